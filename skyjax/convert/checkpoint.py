"""skyjax checkpoint folders, and conversion from / export to Hugging Face folders.

A skyjax checkpoint folder:

    skyjax.json        {"format": 1, "architecture": "qwen2", "model": {...config...}, "hf_config": {...}}
    params/            orbax (tensorstore) checkpoint of the parameter dict, written by every host in parallel
    tokenizer + processor files carried over from the Hugging Face folder

`load_model` accepts either kind of folder, so `score` and `generate` take a Hugging Face folder or a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from skyjax.config import from_dict, to_dict
from skyjax.convert.hf_params import export_params, load_params
from skyjax.convert.registry import ARCHITECTURES, Architecture, detect
from skyjax.convert.safetensors_io import CheckpointError, SafetensorsReader, SafetensorsWriter
from skyjax.nn.functional import Functional
from skyjax.parallel.rules import DEFAULT_RULES, AxisRules

META_NAME = "skyjax.json"
FORMAT_VERSION = 1
# Files that travel with the weights (tokenizer, chat template, image processor, generation defaults).
SIDE_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja", "generation_config.json",
    "preprocessor_config.json", "processor_config.json", "video_preprocessor_config.json", "tokenizer.model",
)


@dataclasses.dataclass
class LoadedModel:
    arch: Architecture
    config: Any
    fn: Functional
    params: dict
    folder: Path  # where tokenizer / processor files are
    hf_config: dict

    def module(self):
        return self.fn.bind(self.params)


def not_a_model_folder(folder: Path) -> CheckpointError:
    """The error for a folder that is neither kind `load_model` accepts, saying what it lacks for each."""
    if not folder.exists():
        return CheckpointError(f"{folder} does not exist (expected a skyjax checkpoint or a Hugging Face model folder)")
    if not folder.is_dir():
        return CheckpointError(f"{folder} is a file, not a folder (expected a skyjax checkpoint or a Hugging Face "
                               f"model folder)")
    if (folder / "params").is_dir():
        return CheckpointError(f"{folder}: has params/ but no {META_NAME}: an unfinished skyjax checkpoint "
                               f"({META_NAME} is written last); write it again (skyjax convert, or rerun the training "
                               f"run)")
    return CheckpointError(f"{folder}: not a model folder (no {META_NAME}, no config.json): a skyjax checkpoint needs "
                           f"{META_NAME} and params/, a Hugging Face folder needs config.json and *.safetensors")


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise not_a_model_folder(folder)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from e


def _runtime(dtype: str | None, param_dtype: str | None, hf_dtype: str | None) -> dict:
    """Compute and storage dtypes; by default the checkpoint's own dtype. Every config's `from_hf` takes these."""
    chosen = dtype or hf_dtype or "float32"
    return {"dtype": chosen, "param_dtype": param_dtype or chosen}


def _set_runtime(cfg_dict: dict, runtime: dict) -> dict:
    """Apply runtime fields (dtype, remat, ...) to a config dict and every nested sub-config that has them."""
    out = {}
    for key, value in cfg_dict.items():
        out[key] = _set_runtime(value, runtime) if isinstance(value, dict) else value
    for key, value in runtime.items():
        if key in cfg_dict:
            out[key] = value
    return out


def _hf_dtype(hf_config: dict) -> str | None:
    d = hf_config.get("dtype") or hf_config.get("torch_dtype") or (hf_config.get("text_config") or {}).get("dtype")
    return d if d in ("float32", "bfloat16", "float16") else None


def load_hf(
    folder: str | Path,
    mesh: Mesh | None = None,
    rules: AxisRules = DEFAULT_RULES,
    dtype: str | None = None,
    param_dtype: str | None = None,
    **runtime,
) -> LoadedModel:
    """Read a Hugging Face folder straight onto `mesh` (each host reads only its own shards)."""
    folder = Path(folder)
    arch, cfg, hf_config = _hf_model_config(folder, dtype, param_dtype, **runtime)
    fn = Functional.create(lambda r: arch.build(cfg, r))
    reader = SafetensorsReader(folder, extra_files=arch.extra_weight_files)
    try:
        shardings = fn.shardings(mesh, rules) if mesh is not None else None
        params = load_params(reader, arch.rules(cfg), fn.shapes, shardings, ignore=arch.ignore_keys)
    finally:
        reader.close()
    return LoadedModel(arch, cfg, fn, params, folder, hf_config)


def _portable(config):
    """The model config as a checkpoint keeps it: without what one run's data set (the vision tower's per-image patch
    bound, from that run's max_pixels: skyjax.train.tasks.bound_image_patches)."""
    vision = getattr(config, "vision", None)
    if getattr(vision, "max_image_patches", None) is not None:
        config = dataclasses.replace(config, vision=dataclasses.replace(vision, max_image_patches=None))
    return config


def save_checkpoint(dst: str | Path, model: LoadedModel, side_files_from: Path | None = None) -> Path:
    """Write params (orbax), skyjax.json and the tokenizer/processor files."""
    dst = Path(dst).resolve()
    dst.mkdir(parents=True, exist_ok=True)
    params_dir = dst / "params"
    if params_dir.exists():
        shutil.rmtree(params_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(params_dir, model.params)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT_VERSION, "architecture": model.arch.name, "model": to_dict(_portable(model.config)),
            "hf_config": model.hf_config}
    if jax.process_index() == 0:
        (dst / META_NAME).write_text(json.dumps(meta, indent=2))
        copy_side_files(side_files_from or model.folder, dst)
    return dst


def copy_side_files(src: Path, dst: Path) -> list[str]:
    copied = []
    if src.resolve() == dst.resolve():
        return copied
    for name in SIDE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / META_NAME).is_file()


def load_checkpoint(
    folder: str | Path,
    mesh: Mesh | None = None,
    rules: AxisRules = DEFAULT_RULES,
    dtype: str | None = None,
    param_dtype: str | None = None,
    **runtime,
) -> LoadedModel:
    """Restore a skyjax checkpoint onto `mesh` (any mesh shape: orbax reshards on read)."""
    folder = Path(folder).resolve()
    arch, cfg, hf_config = _checkpoint_model_config(folder, dtype, param_dtype, **runtime)
    fn = Functional.create(lambda r: arch.build(cfg, r))
    params = restore_params(folder / "params", fn, mesh, rules)
    return LoadedModel(arch, cfg, fn, params, folder, hf_config)


def read_model_config(folder: str | Path, dtype: str | None = None, param_dtype: str | None = None,
                      **runtime) -> tuple[Architecture, Any, dict]:
    """(architecture, model config, Hugging Face config dict) of a skyjax checkpoint or a Hugging Face folder, with
    the runtime fields applied, as `load_model` would build them; reads skyjax.json / config.json (and an InternVL
    folder's tokenizer files), never a weight."""
    folder = Path(folder)
    if not (folder / META_NAME).is_file() and not (folder / "config.json").is_file():
        raise not_a_model_folder(folder)
    return (_checkpoint_model_config if is_checkpoint(folder) else _hf_model_config)(folder, dtype, param_dtype,
                                                                                      **runtime)


def _hf_model_config(folder: Path, dtype: str | None, param_dtype: str | None, **runtime):
    hf_config = read_hf_config(folder)
    arch = detect(hf_config, str(folder / "config.json"), folder)
    cfg = arch.config_from_hf(hf_config, **_runtime(dtype, param_dtype, _hf_dtype(hf_config)), **runtime)
    if hasattr(arch, "complete_config"):  # facts kept beside config.json (InternVL: the tokenizer's image token id)
        cfg = arch.complete_config(cfg, folder)
    return arch, cfg, hf_config


def _checkpoint_model_config(folder: Path, dtype: str | None, param_dtype: str | None, **runtime):
    try:
        meta = json.loads((folder / META_NAME).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{folder / META_NAME}: invalid JSON ({e}); the checkpoint is damaged: write it "
                              f"again") from None
    if not isinstance(meta, dict) or "architecture" not in meta or "model" not in meta:
        raise CheckpointError(f"{folder / META_NAME}: lacks 'architecture' or 'model'; the checkpoint is damaged: "
                              f"write it again")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / META_NAME}: unsupported format {meta.get('format')}")
    if meta["architecture"] not in ARCHITECTURES:
        raise CheckpointError(f"{folder / META_NAME}: unknown architecture {meta['architecture']!r}")
    arch = ARCHITECTURES[meta["architecture"]]
    if dtype is not None:
        runtime["dtype"] = dtype
    if param_dtype is not None or dtype is not None:
        runtime["param_dtype"] = param_dtype or dtype
    cfg = from_dict(arch.config_cls, _set_runtime(meta["model"], runtime))
    return arch, cfg, meta.get("hf_config", {})


def restore_params(path: Path, fn: Functional, mesh: Mesh | None, rules: AxisRules = DEFAULT_RULES) -> dict:
    if mesh is None:
        from skyjax.parallel.mesh import single_device_mesh

        mesh = single_device_mesh()
    shardings = fn.shardings(mesh, rules)
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), fn.shapes, shardings)
    if not path.is_dir():
        raise CheckpointError(f"{path.parent}: no params/ folder beside {META_NAME}: the weights are missing")
    with ocp.StandardCheckpointer() as ckptr:
        try:
            return ckptr.restore(path, target)
        except (ValueError, KeyError) as e:
            if "does not match" in str(e) or isinstance(e, KeyError) or "shape" in str(e).lower():
                raise CheckpointError(f"{path}: the checkpoint does not match the model ({short_error(e)})") from e
            raise _unreadable(path, e) from e
        except Exception as e:  # tensorstore / orbax errors on a truncated or damaged file have no common type
            raise _unreadable(path, e) from e


def short_error(error: BaseException, limit: int = 300) -> str:
    """An error's message on one line, without tensorstore's spec dump, at most `limit` characters."""
    text = " ".join(str(error).split()).split(" See full TensorStore details")[0]
    return (text[:limit] + " ...") if len(text) > limit else text or type(error).__name__


def _unreadable(path: Path, error: BaseException) -> CheckpointError:
    return CheckpointError(f"{path}: the parameters are unreadable ({type(error).__name__}: {short_error(error)}); "
                           f"a file is truncated or damaged: write the checkpoint again (skyjax convert, or the "
                           f"training run's checkpoints)")


def require_reward_model(folder: str | Path) -> None:
    """A `CheckpointError` unless `folder` holds a reward model (a value head), read from its config files only."""
    from skyjax.models.reward import VALUE_HEAD_FILE

    folder = Path(folder)
    arch, _, _ = read_model_config(folder)
    if VALUE_HEAD_FILE in dict(arch.separate_files).values():
        return
    if is_checkpoint(folder):
        raise CheckpointError(f"{folder}: a skyjax checkpoint of architecture {arch.name!r}, which has no value head: "
                              f"not a reward model (give a reward model's checkpoint, e.g. a reward run's "
                              f"checkpoint/)")
    raise CheckpointError(f"{folder}: no {VALUE_HEAD_FILE}: a {arch.name} model without a value head, not a reward "
                          f"model (a Hugging Face reward folder keeps the head in {VALUE_HEAD_FILE} beside the "
                          f"weights)")


def load_model(folder: str | Path, mesh: Mesh | None = None, rules: AxisRules = DEFAULT_RULES, **kw) -> LoadedModel:
    """A skyjax checkpoint or a Hugging Face folder, whichever `folder` is."""
    return (load_checkpoint if is_checkpoint(folder) else load_hf)(folder, mesh, rules, **kw)


def export_hf(model: LoadedModel, dst: str | Path, dtype: str | None = None,
              max_shard_bytes: int = 2 * 1024**3, layout: str | None = None) -> Path:
    """Write a Hugging Face folder: sharded safetensors + config.json + tokenizer/processor files.

    `layout` picks one of the Hugging Face layouts an architecture can write (InternVL: 'native', default, or
    'remote'); architectures with a single layout accept only None."""
    if hasattr(model.arch, "export_hf"):  # architectures that write their own layouts (InternVL)
        return model.arch.export_hf(model, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, layout=layout)
    if layout is not None:
        raise CheckpointError(f"architecture {model.arch.name} has no export layout {layout!r}")
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    out_dtype = np.dtype(dtype or model.config.param_dtype) if dtype or hasattr(model.config, "param_dtype") else None
    export_model_weights(model, dst, out_dtype, max_shard_bytes)
    hf_config = {**model.hf_config, **model.config.to_hf()}
    hf_config["torch_dtype"] = str(out_dtype) if out_dtype is not None else hf_config.get("torch_dtype")
    hf_config.pop("dtype", None)
    (dst / "config.json").write_text(json.dumps(hf_config, indent=2))
    copy_side_files(model.folder, dst)
    return dst


def export_model_weights(model: LoadedModel, dst: Path, out_dtype, max_shard_bytes: int) -> None:
    """Model shards (+ index), and the tensors an architecture keeps in files of their own (a value head)."""
    rules = model.arch.rules(model.config)
    separate = dict(model.arch.separate_files)
    flat = {r.path: r for r in rules}
    main_rules = [r for r in rules if not any(r.hf.startswith(p) for p in separate)]
    with SafetensorsWriter(dst, max_shard_bytes=max_shard_bytes) as writer:
        export_params(_subtree(model.params, {r.path for r in main_rules}), main_rules, writer, dtype=out_dtype,
                      hf_shapes=hf_shapes_of(model))
    for prefix, filename in separate.items():
        sub_rules = [r for r in flat.values() if r.hf.startswith(prefix)]
        dtype = np.dtype(model.arch.separate_files_dtype) if model.arch.separate_files_dtype else out_dtype
        tmp = dst / (filename + ".parts")
        with SafetensorsWriter(tmp, max_shard_bytes=2**62) as writer:
            export_params(_subtree(model.params, {r.path for r in sub_rules}), sub_rules, writer, dtype=dtype)
        (tmp / "model.safetensors").rename(dst / filename)
        tmp.rmdir()


def _subtree(params: dict, paths: set[str]) -> dict:
    """The part of a nested params dict whose slash-joined leaf paths are in `paths`."""
    out: dict = {}
    for path in paths:
        src, dst = params, out
        parts = path.split("/")
        for part in parts[:-1]:
            src = src[part]
            dst = dst.setdefault(part, {})
        dst[parts[-1]] = src[parts[-1]]
    return out


def hf_shapes_of(model: LoadedModel) -> dict:
    """Original HF tensor shapes, needed where a transform is not invertible from our shape alone (conv kernels)."""
    hook = getattr(model.arch.config_cls, "hf_tensor_shapes", None)
    return hook(model.config) if hook else {}
