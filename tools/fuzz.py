"""Fuzz the ONNX loader and the region finder longer than `make test` does.

    .venv/bin/python tools/fuzz.py [--examples 5000] [--seed N]

Mutates serialized copies of the tiny test models (the Llama and BERT of tests/conftest.py, exported
here, and the small graphs of tests/properties/test_fuzz_loader.py): bytes flipped or cut, node inputs
dropped, dtypes and shapes changed, initializers deleted, ops renamed, unknown-domain nodes added,
one to three steps each. Every mutant goes through qgraph.load(path) and the region finder; anything
but success or a QGraphError fails the run with hypothesis's minimal mutation. Prints the outcomes
per first mutation and the most frequent refusal messages.
"""

from __future__ import annotations

import argparse
import collections
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402


def _exported_seeds() -> list:
    import torch

    import qgraph
    from qgraph.ir.capture import CausalLMLogits, EncoderHidden
    from tests.conftest import tiny_bert, tiny_llama

    ids = torch.arange(12).reshape(1, 12) % 200
    return [qgraph.load(CausalLMLogits(tiny_llama()), example_inputs=(ids,), progress=False).model,
            qgraph.load(EncoderHidden(tiny_bert()), example_inputs=(ids,), progress=False).model]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=None, help="draw new mutants (default: the derandomized ones)")
    args = parser.parse_args()
    import onnx_ir as ir

    from tests.properties.graphs import build
    from tests.properties.mutations import load_and_find, mutate, mutation_specs
    from tests.properties.test_fuzz_loader import SMALL

    logging.getLogger("onnx_ir").setLevel(logging.ERROR)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    models = _exported_seeds() + [build(s) for s in SMALL]
    seeds = [ir.to_proto(m).SerializeToString() for m in models]
    path = Path(tempfile.mkdtemp()) / "mutant.onnx"
    outcomes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    messages: collections.Counter = collections.Counter()

    def body(m):
        path.write_bytes(mutate(seeds[m.seed_model], m))
        status, message = load_and_find(path)
        outcomes[m.steps[0][0]][status] += 1
        if message:  # group messages by their shape: names and numbers vary
            messages[re.sub(r"'[^']*'|\d+", "_", message)[:110]] += 1

    test = settings(max_examples=args.examples, deadline=None, database=None, derandomize=args.seed is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])(
        given(mutation_specs(len(seeds)))(body))
    if args.seed is not None:
        test = seed(args.seed)(test)
    t = time.perf_counter()
    test()
    total = sum(sum(c.values()) for c in outcomes.values())
    print(f"{total} mutants of {len(seeds)} models, no exception but QGraphError, {time.perf_counter() - t:.1f} s")
    print(f"{'first mutation':<20} {'ok':>6} {'refused':>8}")
    for kind, c in sorted(outcomes.items()):
        print(f"{kind:<20} {c['ok']:>6} {c['refused']:>8}")
    print("most frequent refusals:")
    for message, n in messages.most_common(12):
        print(f"  {n:>5}  {message}")


if __name__ == "__main__":
    main()
