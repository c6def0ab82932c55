"""InternVL / Skywork R1V <-> skyjax: both Hugging Face layouts, export to either, and LLM-swap assembly.

Two architectures share one model (`R1VForConditionalGeneration`) and differ only in their key maps:

- ``internvl``: transformers-native `InternVLForConditionalGeneration` (on disk `vision_tower.*`,
  `multi_modal_projector.*`, `language_model.model.*`, `language_model.lm_head.weight`; the in-memory names
  `model.vision_tower.*`, `model.multi_modal_projector.*`, `model.language_model.*`, `lm_head.weight` as aliases).
- ``internvl_chat``: the remote-code InternVL-chat / Skywork-R1V layout (`vision_model.*` with a fused `attn.qkv`,
  `mlp1.{0,1,3}`, `language_model.*`). Nothing from the folder is executed; only config.json and safetensors are read.

The remote layout's config.json has no <IMG_CONTEXT> id: it is read from the folder's tokenizer on conversion.
`export_internvl` writes the native layout by default (what `InternVLForConditionalGeneration.from_pretrained` loads)
or, with ``layout="remote"``, the remote-code layout with a matching config.json.

`assemble` is the R1V efficient-transfer recipe: the vision encoder + projector of one checkpoint with the Qwen2 LLM of
another (`skyjax assemble --vision SRC1 --llm SRC2 DST`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from skyjax.convert.keymap import CONV_DENSE, COPY, KeyRule, Transform, linear, norm, qwen2_decoder_rules
from skyjax.convert.registry import Architecture, register
from skyjax.convert.safetensors_io import CheckpointError
from skyjax.models.r1v import R1VConfig, R1VForConditionalGeneration

LAYOUTS = ("native", "remote")
REMOTE_ARCHITECTURES = ("SkyworkR1VChatModel", "InternVLChatModel", "SkyworkChatModel")


class AssemblyError(CheckpointError):
    """The vision side and the LLM side of an assembly do not fit together."""


# --- the fused qkv of the remote layout -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FusedPart(Transform):
    """One of `parts` equal row blocks of a fused torch tensor (the remote `attn.qkv` weight (3E, E) or bias (3E,)):
    part 0 is q, 1 k, 2 v. `name` is the transform of the block itself ('linear' or 'copy'); `to_hf` gives the
    block, and `export_internvl` concatenates the parts."""

    part: int = 0
    parts: int = 3

    def _block(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0] // self.parts
        return x[self.part * n:(self.part + 1) * n]

    def to_ours(self, x, our_shape):
        return super().to_ours(self._block(x), our_shape)

    def matches(self, hf_shape, our_shape) -> bool:
        hf_shape = tuple(hf_shape)
        return bool(hf_shape) and hf_shape[0] % self.parts == 0 and super().matches(
            (hf_shape[0] // self.parts, *hf_shape[1:]), our_shape)

    def expected_hf(self, our_shape) -> str:
        block = Transform(self.name).expected_hf(our_shape)
        return f"{self.parts} row blocks of {block}"


# --- key maps ---------------------------------------------------------------------------------------------------------


def internvl_rules(cfg: R1VConfig, layout: str = "native") -> list[KeyRule]:
    """Our parameters <- the Hugging Face tensors of `layout` ('native' with in-memory aliases, or 'remote')."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
    v = cfg.vision
    ln_bias = v.norm_type == "layer_norm"
    remote = layout == "remote"
    if remote:
        emb, blk = "vision_model.embeddings", "vision_model.encoder.layers.{i}"
        names = dict(patch=f"{emb}.patch_embedding", cls=f"{emb}.class_embedding", pos=f"{emb}.position_embedding",
                     norm1=f"{blk}.norm1", norm2=f"{blk}.norm2", ls1=f"{blk}.ls1", ls2=f"{blk}.ls2",
                     q_norm=f"{blk}.attn.q_norm", k_norm=f"{blk}.attn.k_norm", proj=f"{blk}.attn.proj",
                     fc1=f"{blk}.mlp.fc1", fc2=f"{blk}.mlp.fc2", pnorm="mlp1.0", lin1="mlp1.1", lin2="mlp1.3")
        al = lambda name: []  # noqa: E731
    else:
        emb, blk = "vision_tower.embeddings", "vision_tower.encoder.layer.{i}"
        names = dict(patch=f"{emb}.patch_embeddings.projection", cls=f"{emb}.cls_token",
                     pos=f"{emb}.position_embeddings", norm1=f"{blk}.layernorm_before",
                     norm2=f"{blk}.layernorm_after", ls1=f"{blk}.lambda_1", ls2=f"{blk}.lambda_2",
                     q_norm=f"{blk}.attention.q_norm", k_norm=f"{blk}.attention.k_norm",
                     proj=f"{blk}.attention.projection_layer", fc1=f"{blk}.mlp.fc1", fc2=f"{blk}.mlp.fc2",
                     pnorm="multi_modal_projector.layer_norm", lin1="multi_modal_projector.linear_1",
                     lin2="multi_modal_projector.linear_2")
        al = lambda name: [f"model.{name}"]  # noqa: E731  (transformers >= 4.52 in-memory names)

    def one(path: str, hf: str, transform: Transform = COPY) -> KeyRule:
        return KeyRule(path, hf, transform, tuple(al(hf)))

    t = "vision_tower"
    rules = [one(f"{t}/embeddings/patch_embedding/kernel", f"{names['patch']}.weight", CONV_DENSE),
             one(f"{t}/embeddings/patch_embedding/bias", f"{names['patch']}.bias"),
             one(f"{t}/embeddings/class_embedding", names["cls"]),
             one(f"{t}/embeddings/position_embedding", names["pos"])]
    lay = f"{t}/layers"
    for ours in ("norm1", "norm2"):
        rules += norm(f"{lay}/{ours}", names[ours], bias=ln_bias, aliases=al(names[ours]))
    rules += [one(f"{lay}/ls1", names["ls1"]), one(f"{lay}/ls2", names["ls2"])]
    if v.qk_normalization:
        for ours in ("q_norm", "k_norm"):
            rules += norm(f"{lay}/attn/{ours}", names[ours], aliases=al(names[ours]))
    for part, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if remote:
            rules.append(KeyRule(f"{lay}/attn/{proj}/kernel", f"{blk}.attn.qkv.weight", FusedPart("linear", part)))
            if v.qkv_bias:
                rules.append(KeyRule(f"{lay}/attn/{proj}/bias", f"{blk}.attn.qkv.bias", FusedPart("copy", part)))
        else:
            hf = f"{blk}.attention.{proj}"
            rules += linear(f"{lay}/attn/{proj}", hf, bias=v.qkv_bias, aliases=al(hf))
    rules += linear(f"{lay}/attn/proj", names["proj"], bias=True, aliases=al(names["proj"]))
    for fc in ("fc1", "fc2"):
        rules += linear(f"{lay}/mlp/{fc}", names[fc], bias=True, aliases=al(names[fc]))
    rules += norm("projector/layer_norm", names["pnorm"], bias=True, aliases=al(names["pnorm"]))
    rules += linear("projector/linear_1", names["lin1"], bias=True, aliases=al(names["lin1"]))
    rules += linear("projector/linear_2", names["lin2"], bias=True, aliases=al(names["lin2"]))
    # the LLM: the same on disk in both layouts
    rules += qwen2_decoder_rules("model", "language_model.model", aliases=() if remote else ("model.language_model",))
    if not cfg.text.tie_word_embeddings:
        rules += linear("lm_head", "language_model.lm_head", aliases=() if remote else ("lm_head",))
    return rules


# --- architectures ----------------------------------------------------------------------------------------------------


def _is_native(c: dict) -> bool:
    return c.get("model_type") == "internvl" or "InternVLForConditionalGeneration" in (c.get("architectures") or [])


def _is_remote(c: dict) -> bool:
    archs = c.get("architectures") or []
    return "llm_config" in c and (c.get("model_type") == "internvl_chat"
                                  or any(a in archs for a in REMOTE_ARCHITECTURES))


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _tokenizer_image_id(folder: Path) -> int | None:
    """<IMG_CONTEXT>'s id in the folder's tokenizer files (None when there is no tokenizer or no such token)."""
    if not _has_tokenizer(folder):
        return None
    from skyjax.data.tokenizer import load_tokenizer
    from skyjax.models.r1v import IMAGE_TOKEN

    try:
        vocab = load_tokenizer(folder).get_vocab()
    except ValueError:
        return None
    return vocab.get(IMAGE_TOKEN)


@dataclasses.dataclass(frozen=True)
class InternVLArchitecture(Architecture):
    """An Architecture whose config needs the folder's tokenizer and whose export can write either layout."""

    layout: str = "native"

    def complete_config(self, cfg: R1VConfig, folder: Path) -> R1VConfig:
        """Fill (remote) or check (native) the <IMG_CONTEXT> id against the checkpoint's tokenizer."""
        token_id = _tokenizer_image_id(Path(folder))
        if token_id is None:
            return cfg
        if cfg.image_token_id is None:
            return dataclasses.replace(cfg, image_token_id=int(token_id))
        if cfg.image_token_id != token_id:
            raise CheckpointError(f"{folder}: config.json's image_token_id {cfg.image_token_id} is not the "
                                  f"tokenizer's <IMG_CONTEXT> id {token_id}")
        return cfg

    def export_hf(self, model, dst, dtype=None, max_shard_bytes: int = 2 * 1024**3, layout: str | None = None):
        return export_internvl(model, dst, layout=layout or "native", dtype=dtype, max_shard_bytes=max_shard_bytes)


def _build(cfg, rngs):
    return R1VForConditionalGeneration(cfg, rngs=rngs)


NATIVE = InternVLArchitecture(name="internvl", config_cls=R1VConfig, build=_build,
                              rules=lambda cfg: internvl_rules(cfg, "native"), matches=_is_native,
                              ignore_keys=(r"(language_model\.)?lm_head\.weight",), layout="native")
REMOTE = InternVLArchitecture(name="internvl_chat", config_cls=R1VConfig, build=_build,
                              rules=lambda cfg: internvl_rules(cfg, "remote"), matches=_is_remote,
                              ignore_keys=(r"language_model\.lm_head\.weight",), layout="remote")
register(NATIVE)
register(REMOTE)


# --- export -----------------------------------------------------------------------------------------------------------


def _write(params: dict, rules: Sequence[KeyRule], writer, dtype, hf_shapes: dict) -> list[str]:
    """Like `export_params`, but fused tensors (FusedPart rules sharing one name) are concatenated per layer."""
    import jax

    from skyjax.convert.hf_params import CheckpointMismatchError, _flat_paths

    flat = _flat_paths(params)
    missing = sorted({r.path for r in rules} - set(flat))
    if missing:
        raise CheckpointMismatchError("parameters missing for export: " + ", ".join(missing))
    fused: dict[str, dict[int, np.ndarray]] = {}
    written = []
    for rule in rules:
        arr = flat[rule.path]
        layers = range(arr.shape[0]) if rule.stacked else [None]
        for layer in layers:
            host = np.asarray(jax.device_get(arr[layer] if layer is not None else arr))
            if dtype is not None:
                host = host.astype(dtype)
            name = rule.hf.format(i=layer) if layer is not None else rule.hf
            value = rule.transform.to_hf(host, hf_shapes.get(name))
            if isinstance(rule.transform, FusedPart):
                parts = fused.setdefault(name, {})
                parts[rule.transform.part] = value
                if len(parts) < rule.transform.parts:
                    continue
                value = np.concatenate([parts[k] for k in range(rule.transform.parts)], axis=0)
                del fused[name]
            writer.add(name, value)
            written.append(name)
    if fused:
        raise CheckpointMismatchError(f"incomplete fused tensors: {sorted(fused)}")
    return written


def export_internvl(model, dst, layout: str = "native", dtype: str | None = None,
                    max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write a Hugging Face folder in `layout`: 'native' (transformers' InternVLForConditionalGeneration) or
    'remote' (InternVL-chat / Skywork-R1V remote code). Tensors are gathered one (layer) at a time."""
    from skyjax.convert.checkpoint import copy_side_files
    from skyjax.convert.safetensors_io import SafetensorsWriter

    if layout not in LAYOUTS:
        raise CheckpointError(f"export layout {layout!r} is not one of {LAYOUTS}")
    cfg: R1VConfig = model.config
    dst = Path(dst)
    out_dtype = np.dtype(dtype or cfg.param_dtype)
    source = dict(model.hf_config or {})
    if layout == "native":
        if cfg.image_token_id is None:
            raise CheckpointError("native InternVL config.json needs image_token_id, which this model does not "
                                  "know (convert from a folder with the tokenizer, or set it)")
        hf_config = cfg.to_hf()  # raises for ps_version v1 / force_image_size
        if _is_native(source):  # keep the source's other keys (e.g. generation settings)
            hf_config = {**{k: v for k, v in source.items() if k not in ("dtype",)}, **hf_config}
    else:
        hf_config = cfg.to_remote()
        if _is_remote(source):  # keep auto_map, template, architectures, ... of the original remote checkpoint
            keep = {k: v for k, v in source.items() if k not in ("dtype",)}
            hf_config = {**keep, **hf_config, "architectures": keep.get("architectures", hf_config["architectures"])}
    hf_config["torch_dtype"] = str(out_dtype)
    dst.mkdir(parents=True, exist_ok=True)
    with SafetensorsWriter(dst, max_shard_bytes=max_shard_bytes) as writer:
        _write(model.params, internvl_rules(cfg, layout), writer, out_dtype, R1VConfig.hf_tensor_shapes(cfg))
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    copy_side_files(model.folder, dst)
    return dst


# --- assembly: vision encoder + projector of one checkpoint, Qwen2 LLM of another -------------------------------------


def _llm_part(model) -> tuple:
    """(Qwen2Config, params {'model': ..., ['lm_head': ...]}) of a Qwen2 or InternVL/R1V model."""
    from skyjax.models.qwen2 import Qwen2Config

    cfg = model.config
    if isinstance(cfg, Qwen2Config):
        text = cfg
    elif isinstance(cfg, R1VConfig):
        text = cfg.text
    else:
        raise AssemblyError(f"{model.folder}: a {model.arch.name} model has no Qwen2 LLM to take")
    params = {"model": model.params["model"]}
    if not text.tie_word_embeddings:
        params["lm_head"] = model.params["lm_head"]
    return text, params


def assemble(vision_src, llm_src, dst=None, mesh=None, tokenizer_from: str = "llm"):
    """An R1V model from the vision tower + projector of `vision_src` (an InternVL / R1V folder or skyjax checkpoint)
    and the Qwen2 LLM of `llm_src` (a Qwen2 or InternVL/R1V folder or checkpoint). With `dst`, it is saved there as a
    skyjax checkpoint with the tokenizer files of `tokenizer_from` ('llm' or 'vision'). Returns the LoadedModel.

    The projector's output width must equal the LLM's hidden size; the <IMG_CONTEXT> id comes from the chosen
    tokenizer (None if it has no such token; the vision checkpoint's config when that side has no tokenizer at all)
    and must lie inside the LLM's vocabulary.
    """
    from skyjax.convert.checkpoint import LoadedModel, load_model, save_checkpoint
    from skyjax.nn.functional import Functional

    if tokenizer_from not in ("llm", "vision"):
        raise ValueError(f"tokenizer_from {tokenizer_from!r} is not 'llm' or 'vision'")
    vis = load_model(vision_src, mesh=mesh)
    if not isinstance(vis.config, R1VConfig):
        raise AssemblyError(f"{vision_src}: a {vis.arch.name} model has no InternViT vision tower")
    llm = load_model(llm_src, mesh=mesh)
    text, llm_params = _llm_part(llm)
    width = int(vis.params["projector"]["linear_2"]["kernel"].shape[1])
    if width != text.hidden_size:
        raise AssemblyError(f"the projector of {vision_src} outputs width {width} but the LLM of {llm_src} has hidden "
                            f"size {text.hidden_size}: they cannot be joined")
    side = Path(llm.folder if tokenizer_from == "llm" else vis.folder)
    # the carried tokenizer decides; a tokenizer without <IMG_CONTEXT> (a plain LLM's) leaves the id unknown (None:
    # the model refuses images until the InternVL tokens are added and the id set) rather than borrowing the vision
    # checkpoint's id, which may name another token in this vocabulary
    token_id = _tokenizer_image_id(side) if _has_tokenizer(side) else vis.config.image_token_id
    if token_id is not None and not 0 <= token_id < text.vocab_size:
        raise AssemblyError(f"<IMG_CONTEXT> id {token_id} is outside the LLM's vocabulary ({text.vocab_size} rows)")
    runtime = {k: getattr(vis.config.vision, k) for k in ("dtype", "param_dtype")}
    if (text.dtype, text.param_dtype) != (runtime["dtype"], runtime["param_dtype"]):
        text = dataclasses.replace(text, **runtime)
    cfg = dataclasses.replace(vis.config, text=text, image_token_id=token_id)
    params = {"vision_tower": vis.params["vision_tower"], "projector": vis.params["projector"], **llm_params}
    import jax

    params = jax.tree.map(lambda a: a.astype(runtime["param_dtype"]), params)
    arch = vis.arch
    fn = Functional.create(lambda r: arch.build(cfg, r))
    hf_config = cfg.to_remote() if arch.layout == "remote" else cfg.to_hf() if cfg.ps_version == "v2" else {}
    out = LoadedModel(arch, cfg, fn, params, side, hf_config)
    if dst is not None:
        save_checkpoint(dst, out, side_files_from=side)
    return out


# --- CLI: skyjax assemble ---------------------------------------------------------------------------------------------


def _cmd_assemble(args) -> int:
    import sys
    import time

    from skyjax.parallel import make_mesh

    t0 = time.time()
    model = assemble(args.vision, args.llm, args.dst, mesh=make_mesh(args.mesh), tokenizer_from=args.tokenizer_from)
    print(f"assembled {model.fn.num_params() / 1e6:.2f}M parameters ({model.arch.name}, image_token_id "
          f"{model.config.image_token_id}) into {args.dst} in {time.time() - t0:.1f}s")
    if model.config.image_token_id is None:
        print("warning: the carried tokenizer has no <IMG_CONTEXT> token, so the model cannot take images yet: add "
              "InternVL's <img>, </img>, <IMG_CONTEXT> tokens and set image_token_id, or use --tokenizer-from vision",
              file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    import argparse

    from skyjax.cli import add_mesh_arg

    p = sub.add_parser(
        "assemble", help="R1V from one checkpoint's vision encoder + projector and another's Qwen2 LLM",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The Skywork R1V efficient-transfer recipe: take InternViT + the MLP projector from an InternVL "
                    "checkpoint and join them to a Qwen2 LLM (e.g. DeepSeek-R1-Distill-Qwen-32B) from another. The "
                    "projector's output width must equal the LLM's hidden size. Writes a skyjax checkpoint.\n\n"
                    "example:\n  skyjax assemble --vision ~/hf/InternVL2_5-38B --llm "
                    "~/hf/DeepSeek-R1-Distill-Qwen-32B ckpt/r1v_init")
    p.add_argument("--vision", type=Path, required=True, help="InternVL / R1V folder or skyjax checkpoint")
    p.add_argument("--llm", type=Path, required=True, help="Qwen2 (or InternVL / R1V) folder or skyjax checkpoint")
    p.add_argument("dst", type=Path, help="skyjax checkpoint folder to write")
    p.add_argument("--tokenizer-from", choices=["llm", "vision"], default="llm",
                   help="whose tokenizer files to carry over (and read <IMG_CONTEXT> from). Default: llm")
    add_mesh_arg(p)
    p.set_defaults(func=_cmd_assemble)
