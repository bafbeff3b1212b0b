"""The recognisers and the region finder on random small graphs: no exception, regions well formed."""

from __future__ import annotations

from hypothesis import given, settings

from tests.properties.checks import check_regions
from tests.properties.graphs import build, graph_specs

EXAMPLES = 150  # milliseconds each


@settings(max_examples=EXAMPLES)
@given(graph_specs())
def test_region_finder_never_raises(spec):
    regions, rejected = check_regions(build(spec))
    # Every constant-weight linear or norm is a region source or rejected with a reason; none vanishes.
    sources = {s.name for r in regions for s in r.sources}
    assert sources.isdisjoint(r.candidate for r in rejected)
