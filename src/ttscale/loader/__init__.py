"""Model loading: a path (HF folder or GGUF file) or None for the embedded default model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import Checkpoint, GroupQuantized
from ttscale.loader.hf import PICKLE_SUFFIXES, load_hf_folder, read_hf_config


def load_checkpoint(
    model: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    keep_quantized: bool = False,
    require_quantized: bool = False,
) -> Checkpoint:
    """Dispatches on what `model` is (see `resolve_model_path`). Never reaches a model hub: a
    name that is not a local path is an error, not a download. `keep_quantized` /
    `require_quantized`: a GGUF's matmul weights stay in its quantization (see `load_gguf`);
    an HF folder has none to keep."""
    if model is None:
        from ttscale.loader.default_model import default_model_path

        path = default_model_path()
    else:
        path = resolve_model_path(model)
    if path.suffix == ".gguf":
        from ttscale.loader.gguf import load_gguf  # gguf + numpy dequantizers: only when needed

        return load_gguf(path, dtype, keep_quantized, require_quantized)
    return load_hf_folder(path, dtype)


def resolve_model_path(model: str | Path) -> Path:
    """The one model-path rule, shared by the loader and the cost model: an HF folder (one
    holding config.json, or its config.json itself) resolves to the folder; a .gguf file, or a
    folder holding exactly one, resolves to that file. Anything else is a ModelLoadError."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist (ttscale loads local HF folders and "
            "GGUF files only; it never downloads from a hub)"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return path
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ModelLoadError(
            f"{path} has no config.json"
            + (f" and several GGUF files; pass one of {[g.name for g in ggufs]}" if ggufs else "")
        )
    if path.suffix == ".gguf":
        return path
    if path.name == "config.json":
        return path.parent
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path} is a pickle checkpoint; ttscale never unpickles model files")
    if path.suffix == ".safetensors":
        raise ModelLoadError(f"{path} is a bare weights file; pass the folder with its config.json")
    raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")


def read_model_config(model: str | Path | None = None) -> tuple[dict[str, Any], Path]:
    """The HF-style config dict of a model, without reading its weights, and the path it came
    from (`resolve_model_path`'s; None is the embedded default model). A GGUF's config is
    built from its header exactly as `load_checkpoint` builds it."""
    if model is None:
        from ttscale.loader.default_model import default_model_path

        path = default_model_path()
    else:
        path = resolve_model_path(model)
    if path.suffix == ".gguf":
        from ttscale.loader.gguf import read_gguf_config

        return read_gguf_config(path), path
    return read_hf_config(path), path


__all__ = [
    "Checkpoint",
    "GroupQuantized",
    "ModelLoadError",
    "load_checkpoint",
    "read_model_config",
    "resolve_model_path",
]
