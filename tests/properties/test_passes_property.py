"""Every graph pass the recipes name, on random graphs: function-preserving passes keep the outputs (the
verifier's own check, 1e-5 relative), and every pass changes the graph or says why it did not.

Two sources of graphs: hand-built ones in every shape the recognisers know (milliseconds each), and
tiny Llama / Mistral / Qwen2 decoders exported by torch (seconds each, so only two by default).
"""

from __future__ import annotations

from hypothesis import given, settings

from qgraph.eval.verify import DEFAULT_TOLERANCE
from tests.properties.checks import check_regions, recipe_chains, run_passes
from tests.properties.graphs import build, config_specs, export_config, graph_specs

EXAMPLES = 8  # each runs 15 passes (about 1 s); tools/property_check.py runs more
EXPORTED = 2  # a torch export each (3 to 10 s)


def _check(model, length: int) -> None:
    check_regions(model)
    outcomes = run_passes(model, length)
    assert len(outcomes) == sum(len(passes) for _, _, passes in recipe_chains())
    for o in outcomes:
        assert o.relative_error is None or o.relative_error <= DEFAULT_TOLERANCE, o


@settings(max_examples=EXAMPLES)
@given(graph_specs())
def test_passes_preserve_outputs_or_say_why_not(spec):
    _check(build(spec), spec.length)


@settings(max_examples=EXPORTED)
@given(config_specs())
def test_passes_on_exported_decoders(spec):
    _check(export_config(spec), spec.seq)
