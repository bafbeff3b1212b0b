"""Fuzz the ONNX loader and the recognisers with mutated copies of the tiny test models.

Bytes flipped or cut, inputs dropped, dtypes and shapes changed, initializers deleted, ops renamed,
unknown-domain nodes added (one to three steps each): qgraph.load(path) and the region finder either
work or raise QGraphError. Any other exception is a bug. tools/fuzz.py runs more.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
import pytest
from hypothesis import given, settings

from tests.properties.graphs import Block, GraphSpec, build
from tests.properties.mutations import load_and_find, mutate, mutation_specs

EXAMPLES = 200

# Small graphs beside the exported tiny Llama: their nodes are a larger share of the bytes a flip hits.
SMALL = (
    GraphSpec(vocab=29, dim=12, seq=None, gemm=False, final_norm="rmsnorm", head="tied", gamma="ones_shared",
              dead="none", seed=1, blocks=(Block("attention", "rmsnorm", False, True, False, False, heads=4, kv_heads=2,
                                                 head_dim=3, rope=True),
                                           Block("gated_mlp", "rmsnorm", False, True, False, False, width=17, act="silu"))),
    GraphSpec(vocab=31, dim=10, seq=7, gemm=True, final_norm="none", head="none", gamma="random", dead="none", seed=2,
              blocks=(Block("attention", "layernorm", True, True, True, False, heads=2, kv_heads=2, head_dim=5, mask=True),
                      Block("mlp", "layernorm", True, True, True, False, width=13, act="gelu"))),
)


def seed_models(llama: ir.Model) -> list[bytes]:
    """The serialized models the mutations start from."""
    return [ir.to_proto(m).SerializeToString() for m in (llama, *(build(s) for s in SMALL))]


@pytest.fixture(scope="module")
def seeds(llama_captured):
    return seed_models(llama_captured.model)


def test_fuzz_loader_and_region_finder(seeds, tmp_path):
    logging.getLogger("onnx_ir").setLevel(logging.ERROR)  # dangling names in mutants: not worth a warning each
    path = tmp_path / "mutant.onnx"
    outcomes = []

    @settings(max_examples=EXAMPLES)
    @given(mutation_specs(len(seeds)))
    def check(m):
        path.write_bytes(mutate(seeds[m.seed_model], m))
        outcomes.append(load_and_find(path)[0])

    check()
    # The mutations reach both ends: some mutants still load and analyse, some are refused.
    assert {"ok", "refused"} <= set(outcomes)
