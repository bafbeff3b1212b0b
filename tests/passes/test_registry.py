"""The pass registry: every recipe pass declares typed, documented options in its own file."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest

from qgraph import api
from qgraph.errors import QGraphError
from qgraph.options import option, parse_options
from qgraph.passes import registry
from qgraph.recipes import load_recipe


def test_every_pass_declares_documented_options_whose_defaults_validate():
    passes = registry.registered()
    assert list(passes) == ["awq", "clip_search", "disassemble", "equalize_convs", "exp_bias", "flat", "fold_norm_affine",
                            "gptq", "kv_quant", "qsm", "reorder", "rotate", "shift", "smooth"]
    for name, entry in passes.items():
        assert entry.help and dataclasses.is_dataclass(entry.options), name
        assert entry.options.__dataclass_params__.frozen, name
        defaults = parse_options(entry.options, {}, f"passes.{name}", "test")
        for f in dataclasses.fields(entry.options):
            assert f.metadata["help"], (name, f.name)
            value = getattr(defaults, f.name)
            written = list(value) if isinstance(value, tuple) else value  # as YAML would give it
            assert getattr(parse_options(entry.options, {f.name: written}, name, "test"), f.name) == value, (name, f.name)


@dataclasses.dataclass(frozen=True)
class _CountOptions:
    times: int = option(1, "how often", ge=1)


class _CountPass:
    def __init__(self, times, spec):
        self.times, self.spec = times, spec


def test_a_pass_registered_in_its_own_file_is_usable_in_recipes(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))  # leave the real registry as it was
    registry.register("count", _CountOptions, help="counts")(lambda o, ctx: _CountPass(o.times, ctx.weight_spec))
    p = tmp_path / "r.yaml"
    p.write_text("weights: {format: int8}\npasses:\n  - count: {times: 3}\n")
    recipe = load_recipe(p)
    built = api._recipe_pass("count", dict(recipe.passes)["count"], recipe, None, False)
    assert built.times == 3 and built.spec.format == "int8" and built.spec.axis == 1
    p.write_text("weights: {format: int8}\npasses:\n  - count: {times: 0}\n")
    with pytest.raises(QGraphError, match=r"passes.count.times: 0 is not an integer >= 1"):
        load_recipe(p)


def test_a_name_registered_by_two_modules_is_refused(monkeypatch):
    monkeypatch.setattr(registry, "_PASSES", dict(registry._PASSES))
    with pytest.raises(ValueError, match="'smooth' is registered by qgraph.passes.smooth and"):
        registry.register("smooth", _CountOptions, help="again")(lambda o, ctx: None)


def test_programmatic_recipe_options_are_checked_when_built():
    recipe = dataclasses.replace(load_recipe("w8a8"), passes=(("smooth", {"alpha": 2.0}),))
    with pytest.raises(QGraphError, match=r"recipe w8a8: passes.smooth.alpha: 2 is not a number in \[0, 1\]"):
        api._recipe_pass("smooth", {"alpha": 2.0}, recipe, None, False)


def test_import_qgraph_does_not_import_the_passes():
    code = "import sys, qgraph; print(sorted(m for m in sys.modules if m.startswith('qgraph.passes')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
