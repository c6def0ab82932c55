"""Per-family glue between a model and the generic decode loop (`skyjax.sample.decode.generate`).

A `DecodeAdapter` is the only model-specific part of generation:

    prepare(conversations, images, tokenizer) -> inputs      host: chat template, images, LEFT padding to a bucket
    check(inputs)                                           host: checks jit cannot do (image-token counts)
    prefill(params, inputs, max_len) -> (logits_last [B, V] fp32, cache, state)
    decode_weights(params) -> weights                       once per call, by a program of its own
    step(params, weights, token [R], cache, index, state, active [R]) -> (logits [R, V] fp32, cache)

`inputs` is a dict of arrays with at least `input_ids` and `attention_mask` [B, S] (left-padded, so every row's
last prompt token sits in column S - 1 and every row writes its n-th new token to cache slot S + n); `state` is a
pytree of per-row arrays (batch on axis 0) the step needs besides the cache, e.g. Qwen2.5-VL's M-RoPE deltas.
The loop repeats cache and state along the batch for several samples per prompt, so `state` leaves must all be
batch-major. `index` is the cache slot the token is written to (a scalar, the same for every row).

The scanned step (TPU/GPU default) reads the stacked parameters as they are: slicing a layer is free there and
compile time does not grow with depth. With `unstack_layers` (the default on CPU) `decode_weights(params)` runs once
per generate call, as a jitted program of its own, and copies each layer's weights out of the stacked
([layers, ...]) arrays; the KV cache is kept as one array per layer and the step runs the layers as an unrolled
loop: XLA:CPU otherwise copies every layer's weights (and cache) out of the stacked arrays at every decode step,
which doubles the memory traffic of a step. The copy also stores every matmul kernel of the step (the layers' and
the LM head's) as [out, in] (`out_in_kernels`): a decode matmul has a handful of rows and is bound by reading the
weights, and XLA:CPU's dot streams them ~20-25% faster when each output's weights are contiguous (measured on the
`skyjax.sample.bench` model, batch 8). The step transposes them back, which XLA folds into the dot; inside the
decode program itself XLA would have folded the first transpose into a layout change instead, hence the separate
program. The price is one extra copy of the decoder weights while generating.

Adapters are frozen dataclasses hashed by the model's `Functional` (identity), so they are static arguments of jit.
The families: Qwen2 (text), Qwen2.5-VL (vision tower at prefill, M-RoPE positions) and R1V / InternVL (InternViT
tiles at prefill, then 1-D positions, so its step is the Qwen2 one). A family overrides `prompt_forward` (the prompt
through its model), `prepare` / `check`, and `step` only when its decode positions differ (Qwen2.5-VL).
A new family registers a factory under its architecture name (its skyjax.convert.registry name):
`register_adapter("my_arch", make_adapter)` with `make_adapter(loaded, unstack_layers=None) -> DecodeAdapter`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from skyjax.nn.attention import KVCache
from skyjax.nn.functional import Functional
from skyjax.parallel.rules import constrain

DEFAULT_SEQ_BUCKETS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def _last_logits(model, hidden: jax.Array) -> jax.Array:
    """LM head on the last column only (left padding: every row's last prompt token) -> [B, V] float32."""
    return model.logits(hidden[:, -1:])[:, 0].astype(jnp.float32)


def constrain_cache(cache: KVCache) -> KVCache:
    """Batch-shard the cache (and heads over tensor) by the logical rules, whatever the model's last op left.
    k / v are stacked [layers, B, K, T, D] arrays or (unstacked) tuples of [B, K, T, D] arrays."""
    valid = constrain(cache.valid, ("batch", "kv_seq"))
    if isinstance(cache.k, tuple):
        axes = ("batch", "kv_heads", "kv_seq", "head_dim")
        return KVCache(tuple(constrain(k, axes) for k in cache.k), tuple(constrain(v, axes) for v in cache.v), valid)
    axes = ("layers", "batch", "kv_heads", "kv_seq", "head_dim")
    return KVCache(constrain(cache.k, axes), constrain(cache.v, axes), valid)


def repeat_cache(cache: KVCache, g: int) -> KVCache:
    """Each row of the cache g times in a row (several samples per prompt)."""
    if isinstance(cache.k, tuple):
        k, v = (tuple(jnp.repeat(a, g, axis=0) for a in x) for x in (cache.k, cache.v))
    else:
        k, v = jnp.repeat(cache.k, g, axis=1), jnp.repeat(cache.v, g, axis=1)
    return KVCache(k, v, jnp.repeat(cache.valid, g, axis=0))


def unstack_cache(cache: KVCache) -> KVCache:
    """Stacked [layers, ...] k / v -> tuples of per-layer arrays."""
    n = cache.k.shape[0]
    return KVCache(tuple(cache.k[i] for i in range(n)), tuple(cache.v[i] for i in range(n)), cache.valid)


def layer_states(layers: nnx.Module) -> list:
    """Per-layer parameter states of a stacked layer module (copies, made once)."""
    _, state = nnx.split(layers)
    n = jax.tree.leaves(state)[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], state) for i in range(n)]


def out_in_kernels(tree):
    """Every 2-D `kernel` leaf of a parameter tree transposed: Linear's [in, out] <-> [out, in] (its own inverse)."""

    def swap(path, a):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return a.T if keys and keys[-1] == "kernel" and a.ndim == 2 else a

    return jax.tree_util.tree_map_with_path(swap, tree)


def decoder_step_unrolled(decoder, layer_states: list, x, cos, sin, active, cache: KVCache, index):
    """`Qwen2Model.__call__` for one new token per row: x [R, 1, E] (embedded), cos / sin [R, 1, head_dim], with
    per-layer weights and caches, layers unrolled. Returns (final-norm hidden [R, 1, E], cache)."""
    from skyjax.models.qwen2 import attention_mask_for

    valid = jax.lax.dynamic_update_slice(cache.valid, active[:, None], (0, index))
    mask = attention_mask_for(jnp.arange(1) + index, jnp.arange(valid.shape[1]), valid, None)
    graphdef = nnx.graphdef(decoder.layers)
    ks, vs = [], []
    for state, k, v in zip(layer_states, cache.k, cache.v):
        x, (k, v) = nnx.merge(graphdef, state)(x, cos, sin, mask, (k, v), index)
        ks.append(k)
        vs.append(v)
    return decoder.norm(x), KVCache(tuple(ks), tuple(vs), valid)


def positions_before(valid: jax.Array, index) -> jax.Array:
    """[R, 1]: real tokens in the cache before slot `index` (the 1-D position of the token written there)."""
    return jnp.sum(valid & (jnp.arange(valid.shape[1]) < index)[None], axis=1, dtype=jnp.int32)[:, None]


def left_pad_to_bucket(rows: Sequence[np.ndarray], pad_id: int, buckets: Sequence[int] | None) -> dict:
    """Token rows -> {'input_ids' [B, L] int32, 'attention_mask' [B, L] bool}, padded on the left to a bucket."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(r) for r in rows)
    width = longest
    if buckets is not None:
        fitting = [b for b in sorted(buckets) if b >= longest]
        if not fitting:
            raise ValueError(f"a prompt has {longest} tokens, more than the largest sequence bucket {max(buckets)}")
        width = fitting[0]
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return {"input_ids": ids, "attention_mask": mask}


@dataclasses.dataclass(frozen=True)
class DecodeAdapter:
    """Base class: a text-only causal LM with 1-D positions (Qwen2). Subclasses override what differs.

    `config` is the model's frozen config dataclass (hashable, so the adapter is a valid static jit argument)."""

    fn: Functional
    config: Any
    seq_buckets: tuple[int, ...] | None = DEFAULT_SEQ_BUCKETS
    unstack_layers: bool = False  # see the module docstring; `adapter_for` turns it on for CPU

    name = "causal_lm"
    supports_images = False
    host_inputs = ()  # entries of `prepare`'s dict that only `check` reads (see device_inputs); not a field

    @property
    def text_config(self):
        return getattr(self.config, "text", self.config)

    @property
    def vocab_size(self) -> int:
        return self.text_config.vocab_size

    # --- host side -----------------------------------------------------------------------------------------------
    def prepare(self, conversations: Sequence[Sequence[dict]], images: Sequence[Sequence[Any]], tokenizer) -> dict:
        """Chat-template the conversations (with the generation prompt) and left-pad them to a sequence bucket.
        A ValueError names the row (index into `conversations`)."""
        from skyjax.data.chat import format_conversation

        rows = []
        for i, (messages, imgs) in enumerate(zip(conversations, images)):
            if imgs:
                raise ValueError(f"row {i}: {len(imgs)} image(s), but {self.name} is a text-only model")
            try:
                rows.append(format_conversation(tokenizer, messages, num_image_tokens=[],
                                                add_generation_prompt=True).input_ids)
            except ValueError as e:
                raise type(e)(f"row {i}: {e}") from None
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = self.text_config.pad_token_id or 0
        return left_pad_to_bucket(rows, pad, self.seq_buckets)

    def check(self, inputs: dict) -> None:
        ids, mask = np.asarray(inputs["input_ids"]), np.asarray(inputs["attention_mask"]).astype(bool)
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"input_ids {ids.shape} and attention_mask {mask.shape} must both be [batch, seq]")
        bad = np.flatnonzero(mask.any(axis=1) & ~mask[:, -1])
        if bad.size:
            raise ValueError(f"prompts must be LEFT-padded: rows {bad.tolist()} do not end in the last column")

    # --- inside jit ----------------------------------------------------------------------------------------------
    def decoder(self, model):
        """The Qwen2Model-like text decoder (embed_tokens, stacked layers, norm) of a bound model."""
        return model.model

    def last_logits(self, model, hidden: jax.Array) -> jax.Array:
        """float32 logits [B, V] of the last column of final-norm hidden states [B, S, E]."""
        return _last_logits(model, hidden)

    def decode_weights(self, params):
        """What the unrolled step reads instead of the stacked parameters (None for the scanned step): each layer's
        weights and the LM head's kernel, matmul kernels stored [out, in] (see the module docstring). Runs once
        per generate call as a program of its own (`skyjax.sample.decode`)."""
        if not self.unstack_layers:
            return None
        model = self.fn.bind(params)
        head = getattr(model, "lm_head", None)  # None when tied: the embedding is [vocab, embed] already
        return {"layers": [out_in_kernels(s) for s in layer_states(self.decoder(model).layers)],
                "lm_head": None if head is None else head.kernel[...].T}

    def decode_cache(self, cache: KVCache) -> KVCache:
        """The prefill's (stacked) cache in the form `step` takes."""
        return unstack_cache(cache) if self.unstack_layers else cache

    def device_inputs(self, inputs: dict) -> dict:
        """The part of `inputs` that `prefill` reads (what goes into jit); host-only entries that only `check`
        reads (`host_inputs`) are dropped, so they cannot change the compiled program's signature."""
        return {k: v for k, v in inputs.items() if k not in self.host_inputs}

    def prefill(self, params, inputs: dict, max_len: int):
        """The prompt into an empty cache of `max_len` slots -> (last logits [B, V] fp32, cache for `step`, state)."""
        model = self.fn.bind(params)
        cache = model.init_cache(inputs["input_ids"].shape[0], max_len)
        hidden, cache, state = self.prompt_forward(model, inputs, cache)
        return self.last_logits(model, hidden), self.decode_cache(cache), state

    def prompt_forward(self, model, inputs: dict, cache: KVCache):
        """The family's forward over the whole prompt, writing slots 0..S-1 of `cache` -> (final-norm hidden
        [B, S, E], cache, state). Text-only: positions default to the count of real tokens before each token."""
        hidden, cache = self.decoder(model)(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                            cache=cache, cache_index=0)
        return hidden, cache, {}

    def step(self, params, weights, token, cache, index, state, active):
        if self.unstack_layers:
            return self._unrolled_step(params, weights, token, cache, index,
                                       self.rope(positions_before(cache.valid, index)), active)
        model = self.fn.bind(params)
        # positions default to the count of valid cache slots before the token: real tokens only, so left
        # padding does not shift them (what HF computes from cumsum(attention_mask) - 1)
        hidden, cache = self.decoder(model)(token[:, None], attention_mask=active[:, None], cache=cache,
                                            cache_index=index)
        return self.last_logits(model, hidden), cache

    def rope(self, positions):
        from skyjax.nn.rotary import rope_cos_sin

        cfg = self.text_config
        return rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta)

    def _unrolled_step(self, params, weights, token, cache, index, rope, active):
        """The step on the unstacked `weights` (`decode_weights`); `rope` = (cos, sin) [R, 1, head_dim]. The bound
        model's decoder and head come from `decoder` / `last_logits`, which a family may override. Kernels come
        back from [out, in] by a transpose that XLA folds into each dot."""
        if weights["lm_head"] is not None:
            params = {**params, "lm_head": {**params["lm_head"], "kernel": weights["lm_head"].T}}
        model = self.fn.bind(params)
        decoder = self.decoder(model)
        layers = [out_in_kernels(state) for state in weights["layers"]]
        hidden, cache = decoder_step_unrolled(decoder, layers, decoder.embed_tokens(token[:, None]), *rope, active,
                                              cache, index)
        return self.last_logits(model, hidden), cache


@dataclasses.dataclass(frozen=True)
class Qwen2Adapter(DecodeAdapter):
    name = "qwen2"


@dataclasses.dataclass(frozen=True)
class Qwen2_5_VLAdapter(DecodeAdapter):
    """Images through the vision tower at prefill; M-RoPE positions for the prompt, and for each new token
    (real tokens before it) + rope_delta on all three axes (`decode_positions`: what HF generate does)."""

    image_cfg: Any = None  # skyjax.data.qwen_vl_image.QwenVLImageConfig

    name = "qwen2_5_vl"
    supports_images = True

    def prepare(self, conversations, images, tokenizer) -> dict:
        from skyjax.models.qwen2_5_vl_inputs import Buckets, prepare_vl_batch

        batch = prepare_vl_batch(conversations, images, tokenizer, self.image_cfg, self.config.vision,
                                 add_generation_prompt=True, pad_side="left", buckets=Buckets(seq=self.seq_buckets))
        return {"input_ids": batch.input_ids, **batch.model_kwargs()}

    def check(self, inputs: dict) -> None:
        super().check(inputs)
        from skyjax.models.qwen2_5_vl import ImageTokenMismatchError, check_image_tokens
        from skyjax.nn.mrope import check_mrope_inputs, mm_token_types

        cfg = self.config
        ids = np.asarray(inputs["input_ids"])
        if inputs.get("pixel_values") is None:
            n = int(np.sum(ids == cfg.image_token_id))
            if n:
                raise ImageTokenMismatchError(f"{n} <|image_pad|> placeholder tokens but no pixel_values were given")
            return
        grid = np.asarray(inputs["image_grid_thw"])
        check_image_tokens(ids, grid, cfg.image_token_id, cfg.vision.spatial_merge_size)
        check_mrope_inputs(np.asarray(mm_token_types(ids, cfg.image_token_id, cfg.video_token_id)),
                           np.asarray(inputs["attention_mask"]), grid, spatial_merge_size=cfg.vision.spatial_merge_size)

    def prompt_forward(self, model, inputs: dict, cache: KVCache):
        from skyjax.nn.mrope import mm_token_types, mrope_positions

        cfg = self.config
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        types = mm_token_types(ids, cfg.image_token_id, cfg.video_token_id)
        positions, deltas = mrope_positions(types, mask, inputs.get("image_grid_thw"),
                                            spatial_merge_size=cfg.vision.spatial_merge_size, validate=False)
        kw = {k: inputs[k] for k in ("pixel_values", "vision_meta", "image_grid_thw") if inputs.get(k) is not None}
        hidden, cache = model.hidden_states(ids, attention_mask=mask, positions=positions, cache=cache,
                                            cache_index=0, **kw)
        num_pad = ids.shape[1] - jnp.sum(mask, axis=1, dtype=jnp.int32)
        return hidden, cache, {"rope_deltas": deltas[:, 0], "num_pad": num_pad}

    def step(self, params, weights, token, cache, index, state, active):
        from skyjax.nn.mrope import decode_positions, mrope_cos_sin

        positions = decode_positions(index, state["rope_deltas"], num_pad=state["num_pad"])  # [3, R, 1]
        if self.unstack_layers:
            cfg = self.config
            rope = mrope_cos_sin(positions, cfg.text.head_dim, cfg.text.rope_theta, cfg.mrope_section)
            return self._unrolled_step(params, weights, token, cache, index, rope, active)
        model = self.fn.bind(params)
        hidden, cache = model.hidden_states(token[:, None], attention_mask=active[:, None], positions=positions,
                                            cache=cache, cache_index=index)
        return self.last_logits(model, hidden), cache


@dataclasses.dataclass(frozen=True)
class R1VAdapter(DecodeAdapter):
    """Skywork R1V / InternVL (`R1VForConditionalGeneration`): at prefill the tiles go through InternViT -> pixel
    shuffle -> projector and overwrite the <IMG_CONTEXT> embeddings; positions are 1-D (real tokens before each
    token, what HF generate computes from the attention mask), so every decode step is the Qwen2 one."""

    image_cfg: Any = None  # skyjax.data.internvl_image.InternVLImageConfig (dynamic tiling)

    name = "r1v"
    supports_images = True
    host_inputs = ("tiles_per_row",)  # for the per-row <IMG_CONTEXT> count check; the model needs only the tiles

    def prepare(self, conversations, images, tokenizer) -> dict:
        """Tiles per image (thumbnail last), `<image>` -> `<img>` + `<IMG_CONTEXT>` x (tokens per tile x tiles) +
        `</img>`, left padding to a sequence bucket and the batch's tiles (row after row) to a tile bucket."""
        from skyjax.models.r1v_inputs import Buckets, prepare_r1v_batch

        batch = prepare_r1v_batch(conversations, images, tokenizer, self.config, self.image_cfg,
                                  add_generation_prompt=True, pad_side="left", buckets=Buckets(seq=self.seq_buckets))
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        if batch.pixel_values is not None:
            inputs.update(pixel_values=batch.pixel_values, tiles_per_row=batch.tiles_per_row)
        return inputs

    def check(self, inputs: dict) -> None:
        super().check(inputs)
        from skyjax.models.r1v import IMAGE_TOKEN, ImageTokenMismatchError, check_image_tokens

        cfg = self.config
        ids = np.asarray(inputs["input_ids"])
        pixels = inputs.get("pixel_values")
        if cfg.image_token_id is None:
            if pixels is not None:
                raise ValueError("image_token_id is unknown (no <IMG_CONTEXT> in the checkpoint's tokenizer); "
                                 "set R1VConfig.image_token_id")
            return
        if pixels is None:
            n = int(np.sum(ids == cfg.image_token_id))
            if n:
                raise ImageTokenMismatchError(f"{n} {IMAGE_TOKEN} placeholder tokens but no pixel_values were given")
            return
        tiles = inputs.get("tiles_per_row")
        check_image_tokens(ids, None if tiles is None else np.asarray(tiles), cfg.image_token_id,
                           cfg.tokens_per_tile, int(np.shape(pixels)[0]))

    def prompt_forward(self, model, inputs: dict, cache: KVCache):
        hidden, cache = model.hidden_states(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                            pixel_values=inputs.get("pixel_values"), cache=cache, cache_index=0)
        return hidden, cache, {}


MAX_UNSTACKED_LAYERS = 48  # deeper models keep the scanned step (compile time grows with unrolled depth)


def default_unstack(num_layers: int) -> bool:
    """Unstack on CPU (see the module docstring), where the scanned step copies every layer's weights each step."""
    return jax.default_backend() == "cpu" and num_layers <= MAX_UNSTACKED_LAYERS


def _common(loaded, unstack_layers: bool | None) -> dict:
    """The adapter fields every family sets the same way (unstack_layers None = `default_unstack`)."""
    text = getattr(loaded.config, "text", loaded.config)
    unstack = default_unstack(text.num_hidden_layers) if unstack_layers is None else unstack_layers
    return dict(fn=loaded.fn, config=loaded.config, unstack_layers=unstack)


def _qwen2(loaded, unstack_layers: bool | None = None) -> DecodeAdapter:
    return Qwen2Adapter(**_common(loaded, unstack_layers))


def _qwen2_5_vl(loaded, unstack_layers: bool | None = None) -> DecodeAdapter:
    from skyjax.data.qwen_vl_image import QwenVLImageConfig

    return Qwen2_5_VLAdapter(**_common(loaded, unstack_layers), image_cfg=QwenVLImageConfig.from_folder(loaded.folder))


def _r1v(loaded, unstack_layers: bool | None = None) -> DecodeAdapter:
    """Both InternVL layouts (native `internvl`, remote-code `internvl_chat`): one model, one adapter. Tiling
    follows the model config (tile size, min/max_dynamic_patch, use_thumbnail), as R1V's own inference code."""
    return R1VAdapter(**_common(loaded, unstack_layers), image_cfg=loaded.config.image_config())


ADAPTERS: dict[str, Callable[..., DecodeAdapter]] = {"qwen2": _qwen2, "qwen2_5_vl": _qwen2_5_vl,
                                                     "internvl": _r1v, "internvl_chat": _r1v}


def register_adapter(arch_name: str, factory: Callable[..., DecodeAdapter]) -> None:
    """`factory(loaded_model, unstack_layers=None) -> DecodeAdapter` for the architecture `arch_name` (its
    skyjax.convert.registry name); unstack_layers None = `default_unstack`."""
    ADAPTERS[arch_name] = factory


def adapter_for(loaded, unstack_layers: bool | None = None) -> DecodeAdapter:
    """The adapter of a `LoadedModel` (from `skyjax.convert.checkpoint.load_model`), by its architecture name.
    unstack_layers: None = automatic (CPU: yes), True / False to force the unrolled or the scanned decode step."""
    name = loaded.arch.name
    if name not in ADAPTERS:
        raise ValueError(f"generation is not supported for architecture {name!r} (supported: {', '.join(ADAPTERS)})")
    return ADAPTERS[name](loaded, unstack_layers=unstack_layers)
