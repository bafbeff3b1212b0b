"""The properties themselves, as plain functions: the tests and tools/property_check.py call the same code.

run_passes() runs every graph pass the shipped recipes name, built as qgraph.compile builds them
(api._recipe_pass), in recipe order on a clone, plus fold_norm_affine and shift on their own:
function-preserving passes go through the verifier's check_pass (it raises past 1e-5 relative), and
every pass must either change the graph (and say modified=True) or leave it bit for bit alone and
give a reason in its summary.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx_ir as ir

from qgraph.calib.data import TokenWindows
from qgraph.eval.verify import check_pass, token_range, verification_inputs
from qgraph.ir.regions import find_embeddings, find_linears, find_norms, find_regions
from qgraph.recipes import available, load_recipe

# Passes no shipped recipe runs, checked on their own with w8a8's specs.
STANDALONE = (("fold_norm_affine", {}), ("shift", {}), ("reorder", {}), ("disassemble", {"threshold": 2.0, "assemble": False}),
              ("disassemble", {"threshold": 2.0}), ("flat", {"steps": 2}))


def recipe_chains() -> list[tuple[str, object, tuple[tuple[str, dict], ...]]]:
    """(label, recipe, passes) for every shipped recipe with passes, then the standalone passes."""
    chains = [(name, recipe, recipe.passes) for name in available() if (recipe := load_recipe(name)).passes]
    w8a8 = load_recipe("w8a8")
    return chains + [(f"w8a8+{name}", w8a8, ((name, options),)) for name, options in STANDALONE]


def fingerprint(model: ir.Model) -> str:
    """A digest of everything a pass may change: nodes and their wiring, initializer bytes, value shapes and meta."""
    h = hashlib.sha256()
    for node in model.graph:
        attrs = sorted((k, repr(a.value)) for k, a in node.attributes.items())
        wiring = [v.name if v is not None else "" for v in node.inputs], [v.name for v in node.outputs]
        h.update(repr((node.op_type, node.domain, node.name, wiring, attrs)).encode())
        for v in node.outputs:
            h.update(repr((v.name, v.shape, sorted(v.meta.items()))).encode())
    for name, value in sorted(model.graph.initializers.items()):
        h.update(name.encode())
        h.update(value.const_value.numpy().tobytes())
    return h.hexdigest()


def why_not(summary: dict) -> str:
    """The reason a pass gives for leaving the graph alone: a stated reason, then its refused candidates."""
    reasons = [summary["reason"]] if summary.get("reason") else []
    return "; ".join(reasons + [f"{r['candidate']}: {r['reason']}" for r in summary.get("refused") or []])


@dataclasses.dataclass
class Outcome:
    chain: str
    name: str
    modified: bool
    relative_error: float | None  # None: not a function-preserving pass
    reason: str


def windows_for(model: ir.Model, length: int, count: int = 2, seed: int = 0) -> TokenWindows:
    """Random calibration windows [count, length] over the model's token range."""
    ids = np.random.default_rng(seed).integers(0, token_range(model), size=(count, length), dtype=np.int64)
    return TokenWindows(ids, 0, "random")


def run_passes(model: ir.Model, length: int) -> list[Outcome]:
    """Every recipe's pass chain on a clone of `model`; raises (AssertionError / QGraphError) where a property fails."""
    from qgraph.api import _recipe_pass

    windows = windows_for(model, length)
    inputs = verification_inputs(token_range(model), windows.ids[:1], length=length)
    outcomes = []
    for label, recipe, passes in recipe_chains():
        graph = model.clone()
        for name, options in passes:
            p = _recipe_pass(name, options, recipe, windows, progress=False)
            before = fingerprint(graph)
            error = None
            if p.function_preserving:
                result, verdict = check_pass(p, graph, inputs, name=f"{label}:{name}")
                error = verdict.relative_error
            else:
                result = p(graph)
            changed = fingerprint(result.model) != before
            summary = p.summary()
            assert result.modified == changed, f"{label}:{name} says modified={result.modified} but changed={changed}"
            reason = why_not(summary)
            assert changed or reason, f"{label}:{name} left the graph alone without a reason: {summary}"
            outcomes.append(Outcome(label, name, result.modified, error, reason))
            graph = result.model
    return outcomes


def check_regions(model: ir.Model) -> tuple[list, list]:
    """The recognisers and the region finder on `model`: no exception, and every region well formed."""
    layers = find_linears(model)
    find_norms(model)
    find_embeddings(model)
    regions, rejected = find_regions(model)
    names = {layer.name for layer in layers}
    for r in regions:
        assert r.sources and r.sinks, r.name
        assert all(s.name in names for s in r.sinks), r.name
        for sink in r.sinks:
            assert r.sink_index.shape == (sink.in_features,), (r.name, sink.name)
        assert r.sink_index.min() >= 0 and r.sink_index.max() < r.channels, r.name
    candidates = [x.candidate for x in rejected]
    assert len(candidates) == len(set(candidates)), "a candidate is rejected twice"
    assert all(x.reason for x in rejected)
    return regions, rejected
