"""Loads a Hugging Face model folder: config.json, *.safetensors (single or sharded), tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ttscale.errors import ModelLoadError
from ttscale.loader.checkpoint import Checkpoint
from ttscale.tokenizer import Tokenizer

# Formats we refuse on sight: they are Python pickles, and unpickling runs arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def load_hf_folder(path: str | Path, dtype: torch.dtype = torch.float32) -> Checkpoint:
    path = Path(path)
    config = read_hf_config(path)
    files = _safetensors_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            loaded = load_file(str(file))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelLoadError(f"{file} is not a valid safetensors file ({e})") from None
        for name, tensor in loaded.items():
            tensors[name] = tensor if tensor.dtype == dtype else tensor.to(dtype)
    eos = _generation_eos(path)
    return Checkpoint(config, tensors, Tokenizer.from_dir(path, eos), str(path))


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The config.json dict of an HF model folder (its weights are not opened)."""
    config_path = Path(path) / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(f"{path} is not a model folder: it has no config.json")
    return _read_json(config_path)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{index} has no weight_map")
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {missing}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{path} holds only pickle checkpoints ({', '.join(pickles)}); ttscale never "
            "unpickles model files, since that can run arbitrary code. Convert them to "
            "safetensors (e.g. transformers' save_pretrained(safe_serialization=True))"
        )
    raise ModelLoadError(f"{path} has no *.safetensors weights")


def _generation_eos(path: Path) -> list[int]:
    """EOS ids of generation_config.json: chat models often stop on several tokens."""
    gen = path / "generation_config.json"
    if not gen.is_file():
        return []
    eos = _read_json(gen).get("eos_token_id")
    if eos is None:
        return []
    return list(eos) if isinstance(eos, list) else [int(eos)]
