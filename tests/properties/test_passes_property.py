"""Every graph pass the recipes name, on random small graphs: function-preserving passes keep the outputs
(the verifier's own check, 1e-5 relative), and every pass changes the graph or says why it did not."""

from __future__ import annotations

from hypothesis import given, settings

from qgraph.eval.verify import DEFAULT_TOLERANCE
from tests.properties.checks import recipe_chains, run_passes
from tests.properties.graphs import build, graph_specs

EXAMPLES = 8  # each runs 15 passes (about 1 s); tools/property_check.py runs more


@settings(max_examples=EXAMPLES)
@given(graph_specs())
def test_passes_preserve_outputs_or_say_why_not(spec):
    outcomes = run_passes(build(spec), spec.length)
    assert len(outcomes) == sum(len(passes) for _, _, passes in recipe_chains())
    for o in outcomes:
        assert o.relative_error is None or o.relative_error <= DEFAULT_TOLERANCE, o
