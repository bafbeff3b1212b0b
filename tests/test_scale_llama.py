"""models/scale_llama.py: seeded sharded Llama builder and its depth family, on a tiny config (fast)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "models"))

import scale_llama  # noqa: E402

# vocab 512 keeps the tiny model small; the tokenizer written next to it is still SmolLM2's (49152 tokens),
# larger than the model's vocab: fine for these tests, which never tokenize.
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=512)
SHARD = 150_000  # bytes: the tiny model (~854 kB) spans several shards


def file_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor the folder's index lists, read straight from its safetensors files."""
    from safetensors import safe_open

    weight_map = json.loads((folder / scale_llama.INDEX).read_text())["weight_map"]
    out = {}
    for file in sorted(set(weight_map.values())):
        with safe_open(str(folder / file), framework="pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys() if weight_map.get(n) == file})
    return out


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32)
    return model, info


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: os.lstat(p).st_mtime_ns for p in folder.iterdir()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale") / "tiny"
    return scale_llama.build(root, config_overrides=TINY, seed=0, shard_bytes=SHARD, progress=False)


def test_param_count_matches_transformers():
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        full = LlamaForCausalLM(LlamaConfig(**scale_llama.FULL))
    n = sum(p.numel() for p in full.parameters())
    assert scale_llama.param_count(scale_llama.FULL) == n == 1_522_649_088
    plan = dict(scale_llama.tensor_plan(scale_llama.FULL))
    assert plan == {k: tuple(v.shape) for k, v in full.state_dict().items()}


def test_build_loads_with_transformers(tiny: Path):
    index = json.loads((tiny / scale_llama.INDEX).read_text())
    shards = sorted(tiny.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    n = scale_llama.param_count({**scale_llama.FULL, **TINY})
    assert index["metadata"]["total_size"] == scale_llama.fp32_bytes(tiny) == 4 * n

    config = json.loads((tiny / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["torch_dtype"] == "float32"
    assert config["num_hidden_layers"] == 4 and config["vocab_size"] == 512
    assert (tiny / "tokenizer.json").is_file() and (tiny / "tokenizer_config.json").is_file()
    marker = json.loads((tiny / scale_llama.MARKER).read_text())
    assert marker["seed"] == 0 and marker["param_count"] == n and marker["config"]["hidden_size"] == 64

    model, info = load(tiny)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    files = file_tensors(tiny)
    state = model.state_dict()
    assert set(files) == set(state)
    for name, t in files.items():
        assert t.dtype == torch.float32 and torch.equal(state[name], t), name
    with torch.no_grad():
        logits = model(torch.arange(8).reshape(1, 8)).logits
    assert logits.shape == (1, 8, 512) and torch.isfinite(logits).all()


def test_weight_recipe(tiny: Path):
    t = file_tensors(tiny)
    marker = json.loads((tiny / scale_llama.MARKER).read_text())
    ch = torch.tensor(marker["outlier_channels"])
    assert len(ch) == 8 and torch.equal(ch, scale_llama.outlier_channels(0, 64))
    rest = torch.ones(64, dtype=torch.bool)
    rest[ch] = False
    for i in range(4):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            w = t[f"model.layers.{i}.{norm}.weight"]
            assert (w > 0).all() and not torch.all(w == 1)
            assert w[ch].mean() > 4 and w[rest].max() < 2  # the same 8 channels, x8, in every layer
    final = t["model.norm.weight"]
    assert final.min() >= 0.05 and final.max() < 2
    q = t["model.layers.0.self_attn.q_proj.weight"]
    assert abs(q.std().item() - 0.02) < 0.003 and abs(q.mean().item()) < 0.002


def test_depth_variant_shares_shards(tiny: Path):
    v = scale_llama.depth_variant(tiny, 2)
    assert v == tiny.parent / "tiny-l2"
    links = sorted(v.glob("model-*.safetensors"))
    assert links and all(p.is_symlink() and not os.path.isabs(os.readlink(p)) for p in links)
    assert all(p.resolve().parent == tiny.resolve() for p in links)
    assert (v / "tokenizer.json").is_file() and not (v / "tokenizer.json").is_symlink()
    weight_map = json.loads((v / scale_llama.INDEX).read_text())["weight_map"]
    assert not any(k.startswith(("model.layers.2.", "model.layers.3.")) for k in weight_map)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(weight_map)
    assert json.loads((v / "config.json").read_text())["num_hidden_layers"] == 2

    model, info = load(v)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # a family depth: shards cut at its boundary
    assert len(model.model.layers) == 2
    full = load(tiny)[0].state_dict()
    state = model.state_dict()
    assert set(state) == set(weight_map)
    for name, t in state.items():
        assert t.numpy().tobytes() == full[name].numpy().tobytes(), name

    before = mtimes(v)
    assert scale_llama.depth_variant(tiny, 2) == v and mtimes(v) == before
    fam = scale_llama.family(tiny)
    assert fam == {"0.25x": tiny.parent / "tiny-l1", "0.5x": v, "1x": tiny} and mtimes(v) == before

    odd = scale_llama.depth_variant(tiny, 3)  # not a family depth: loads, the extra layer is only "unexpected"
    _, info = load(odd)
    assert not info["missing_keys"]
    with pytest.raises(ValueError):
        scale_llama.depth_variant(tiny, 5)


def test_build_twice_is_a_no_op(tiny: Path):
    before = mtimes(tiny)
    assert scale_llama.build(tiny, config_overrides=TINY, seed=0, shard_bytes=SHARD, progress=False) == tiny
    assert mtimes(tiny) == before


def test_partial_folder_is_rebuilt_and_foreign_folder_kept(tmp_path: Path):
    root = scale_llama.build(tmp_path / "m", config_overrides=TINY, shard_bytes=SHARD, progress=False)
    reference = file_tensors(root)
    (root / scale_llama.MARKER).unlink()
    (root / "model-00001-of-00002.safetensors").write_bytes(b"junk")  # debris of an interrupted build
    scale_llama.build(root, config_overrides=TINY, shard_bytes=SHARD, progress=False)
    assert (root / scale_llama.MARKER).is_file() and not (root / "model-00001-of-00002.safetensors").exists()
    rebuilt = file_tensors(root)
    assert all(torch.equal(rebuilt[k], reference[k]) for k in reference)

    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("not a model")
    with pytest.raises(RuntimeError, match="did not write"):
        scale_llama.build(other, config_overrides=TINY, shard_bytes=SHARD, progress=False)
    assert (other / "notes.txt").is_file()


def test_values_depend_on_seed_not_depth(tiny: Path, tmp_path: Path):
    ref = file_tensors(tiny)
    shallow = scale_llama.build(tmp_path / "same", config_overrides={**TINY, "num_hidden_layers": 2}, seed=0,
                                shard_bytes=1 << 20, progress=False)
    same = file_tensors(shallow)
    assert len(same) == len(ref) - 18
    for name, t in same.items():
        assert torch.equal(t, ref[name]), name
    other = file_tensors(scale_llama.build(tmp_path / "other", config_overrides=TINY, seed=1, shard_bytes=SHARD,
                                           progress=False))
    assert set(other) == set(ref)
    assert not any(torch.equal(other[name], ref[name]) for name in ref)
