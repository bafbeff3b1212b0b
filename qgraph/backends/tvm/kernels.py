"""TIR kernels qgraph owns for quantized linears, and their CPU / CUDA schedules.

Every kernel is first built as one unscheduled TensorIR function (tensor expressions through
`te.create_prim_func`); that function is what the tests run on llvm against numpy. The CPU and
CUDA versions are the same function with schedule transformations only, so a schedule can make a
kernel slow but never change what it computes.

Layouts (Y = X @ W, as in ONNX MatMul, W stored [K, N]):
- int4: `w` is uint32 [ceil(K/8) (or more), N]; word (k // 8, n) holds the 4-bit code of W[k, n]
  in bits 4*(k % 8) .. 4*(k % 8) + 3, i.e. 8 codes packed along K. The value is
  (code - zero) * scale with per-group `scales` [G, N] (G = ceil(K / group); the last group may be
  a tail shorter than `group`) and zero 8 (symmetric) or `zeros` [G, N] uint8 (asymmetric uint4).
  Words run along N, so a CPU vector or a GPU warp reads consecutive output channels.
- int8: activations `a` [M, K] int8 or uint8 with one scale and zero point, weights `w` [K, N] int8
  (symmetric, per output channel); acc = sum_k a * w in int32 and
  Y = (acc - a_zero * w_colsum) * a_scale * w_scale[n], with `w_colsum` = sum_k w[k, n] stored
  beside the weight, so the zero point costs nothing per call.
- int4 x int8 (w_bits=4): the same int8 kernel with `w` packed as in int4 (uint32 [ceil(K/8), N],
  offset-binary codes q + 8 of a symmetric int4 weight, q in -8..7); a `decode` block turns a word
  back into int32 q that the int32 matmul reads (the CPU prefill schedule keeps its decoded panel as int8),
  and `w_colsum` is the sum of q.
"""

from __future__ import annotations

import numpy as np

from qgraph.backends.onnx_qdq import unpack_nibbles

PACK = 8  # 4-bit codes per uint32 word
VEC = 16  # fp32 lanes of one AVX-512 register (two AVX2 registers)


def _tvm():
    from qgraph.backends.tvm import require_tvm

    return require_tvm()


# ---------------------------------------------------------------- packing (numpy, used by lowering and tests)


def pack_int4(codes: np.ndarray) -> np.ndarray:
    """Pack unsigned 4-bit codes [K, N] (0..15) into uint32 words [ceil(K/8), N] (8 codes along K)."""
    k, n = codes.shape
    words = -(-k // PACK)
    padded = np.zeros((words * PACK, n), dtype=np.uint32)
    padded[:k] = codes.astype(np.uint32) & 15
    blocks = padded.reshape(words, PACK, n)
    out = np.zeros((words, n), dtype=np.uint32)
    for i in range(PACK):
        out |= blocks[:, i, :] << np.uint32(4 * i)
    return out


def unpack_int4(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_int4: uint32 [W, N] -> codes uint8 [k, N]."""
    shifts = (np.arange(PACK, dtype=np.uint32) * 4)[None, :, None]
    codes = (words[:, None, :] >> shifts) & 15
    return codes.reshape(-1, words.shape[1])[:k].astype(np.uint8)


def matmulnbits_to_q4(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, n: int,
                      block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """ORT MatMulNBits tensors (B [N, blocks, block/2] uint8, scales [N*blocks], 4-bit packed zero points)
    -> this module's layout (w uint32 [words, N], scales [G, N], zeros uint8 [G, N] or None)."""
    blocks = -(-k // block)
    codes = unpack_nibbles(b.reshape(n, blocks * block // 2))
    w = pack_int4(np.ascontiguousarray(codes[:, :k].T))
    s = np.ascontiguousarray(scales.reshape(n, blocks).T).astype(np.float32)
    z = None
    if zero_points is not None:
        z = np.ascontiguousarray(unpack_nibbles(zero_points.reshape(n, -1))[:, :blocks].T)
    return w, s, z


def reference_q4(x: np.ndarray, w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group: int) -> np.ndarray:
    """numpy reference of q4_linear (fp64 accumulation)."""
    k = x.shape[1]
    codes = unpack_int4(w, k).astype(np.float64)
    g = np.arange(k) // group
    zero = 8.0 if zeros is None else zeros[g].astype(np.float64)
    wf = (codes - zero) * scales[g].astype(np.float64)
    return (x.astype(np.float64) @ wf).astype(np.float32)


def reference_int8(a, w, w_colsum, a_scale, a_zero, w_scale) -> np.ndarray:
    """numpy reference of int8_linear (exact int64 accumulation); w is int8 [K, N] or packed int4 words."""
    if w.dtype == np.uint32:
        w = unpack_int4_signed(w, a.shape[1])
    acc = a.astype(np.int64) @ w.astype(np.int64) - int(a_zero[0]) * w_colsum.astype(np.int64)
    return (acc.astype(np.float32) * (np.float32(a_scale[0]) * w_scale.astype(np.float32))).astype(np.float32)


def pack_int4_signed(q: np.ndarray) -> np.ndarray:
    """Symmetric int4 values [K, N] (-8..7) -> uint32 words of offset-binary codes q + 8 (int8_linear, w_bits=4)."""
    q = np.asarray(q).astype(np.int64)
    if q.min(initial=0) < -8 or q.max(initial=0) > 7:
        raise ValueError(f"int4 values out of -8..7: [{q.min()}, {q.max()}]")
    return pack_int4((q + 8).astype(np.uint8))


def unpack_int4_signed(words: np.ndarray, k: int) -> np.ndarray:
    """Inverse of pack_int4_signed: uint32 [W, N] -> int8 [k, N] in -8..7."""
    return unpack_int4(words, k).astype(np.int8) - np.int8(8)


# ---------------------------------------------------------------- unscheduled kernels


def _rows(m):
    tvm = _tvm()
    return tvm.tirx.Var("m", "int64") if m is None else m


def q4_linear(k: int, n: int, group: int, *, m: int | None = None, zero_points: bool = False, words: int | None = None):
    """Fused int4 dequant + matmul: Y[M, N] fp32 = X[M, K] fp32 @ dequant(w). m=None: rows symbolic."""
    _tvm()
    from tvm import te, tirx

    groups = -(-k // group)
    words = words or -(-k // PACK)
    rows = _rows(m)
    x = te.placeholder((rows, k), "float32", name="x")
    w = te.placeholder((words, n), "uint32", name="w")
    s = te.placeholder((groups, n), "float32", name="scales")
    z = te.placeholder((groups, n), "uint8", name="zeros") if zero_points else None

    def decode(kk, j):
        shift = ((kk % PACK) * 4).astype("uint32")
        code = (w[kk // PACK, j] >> shift) & tirx.const(15, "uint32")
        zero = z[kk // group, j].astype("float32") if zero_points else tirx.const(8.0, "float32")
        return (code.astype("float32") - zero) * s[kk // group, j]

    dq = te.compute((k, n), decode, name="decode")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, r] * dq[r, j], axis=r), name="matmul")
    args = [x, w, s] + ([z] if zero_points else []) + [y]
    func = te.create_prim_func(args, index_dtype_override="int64")
    return func.with_attr("global_symbol", f"q4_linear_k{k}_n{n}_g{group}{'_zp' if zero_points else ''}")


def int8_linear(k: int, n: int, *, m: int | None = None, a_dtype: str = "uint8", w_bits: int = 8):
    """int8 x int8 (or packed int4, w_bits=4) -> int32 matmul, per-tensor activation x per-channel weight rescale."""
    _tvm()
    from tvm import te, tirx

    if w_bits not in (4, 8):
        raise ValueError(f"int8_linear: w_bits={w_bits}, expected 8 or 4")
    rows = _rows(m)
    a = te.placeholder((rows, k), a_dtype, name="a")
    if w_bits == 8:
        w = te.placeholder((k, n), "int8", name="w")
        wq = w
    else:
        w = te.placeholder((-(-k // PACK), n), "uint32", name="w")

        def decode(kk, j):
            code = (w[kk // PACK, j] >> ((kk % PACK) * 4).astype("uint32")) & tirx.const(15, "uint32")
            return code.astype("int32") - tirx.const(8, "int32")

        wq = te.compute((k, n), decode, name="decode")
    colsum = te.placeholder((n,), "int32", name="w_colsum")
    a_scale = te.placeholder((1,), "float32", name="a_scale")
    a_zero = te.placeholder((1,), "int32", name="a_zero")
    w_scale = te.placeholder((n,), "float32", name="w_scale")
    r = te.reduce_axis((0, k), name="k")
    acc = te.compute((rows, n), lambda i, j: te.sum(a[i, r].astype("int32") * wq[r, j].astype("int32"), axis=r),
                     name="matmul")
    y = te.compute((rows, n), lambda i, j: (acc[i, j] - a_zero[0] * colsum[j]).astype("float32")
                   * (a_scale[0] * w_scale[j]), name="rescale")
    func = te.create_prim_func([a, w, colsum, a_scale, a_zero, w_scale, y], index_dtype_override="int64")
    return func.with_attr("global_symbol", f"int8_linear_k{k}_n{n}_{a_dtype}{'_w4' if w_bits == 4 else ''}")


def f32_linear(k: int, n: int, *, m: int | None = None):
    """Float linear Y = X @ W with W [K, N] fp32: the same schedules serve float layers (lm_head, fp32 recipe)."""
    _tvm()
    from tvm import te

    rows = _rows(m)
    x = te.placeholder((rows, k), "float32", name="x")
    w = te.placeholder((k, n), "float32", name="w")
    r = te.reduce_axis((0, k), name="k")
    y = te.compute((rows, n), lambda i, j: te.sum(x[i, r] * w[r, j], axis=r), name="matmul")
    return te.create_prim_func([x, w, y], index_dtype_override="int64").with_attr("global_symbol", f"f32_linear_k{k}_n{n}")


# ---------------------------------------------------------------- CPU schedules (s_tir, written by hand)
# dlight's cpu.GEMV rule vectorizes the spatial axis but needs the vector operand in its own
# buffer and cannot keep a decoded tile for reuse across rows; these two schedules cover
# decode (few rows: decode inline, vectorized over N) and prefill (many rows: decode an N panel
# once per thread, then a register-blocked rows x N tile).

DECODE_N = 8 * VEC  # output channels per parallel task in decode: long contiguous runs of each weight row
PANEL_N = 4 * VEC  # output channels per decoded panel in prefill
ROWS = 4  # rows per register tile in prefill


def _split_vector(sch, loop, lanes):
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer


def schedule_cpu(func, *, decode: bool):
    """Parallel + vectorized CPU schedule of q4_linear / int8_linear; decode=True for M of a few rows."""
    _tvm()
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = _block_names(sch)
    blk = sch.get_sblock("matmul")
    epilogue = sch.get_sblock("rescale") if "rescale" in names else None
    i, j, k = sch.get_loops(blk)
    if decode:
        if "decode" in names:
            sch.compute_inline(sch.get_sblock("decode"))
        jo, ji = sch.split(j, [None, DECODE_N if _extent(func, "n") >= 4 * DECODE_N else 2 * VEC])
        ko, ki = sch.split(k, [None, PACK])
        sch.reorder(jo, i, ko, ki, ji)
        sch.parallel(jo)
        # int4: accumulate in a per-task buffer; int8: the rescale epilogue consumes the int32 tile.
        tail = sch.cache_write(blk, 0, "local") if epilogue is None else epilogue
        sch.reverse_compute_at(tail, i)
        _split_vector(sch, sch.get_loops(tail)[-1], VEC)
        sch.unroll(ki)
        _split_vector(sch, ji, VEC)
        sch.decompose_reduction(blk, ko)
    else:
        jo, ji = sch.split(j, [None, PANEL_N])
        io, ii = sch.split(i, [None, ROWS])
        sch.reorder(jo, io, k, ii, ji)
        sch.parallel(jo)
        if "decode" in names:
            dec = sch.get_sblock("decode")
            sch.compute_at(dec, jo)
            if epilogue is not None:
                # int4 x int8: the codes (-8..7) fit int8, and an int8 panel stays in L1 like an int8 weight
                # panel (an int32 one does not: prefill measured 2x slower); decode rows inline the int32 form
                sch.unsafe_set_dtype(dec, 0, "int8")
            _split_vector(sch, sch.get_loops(dec)[-1], VEC)
        tail = sch.cache_write(blk, 0, "local") if epilogue is None else epilogue
        sch.reverse_compute_at(tail, io)
        _split_vector(sch, sch.get_loops(tail)[-1], VEC)
        jv = _split_vector(sch, ji, VEC)
        sch.unroll(jv)
        sch.unroll(ii)
        sch.decompose_reduction(blk, k)
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def _extent(func, axis: str) -> int:
    """N or K of a kernel from its weight buffer (w is [K-words or K, N])."""
    shape = func.params[1].ty.shape
    return int(shape[1] if axis == "n" else shape[0])


def _block_names(sch) -> set[str]:
    return {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}


# ---------------------------------------------------------------- CUDA schedules

GPU_THREADS_N = 64  # threadIdx.x over output channels: consecutive words of w, coalesced
GPU_THREADS_K = 8  # threadIdx.y splits K; partial sums meet in a cross-thread reduction


def schedule_cuda_gemv(func):
    """Decode (few rows) on CUDA: threads over N, K split across threadIdx.y, rfactor + cross-thread sum.

    Written by hand: dlight.gpu.GEMV schedules K-major ("outer reduction") weights only for opencl
    and metal, and these kernels keep words along N so the CPU vectorizes over output channels.
    """
    _tvm()
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    names = _block_names(sch)
    if "decode" in names:
        sch.compute_inline(sch.get_sblock("decode"))
    blk = sch.get_sblock("matmul")
    i, j, k = sch.get_loops(blk)
    # threadIdx.x must divide N: the cross-thread reduction's write-back is emitted without the
    # bounds guard a tail would need (checked in the CUDA source), so odd N get fewer threads.
    threads_n = next(t for t in (GPU_THREADS_N, 32, 16, 8, 4, 2, 1) if _extent(func, "n") % t == 0)
    jo, jt = sch.split(j, [None, threads_n])
    kt, kr = sch.split(k, [GPU_THREADS_K, None])
    sch.reorder(jo, jt, kt, i, kr)
    rf = sch.rfactor(kt, 0)
    jo, jt, kt, i, kr = sch.get_loops(rf)
    sch.bind(jo, "blockIdx.x")
    sch.bind(jt, "threadIdx.x")
    sch.bind(kt, "threadIdx.y")
    sch.set_scope(rf, 0, "local")
    sch.decompose_reduction(rf, kr)
    sch.reverse_compute_at(blk, jo, preserve_unit_loops=True)
    kt, i, jt = sch.get_loops(blk)[1:]  # rfactor puts the reduced axis first among the block's iters
    sch.reorder(i, jt, kt)  # a cross-thread reduction needs its reduction loop innermost
    sch.bind(jt, "threadIdx.x")
    sch.bind(kt, "threadIdx.y")
    if "rescale" in names:
        sch.set_scope(blk, 0, "local")
        epi = sch.get_sblock("rescale")
        sch.reverse_compute_at(epi, jo, preserve_unit_loops=True)
        sch.bind(sch.get_loops(epi)[-1], "threadIdx.x")
    return sch.mod["main"].with_attr("tirx.is_scheduled", True)


def schedule_cuda(func, *, decode: bool):
    """CUDA schedule: the hand GEMV above for decode, dlight's tiled shared-memory Matmul for prefill."""
    if decode:
        return schedule_cuda_gemv(func)
    tvm = _tvm()
    from tvm.s_tir import dlight as dl

    mod = dl.ApplyDefaultSchedule(dl.gpu.Matmul())(tvm.IRModule({"main": func}))
    return mod["main"]


def build_cuda(funcs: dict, arch: str = "sm_80") -> tuple[str, bytes]:
    """Schedule and compile {name: (unscheduled func, decode)} for CUDA: (CUDA source, cubin from nvcc).

    TVM's PyPI build emits CUDA C source only (no NVRTC here), so the source goes through nvcc
    explicitly; the cubin is what a GPU machine loads without a compiler.
    """
    tvm = _tvm()
    from tvm.support import nvcc

    from qgraph.backends.tvm import cuda_target
    from qgraph.backends.tvm.cuda import require_nvcc

    require_nvcc()
    target = cuda_target(arch)
    with target:
        scheduled = {name: schedule_cuda(func, decode=decode).with_attr("global_symbol", name)
                     for name, (func, decode) in funcs.items()}
        lib = tvm.compile(tvm.IRModule(scheduled), target=target)
        source = lib.mod.imports[0].inspect_source("")
        binary = nvcc.compile_cuda(source, target_format="cubin", compiler="nvcc")
    return source, bytes(binary)
