"""HF-folder loading: sharded checkpoints, chat templates, and every kind of bad input."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import make_tiny_model
from ttscale.loader import ModelLoadError, load_checkpoint, resolve_model_path
from ttscale.models.config import ModelConfig
from ttscale.models.registry import build_model


def build(path):
    ckpt = load_checkpoint(path)
    return build_model(ModelConfig.from_hf(ckpt.config), ckpt.tensors)


def test_sharded_checkpoint_loads_same_weights(tmp_path):
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    hf = make_tiny_model(single)
    hf.save_pretrained(str(sharded), max_shard_size="20KB", safe_serialization=True)
    (sharded / "tokenizer.json").write_bytes((single / "tokenizer.json").read_bytes())
    (sharded / "tokenizer_config.json").write_bytes((single / "tokenizer_config.json").read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a, b = build(single), build(sharded)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_chat_template_from_jinja_file(tmp_path):
    make_tiny_model(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    )
    tok = load_checkpoint(tmp_path).tokenizer
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"


def test_missing_path():
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_checkpoint("/nonexistent/model")


def test_hub_name_is_not_downloaded():
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_checkpoint("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_folder_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"no config.json"):
        load_checkpoint(tmp_path)


def test_folder_with_several_ggufs_is_refused(tmp_path):
    for name in ("a.Q4_0.gguf", "a.Q8_0.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"several GGUF files; pass one of"):
        load_checkpoint(tmp_path)


def test_config_json_names_its_folder(tmp_path):
    """A path to an HF folder's config.json loads the folder (the cost model prices the same
    path, so both accept it)."""
    make_tiny_model(tmp_path)
    assert resolve_model_path(tmp_path / "config.json") == tmp_path
    via_file = load_checkpoint(tmp_path / "config.json")
    assert via_file.config == load_checkpoint(tmp_path).config


def test_unsupported_architecture(tmp_path):
    make_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture GPT2LMHeadModel.*Llama"):
        build(tmp_path)


def test_corrupt_safetensors(tmp_path):
    make_tiny_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    make_tiny_model(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a valid safetensors"):
        load_checkpoint(tmp_path)


class _Exploit:
    """Unpickling this would create a marker file: the test proves we never unpickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt"])
def test_pickle_checkpoint_refused_without_unpickling(tmp_path, name):
    make_tiny_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    (tmp_path / name).write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_checkpoint(tmp_path)
    with pytest.raises(ModelLoadError, match="never unpickles"):
        load_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_config_disagrees_with_weights(tmp_path):
    make_tiny_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"shape .* config implies"):
        build(tmp_path)


def test_missing_weight(tmp_path):
    make_tiny_model(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing part of layers.1.mlp.gate_up_proj"):
        build(tmp_path)


def test_malformed_config(tmp_path):
    make_tiny_model(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load_checkpoint(tmp_path)
