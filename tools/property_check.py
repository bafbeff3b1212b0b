"""Longer property runs than `make test`: random graphs through the region finder and every recipe pass.

    .venv/bin/python tools/property_check.py [--examples 200] [--exported 10] [--regions 2000] [--seed N]

The same checks as tests/properties/ (the verifier's 1e-5 relative check on every function-preserving
pass; every pass changes the graph or says why not; the region finder never raises), on more
examples. Without --seed the examples are the derandomized ones CI starts from; with it, new ones.
Prints what was generated and what each pass did; exits non-zero with hypothesis's minimal failing
example when a property fails.
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hypothesis import HealthCheck, given, seed, settings  # noqa: E402

from tests.properties.checks import check_regions, run_passes  # noqa: E402
from tests.properties.graphs import build, config_specs, export_config, graph_specs  # noqa: E402


def _settings(examples: int, rng_seed: int | None) -> settings:
    return settings(max_examples=examples, deadline=None, database=None, derandomize=rng_seed is None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=200, help="hand-built graphs through every pass")
    parser.add_argument("--exported", type=int, default=10, help="exported transformers decoders through every pass")
    parser.add_argument("--regions", type=int, default=2000, help="hand-built graphs through the region finder only")
    parser.add_argument("--seed", type=int, default=None, help="draw new examples (default: the derandomized ones)")
    args = parser.parse_args()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)

    kinds: collections.Counter = collections.Counter()
    blocks: collections.Counter = collections.Counter()
    passes: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    worst: dict[str, float] = collections.defaultdict(float)

    def regions_only(spec):
        blocks.update(b.kind for b in spec.blocks)
        regions, _ = check_regions(build(spec))
        kinds.update(r.kind for r in regions)

    def record(model, length: int) -> None:
        check_regions(model)
        for o in run_passes(model, length):
            key = f"{o.chain}:{o.name}"
            passes[key]["changed" if o.modified else "left alone"] += 1
            if o.relative_error is not None:
                worst[key] = max(worst[key], o.relative_error)

    runs = [
        (f"region finder, {args.regions} hand-built graphs", regions_only, graph_specs(), args.regions),
        (f"every pass, {args.examples} hand-built graphs", lambda s: record(build(s), s.length), graph_specs(),
         args.examples),
        (f"every pass, {args.exported} exported decoders", lambda s: record(export_config(s), s.seq), config_specs(),
         args.exported),
    ]
    for label, body, strategy, count in runs:
        if count <= 0:
            continue
        t = time.perf_counter()
        test = _settings(count, args.seed)(given(strategy)(body))
        if args.seed is not None:
            test = seed(args.seed)(test)
        test()
        print(f"{label}: ok in {time.perf_counter() - t:.1f} s")
    print("region finder run, blocks drawn:", dict(blocks))
    print("region finder run, regions found:", dict(kinds))
    width = max((len(k) for k in passes), default=10)
    print(f"{'pass':<{width}}  changed  left alone  max rel. error")
    for key, counts in passes.items():
        err = f"{worst[key]:.1e}" if key in worst else "-"
        print(f"{key:<{width}}  {counts['changed']:>7}  {counts['left alone']:>10}  {err:>14}")


if __name__ == "__main__":
    main()
