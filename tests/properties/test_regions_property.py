"""The recognisers and the region finder on random small graphs: no exception, regions well formed."""

from __future__ import annotations

from hypothesis import given, settings

from qgraph.ir.regions import find_linears
from tests.properties.checks import check_regions
from tests.properties.graphs import build, graph_specs

EXAMPLES = 150  # milliseconds each


@settings(max_examples=EXAMPLES)
@given(graph_specs())
def test_region_finder_never_raises(spec):
    model = build(spec)
    regions, rejected = check_regions(model)
    # Every constant-weight linear is a candidate source: it heads a region or is rejected with a reason.
    sources = {s.name for r in regions for s in r.sources}
    refused = {r.candidate for r in rejected}
    assert sources.isdisjoint(refused)
    assert {layer.name for layer in find_linears(model)} <= sources | refused
