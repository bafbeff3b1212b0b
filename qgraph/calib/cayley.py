"""SpinQuant's learned rotations: Cayley SGD on the orthogonal group, from a Hadamard start.

SpinQuant (Liu et al. 2024) trains R1 and R2 end to end on the network's loss. qgraph learns
them on a layer-wise proxy instead, which needs no differentiable copy of the graph: for every
linear group that reads a rotated activation x (samples from calibration, G = W W^T from the
weights it feeds), the loss is the quantized output error

    |(Q_a(x R) R^T - x) W|^2 / |x W|^2 = tr(E G E^T) / tr(x G x^T),   E = Q_a(x R) R^T - x,

averaged over the groups, with the recipe's activation rounding and a straight-through gradient.
Weights are left out of the loss as SpinQuant does when GPTQ rounds them afterwards (every
rotation recipe here runs GPTQ). R is kron(I_blocks, r): blocks = 1 for the residual stream,
the head count for R2's per-head rotation.

The Cayley step (Li, Fuxin & Todorovic 2020, the optimizer SpinQuant uses) keeps r exactly
orthogonal: A = G r^T - r G^T is skew, r <- (I + a/2 A)^-1 (I - a/2 A) r. torch has no Stiefel
optimizer, so the step is written here; its size is normalised (a = lr / |A|) and decays
linearly, and the best r seen is kept, so more steps never make the measured loss worse.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qgraph.calib.fake_quant import round_activation_torch
from qgraph.ir.qspec import QuantSpec


@dataclasses.dataclass
class RotationTerm:
    """One linear group reading the rotated value: token samples x [t, C] and G = W W^T [C, C]."""

    x: np.ndarray
    gram: np.ndarray


def cayley_step(r, grad, lr: float):
    """r moved along the orthogonal group against grad by a step of angle about lr (r stays orthogonal)."""
    import torch

    a = grad @ r.T - r @ grad.T
    norm = torch.linalg.matrix_norm(a)
    if not torch.isfinite(norm) or norm == 0:
        return r
    a = a * (lr / norm)
    eye = torch.eye(r.shape[0], dtype=r.dtype)
    return torch.linalg.solve(eye + 0.5 * a, (eye - 0.5 * a) @ r)


def learn_rotation(terms: list[RotationTerm], r0: np.ndarray, activation: QuantSpec, *, blocks: int = 1,
                   steps: int = 50, lr: float = 0.05) -> tuple[np.ndarray, float, float]:
    """The rotation kron(I_blocks, r) minimising the terms' quantized output error; (r, error start, error learned).

    Errors are the square root of the mean relative loss, as flat reports them.
    """
    import torch

    k = r0.shape[0]
    xs = [torch.from_numpy(np.ascontiguousarray(t.x, dtype=np.float64)) for t in terms]
    grams = [torch.from_numpy(np.ascontiguousarray(t.gram, dtype=np.float64)) for t in terms]
    norms = [((x @ g) * x).sum() for x, g in zip(xs, grams, strict=True)]

    def loss_fn(r):
        total = 0.0
        for x, g, ref in zip(xs, grams, norms, strict=True):
            n, c = x.shape
            xr = (x.reshape(n, blocks, k) @ r).reshape(n, c)
            rounded = round_activation_torch(xr, activation, step_grad=True)
            e = (rounded.reshape(n, blocks, k) @ r.T).reshape(n, c) - x
            total = total + ((e @ g) * e).sum() / torch.clamp(ref, min=1e-30)
        return total / len(xs)

    r = torch.from_numpy(np.asarray(r0, dtype=np.float64)).clone()
    first, best, best_r = None, np.inf, np.asarray(r0, dtype=np.float64)
    for step in range(steps + 1):  # each loss scores the r it was computed at; the best one is kept
        r.requires_grad_(True)
        loss = loss_fn(r)
        now = float(loss.detach())
        first = now if first is None else first
        if np.isfinite(now) and now < best:
            best, best_r = now, r.detach().numpy().copy()
        if step == steps:
            break
        (grad,) = torch.autograd.grad(loss, r)
        with torch.no_grad():
            r = cayley_step(r.detach(), grad, lr * (1 - step / steps))
    return best_r, float(np.sqrt(first)), float(np.sqrt(best))
