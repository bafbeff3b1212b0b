"""Orthonormal Hadamard matrices of sizes that are not powers of two: H_m (x) H_2^n.

scipy.linalg.hadamard builds only Sylvester's powers of two, so the small factors of other
orders are built here with Paley's constructions (written by hand; no library on this machine
ships them): Paley I for q + 1 with q a prime, q = 3 mod 4 (4, 8, 12, 20, 24, 32, 44, 48, ...),
Paley II for 2 (q + 1) with q a prime, q = 1 mod 4 (12, 28, 36, 60, 76, ...). SmolLM2 needs
576 = 36 x 16, 1536 = 12 x 128, 192 = 12 x 16 and 64.

Every matrix returned is orthonormal (H H^T = I), so a rotation by it is exact in float up to
rounding and its inverse is its transpose.
"""

from __future__ import annotations

import functools

import numpy as np

# Initializers of online Hadamard factors (and flat's learned transforms): never a linear layer to quantize.
ONLINE_PREFIX = "qgraph.hadamard."


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, int(q ** 0.5) + 1))


def _jacobsthal(q: int) -> np.ndarray:
    """Q[i, j] = legendre(j - i, q): the quadratic-residue matrix of GF(q), q prime."""
    residues = {(x * x) % q for x in range(1, q)}
    chi = np.array([0] + [1 if a in residues else -1 for a in range(1, q)], dtype=np.int64)
    i = np.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _paley1(q: int) -> np.ndarray:
    """Order q + 1 (q prime, q = 3 mod 4): I + S with S the skew conference matrix."""
    s = np.zeros((q + 1, q + 1), dtype=np.int64)
    s[0, 1:], s[1:, 0] = 1, -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(q + 1, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    """Order 2 (q + 1) (q prime, q = 1 mod 4): the symmetric conference matrix C, expanded."""
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:], c[1:, 0] = 1, 1
    c[1:, 1:] = _jacobsthal(q)
    plus, minus = np.array([[1, -1], [-1, -1]]), np.array([[1, 1], [1, -1]])
    out = np.zeros((2 * (q + 1), 2 * (q + 1)), dtype=np.int64)
    for i in range(q + 1):
        for j in range(q + 1):
            out[2 * i:2 * i + 2, 2 * j:2 * j + 2] = minus if c[i, j] == 0 else plus * c[i, j]
    return out


@functools.cache
def _small_orders() -> dict[int, tuple[str, int]]:
    """Hadamard orders (not powers of two) that Paley's constructions reach up to 1024."""
    orders: dict[int, tuple[str, int]] = {}
    for q in range(3, 1024):
        if not _is_prime(q):
            continue
        if q % 4 == 3:
            orders.setdefault(q + 1, ("paley1", q))
        elif 2 * (q + 1) <= 1024:
            orders.setdefault(2 * (q + 1), ("paley2", q))
    return {m: how for m, how in orders.items() if m & (m - 1)}


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def factors(size: int) -> tuple[int, int] | None:
    """(m, 2^k) with size = m * 2^k and a known Hadamard of order m (1 for a power of two); None if none."""
    if size < 1:
        return None
    power = size & -size  # the largest power of two dividing size
    m = size // power
    if m == 1:
        return 1, size
    # m itself odd: look for m * 2^j (j >= 2) among Paley's orders, leaving 2^(k - j) to Sylvester.
    orders = _small_orders()
    j = 1
    while power % (1 << j) == 0:
        if m << j in orders:
            return m << j, power >> j
        j += 1
    return None


@functools.cache
def _integer_hadamard(order: int) -> np.ndarray:
    if order & (order - 1) == 0:
        return _sylvester(order)
    how, q = _small_orders()[order]
    return _paley1(q) if how == "paley1" else _paley2(q)


def hadamard_factors(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Orthonormal (A, B) with A (x) B an orthonormal Hadamard of order `size`; ValueError if unknown."""
    found = factors(size)
    if found is None:
        raise ValueError(f"no known Hadamard matrix of order {size}: it must be m * 2^k with m a Paley order "
                         "(12, 20, 28, 36, ...)")
    m, p = found
    a, b = _integer_hadamard(m), _sylvester(p)
    return a / np.sqrt(m), b / np.sqrt(p)


def hadamard(size: int) -> np.ndarray:
    """An orthonormal Hadamard matrix of order `size` (float64); ValueError if no construction is known."""
    a, b = hadamard_factors(size)
    return np.kron(a, b)


def random_orthogonal(size: int, seed: int = 0) -> np.ndarray:
    """A seeded Haar-random orthogonal matrix: the fallback where no Hadamard order is known."""
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((size, size)))
    return q * np.sign(np.diag(r))[None, :]
