"""Recipe passes register themselves: a name, typed options and a builder, all in the pass's own file.

A pass module decorates its `build(options, ctx)` with `register(name, OptionsClass, help=...)`.
Recipes are checked against these declarations (option types and ranges, what the pass needs from
the recipe's quantization, whether it must run last) and compile builds each pass through
`build_pass`, so neither names a pass. The pass modules are imported on the first lookup, not
with `import qgraph`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import pkgutil
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qgraph.errors import QGraphError
from qgraph.options import parse_options

if TYPE_CHECKING:
    from qgraph.calib.data import TokenWindows
    from qgraph.ir.qspec import QuantSpec
    from qgraph.recipes import LayerRule, Recipe


@dataclasses.dataclass(frozen=True)
class PassContext:
    """What a recipe gives each pass besides its options: calibration tokens and the blocks' specs."""

    windows: TokenWindows | None
    weight_spec: QuantSpec | None  # the block linears' weights as annotated; None: float weights
    activation_spec: QuantSpec | None  # None: float activations
    recipe: str
    progress: bool = True


@dataclasses.dataclass(frozen=True)
class RecipePass:
    """One registered pass: how a recipe names it, what options it takes, how it is built."""

    name: str
    options: type  # a frozen dataclass whose fields are qgraph.options.option(...)
    build: Callable[[Any, PassContext], Any]
    help: str
    # Raises QGraphError(what, fix) when the recipe's block rule does not suit the pass.
    requires: Callable[[LayerRule | None], None] | None = None
    last: str = ""  # set: the pass must run last, because a later pass would <last>
    keeps_weights: bool = False  # the pass changes no weight, so it may follow a `last` pass (kv_quant)
    data_free: bool = False  # reads the weights only: a recipe of such passes needs no calibration data

    def parse(self, options: Any, origin: str) -> Any:
        """The typed options from a recipe's mapping for this pass."""
        return parse_options(self.options, options, f"passes.{self.name}", origin)

    def check(self, blocks: LayerRule | None, origin: str) -> None:
        """Refuse a recipe whose block quantization this pass cannot work with."""
        if self.requires is None:
            return
        try:
            self.requires(blocks)
        except QGraphError as exc:
            raise QGraphError(f"recipe {origin}: {exc.what}", exc.fix) from None


_PASSES: dict[str, RecipePass] = {}


def register(name: str, options: type, *, help: str, requires: Callable | None = None,  # noqa: A002
             last: str = "", keeps_weights: bool = False, data_free: bool = False) -> Callable:
    """Decorator for a pass module's `build(options, ctx)`: makes `name` usable in recipes."""

    def decorate(build: Callable) -> Callable:
        known = _PASSES.get(name)
        if known is not None and known.build.__module__ != build.__module__:
            raise ValueError(f"pass name {name!r} is registered by {known.build.__module__} and {build.__module__}; "
                             "rename one")
        _PASSES[name] = RecipePass(name, options, build, help, requires, last, keeps_weights, data_free)
        return build

    return decorate


@functools.cache
def _import_pass_modules() -> None:
    import qgraph.passes

    for info in pkgutil.iter_modules(qgraph.passes.__path__):
        importlib.import_module(f"qgraph.passes.{info.name}")


def registered() -> dict[str, RecipePass]:
    """Every registered pass by name, sorted (imports the pass modules the first time)."""
    _import_pass_modules()
    return dict(sorted(_PASSES.items()))


def lookup(name: Any, origin: str) -> RecipePass:
    """The registered pass `name`, or an error that suggests the nearest name."""
    passes = registered()
    if isinstance(name, str) and name in passes:
        return passes[name]
    near = difflib.get_close_matches(str(name), passes, n=1)
    raise QGraphError(f"recipe {origin}: unknown pass {name!r} in passes",
                      (f"did you mean {near[0]!r}? " if near else "") + f"known passes: {', '.join(passes)}")


def build_pass(name: str, options: dict, recipe: Recipe, windows: TokenWindows | None, progress: bool = True):
    """Construct a recipe's pass with the quantization specs it optimises for."""
    from qgraph.passes.annotate import activation_spec, weight_spec

    entry = lookup(name, recipe.name)
    typed = entry.parse(options, recipe.name)
    rules = recipe.blocks
    entry.check(rules, recipe.name)
    ctx = PassContext(windows,
                      weight_spec(rules.weights) if rules and rules.weights else None,
                      activation_spec(rules.activations) if rules and rules.activations else None,
                      recipe.name, progress)
    return entry.build(typed, ctx)
