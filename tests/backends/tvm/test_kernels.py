"""qgraph's TIR kernels against numpy: unscheduled on llvm, then the CPU schedules, on odd shapes and group tails
(int4 x fp32, int8 x int8, int4 x int8)."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from qgraph.backends.onnx_qdq import pack_matmulnbits  # noqa: E402
from qgraph.backends.tvm import host_target  # noqa: E402
from qgraph.backends.tvm import kernels as K  # noqa: E402
from qgraph.ir.qspec import QuantSpec  # noqa: E402
from qgraph.quantize import dequantize, quantize_tensor  # noqa: E402

# (K, N, group): K=576 / group 128 and K=100 / group 32 end in a tail group; K=100 is not a
# multiple of 8 (a partly used last word); N=37 is not a multiple of the vector width.
Q4_SHAPES = [(576, 192, 128), (100, 37, 32), (200, 64, 64)]
I8_SHAPES = [(576, 192), (100, 37)]


@pytest.fixture(scope="module")
def built():
    """Compiled kernels shared by every test of the module (each compile is ~0.2 s)."""
    cache = {}
    target = host_target()

    def get(kind, *shape, schedule=None, **kw):
        key = (kind, shape, schedule, tuple(sorted(kw.items())))
        if key not in cache:
            func = K.q4_linear(*shape, **kw) if kind == "q4" else K.int8_linear(*shape, **kw)
            if schedule is not None:
                func = K.schedule_cpu(func, decode=schedule == "decode")
            cache[key] = tvm.compile(func, target=target)
        return cache[key]

    return get


def run(lib, arrays, out_shape):
    dev = tvm.cpu()
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32), dev)
    lib(*[tvm.runtime.tensor(a, dev) for a in arrays], out)
    return out.numpy()


def q4_case(k, n, group, m, zero_points, seed=0):
    rng = np.random.default_rng(seed)
    groups = -(-k // group)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = K.pack_int4(rng.integers(0, 16, (k, n)).astype(np.uint8))
    s = (rng.random((groups, n)) * 0.1 + 0.01).astype(np.float32)
    z = rng.integers(0, 16, (groups, n)).astype(np.uint8) if zero_points else None
    return [a for a in (x, w, s, z) if a is not None], K.reference_q4(x, w, s, z, group)


def i8_case(k, n, m, a_dtype, seed=0, w_bits=8):
    """int8 activations x int8 weights, or x int4 weights packed 8 per word (full range -8..7)."""
    rng = np.random.default_rng(seed)
    lo, hi = (0, 256) if a_dtype == "uint8" else (-128, 128)
    a = rng.integers(lo, hi, (m, k)).astype(a_dtype)
    q = rng.integers(-127, 128, (k, n)).astype(np.int8) if w_bits == 8 else rng.integers(-8, 8, (k, n)).astype(np.int8)
    w = q if w_bits == 8 else K.pack_int4_signed(q)
    colsum = q.astype(np.int32).sum(0).astype(np.int32)
    a_scale = np.array([0.0173], np.float32)
    a_zero = np.array([128 if a_dtype == "uint8" else 3], np.int32)
    w_scale = (rng.random(n) * 0.01 + 1e-3).astype(np.float32)
    arrays = [a, w, colsum, a_scale, a_zero, w_scale]
    return arrays, K.reference_int8(*arrays)


def rel_err(y, ref):
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def test_pack_int4_roundtrip_and_bit_positions():
    codes = np.arange(20, dtype=np.uint8).reshape(10, 2) % 16
    words = K.pack_int4(codes)
    assert words.shape == (2, 2) and words.dtype == np.uint32
    # column 0 holds codes 0, 2, 4, ..., 14 in nibbles 0..7 of word 0
    assert int(words[0, 0]) == sum((2 * i % 16) << (4 * i) for i in range(8))
    np.testing.assert_array_equal(K.unpack_int4(words, 10), codes)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k,n,group", [(576, 24, 128), (100, 7, 32)])
def test_matmulnbits_layout_matches_qgraph_dequantization(k, n, group, symmetric):
    """ORT MatMulNBits tensors from the ONNX lowering, converted to the kernel layout, give the same weights."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((k, n)).astype(np.float32)
    spec = QuantSpec("int4", "block", axis=0, block_size=group, symmetric=symmetric)
    b, scales, zps = pack_matmulnbits(w, spec)
    wq, s, z = K.matmulnbits_to_q4(b, scales, zps, k, n, group)
    assert (z is None) == symmetric
    eye = np.eye(k, dtype=np.float32)
    got = K.reference_q4(eye, wq, s, z, group)
    q, scale, zp = quantize_tensor(w, spec)
    np.testing.assert_allclose(got, dequantize(q, scale, zp, spec), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("k,n,group", Q4_SHAPES)
def test_q4_unscheduled_matches_numpy(built, k, n, group, zero_points):
    lib = built("q4", k, n, group, zero_points=zero_points)
    for m in (1, 3):  # rows are symbolic: one build serves both
        arrays, ref = q4_case(k, n, group, m, zero_points)
        assert rel_err(run(lib, arrays, ref.shape), ref) < 1e-5


@pytest.mark.parametrize("schedule,m", [("decode", 1), ("decode", 2), ("prefill", 13), ("prefill", 64)])
@pytest.mark.parametrize("zero_points", [False, True])
@pytest.mark.parametrize("k,n,group", Q4_SHAPES)
def test_q4_cpu_schedules_match_numpy(built, k, n, group, zero_points, schedule, m):
    lib = built("q4", k, n, group, schedule=schedule, zero_points=zero_points)
    arrays, ref = q4_case(k, n, group, m, zero_points, seed=m)
    assert rel_err(run(lib, arrays, ref.shape), ref) < 1e-5


@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("schedule,m", [(None, 1), (None, 5), ("decode", 1), ("decode", 3), ("prefill", 13), ("prefill", 64)])
@pytest.mark.parametrize("k,n", I8_SHAPES)
def test_int8_matches_numpy_exactly(built, k, n, schedule, m, a_dtype):
    """int32 accumulation is exact; only the final fp32 rescale rounds, the same way as numpy's."""
    lib = built("i8", k, n, schedule=schedule, a_dtype=a_dtype)
    arrays, ref = i8_case(k, n, m, a_dtype, seed=m)
    np.testing.assert_allclose(run(lib, arrays, ref.shape), ref, rtol=1e-6, atol=0)


def test_pack_int4_signed_is_offset_binary():
    q = np.array([[-8, 7], [0, -1], [3, -5]], np.int8)
    words = K.pack_int4_signed(q)
    assert words.shape == (1, 2) and int(words[0, 0]) == 0 | (8 << 4) | (11 << 8)  # codes q + 8 along K
    np.testing.assert_array_equal(K.unpack_int4_signed(words, 3), q)
    with pytest.raises(ValueError, match="out of -8..7"):
        K.pack_int4_signed(np.array([[8]]))


@pytest.mark.parametrize("a_dtype", ["uint8", "int8"])
@pytest.mark.parametrize("schedule,m", [(None, 1), (None, 5), ("decode", 1), ("decode", 3), ("prefill", 13), ("prefill", 64)])
@pytest.mark.parametrize("k,n", I8_SHAPES)
def test_int4_weights_int8_activations_match_numpy_exactly(built, k, n, schedule, m, a_dtype):
    """w4a8: packed int4 codes decoded to int32 inside the int8 kernel; K=100 leaves half of the last word unused."""
    lib = built("i8", k, n, schedule=schedule, a_dtype=a_dtype, w_bits=4)
    arrays, ref = i8_case(k, n, m, a_dtype, seed=m, w_bits=4)
    assert arrays[1].shape == (-(-k // 8), n) and arrays[1].dtype == np.uint32
    np.testing.assert_allclose(run(lib, arrays, ref.shape), ref, rtol=1e-6, atol=0)


def test_cpu_schedule_is_parallel_and_vectorized():
    """Scheduled, not naive loops: the decode kernel has a parallel loop and vector lanes."""
    text = K.schedule_cpu(K.q4_linear(576, 1536, 128), decode=True).script()
    assert "T.parallel" in text and "T.vectorized" in text
    text = K.schedule_cpu(K.int8_linear(576, 1536), decode=False).script()
    assert "T.parallel" in text and "T.vectorized" in text


def test_int4_decode_is_fused_in_the_int8_cpu_schedules():
    """w4a8 decode rows: shift and mask inside the int32 update; prefill: a decoded int8 panel per parallel task."""
    func = K.int8_linear(576, 1536, w_bits=4)
    decode = K.schedule_cpu(func, decode=True).script()
    assert 'sblock("decode")' not in decode and ">>" in decode and "T.uint32(15)" in decode
    prefill = K.schedule_cpu(func, decode=False).script()
    loops = prefill.split('sblock("decode")')[0]
    assert "T.parallel" in loops and 'sblock("matmul' not in loops  # decode sits inside the parallel N loop
    assert 'decode = T.sblock_alloc_buffer((T.int64(576), T.int64(1536)), "int8")' in prefill
