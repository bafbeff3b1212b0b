"""Named quantization recipes (YAML files beside this module), loaded and validated."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from qgraph.errors import QGraphError

RECIPE_DIR = Path(__file__).parent

_TOP_KEYS = {"name", "description", "layers", "passes", "weights", "activations", "lm_head", "embedding", "lowering"}
# Graph passes a recipe may run before annotation, with the options each accepts.
PASS_OPTIONS: dict[str, set[str]] = {
    "smooth": {"alpha", "grid", "sample_tokens"},
    "qsm": {"clip", "split_threshold", "max_copies", "shift", "sample_tokens"},
    "shift": {"scale", "steps", "sample_tokens"},
    "awq": {"alpha", "grid", "sample_tokens"},
    "clip_search": {"ratios", "sample_tokens"},
    "fold_norm_affine": set(),
    "exp_bias": {"max_shift", "targets", "clips", "sample_tokens"},
    "gptq": {"damp", "act_order"},
}
_LAYER_KEYS = {"select", "skip"}
_WEIGHT_KEYS = {"format", "granularity", "group_size", "symmetric", "full_range"}
_ACT_KEYS = {"format", "granularity", "symmetric", "static", "observer"}
_EMBEDDING_KEYS = {"format", "granularity", "group_size"}
_HEAD_KEYS = {"weights", "activations", "lowering"}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one kind of tensor is quantized, before it is bound to a layer's axes."""

    format: str
    granularity: str = "channel"
    group_size: int | None = None
    symmetric: bool = True
    static: bool = True
    observer: str = "minmax"
    full_range: bool = False


@dataclasses.dataclass(frozen=True)
class LayerRule:
    """What happens to a set of layers: weight rule, activation rule (None = float), lowering."""

    weights: TensorRule | None
    activations: TensorRule | None
    lowering: str = "qdq"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A named recipe: which layers it quantizes and how."""

    name: str
    description: str
    blocks: LayerRule | None
    lm_head: LayerRule | None
    embedding: TensorRule | None = None  # None: the token table stays float
    lm_head_tied: bool = False  # lm_head reads the quantized embedding table (one stored copy)
    select: str = "block-linears"
    skip: tuple[str, ...] = ()
    passes: tuple[tuple[str, dict], ...] = ()
    source: str = ""

    @property
    def quantizes(self) -> bool:
        return self.blocks is not None or self.lm_head is not None or self.embedding is not None

    @property
    def needs_calibration(self) -> bool:
        rules = [r for r in (self.blocks, self.lm_head) if r is not None]
        return bool(self.passes) or any(r.activations is not None and r.activations.static for r in rules)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def available() -> list[str]:
    """Names of the recipes shipped with qgraph."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _check_keys(d: Any, allowed: set[str], where: str, origin: str) -> dict:
    if d is None:
        return {}
    if not isinstance(d, dict):
        raise QGraphError(f"recipe {origin}: {where} must be a mapping, got {type(d).__name__}",
                          f"write {where} as key: value lines")
    unknown = sorted(set(d) - allowed)
    if unknown:
        import difflib

        hints = [difflib.get_close_matches(k, allowed, n=1) for k in unknown]
        did = "; ".join(f"{k!r} -> did you mean {h[0]!r}?" for k, h in zip(unknown, hints, strict=True) if h)
        raise QGraphError(
            f"recipe {origin}: unknown key(s) {', '.join(map(repr, unknown))} in {where}",
            (did + "; " if did else "") + f"allowed keys: {', '.join(sorted(allowed))}",
        )
    return d


def _tensor_rule(d: Any, where: str, origin: str, allowed: set[str]) -> TensorRule | None:
    if d in (None, "float", "none"):
        return None
    d = _check_keys(d, allowed, where, origin)
    if "format" not in d:
        raise QGraphError(f"recipe {origin}: {where} has no format", "add e.g. `format: int8`")
    from qgraph.ir.qspec import FORMATS

    if d["format"] not in FORMATS:
        raise QGraphError(f"recipe {origin}: unknown format {d['format']!r} in {where}",
                          f"use one of {', '.join(FORMATS)}")
    gran = d.get("granularity", "channel")
    if gran not in ("tensor", "channel", "group"):
        raise QGraphError(f"recipe {origin}: unknown granularity {gran!r} in {where}", "use tensor, channel or group")
    if gran == "group" and not d.get("group_size"):
        raise QGraphError(f"recipe {origin}: {where} has granularity group but no group_size", "add group_size: 128")
    return TensorRule(
        format=d["format"], granularity=gran, group_size=d.get("group_size"),
        symmetric=bool(d.get("symmetric", True)), static=bool(d.get("static", True)),
        observer=d.get("observer", "minmax"), full_range=bool(d.get("full_range", False)),
    )


def _layer_rule(d: Any, where: str, origin: str) -> LayerRule | None:
    if d in (None, "float", "none"):
        return None
    d = _check_keys(d, _HEAD_KEYS, where, origin)
    lowering = d.get("lowering", "qdq")
    if lowering not in ("qdq", "matmulnbits", "fp4-emulated"):
        raise QGraphError(f"recipe {origin}: unknown lowering {lowering!r} in {where}", "use qdq, matmulnbits or fp4-emulated")
    prefix = "" if where == "the blocks" else f"{where}."
    rule = LayerRule(
        _tensor_rule(d.get("weights"), f"{prefix}weights", origin, _WEIGHT_KEYS),
        _tensor_rule(d.get("activations"), f"{prefix}activations", origin, _ACT_KEYS),
        lowering,
    )
    if rule.weights is None and rule.activations is None:
        return None
    if rule.lowering == "matmulnbits" and (rule.activations is not None or rule.weights is None
                                           or rule.weights.format not in ("int4", "uint4")
                                           or rule.weights.granularity != "group"):
        raise QGraphError(f"recipe {origin}: lowering matmulnbits in {where} is int4 group weight-only",
                          "use weights {format: int4, granularity: group} with no activations, or lowering: qdq")
    if rule.lowering == "fp4-emulated" and any(t and t.format != "fp4_e2m1" for t in (rule.weights, rule.activations)):
        raise QGraphError(f"recipe {origin}: lowering fp4-emulated in {where} emulates fp4_e2m1 weights and activations",
                          "use format fp4_e2m1 for both, or lowering: qdq")
    return rule


def _passes(items: Any, origin: str) -> tuple[tuple[str, dict], ...]:
    if items in (None, []):
        return ()
    if not isinstance(items, list):
        raise QGraphError(f"recipe {origin}: passes must be a list", "write `passes:` then `- smooth: {alpha: search}` lines")
    out = []
    for item in items:
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
        else:
            name, options = None, None
        if name not in PASS_OPTIONS:
            import difflib

            near = difflib.get_close_matches(str(name), PASS_OPTIONS, n=1)
            raise QGraphError(f"recipe {origin}: unknown pass {name!r} in passes",
                              (f"did you mean {near[0]!r}? " if near else "") + f"known passes: {', '.join(PASS_OPTIONS)}")
        options = _check_keys(options or {}, PASS_OPTIONS[name], f"passes.{name}", origin)
        out.append((name, dict(options)))
    names = [name for name, _ in out]
    if "gptq" in names and names[-1] != "gptq":
        after = names[names.index("gptq") + 1]
        raise QGraphError(f"recipe {origin}: pass {after!r} runs after gptq and would move the weights off the grid "
                          "gptq rounded them to", "list gptq last in passes")
    return tuple(out)


def parse_recipe(data: Any, origin: str) -> Recipe:
    """Validate a recipe mapping; every mistake names the key and the fix."""
    d = _check_keys(data, _TOP_KEYS, "the top level", origin)
    layers = _check_keys(d.get("layers", {}), _LAYER_KEYS, "layers", origin)
    select = layers.get("select", "block-linears")
    if select != "block-linears":
        raise QGraphError(f"recipe {origin}: unknown layers.select {select!r}", "use block-linears")
    blocks = _layer_rule(
        {k: d[k] for k in ("weights", "activations", "lowering") if k in d}, "the blocks", origin
    )
    embedding = _tensor_rule(d.get("embedding"), "embedding", origin, _EMBEDDING_KEYS)
    if embedding is not None and (embedding.format != "int8" or embedding.granularity != "group"):
        raise QGraphError(f"recipe {origin}: embedding {embedding.format} {embedding.granularity} is not supported",
                          "use embedding: {format: int8, granularity: group, group_size: 32}, or float")
    tied = d.get("lm_head") == "tied"
    if tied and embedding is None:
        raise QGraphError(f"recipe {origin}: lm_head: tied reads the quantized embedding table, but embedding is float",
                          "quantize the table (embedding: {format: int8, granularity: group, group_size: 32}) "
                          "or set lm_head: float")
    return Recipe(
        name=str(d.get("name", Path(origin).stem)),
        description=str(d.get("description", "")),
        blocks=blocks,
        lm_head=None if tied else _layer_rule(d.get("lm_head"), "lm_head", origin),
        embedding=embedding,
        lm_head_tied=tied,
        select=select,
        skip=tuple(layers.get("skip", []) or []),
        passes=_passes(d.get("passes"), origin),
        source=origin,
    )


def load_recipe(name_or_path: str | Path | Recipe) -> Recipe:
    """A shipped recipe by name, or a recipe YAML file by path."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    text = str(name_or_path)
    path = Path(text)
    if not (path.suffix in (".yaml", ".yml") or path.is_file()):
        path = RECIPE_DIR / f"{text}.yaml"
        if not path.exists():
            raise QGraphError(f"unknown recipe {text!r}", f"use one of {', '.join(available())} or a path to a .yaml file")
    elif not path.exists():
        raise QGraphError(f"recipe file {text!r} does not exist", f"use one of {', '.join(available())} or an existing .yaml")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise QGraphError(f"recipe {path.name}: not valid YAML ({str(exc).splitlines()[0]})", "fix the YAML syntax") from None
    return parse_recipe(data, path.name)
