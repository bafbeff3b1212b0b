"""Recipes: shipped ones load; mistakes name the key and the fix."""

from __future__ import annotations

import pytest

from qgraph.errors import QGraphError
from qgraph.recipes import available, load_recipe


def test_shipped_recipes_load():
    assert {"fp32", "w8a8", "w4a16"} <= set(available())
    fp32, w8a8, w4a16 = (load_recipe(n) for n in ("fp32", "w8a8", "w4a16"))
    assert not fp32.quantizes and not fp32.needs_calibration
    assert w8a8.blocks.weights.format == "int8" and w8a8.blocks.weights.granularity == "channel"
    assert w8a8.blocks.activations.granularity == "tensor" and w8a8.needs_calibration
    assert w8a8.lm_head is None and w8a8.skip == ()
    assert w4a16.blocks.weights.group_size == 128 and w4a16.blocks.lowering == "matmulnbits"
    assert w4a16.blocks.activations is None and not w4a16.needs_calibration


def test_unknown_recipe_name():
    with pytest.raises(QGraphError, match="unknown recipe 'w9a9'") as e:
        load_recipe("w9a9")
    assert "w8a8" in e.value.fix


def test_recipe_key_typo_suggests_the_right_key(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text("name: mine\nweigths:\n  format: int8\n")
    with pytest.raises(QGraphError, match="unknown key\\(s\\) 'weigths'") as e:
        load_recipe(p)
    assert "did you mean 'weights'" in e.value.fix


def test_nested_typo_and_bad_values(tmp_path):
    p = tmp_path / "a.yaml"
    p.write_text("weights:\n  format: int8\n  granularty: channel\n")
    with pytest.raises(QGraphError, match="in weights"):
        load_recipe(p)
    p.write_text("weights:\n  format: int3\n")  # int7 is a format now (the s7 int8 kernel)
    with pytest.raises(QGraphError, match="unknown format 'int3'"):
        load_recipe(p)
    p.write_text("weights:\n  format: int8\nactivations:\n  format: int8\nlowering: matmulnbits\n")
    with pytest.raises(QGraphError, match="matmulnbits"):
        load_recipe(p)
    p.write_text("weights:\n  format: int8\nlowering: fp4-emulated\n")
    with pytest.raises(QGraphError, match="fp4-emulated in the blocks emulates fp4_e2m1"):
        load_recipe(p)
    p.write_text("weights:\n  format: fp8_e4m3\n  granularity: channel\npasses:\n  - gptq: {}\n  - smooth: {}\n")
    with pytest.raises(QGraphError, match="'smooth' runs after gptq"):
        load_recipe(p)
    # kv_quant touches no weight: it may follow gptq, but a weight pass after it still may not.
    p.write_text("weights:\n  format: fp8_e4m3\n  granularity: channel\npasses:\n  - gptq: {}\n  - kv_quant: {}\n")
    assert [n for n, _ in load_recipe(p).passes] == ["gptq", "kv_quant"]
    p.write_text("weights:\n  format: fp8_e4m3\n  granularity: channel\npasses:\n  - gptq: {}\n  - kv_quant: {}\n"
                 "  - smooth: {}\n")
    with pytest.raises(QGraphError, match="'smooth' runs after gptq"):
        load_recipe(p)
    p.write_text("weights: [1, 2\n")
    with pytest.raises(QGraphError, match="not valid YAML"):
        load_recipe(p)


def test_fp4_comparison_recipe_differs_only_in_the_reparameterization():
    fp4, plain = load_recipe("fp4"), load_recipe("fp4-noreparam")
    assert fp4.blocks == plain.blocks and fp4.blocks.lowering == "fp4-emulated"
    assert fp4.passes == (("exp_bias", {"max_shift": 4}),) and plain.passes == (("exp_bias", {"max_shift": 0}),)
