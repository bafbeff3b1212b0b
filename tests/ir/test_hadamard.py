"""Hadamard constructions: orthonormal, +-1/sqrt(n) entries, the sizes SmolLM2 and Llama need."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qgraph.ir.hadamard import factors, hadamard, hadamard_factors, random_orthogonal


@pytest.mark.parametrize("size, expected", [(64, (1, 64)), (576, (36, 16)), (1536, (12, 128)), (192, (12, 16)),
                                            (12, (12, 1)), (20, (20, 1)), (28, (28, 1)), (5120, (20, 256)),
                                            (14336, (28, 512)), (3072, (12, 256))])
def test_factors_of_model_sizes(size, expected):
    assert factors(size) == expected


@given(st.sampled_from([2, 4, 12, 20, 24, 28, 36, 40, 44, 48, 60, 72, 96, 160, 192, 576, 1536]))
@settings(max_examples=30, deadline=None)
def test_hadamard_is_orthonormal_with_equal_magnitude_entries(size):
    h = hadamard(size)
    np.testing.assert_allclose(h @ h.T, np.eye(size), atol=1e-12)
    np.testing.assert_allclose(np.abs(h), 1 / np.sqrt(size), rtol=1e-12)
    a, b = hadamard_factors(size)
    np.testing.assert_array_equal(np.kron(a, b), h)


def test_unknown_orders_refuse_and_fall_back_to_a_seeded_orthogonal():
    assert factors(11008) is None and factors(52) is None  # 43 x 256; 52 needs q = 25, not a prime
    with pytest.raises(ValueError, match="no known Hadamard matrix of order 11008"):
        hadamard(11008)
    q = random_orthogonal(52, seed=3)
    np.testing.assert_allclose(q @ q.T, np.eye(52), atol=1e-12)
    np.testing.assert_array_equal(q, random_orthogonal(52, seed=3))
