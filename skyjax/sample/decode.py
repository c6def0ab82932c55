"""KV-cache generation compiled as one program: prefill, then a `lax.while_loop` of single-token steps.

    out = generate(adapter, params, inputs, Sampling(max_new_tokens=256, temperature=1.0, num_samples=8), seed=0)
    out.tokens [B*G, N]   out.logprobs [B*G, N]   out.lengths [B*G]   out.stopped [B*G]

- Prompts are LEFT-padded into one batch ([B, S]); every row writes its n-th new token to cache slot S + n and the
  cache's `valid` mask keeps padding out of attention, so prompts of different lengths (and, for Qwen2.5-VL and
  R1V, different images) decode together. Shapes are static: S is a bucket, N = max_new_tokens.
- The model-specific part is a `DecodeAdapter` (skyjax.sample.adapters): prefill and one step.
- Several samples per prompt (G = num_samples, e.g. GRPO's 8): the prompt is prefilled ONCE, then the cache, the
  adapter state and the last logits are repeated G times along the batch. Output row b*G + g is sample g of
  prompt b.
- Sampling follows Hugging Face `generate` (skyjax.sample.processors): repetition penalty, then temperature, top-k,
  top-p, min-p; temperature 0 is greedy. Every control may differ per prompt.
- Rows stop independently at any of `stop_token_ids` (the stop token is kept and counted); the loop ends when all
  rows have stopped or N tokens were produced. Unused token slots hold -1 (logprob 0).
- Randomness: prompt b's sample g at step n uses fold_in(fold_in(prompt_key[b], g), n). The prompt keys default to
  fold_in(key(seed), b); pass `prompt_keys` to make a row's draws independent of its batch (the CLI keys them by
  the input line), so the same seed gives the same samples whatever the batch size or mesh.

Log-probabilities (what GRPO needs as pi_old): `logprobs[r, n]` = log_softmax(RAW model logits)[token], the
unprocessed model at temperature 1 -- no penalty, temperature or truncation -- computed in float32 from the same
forward that chose the token. `sample_logprobs[r, n]` is the log-probability under the PROCESSED distribution the
token was actually drawn from (0 for greedy rows), for importance weights of off-policy samples.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from skyjax.parallel.rules import constrain, current_mesh, logical_to_spec
from skyjax.sample.adapters import DecodeAdapter, Qwen2Adapter, constrain_cache, default_unstack, repeat_cache
from skyjax.sample.processors import ProcessorFlags, process_logits

PAD = -1  # token slot after a row stopped


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token lists -> (ids [B, L], mask [B, L]) padded on the left."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("left_pad: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), bool)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = True
    return ids, mask


def _per_row(name: str, value, batch: int, dtype) -> np.ndarray:
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full((batch,), arr, dtype)
    if arr.shape != (batch,):
        raise ValueError(f"{name}: expected a scalar or one value per prompt ({batch}), got shape {arr.shape}")
    return arr


@dataclasses.dataclass(frozen=True)
class Sampling:
    """Generation controls, Hugging Face semantics. temperature / top_k / top_p / min_p / repetition_penalty are each
    a scalar or a sequence with one value per prompt. Off values: top_k 0, top_p 1, min_p 0, penalty 1;
    temperature 0 = greedy (argmax after the repetition penalty)."""

    max_new_tokens: int = 256
    temperature: Any = 0.0
    top_k: Any = 0
    top_p: Any = 1.0
    min_p: Any = 0.0
    repetition_penalty: Any = 1.0
    stop_token_ids: tuple[int, ...] = ()
    num_samples: int = 1

    def __post_init__(self):
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not np.isscalar(value):
                object.__setattr__(self, name, tuple(np.asarray(value).tolist()))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if int(self.max_new_tokens) < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if int(self.num_samples) < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        checks = {
            "temperature": (lambda a: a >= 0, ">= 0 (0 = greedy)"),
            "top_k": (lambda a: (a >= 0) & (a == np.round(a)), "a non-negative integer (0 = off)"),
            "top_p": (lambda a: (a >= 0) & (a <= 1), "in [0, 1] (1 = off)"),
            "min_p": (lambda a: (a >= 0) & (a <= 1), "in [0, 1] (0 = off)"),
            "repetition_penalty": (lambda a: a > 0, "> 0 (1 = off)"),
        }
        for name, (ok, what) in checks.items():
            a = np.asarray(getattr(self, name), np.float64)
            if not np.all(ok(a) & np.isfinite(a)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)}")

    def rows(self, batch: int) -> dict[str, np.ndarray]:
        """[batch] arrays of every per-row control (top-p's threshold 1 - p computed in float64, as HF does)."""
        top_p = _per_row("top_p", self.top_p, batch, np.float64)
        return {
            "temperature": _per_row("temperature", self.temperature, batch, np.float32),
            "top_k": _per_row("top_k", self.top_k, batch, np.float64).astype(np.int32),
            "top_p": top_p.astype(np.float32),
            "one_minus_top_p": (1.0 - top_p).astype(np.float32),
            "min_p": _per_row("min_p", self.min_p, batch, np.float32),
            "repetition_penalty": _per_row("repetition_penalty", self.repetition_penalty, batch, np.float32),
        }


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B*G, N] int32, PAD (-1) after the row stopped
    logprobs: jax.Array  # [B*G, N] float32: raw model log-prob of each token (temperature 1, unprocessed)
    sample_logprobs: jax.Array  # [B*G, N] float32: log-prob under the processed sampling distribution (greedy: 0)
    lengths: jax.Array  # [B*G] int32: tokens produced, the stop token included
    stopped: jax.Array  # [B*G] bool: True = finish_reason 'stop' (a stop token), False = 'length'

    def finish_reasons(self) -> list[str]:
        return ["stop" if s else "length" for s in np.asarray(self.stopped)]

    def token_lists(self) -> list[list[int]]:
        tokens, lengths = np.asarray(self.tokens), np.asarray(self.lengths)
        return [tokens[i, : lengths[i]].tolist() for i in range(tokens.shape[0])]


def _repeat_rows(tree, g: int):
    return jax.tree.map(lambda x: jnp.repeat(x, g, axis=0), tree)


def _mark_seen(seen, token, active):
    rows = jnp.arange(token.shape[0])
    return seen.at[rows, token].max(active)


@partial(jax.jit, static_argnames=("adapter",))
def _decode_weights(adapter: DecodeAdapter, params):
    """The unrolled step's weights, made by a program of their own so that they enter the decode program in the
    layout they were made in (see skyjax.sample.adapters)."""
    return adapter.decode_weights(params)


@partial(jax.jit, static_argnames=("adapter", "max_new_tokens", "num_samples", "flags"))
def _generate(adapter: DecodeAdapter, params, weights, inputs: dict, rows: dict, stop_ids, prompt_keys, *,
              max_new_tokens: int, num_samples: int, flags: ProcessorFlags) -> GenerateOutput:
    ids, mask = inputs["input_ids"], inputs["attention_mask"].astype(bool)
    b, s = ids.shape
    g, n = num_samples, max_new_tokens
    # new token n (0..N-1) is fed back at cache slot S + n (the last one needlessly, which keeps one sampling site)
    logits, cache, state = adapter.prefill(params, inputs, s + n)
    vocab = logits.shape[-1]
    seen = None
    if flags.penalty:  # token ids in each prompt (real tokens only), for the repetition penalty
        seen = jnp.zeros((b, vocab), bool).at[jnp.arange(b)[:, None], jnp.clip(ids, 0, vocab - 1)].max(mask)
    if g > 1:  # several samples per prompt: repeat what the prefill produced instead of recomputing it
        logits, state, rows, seen = _repeat_rows((logits, state, rows, seen), g)
        cache = repeat_cache(cache, g)
    # sample g of prompt b draws with fold_in(prompt_keys[b], g), folded again with the step
    sample_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(g)))(prompt_keys)
    sample_keys = sample_keys.reshape((b * g,) + sample_keys.shape[2:])
    r = b * g
    cache = constrain_cache(cache)
    if seen is not None:
        seen = constrain(seen, ("batch", None))

    def choose(logits, seen, step):
        logits = constrain(logits.astype(jnp.float32), ("batch", None))  # whole vocabulary per row: sort / top-k
        raw = jax.nn.log_softmax(logits, axis=-1)
        penalised, warped = process_logits(logits, seen, rows, flags)
        token = jnp.argmax(penalised, axis=-1).astype(jnp.int32)
        sample_lp = jnp.zeros((r,), jnp.float32)
        if flags.sample:
            keys = jax.vmap(lambda k: jax.random.fold_in(k, step))(sample_keys)
            drawn = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
            sampled = rows["temperature"] > 0
            token = jnp.where(sampled, drawn, token)
            lp = jnp.take_along_axis(jax.nn.log_softmax(warped, axis=-1), token[:, None], axis=-1)[:, 0]
            sample_lp = jnp.where(sampled, lp, 0.0)
        return token, jnp.take_along_axis(raw, token[:, None], axis=-1)[:, 0], sample_lp

    def cond(carry):
        t, _, done = carry[:3]
        return (t < n) & ~jnp.all(done)

    def body(carry):
        t, logits, done, cache, seen, tokens, logprobs, sample_logprobs, lengths = carry
        active = ~done
        new, lp, slp = choose(logits, seen, t)
        tokens = tokens.at[:, t].set(jnp.where(active, new, PAD))
        logprobs = logprobs.at[:, t].set(jnp.where(active, lp, 0.0))
        sample_logprobs = sample_logprobs.at[:, t].set(jnp.where(active, slp, 0.0))
        lengths = lengths + active.astype(jnp.int32)
        if seen is not None:
            seen = _mark_seen(seen, new, active)
        done = done | (active & jnp.isin(new, stop_ids))
        logits, cache = adapter.step(params, weights, new, cache, s + t, state, active)
        return t + 1, logits, done, cache, seen, tokens, logprobs, sample_logprobs, lengths

    carry = (jnp.int32(0), logits, jnp.zeros((r,), bool), cache, seen, jnp.full((r, n), PAD, jnp.int32),
             jnp.zeros((r, n), jnp.float32), jnp.zeros((r, n), jnp.float32), jnp.zeros((r,), jnp.int32))
    _, _, done, _, _, tokens, logprobs, sample_logprobs, lengths = jax.lax.while_loop(cond, body, carry)
    per_row = [constrain(x, ("batch", None)) for x in (tokens, logprobs, sample_logprobs)]
    return GenerateOutput(*per_row, constrain(lengths, ("batch",)), constrain(done, ("batch",)))


def _place(x, axes, mesh, rules):
    """Put a host array on the mesh: batch-sharded when the batch divides the data axes, replicated otherwise."""
    from jax.sharding import NamedSharding

    spec = logical_to_spec(axes, mesh, rules, shape=np.shape(x), strict=False)
    return jax.device_put(x, NamedSharding(mesh, spec))


def _prompt_keys(seed, prompt_keys, batch: int):
    if prompt_keys is not None:
        keys = jnp.asarray(prompt_keys) if not isinstance(prompt_keys, jax.Array) else prompt_keys
        if keys.shape[0] != batch:
            raise ValueError(f"prompt_keys: {keys.shape[0]} keys for {batch} prompts")
        return keys
    key = jax.random.key(seed) if isinstance(seed, (int, np.integer)) else seed
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def generate(adapter: DecodeAdapter, params, inputs: dict, sampling: Sampling = Sampling(), *, seed=0,
             prompt_keys=None, flags: ProcessorFlags | None = None, check: bool = True) -> GenerateOutput:
    """Generate for a LEFT-padded batch `inputs` (from `adapter.prepare`, or any dict with input_ids and
    attention_mask [B, S] plus the model's extra inputs). Runs on the mesh of the enclosing `use_mesh`, if any.

    seed: an int or a jax PRNG key; prompt_keys: [B] keys (one per prompt) instead of deriving them from `seed`.
    flags: processors to compile in even if this batch does not need them (e.g. the repetition penalty when only
    some batches of a file set it), so that every batch runs the same program.
    """
    if check:
        adapter.check(inputs)
    inputs = adapter.device_inputs(inputs)
    b = int(np.shape(inputs["input_ids"])[0])
    rows = sampling.rows(b)
    flags = ProcessorFlags.from_rows(rows["temperature"], rows["top_k"], rows["top_p"], rows["min_p"],
                                     rows["repetition_penalty"], adapter.vocab_size).union(flags)
    stop = list(sampling.stop_token_ids)
    stop_ids = jnp.asarray(stop + [-2] * (-len(stop) % 8 or (8 if not stop else 0)), jnp.int32)  # -2: never drawn
    ctx = current_mesh()
    if ctx is not None:
        mesh, rules = ctx
        inputs = dict(inputs)
        for name in ("input_ids", "attention_mask"):
            inputs[name] = _place(np.asarray(inputs[name]), ("batch", "seq"), mesh, rules)
        rows = {k: _place(v, ("batch",), mesh, rules) for k, v in rows.items()}
    weights = _decode_weights(adapter, params) if adapter.unstack_layers else None
    return _generate(adapter, params, weights, inputs, rows, stop_ids, _prompt_keys(seed, prompt_keys, b),
                     max_new_tokens=int(sampling.max_new_tokens), num_samples=int(sampling.num_samples), flags=flags)


def greedy_generate(fn, params, input_ids, attention_mask, stop_ids, *, max_new_tokens: int):
    """Greedy tokens [B, max_new_tokens] and lengths [B] for a Qwen2 causal LM built by `fn` (the first API, kept
    for skyjax.demo). A row stops after emitting any of `stop_ids` (kept); later slots hold -1."""
    from flax import nnx

    model_cfg = nnx.merge(fn.graphdef, fn.abstract).cfg  # every skyjax model keeps its config as .cfg
    adapter = Qwen2Adapter(fn=fn, config=model_cfg, seq_buckets=None,
                           unstack_layers=default_unstack(model_cfg.num_hidden_layers))
    out = generate(adapter, params, {"input_ids": input_ids, "attention_mask": attention_mask},
                   Sampling(max_new_tokens=max_new_tokens, stop_token_ids=tuple(np.asarray(stop_ids).tolist())),
                   check=False)
    return out.tokens, out.lengths

