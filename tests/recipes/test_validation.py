"""Recipe validation: every mistake is one error naming the file, the key path, the bad value and the fix."""

from __future__ import annotations

import pytest

from qgraph.errors import QGraphError
from qgraph.recipes import load_recipe

W8 = "weights: {format: int8}\n"
W8A8 = "weights: {format: int8}\nactivations: {format: int8, granularity: tensor}\n"
W4G = "weights: {format: int4, granularity: group, group_size: 128}\n"
FP4 = "weights: {format: fp4_e2m1, granularity: group, group_size: 32}\nactivations: {format: fp4_e2m1, granularity: tensor}\n"
FORMATS = "int8, int7, uint8, int4, uint4, fp8_e4m3, fp8_e5m2, fp4_e2m1"

# (recipe text, fragments of the error's what, fragments of its fix)
CASES = {
    # unknown keys, anywhere
    "pass option typo": (W8 + "passes:\n  - smooth: {alpah: 0.5}\n",
                         ["unknown key(s) 'alpah' in passes.smooth"], ["did you mean 'alpha'", "allowed keys: alpha, grid"]),
    "layers typo": ("layers: {skp: [a]}\n" + W8, ["unknown key(s) 'skp' in layers"], ["did you mean 'skip'"]),
    "lm_head weights typo": ("lm_head: {weights: {format: int8, granulrity: tensor}}\n",
                             ["unknown key(s) 'granulrity' in lm_head.weights"], ["did you mean 'granularity'"]),
    "embedding key": ("embedding: {format: int8, granularity: group, group_size: 32, symmetric: true}\n",
                      ["unknown key(s) 'symmetric' in embedding"], ["allowed keys: format, granularity, group_size"]),
    "activation-only key on weights": ("weights: {format: int8, static: true}\n",
                                       ["unknown key(s) 'static' in weights"], ["allowed keys:"]),
    "bits instead of format": ("weights: {bits: 3}\n", ["unknown key(s) 'bits' in weights"],
                               [f"did you mean 'format' (one of {FORMATS})"]),
    "option on an option-less pass": (W8 + "passes:\n  - fold_norm_affine: {alpha: 1}\n",
                                      ["passes.fold_norm_affine takes no options, got 'alpha'"],
                                      ["write `- fold_norm_affine`"]),
    # wrong types
    "alpha text": (W8A8 + "passes:\n  - smooth: {alpha: abc}\n",
                   ["passes.smooth.alpha: 'abc' is not a number in [0, 1] or 'search'"], ["`alpha: search` (the default)"]),
    "alpha bool": (W8 + "passes:\n  - smooth: {alpha: true}\n", ["passes.smooth.alpha: true is not a number"], []),
    "group_size text": ("weights: {format: int4, granularity: group, group_size: abc}\n",
                        ["weights.group_size: 'abc' is not an integer >= 1 or null"], ["`group_size: 128`"]),
    "symmetric int": ("weights: {format: int8, symmetric: 3}\n", ["weights.symmetric: 3 is not true or false"],
                      ["`symmetric: true` (the default)"]),
    "act_order text": (W8 + "passes:\n  - gptq: {act_order: 'yes'}\n", ["passes.gptq.act_order: 'yes' is not true or false"],
                       []),
    "sample_tokens float": (W8 + "passes:\n  - smooth: {sample_tokens: 1.5}\n",
                            ["passes.smooth.sample_tokens: 1.5 is not an integer >= 1"], ["`sample_tokens: 512`"]),
    "grid scalar": (W8 + "passes:\n  - smooth: {grid: 0.5}\n", ["passes.smooth.grid: 0.5 is not a list of numbers in [0, 1]"],
                    ["`grid: [0, 0.1,"]),
    "passes mapping": (W8 + "passes: {smooth: 1}\n", ["passes must be a list, got a mapping"], ["- smooth: {alpha: search}"]),
    "pass options scalar": (W8 + "passes:\n  - smooth: 1\n", ["passes.smooth must be a mapping, got int"], []),
    "two passes in one item": (W8 + "passes:\n  - smooth: {}\n    gptq: {}\n", ["passes[0] is", "not one pass"],
                               ["on its own `- ` line"]),
    "weights list": ("weights: [int8, channel]\n", ["weights must be a mapping, got a list"], ["write weights as key: value"]),
    "format number": ("weights: {format: 8}\n", ["weights.format: unknown format 8"], [f"use one of {FORMATS}"]),
    "name number": ("name: 3\n" + W8, ["name: 3 is not text"], ['quote it: name: "3"']),
    "skip text": ("layers: {skip: model.layers.0.mlp}\n" + W8, ["layers.skip: 'model.layers.0.mlp' is not a list"],
                  ["skip: [name, ...]"]),
    "lm_head text": ("lm_head: int8\n", ["lm_head: 'int8' is not float, tied or a mapping"], ["lm_head: tied"]),
    # out of range
    "format int3": ("weights: {format: int3}\n", ["weights.format: unknown format 'int3'"], [f"use one of {FORMATS}"]),
    "granularity block": ("weights: {format: int8, granularity: block}\n", ["weights.granularity: unknown granularity 'block'"],
                          ["use one of tensor, channel, group"]),
    "lowering": (W8 + "lowering: nbits\n", ["lowering: unknown lowering 'nbits'"], ["use one of qdq, matmulnbits, fp4-emulated"]),
    "observer": (W8 + "activations: {format: int8, observer: percentile}\n",
                 ["activations.observer: unknown observer 'percentile'"], ["use 'minmax'"]),
    "group_size negative": ("weights: {format: int4, granularity: group, group_size: -1}\n",
                            ["weights.group_size: -1 is not an integer >= 1"], []),
    "group_size zero": ("weights: {format: int4, granularity: group, group_size: 0}\n",
                        ["weights.group_size: 0 is not an integer >= 1"], []),
    "group_size without group": ("weights: {format: int4, group_size: 128}\n",
                                 ["weights.group_size applies to granularity group, not channel"], ["add granularity: group"]),
    "matmulnbits block": ("weights: {format: int4, granularity: group, group_size: 100}\nlowering: matmulnbits\n",
                          ["weights.group_size: 100 is not a power of two >= 16, which MatMulNBits needs"],
                          ["use group_size: 32, 64 or 128, or lowering: qdq"]),
    "matmulnbits small block": ("weights: {format: int4, granularity: group, group_size: 8}\nlowering: matmulnbits\n",
                                ["weights.group_size: 8 is not a power of two >= 16"], []),
    "embedding block": ("embedding: {format: int8, granularity: group, group_size: 24}\n",
                        ["embedding.group_size: 24 is not a power of two >= 16, which GatherBlockQuantized needs"],
                        ["use group_size: 32"]),
    "damp zero": (
        W8 + "passes:\n  - gptq: {damp: 0}\n",
        ["passes.gptq.damp: 0 is not a number > 0"],
        ["`damp: 0.01` (the default)"]),
    "damp negative": (W8 + "passes:\n  - gptq: {damp: -0.1}\n", ["passes.gptq.damp: -0.1 is not a number > 0"], []),
    "sample_tokens zero": (W8 + "passes:\n  - smooth: {sample_tokens: 0}\n",
                           ["passes.smooth.sample_tokens: 0 is not an integer >= 1"], []),
    "split_threshold one": (
        W8A8 + "passes:\n  - qsm: {split_threshold: 1}\n",
        ["passes.qsm.split_threshold: 1 is not a number > 1 or null"],
        ["`split_threshold: 8` (the default)"]),
    "qsm clip above one": (
        W8A8 + "passes:\n  - qsm: {clip: 1.5}\n",
        ["passes.qsm.clip: 1.5 is not a number in (0, 1] or 'search'"],
        []),
    "max_copies one": (W8A8 + "passes:\n  - qsm: {max_copies: 1}\n", ["passes.qsm.max_copies: 1 is not an integer >= 2"], []),
    "alpha above one": (W8 + "passes:\n  - smooth: {alpha: 1.5}\n", ["passes.smooth.alpha: 1.5 is not a number in [0, 1]"], []),
    "alpha negative": (W8 + "passes:\n  - awq: {alpha: -0.1}\n", ["passes.awq.alpha: -0.1 is not a number in [0, 1]"], []),
    "grid value": (
        W8 + "passes:\n  - smooth: {grid: [0.5, 2]}\n",
        ["passes.smooth.grid: [0.5, 2] is not a list of numbers in [0, 1]"],
        []),
    "grid empty": (W8 + "passes:\n  - smooth: {grid: []}\n", ["passes.smooth.grid: [] is not a list of numbers"], []),
    "clip_search ratio": (W4G + "passes:\n  - clip_search: {ratios: [1.0, 0]}\n",
                          ["passes.clip_search.ratios: [1, 0] is not a list of numbers in (0, 1]"], []),
    "exp_bias max_shift": (FP4 + "passes:\n  - exp_bias: {max_shift: -1}\n",
                           ["passes.exp_bias.max_shift: -1 is not an integer >= 0"], ["`max_shift: 4` (the default)"]),
    "exp_bias clips": (
        FP4 + "passes:\n  - exp_bias: {clips: [1.2]}\n",
        ["passes.exp_bias.clips: [1.2] is not a list of numbers in (0, 1]"],
        []),
    "shift steps": (W8A8 + "passes:\n  - shift: {steps: 0}\n", ["passes.shift.steps: 0 is not an integer >= 1"], []),
    # what a pass needs from the recipe
    "clip_search without groups": (W8 + "passes:\n  - clip_search\n", ["clip_search needs group weight quantization"],
                                   ["set weights granularity: group"]),
    "exp_bias without activations": (W8 + "passes:\n  - exp_bias\n", ["exp_bias needs quantized weights and activations"],
                                     ["drop exp_bias"]),
    "exp_bias on int activations": (
        W8A8 + "passes:\n  - exp_bias\n",
        ["exp_bias needs per-tensor float activations, got int8 tensor"],
        ["fp4_e2m1 or fp8_e4m3"]),
    "gptq per tensor": ("weights: {format: int8, granularity: tensor}\npasses:\n  - gptq\n",
                        ["gptq rounds quantized weights with per-channel or per-group scales"], ["channel or group"]),
    "gptq not last": (W8A8 + "passes:\n  - gptq\n  - smooth\n", ["pass 'smooth' runs after gptq"], ["list gptq last in passes"]),
    # run-time (dynamic) activations
    "token step on static activations": (W4G + "activations: {format: int4, granularity: token}\n",
                                         ["activations.granularity token is a run-time step per token"],
                                         ["set static: false"]),
    "dynamic per channel": (W4G + "activations: {format: int4, granularity: channel, static: false}\n",
                            ["activations with static: false computes steps at run time per token or per group"],
                            ["use granularity: token"]),
    "static group activations": (W4G + "activations: {format: int4, granularity: group, group_size: 32}\n",
                                 ["activations.granularity group is a run-time step per group"], ["set static: false"]),
    "clip on static activations": (W8A8.replace("tensor}", "tensor, clip: 0.9}"),
                                   ["activations.clip applies to dynamic activations"], ["set static: false"]),
    "clip above 1": (W4G + "activations: {format: int4, granularity: token, static: false, clip: 1.5}\n",
                     ["activations.clip: 1.5 is not a number in (0, 1]"], []),
    "matmulnbits with static activations": (W4G + "activations: {format: int8, granularity: tensor}\nlowering: matmulnbits\n",
                                            ["lowering matmulnbits in the blocks takes int4 group weights with float or "
                                             "dynamic"], ["static: false"]),
    "unknown pass": (
        W8 + "passes:\n  - smoth\n",
        ["unknown pass 'smoth' in passes"],
        ["did you mean 'smooth'?", "known passes: awq,"]),
    # the file itself
    "yaml syntax": ("weights:\n  format: int8\n granularity: channel\n",
                    ["not valid YAML at line 3, column 2", "expected <block end>"], ["fix the YAML syntax"]),
    "yaml unclosed list": ("weights: {format: int8}\nlayers: {skip: [a, b\n", ["not valid YAML at line 3", "from line 2"], []),
    "empty file": ("", ["is empty"], ["weights: {format: int8}"]),
    "comments only": ("# nothing here\n", ["is empty"], []),
    "top-level list": ("- weights\n- activations\n", ["the top level must be a mapping", "got a list"], ["key: value lines"]),
    "top-level scalar": ("w8a8\n", ["the top level must be a mapping", "got text"], []),
}


def _error(tmp_path, text: str | bytes, name: str = "r.yaml") -> QGraphError:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(QGraphError) as e:
        load_recipe(p)
    return e.value


@pytest.mark.parametrize("case", list(CASES))
def test_recipe_mistake_is_one_line_naming_file_key_and_fix(tmp_path, case):
    text, what, fix = CASES[case]
    err = _error(tmp_path, text)
    assert err.what.startswith("recipe r.yaml"), err.what
    assert "\n" not in str(err) and err.fix, str(err)
    for fragment in what:
        assert fragment in err.what, (fragment, err.what)
    for fragment in fix:
        assert fragment in err.fix, (fragment, err.fix)


def test_binary_and_control_characters(tmp_path):
    err = _error(tmp_path, b"\x89PNG\r\n\x1a\n\x00\x00\xff")
    assert err.what == "recipe r.yaml is not UTF-8 text (byte 0x89 at offset 0)" and "UTF-8" in err.fix
    err = _error(tmp_path, b"weights:\n  format: int8\x00\n")
    assert "not valid YAML at line 2: unacceptable character #x0000" in err.what


def test_directory_is_not_a_recipe(tmp_path):
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(QGraphError, match="cannot read recipe file .*d.yaml"):
        load_recipe(tmp_path / "d.yaml")


def test_valid_values_are_kept_as_written(tmp_path):
    p = tmp_path / "ok.yaml"
    p.write_text(W8A8 + "passes:\n  - smooth: {alpha: 1, grid: [0.5]}\n  - qsm: {split_threshold: null, clip: search}\n"
                 "  - gptq\n")
    r = load_recipe(p)
    assert r.passes == (("smooth", {"alpha": 1, "grid": [0.5]}), ("qsm", {"split_threshold": None, "clip": "search"}),
                        ("gptq", {}))
