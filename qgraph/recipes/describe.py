"""What a recipe does, as data for `qgraph recipes`: its passes with every option, and its formats."""

from __future__ import annotations

from qgraph.options import describe_options
from qgraph.recipes import ACT_KEYS, EMBEDDING_KEYS, LOWERINGS, WEIGHT_KEYS, LayerRule, Recipe, TensorRule, available, load_recipe


def shipped() -> list[dict]:
    """One entry per shipped recipe: name, description and the passes it runs."""
    return [{"name": r.name, "description": r.description, "passes": [name for name, _ in r.passes]}
            for r in map(load_recipe, available())]


def describe(recipe: Recipe) -> dict:
    """A recipe's passes in order (each option's value, type, default, help) and its weights/activations/lowering."""
    from qgraph.backends.int8_kernels import KERNELS
    from qgraph.passes.registry import lookup

    origin = recipe.source or recipe.name
    passes = []
    for name, given in recipe.passes:
        entry = lookup(name, origin)
        passes.append({"pass": name, "help": entry.help, "options": describe_options(entry.parse(given, origin), given)})
    return {
        "name": recipe.name,
        "description": recipe.description,
        "source": recipe.source,
        "layers": {"select": recipe.select, "skip": list(recipe.skip)},
        "passes": passes,
        "blocks": _layer(recipe.blocks),
        "lm_head": "tied" if recipe.lm_head_tied else _layer(recipe.lm_head),
        "embedding": _tensor(recipe.embedding, EMBEDDING_KEYS),
        "int8_kernel": {"name": recipe.int8_kernel, "help": KERNELS[recipe.int8_kernel].help},
    }


def _tensor(rule: TensorRule | None, keys: set[str]) -> list[dict] | None:
    """The rule's fields a recipe may write in that section (None: float)."""
    if rule is None:
        return None
    return [{k: v for k, v in row.items() if k != "set"} for row in describe_options(rule) if row["name"] in keys]


def _layer(rule: LayerRule | None) -> dict | None:
    if rule is None:
        return None
    return {"weights": _tensor(rule.weights, WEIGHT_KEYS), "activations": _tensor(rule.activations, ACT_KEYS),
            "lowering": rule.lowering, "lowering_help": LOWERINGS[rule.lowering]}
