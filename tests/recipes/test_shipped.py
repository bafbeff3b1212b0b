"""Shipped recipes load and build their passes exactly as recorded before the pass registry existed.

shipped_recipes.json was written by `snapshot()` on the commit before the registry (9aee0db):
every shipped recipe's to_dict() and the attributes of each pass it builds, plus every pass built
with no options (its defaults). Values are compared after a JSON round trip, so an int option the
registry now types as float (qsm split_threshold 8 -> 8.0) compares equal, as it computes the same.
Recipes added later (fp32-rot, w4a8-rot, kv4, kv2, w4a8-rot-kv4, w4a4-rot) were added to the file
by `write()`; every older entry unchanged. Since then recipes carry `int8_kernel` (default u8u8),
tensor rules and QuantSpecs a `clip` (default 1.0), and passes start with empty result attributes
(clipped / rounded / reason ...) that say why they changed nothing, and rotate the SpinQuant options
(spin_steps 0 keeps the Hadamard), and weight rules and QuantSpecs a float_zero_point (default false),
and kv_quant KIVI's residual window (default 128, read only by KV-cache artifacts), and w8a8-cnn;
each was added after checking every other value was unchanged.
Private attributes (a leading underscore: scratch state such as calibration samples) are not recorded.
After an intended change to a recipe or a pass default, rewrite the file with
`python -c "from tests.recipes.test_shipped import write; write()"`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from qgraph import api
from qgraph.recipes import available, load_recipe

GOLDEN = Path(__file__).with_name("shipped_recipes.json")
WINDOWS = object()  # passes only keep the calibration windows at construction
# Every pass with no options, under a shipped recipe whose formats it accepts.
DEFAULTS = {"w8a8": ["smooth", "awq", "qsm", "shift", "fold_norm_affine", "gptq"], "fp4": ["exp_bias"],
            "w4a16": ["clip_search", "gptq"], "w4a16-awq": ["qsm", "awq"]}


def _plain(v):
    if dataclasses.is_dataclass(v):
        return dataclasses.asdict(v)
    if isinstance(v, (tuple, list)):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def _attrs(p) -> dict:
    kept = {k: v for k, v in sorted(vars(p).items()) if k != "windows" and not k.startswith("_")}
    return {"type": type(p).__name__, **{k: _plain(v) for k, v in kept.items()}}


def snapshot() -> dict:
    """Every shipped recipe and the passes it builds, as JSON-able data."""
    out = {}
    for name in available():
        r = load_recipe(name)
        out[name] = {"recipe": r.to_dict(), "passes": [_attrs(api._recipe_pass(n, o, r, WINDOWS, False)) for n, o in r.passes]}
    for base, names in DEFAULTS.items():
        r = load_recipe(base)
        out[f"defaults/{base}"] = [_attrs(api._recipe_pass(n, {}, r, WINDOWS, True)) for n in names]
    return json.loads(json.dumps(out))


def write() -> None:
    GOLDEN.write_text(json.dumps(snapshot(), indent=1, sort_keys=True) + "\n")


def test_shipped_recipes_and_their_passes_are_unchanged():
    golden = json.loads(GOLDEN.read_text())
    now = snapshot()
    assert sorted(now) == sorted(golden)
    for key in golden:
        assert now[key] == golden[key], key
