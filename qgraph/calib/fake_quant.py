"""The recipes' rounding as differentiable torch ops, for passes that learn a transform (flat, rotate's SpinQuant).

Each rounding uses the steps the ONNX lowering would compute from the same tensor (per token,
block, channel or tensor; symmetric or with a zero point) and passes gradients straight through
the rounding (STE), so a loss on the rounded output trains what it multiplies.
"""

from __future__ import annotations

from qgraph.ir.qspec import FORMATS, QuantSpec


def _ste(x, step, lo, hi, zero=None, step_grad: bool = False):
    """Round x / step to the grid [lo, hi] (around zero point `zero`) with a straight-through gradient.

    step_grad=False: the gradient is the identity (the step is a constant). step_grad=True: only the
    round() is passed straight through (LSQ's form), so the gradient also reaches the step and, through
    it, the range that sets it: a rotation that lowers a token's max|x| is rewarded for the finer grid.
    """
    import torch

    z = 0.0 if zero is None else zero
    if step_grad:
        q = x / step + z
        q = torch.clamp(q + (torch.round(q) - q).detach(), lo, hi)
        return (q - z) * step
    q = torch.clamp(torch.round(x / step) + z, lo, hi)
    y = (q - z) * step
    return x + (y - x).detach()


def _grid(spec: QuantSpec) -> tuple[float, float]:
    _, _, qmin, qmax = FORMATS[spec.format]
    return float(qmin), float(qmax)


def _round_groups(x, groups: int, spec: QuantSpec, clip: float = 1.0, step_grad: bool = False):
    """Rows of x [r, C] rounded in `groups` equal groups of its last axis, each with its own step."""
    import torch

    r, c = x.shape
    g = x.reshape(r, groups, c // groups)
    lo, hi = _grid(spec)
    if spec.symmetric:
        qmax = hi if not spec.full_range else -lo
        step = torch.clamp(g.abs().amax(dim=-1, keepdim=True) * clip / qmax, min=1e-12)
        step = step if step_grad else step.detach()
        return _ste(g, step, lo, hi, step_grad=step_grad).reshape(r, c)
    mn, mx = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    step = torch.clamp((mx - mn) / (hi - lo), min=1e-12)
    step = step if step_grad else step.detach()
    zero = (lo - torch.round(mn / step)).detach()
    return _ste(g, step, lo, hi, zero, step_grad).reshape(r, c)


def round_activation_torch(x, spec: QuantSpec | None, step_grad: bool = False):
    """The recipe's activation rounding of samples x [n, C] (static ranges from x itself)."""
    if spec is None or spec.is_float:
        return x
    c = x.shape[1]
    if spec.granularity == "token":
        return _round_groups(x, 1, spec, spec.clip, step_grad)
    if spec.granularity == "block":
        return _round_groups(x, c // spec.block_size, spec, spec.clip, step_grad) if c % spec.block_size == 0 else x
    if spec.granularity == "channel":
        return _round_groups(x.T.contiguous(), 1, spec, step_grad=step_grad).T
    return _round_groups(x.reshape(1, -1), 1, spec, step_grad=step_grad).reshape(x.shape)


def round_weight_torch(w, spec: QuantSpec | None):
    """The recipe's weight rounding of the logical weight w [in, out]."""
    if spec is None or spec.is_float:
        return w
    k, n = w.shape
    if spec.granularity == "channel":  # a step per output column
        return _round_groups(w.T.contiguous(), 1, spec).T
    if spec.granularity == "block" and k % spec.block_size == 0:  # groups along the inputs
        return _round_groups(w.T.contiguous(), k // spec.block_size, spec).T
    return _round_groups(w.reshape(1, -1), 1, spec).reshape(w.shape)
