#!/usr/bin/env python
"""The README's family table: tiny random checkpoints of decoder families transformers ships, what qgraph finds.

Per family (the same checkpoints as tests/test_families.py): the class transformers loaded, linear layers
found, layers w8a8-qsm quantizes, channel regions, and the refused region candidates with their reasons.

    python tools/families.py [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import qgraph  # noqa: E402
from qgraph.calib.data import TokenWindows  # noqa: E402
from qgraph.ir.regions import find_linears  # noqa: E402
from qgraph.passes.split_fused_linears import regions_as_compiled  # noqa: E402
from tests.test_families import _families  # noqa: E402


def _kind(reason: str) -> str:
    """A refusal reason without its node and value names, so equal reasons count together."""
    reason = re.sub(r"\b(?:node|val|transpose|linear|model|net)[\w./]*", "X", reason.split(" -- ")[0])
    return reason[:80]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    calib = TokenWindows(np.random.default_rng(1).integers(0, 256, size=(2, 32), dtype=np.int64), 0, "random")
    for family, build in _families().items():
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            build().eval().save_pretrained(d)
            captured = qgraph.load(d, progress=False)
        regions, rejected, split = regions_as_compiled(captured.model)
        compiled = qgraph.compile(captured, recipe="w8a8-qsm", calib=calib, progress=False, verify=True)
        reasons = collections.Counter(_kind(r.reason) for r in rejected)
        rows.append({"family": family, "loaded_class": captured.source["loaded_class"],
                     "linears": len(find_linears(captured.model)),
                     "fused_split": f"{len(split.split)} -> {sum(len(p) for p in split.split.values())}",
                     "quantized": compiled.report["quantized_layers"],
                     "regions": len(regions), "refused": len(rejected),
                     "verified": all(v["ok"] for v in compiled.report["verified"]),
                     "refusals": dict(reasons.most_common(3))})
        print(f"[families] {family}", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print("| family (class loaded) | linears found | fused split into parts | quantized (w8a8-qsm) | regions | "
          "refused: most common reasons | --verify |")
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        why = "; ".join(f"{n} x {k}" for k, n in r["refusals"].items()) or "none"
        print(f"| {r['family']} ({r['loaded_class']}) | {r['linears']} | {r['fused_split']} | {r['quantized']} | "
              f"{r['regions']} | {r['refused']}: {why} | {'passes' if r['verified'] else 'FAILS'} |")


if __name__ == "__main__":
    main()
