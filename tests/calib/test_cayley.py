"""Cayley SGD (SpinQuant): steps stay on the orthogonal group and lower the quantized output error."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.calib.cayley import RotationTerm, cayley_step, learn_rotation
from qgraph.ir.hadamard import hadamard
from qgraph.passes.annotate import activation_spec
from qgraph.recipes import load_recipe

A4 = activation_spec(load_recipe("w4a4-rot").blocks.activations)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(size=st.integers(2, 40), lr=st.floats(1e-3, 3.0), seed=st.integers(0, 2**16))
def test_a_cayley_step_keeps_the_rotation_orthogonal(size, lr, seed):
    rng = np.random.default_rng(seed)
    r = torch.from_numpy(np.linalg.qr(rng.normal(size=(size, size)))[0])
    step = cayley_step(r, torch.from_numpy(rng.normal(size=(size, size))), lr)
    assert torch.allclose(step @ step.T, torch.eye(size, dtype=step.dtype), atol=1e-10)


def test_a_zero_gradient_leaves_the_rotation_alone():
    r = torch.eye(4, dtype=torch.float64)
    assert torch.equal(cayley_step(r, torch.zeros(4, 4, dtype=torch.float64), 0.5), r)


def _outlier_terms(c: int = 32, blocks: int = 1) -> list[RotationTerm]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, c))
    x[:, 3] *= 30  # one loud channel, as LLM activations have
    w = rng.normal(size=(c, 48))
    return [RotationTerm(x, w @ w.T)]


def test_learning_finds_a_rotation_that_spreads_the_outlier():
    # From the identity (the outlier channel left alone) the learned rotation gets the 4-bit error
    # down to what a Hadamard gives; the gradient reaches the per-token step through max|x|.
    terms = _outlier_terms()
    r, before, after = learn_rotation(terms, np.eye(32), A4, steps=30, lr=0.3)
    _, hadamard_error, _ = learn_rotation(terms, hadamard(32), A4, steps=0)
    assert np.allclose(r @ r.T, np.eye(32), atol=1e-10)
    assert after < 0.4 * before and after < 1.05 * hadamard_error, (before, after, hadamard_error)


def test_learning_from_the_hadamard_only_lowers_the_error():
    _, before, after = learn_rotation(_outlier_terms(), hadamard(32), A4, steps=30, lr=0.1)
    assert after < 0.97 * before, (before, after)


def test_per_block_rotation_and_zero_steps_keep_the_start():
    h = hadamard(8)
    r, before, after = learn_rotation(_outlier_terms(32), h, A4, blocks=4, steps=0)
    assert np.array_equal(r, h) and before == after
    r, before, after = learn_rotation(_outlier_terms(32), h, A4, blocks=4, steps=20, lr=0.1)
    assert r.shape == (8, 8) and after <= before
