"""Reference quantization math in numpy: scales from ranges, quantize, dequantize.

Used offline to quantize weights, and by the tests as the oracle that ONNX Runtime's
QuantizeLinear/DequantizeLinear must match. Arithmetic follows the ONNX operator
definitions: y = saturate(round_half_even(x / scale) + zero_point), x' = (y - zp) * scale,
all in float32.
"""

from __future__ import annotations

import numpy as np

from qgraph.ir.qspec import QuantSpec


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _blocked(x: np.ndarray, axis: int, block: int, reduce) -> np.ndarray:
    """Reduce x over blocks of `block` along `axis` (last block may be partial).

    Whole blocks are one reshape and one reduction (a loop of per-block copies took minutes on a
    2048 x 49152 head in AWQ's search).
    """
    axis %= x.ndim
    n = x.shape[axis]
    whole = n // block

    def along(start: int, stop: int) -> np.ndarray:
        index = [slice(None)] * x.ndim
        index[axis] = slice(start, stop)
        return x[tuple(index)]

    parts = []
    if whole:
        grouped = along(0, whole * block).reshape(*x.shape[:axis], whole, block, *x.shape[axis + 1:])
        parts.append(reduce(grouped, axis=axis + 1))
    if n % block:
        parts.append(reduce(along(whole * block, n), axis=axis, keepdims=True))
    return np.concatenate(parts, axis=axis) if len(parts) > 1 else parts[0]


def tensor_range(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """Min and max of x at the spec's granularity (scalar, per channel, or per block)."""
    x = np.asarray(x, dtype=np.float32)
    if spec.granularity == "tensor":
        return np.asarray(x.min()), np.asarray(x.max())
    if spec.granularity == "channel":
        axes = _reduce_axes(x.ndim, spec.axis)
        return x.min(axis=axes), x.max(axis=axes)
    return _blocked(x, spec.axis, spec.block_size, np.min), _blocked(x, spec.axis, spec.block_size, np.max)


def qparams_from_range(
    lo: np.ndarray, hi: np.ndarray, spec: QuantSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Scale (float32) and zero point (storage dtype; float32 with float_zero_point) covering [lo, hi]."""
    if spec.float_zero_point:  # [lo, hi] exactly, zero need not be a code (llama.cpp Q4_1)
        lo, hi = np.asarray(lo, dtype=np.float64), np.asarray(hi, dtype=np.float64)
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.where(scale > 0, spec.qmin - lo / safe, spec.qmin - lo)  # a constant group: every code is lo
        return safe.astype(np.float32), zp.astype(np.float32)
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    if spec.is_float:
        scale = np.maximum(-lo, hi) / spec.qmax
        zp = np.zeros_like(scale)
    elif spec.full_range:
        # The largest-magnitude end maps to qmin exactly; the scale takes that end's sign.
        scale = np.where(-lo >= hi, -lo / -spec.qmin, hi / spec.qmin)
        zp = np.zeros_like(scale)
        scale = np.where(scale != 0, scale, 1.0).astype(np.float32)
        return scale, zp.astype(spec.storage_dtype)
    elif spec.symmetric:
        # Unsigned storage keeps its zero point at the middle of the range.
        mid = 0.0 if spec.qmin < 0 else float(np.ceil((spec.qmax + spec.qmin) / 2))
        scale = np.maximum(-lo, hi) / (spec.qmax - mid)
        zp = np.full_like(scale, mid)
    else:
        scale = (hi - lo) / (spec.qmax - spec.qmin)
        safe = np.where(scale > 0, scale, 1.0)
        zp = np.clip(np.round(spec.qmin - lo / safe), spec.qmin, spec.qmax)
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return scale, zp.astype(spec.storage_dtype)


def broadcast_params(p: np.ndarray, shape: tuple[int, ...], spec: QuantSpec) -> np.ndarray:
    """Broadcast per-channel or per-block parameters to the full tensor shape."""
    p = np.asarray(p)
    if spec.granularity == "tensor" or p.ndim == 0:
        return p
    axis = spec.axis % len(shape)
    if spec.granularity == "channel":
        view = [1] * len(shape)
        view[axis] = shape[axis]
        return p.reshape(view)
    return np.repeat(p, spec.block_size, axis=axis).take(range(shape[axis]), axis=axis)


def _params(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec):
    """(x, scale, zero point) shaped to broadcast against each other, all float32; zero point None for float formats.

    Per-group parameters over whole blocks: x viewed as [..., groups, block, ...] and the parameters as
    [..., groups, 1, ...], so no full-size copy of them is made (np.repeat). Otherwise broadcast_params.
    """
    axis = spec.axis % x.ndim if spec.granularity == "block" and x.ndim else 0
    if (spec.granularity == "block" and x.ndim and x.shape[axis] % spec.block_size == 0
            and np.ndim(scale) == x.ndim and np.ndim(zero_point) == x.ndim):
        groups = (*x.shape[:axis], x.shape[axis] // spec.block_size)
        xv = x.reshape(*groups, spec.block_size, *x.shape[axis + 1:])
        s, z = (np.asarray(p).reshape(*groups, 1, *x.shape[axis + 1:]) for p in (scale, zero_point))
    else:
        xv, s, z = x, broadcast_params(scale, x.shape, spec), None
    z = None if spec.is_float else (z if z is not None else broadcast_params(zero_point, x.shape, spec)).astype(np.float32)
    return xv, s.astype(np.float32), z


def quantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """ONNX QuantizeLinear in numpy (saturating; float formats round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    xv, s, z = _params(x, scale, zero_point, spec)
    if spec.is_float:
        return np.clip(xv / s, spec.qmin, spec.qmax).astype(spec.storage_dtype).reshape(x.shape)
    q = np.round(xv / s + z) if spec.float_zero_point else np.round(xv / s) + z
    return np.clip(q, spec.qmin, spec.qmax).astype(spec.storage_dtype).reshape(x.shape)


def dequantize(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """ONNX DequantizeLinear in numpy."""
    qf = np.asarray(q).astype(np.float32)
    qv, s, z = _params(qf, scale, zero_point, spec)
    if spec.is_float:
        return (qv * s).reshape(qf.shape)
    return ((qv - z) * s).astype(np.float32).reshape(qf.shape)


def quantize_dequantize(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """dequantize(quantize(x)), bit for bit, without the storage dtype between them.

    Integer codes are whole numbers in [qmin, qmax] held exactly by float32, so the round trip stays in
    float32 (searches call this hundreds of times per layer; the two casts were a quarter of the time).
    Float formats round through their storage type, so they take the two-step path.
    """
    if spec.is_float:
        return dequantize(quantize(x, scale, zero_point, spec), scale, zero_point, spec)
    x = np.asarray(x, dtype=np.float32)
    xv, s, z = _params(x, scale, zero_point, spec)
    q = np.asarray(np.round(xv / s + z) if spec.float_zero_point else np.round(xv / s) + z)
    np.maximum(q, spec.qmin, out=q)  # np.clip's result, without its dispatch cost on every call
    np.minimum(q, spec.qmax, out=q)
    q -= z
    q *= s
    return q.reshape(x.shape)


def quantize_tensor(x: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Quantize a constant tensor with parameters from its own range: (q, scale, zero_point)."""
    lo, hi = tensor_range(x, spec)
    scale, zp = qparams_from_range(lo, hi, spec)
    return quantize(x, scale, zp, spec), scale, zp


def fake_quantize(x: np.ndarray, spec: QuantSpec) -> np.ndarray:
    """Quantize then dequantize x with parameters from its own range."""
    q, scale, zp = quantize_tensor(x, spec)
    return dequantize(q, scale, zp, spec)
