"""The recipes' rounding in torch: the levels the lowering would produce, with straight-through gradients."""

from __future__ import annotations

import numpy as np

from qgraph.calib.fake_quant import round_activation_torch
from qgraph.passes.annotate import activation_spec
from qgraph.recipes import load_recipe


def test_token_rounding_has_at_most_sixteen_levels_per_row():
    import torch

    spec = activation_spec(load_recipe("w4a4-flat").blocks.activations)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(4, 64)).astype(np.float32)).requires_grad_(True)
    y = round_activation_torch(x, spec)
    assert all(len(torch.unique(row)) <= 16 for row in y) and not torch.equal(x, y)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight through
