"""Named quantization recipes (YAML files beside this module), loaded and validated."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

import yaml

from qgraph.errors import QGraphError
from qgraph.options import check_keys, kind_of, option, parse_options

RECIPE_DIR = Path(__file__).parent

_TOP_KEYS = {"name", "description", "layers", "passes", "weights", "activations", "lm_head", "embedding", "lowering",
             "int8_kernel"}
_LAYER_KEYS = {"select", "skip"}
WEIGHT_KEYS = {"format", "granularity", "group_size", "symmetric", "full_range", "float_zero_point"}
ACT_KEYS = {"format", "granularity", "group_size", "symmetric", "static", "observer", "clip"}
EMBEDDING_KEYS = {"format", "granularity", "group_size"}
_HEAD_KEYS = {"weights", "activations", "lowering"}
LOWERINGS = {
    "qdq": "QuantizeLinear/DequantizeLinear pairs ORT fuses into its integer kernels",
    "matmulnbits": "ORT's MatMulNBits: int4 group weights, float activations",
    "fp4-emulated": "FP4 E2M1 codes and rounding in ops ORT runs (no float4e2m1 kernel in ORT 1.32)",
}


def _format_names() -> tuple[str, ...]:
    from qgraph.ir.qspec import FORMATS, KV_ONLY_FORMATS

    return tuple(f for f in FORMATS if f not in KV_ONLY_FORMATS)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """How one kind of tensor is quantized, before it is bound to a layer's axes."""

    format: str = option(help="number format", choices=_format_names, example="int8", aliases=("bits", "dtype", "type"))
    granularity: Literal["tensor", "channel", "group", "token"] = option(
        "channel", "one scale per tensor, per channel (weights: output; activations: feature), per group of inputs "
                   "or (dynamic activations) per token")
    group_size: int | None = option(None, "inputs sharing one scale, with granularity group", ge=1, example=128)
    symmetric: bool = option(True, "no zero point (false: one per scale)")
    static: bool = option(True, "activation ranges calibrated ahead of time (false: computed at run time)")
    observer: Literal["minmax"] = option("minmax", "how calibration turns activations into a range")
    full_range: bool = option(False, "symmetric signed integers also use code -2^(b-1) (as llama.cpp Q4_0)")
    float_zero_point: bool = option(False, "asymmetric weights: an unrounded zero point, each group's codes spanning "
                                           "exactly [min, max] (as llama.cpp Q4_1; MatMulNBits lowering only)")
    clip: float = option(1.0, "dynamic activations: each step covers clip x max|x| of its token or group "
                              "(values beyond are clipped); 1 clips nothing", gt=0, le=1)


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
    int8_kernel: str = "u8u8"  # ORT's int8 GEMM for int8-weight x 8-bit-activation layers (backends.int8_kernels)

    @property
    def quantizes(self) -> bool:
        return self.blocks is not None or self.lm_head is not None or self.embedding is not None

    @property
    def needs_calibration(self) -> bool:
        from qgraph.passes.registry import lookup

        rules = [r for r in (self.blocks, self.lm_head) if r is not None]
        return (any(not lookup(name, self.name).data_free for name, _ in self.passes)
                or any(r.activations is not None and r.activations.static for r in rules))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_int8_kernel(self, name: str, where: str = "--int8-kernel") -> Recipe:
        """This recipe lowered for another int8 kernel: layers on the old kernel's weight grid move to the new one's.

        `s7` rounds the fused int8 layers' weights to 7 bits, so passes that search or round weights
        (smooth, gptq, ...) optimise for the grid the artifact really stores.
        """
        from qgraph.backends.int8_kernels import int8_kernel, takes_int8_gemm

        old, new = int8_kernel(self.int8_kernel), int8_kernel(name, where)

        def move(rule: LayerRule | None) -> LayerRule | None:
            if (rule is None or rule.weights is None or rule.weights.format != old.weight_format
                    or not takes_int8_gemm(rule.weights.format, rule.activations)):
                return rule
            return dataclasses.replace(rule, weights=dataclasses.replace(rule.weights, format=new.weight_format))

        return dataclasses.replace(self, blocks=move(self.blocks), lm_head=move(self.lm_head), int8_kernel=new.name)


def available() -> list[str]:
    """Names of the recipes shipped with qgraph."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _tensor_rule(d: Any, where: str, origin: str, allowed: set[str]) -> TensorRule | None:
    if d in (None, "float", "none"):
        return None
    rule = parse_options(TensorRule, d, where, origin, keys=allowed)
    if rule.granularity == "group" and rule.group_size is None:
        raise QGraphError(f"recipe {origin}: {where} has granularity group but no group_size", "add group_size: 128")
    if rule.granularity != "group" and rule.group_size is not None:
        raise QGraphError(f"recipe {origin}: {where}.group_size applies to granularity group, not {rule.granularity}",
                          "add granularity: group, or drop group_size")
    dynamic = where.endswith("activations") and not rule.static
    if where.endswith("activations") and rule.granularity == "group" and rule.static:
        raise QGraphError(f"recipe {origin}: {where}.granularity group is a run-time step per group of a token's "
                          "channels, for activations with static: false", "set static: false, or use granularity "
                          "tensor or channel")
    if rule.granularity == "token" and not dynamic:
        raise QGraphError(f"recipe {origin}: {where}.granularity token is a run-time step per token, for activations "
                          "with static: false", "set static: false, or use granularity tensor or channel")
    if dynamic and rule.granularity not in ("token", "group"):
        raise QGraphError(f"recipe {origin}: {where} with static: false computes steps at run time per token or per "
                          f"group of a token's channels, not per {rule.granularity}",
                          "use granularity: token, or granularity: group with a group_size")
    if rule.clip != 1.0 and not dynamic:
        raise QGraphError(f"recipe {origin}: {where}.clip applies to dynamic activations (static: false)",
                          "drop clip, or set static: false")
    return rule


def _kernel_block(rule: TensorRule, where: str, origin: str, kernel: str, fix: str) -> None:
    """ORT's block kernels (MatMulNBits, GatherBlockQuantized) take power-of-two blocks of 16 or more."""
    size = rule.group_size
    if size < 16 or size & (size - 1):
        raise QGraphError(f"recipe {origin}: {where}.group_size: {size} is not a power of two >= 16, which {kernel} needs",
                          fix)


def _layer_rule(d: Any, where: str, origin: str) -> LayerRule | None:
    if d in (None, "float", "none"):
        return None
    d = check_keys(d, _HEAD_KEYS, where, origin)
    prefix = "" if where == "the blocks" else f"{where}."
    lowering = d.get("lowering", "qdq")
    if not isinstance(lowering, str) or lowering not in LOWERINGS:
        raise QGraphError(f"recipe {origin}: {prefix}lowering: unknown lowering {lowering!r}",
                          f"use one of {', '.join(LOWERINGS)}")
    rule = LayerRule(
        _tensor_rule(d.get("weights"), f"{prefix}weights", origin, WEIGHT_KEYS),
        _tensor_rule(d.get("activations"), f"{prefix}activations", origin, ACT_KEYS),
        lowering,
    )
    if rule.weights is None and rule.activations is None:
        return None
    if rule.lowering == "matmulnbits":
        if ((rule.activations is not None and rule.activations.static) or rule.weights is None
                or rule.weights.format not in ("int4", "uint4") or rule.weights.granularity != "group"):
            raise QGraphError(f"recipe {origin}: lowering matmulnbits in {where} takes int4 group weights with float "
                              "or dynamic (run-time rounded) activations",
                              "use weights {format: int4, granularity: group} with no activations or static: false "
                              "ones, or lowering: qdq")
        _kernel_block(rule.weights, f"{prefix}weights", origin, "MatMulNBits", "use group_size: 32, 64 or 128, or lowering: qdq")
    if rule.lowering == "fp4-emulated" and any(t and t.format != "fp4_e2m1" for t in (rule.weights, rule.activations)):
        raise QGraphError(f"recipe {origin}: lowering fp4-emulated in {where} emulates fp4_e2m1 weights and activations",
                          "use format fp4_e2m1 for both, or lowering: qdq")
    return rule


def _passes(items: Any, blocks: LayerRule | None, origin: str) -> tuple[tuple[str, dict], ...]:
    """The recipe's passes as written, each checked against its registration (qgraph.passes.registry)."""
    from qgraph.passes.registry import lookup

    if items in (None, []):
        return ()
    if not isinstance(items, list):
        raise QGraphError(f"recipe {origin}: passes must be a list, got {kind_of(items)}",
                          "write `passes:` then `- smooth: {alpha: search}` lines")
    out, entries = [], []
    for i, item in enumerate(items):
        if isinstance(item, dict) and len(item) == 1:
            name, options = next(iter(item.items()))
        elif isinstance(item, dict) or not isinstance(item, str):
            raise QGraphError(f"recipe {origin}: passes[{i}] is {item!r}, not one pass",
                              "write each pass on its own `- ` line: `- gptq` or `- smooth: {alpha: 0.5}`")
        else:
            name, options = item, None
        entry = lookup(name, origin)
        entry.parse(options, origin)
        entry.check(blocks, origin)
        out.append((name, dict(options or {})))
        entries.append(entry)
    for i, entry in enumerate(entries):
        after = next((name for name, later in zip([n for n, _ in out[i + 1:]], entries[i + 1:], strict=True)
                      if not later.keeps_weights), None)
        if entry.last and after is not None:
            raise QGraphError(f"recipe {origin}: pass {after!r} runs after {entry.name} and would {entry.last}",
                              f"list {entry.name} last in passes")
    return tuple(out)


def _text(d: dict, key: str, default: str, origin: str) -> str:
    value = d.get(key, default)
    if not isinstance(value, str):
        raise QGraphError(f"recipe {origin}: {key}: {value!r} is not text", f'quote it: {key}: "{value}"')
    return value


def parse_recipe(data: Any, origin: str) -> Recipe:
    """Validate a recipe mapping; every mistake names the key and the fix."""
    if data is None:
        raise QGraphError(f"recipe {origin} is empty", "write at least `weights: {format: int8}` (see `qgraph recipes w8a8`)")
    if not isinstance(data, dict):
        raise QGraphError(f"recipe {origin}: the top level must be a mapping of keys (name, weights, ...), got {kind_of(data)}",
                          "write the recipe as key: value lines (see `qgraph recipes w8a8`)")
    d = check_keys(data, _TOP_KEYS, "the top level", origin)
    layers = check_keys(d.get("layers", {}), _LAYER_KEYS, "layers", origin)
    select = layers.get("select", "block-linears")
    if select != "block-linears":
        raise QGraphError(f"recipe {origin}: unknown layers.select {select!r}", "use block-linears")
    skip = layers.get("skip") or []
    if not isinstance(skip, list) or not all(isinstance(name, str) for name in skip):
        raise QGraphError(f"recipe {origin}: layers.skip: {skip!r} is not a list of layer names",
                          "write skip: [name, ...] with names `qgraph inspect MODEL` lists")
    blocks = _layer_rule(
        {k: d[k] for k in ("weights", "activations", "lowering") if k in d}, "the blocks", origin
    )
    embedding = _tensor_rule(d.get("embedding"), "embedding", origin, EMBEDDING_KEYS)
    if embedding is not None:
        if embedding.format not in ("int8", "int4") or embedding.granularity != "group":
            raise QGraphError(f"recipe {origin}: embedding {embedding.format} {embedding.granularity} is not supported",
                              "use embedding: {format: int8 (or int4), granularity: group, group_size: 32}, or float")
        _kernel_block(embedding, "embedding", origin, "GatherBlockQuantized", "use group_size: 32")
    head = d.get("lm_head")
    tied = head == "tied"
    if tied and embedding is None:
        raise QGraphError(f"recipe {origin}: lm_head: tied reads the quantized embedding table, but embedding is float",
                          "quantize the table (embedding: {format: int8, granularity: group, group_size: 32}) "
                          "or set lm_head: float")
    if isinstance(head, str) and head not in ("tied", "float", "none"):
        raise QGraphError(f"recipe {origin}: lm_head: {head!r} is not float, tied or a mapping",
                          "write lm_head: float, lm_head: tied, or lm_head: {weights: {format: int8}}")
    return Recipe(
        name=_text(d, "name", Path(origin).stem, origin),
        description=_text(d, "description", "", origin),
        blocks=blocks,
        lm_head=None if tied else _layer_rule(head, "lm_head", origin),
        embedding=embedding,
        lm_head_tied=tied,
        select=select,
        skip=tuple(skip),
        passes=_passes(d.get("passes"), blocks, origin),
        source=origin,
    ).with_int8_kernel(d.get("int8_kernel", "u8u8"), f"recipe {origin}: int8_kernel")


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
    return parse_recipe(_read_yaml(path), path.name)


def _read_yaml(path: Path) -> Any:
    """The YAML document in a recipe file; unreadable, non-UTF-8 and malformed files are one-line errors."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise QGraphError(f"cannot read recipe file {str(path)!r}: {exc.strerror}", "pass a readable .yaml file") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise QGraphError(f"recipe {path.name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
                          "save the recipe as a UTF-8 YAML text file") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise QGraphError(f"recipe {path.name}: not valid YAML {_yaml_problem(exc, text)}", "fix the YAML syntax there") from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> str:
    """'at line 2, column 1: expected ...' from a PyYAML error, on one line."""
    if isinstance(exc, yaml.reader.ReaderError):
        line = text.count("\n", 0, exc.position) + 1
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return f"at line {line}: unacceptable character #x{code:04x} ({exc.reason})"
    mark, context = getattr(exc, "problem_mark", None), getattr(exc, "context", None)
    where = f"at line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark:
        problem += f" ({context} from line {context_mark.line + 1})"
    return where + problem
