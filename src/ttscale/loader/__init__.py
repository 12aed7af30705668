"""Model loading: a path (HF folder or GGUF file) or None for the embedded default model."""

from __future__ import annotations

from pathlib import Path

import torch

from ttscale.loader.checkpoint import Checkpoint
from ttscale.loader.errors import ModelLoadError
from ttscale.loader.hf import PICKLE_SUFFIXES, load_hf_folder


def load_checkpoint(
    model: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Checkpoint:
    """Dispatches on what `model` is. Never reaches a model hub: a name that is not a local
    path is an error, not a download."""
    if model is None:
        from ttscale.loader.default_model import default_model_path

        return _load_gguf(default_model_path(), dtype)
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelLoadError(
            f"model path {str(model)!r} does not exist (ttscale loads local HF folders and "
            "GGUF files only; it never downloads from a hub)"
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return load_hf_folder(path, dtype)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_gguf(ggufs[0], dtype)
        raise ModelLoadError(
            f"{path} has no config.json"
            + (f" and several GGUF files; pass one of {[g.name for g in ggufs]}" if ggufs else "")
        )
    if path.suffix == ".gguf":
        return _load_gguf(path, dtype)
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{path} is a pickle checkpoint; ttscale never unpickles model files")
    if path.suffix == ".safetensors":
        raise ModelLoadError(f"{path} is a bare weights file; pass the folder with its config.json")
    raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")


def _load_gguf(path: Path, dtype: torch.dtype) -> Checkpoint:
    from ttscale.loader.gguf import load_gguf  # gguf + numpy dequantizers: only when needed

    return load_gguf(path, dtype)


__all__ = ["Checkpoint", "ModelLoadError", "load_checkpoint"]
