"""The llvm build pipeline: TVM's CPU Relax pipeline with schedules for the ops qgraph's kernels do not cover.

TVM's default CPU pipeline legalizes every Relax op to TIR and schedules none of it (single-threaded
loop nests). Attention's activation x activation matmuls, softmax, norms and elementwise chains are
scheduled here: dlight's CPU Reduction rule first (its GEMV rule asserts on attention's batched
matmuls), then a fallback that parallelizes the outer spatial loops and vectorizes the innermost
spatial one (moved inside any reduction). qgraph's own kernels arrive scheduled and are left alone.
"""

from __future__ import annotations

from qgraph.backends.tvm import require_tvm

LANES = 16


def _fallback_rule():
    require_tvm()
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import get_extent

    class ParallelVectorize(dl.ScheduleRule):
        """Parallel outer spatial loops, vectorized inner spatial loop, reductions in between."""

        def apply(self, func, target, _tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            for info in infos:
                self._block(sch, info)
            return sch

        @staticmethod
        def _block(sch, info):
            loops = sch.get_loops(info.block_rv)
            kinds = info.dom_kind()
            if len(loops) != len(kinds) or "S" not in kinds:
                return
            spatial = [lp for lp, k in zip(loops, kinds, strict=True) if k == "S"]
            reduce = [lp for lp, k in zip(loops, kinds, strict=True) if k == "R"]
            if reduce and len(spatial) >= 2:
                # the innermost spatial axis goes inside the reduction: one vector accumulator per row
                sch.reorder(*spatial[:-1], *reduce, spatial[-1])
            outer, inner = (spatial[:-1], spatial[-1]) if len(spatial) > 1 else ([], spatial[0])
            if outer:
                sch.parallel(sch.fuse(*outer))
            extent = get_extent(sch, inner)
            if isinstance(extent, int) and extent >= LANES and extent % LANES == 0:
                _, vec = sch.split(inner, [None, LANES])
                sch.vectorize(vec)
            elif not outer and isinstance(extent, int) and extent >= 4 * LANES:
                par, vec = sch.split(inner, [None, LANES])
                sch.parallel(par)
                sch.vectorize(vec)
            if reduce and len(spatial) >= 2:
                sch.decompose_reduction(info.block_rv, reduce[0])

    return ParallelVectorize()


def cpu_pipeline(target):
    """Relax pipeline for llvm: library dispatch, legalize + fuse, schedule (dlight + fallback), lower, finalize."""
    tvm = require_tvm()
    from tvm.relax.backend.cpu_generic import pipeline as cpu_generic
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                cpu_generic.library_dispatch_passes(target)
                + cpu_generic.legalize_passes(target)
                + [dl.ApplyDefaultSchedule(dl.cpu.Reduction(), _fallback_rule())]
                + cpu_generic.dataflow_lower_passes(target)
                + cpu_generic.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _guarded(rule):
    """A dlight GPU rule that declines (None) instead of failing on a loop nest it does not expect.

    dlight's GPU rules assert on shapes outside their pattern (GEMV's normalize asserts a reduction
    loop that attention's batched matmuls at length 1 do not have); declining passes the function to
    the next rule, ending at Fallback, which schedules any loop nest.
    """
    require_tvm()
    from tvm.s_tir import dlight as dl

    class Guarded(dl.ScheduleRule):
        def apply(self, func, target, tunable):
            try:
                return rule.apply(func, target, tunable)
            except (AssertionError, ValueError, IndexError):
                return None

        def __repr__(self):
            return f"guarded {type(rule).__name__}"

    return Guarded()


def gpu_rules():
    """dlight's GPU rules in TVM's default order, each guarded; Fallback last and unguarded."""
    require_tvm()
    from tvm.s_tir import dlight as dl

    g = dl.gpu
    return [_guarded(r) for r in (g.Matmul(), g.GEMV(), g.Reduction(), g.GeneralReduction())] + [g.Fallback()]


def cuda_pipeline(target):
    """Relax pipeline for cuda: TVM's CUDA pipeline with the dlight rules guarded (see _guarded).

    qgraph's kernels arrive scheduled (tirx.is_scheduled) and dlight leaves them alone.
    """
    tvm = require_tvm()
    from tvm.relax.backend.cuda import pipeline as cuda
    from tvm.s_tir import dlight as dl

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            legalize = [p for p in cuda.legalize_passes(target) if not isinstance(p, dl.ApplyDefaultSchedule)]
            seq = tvm.transform.Sequential(
                cuda.library_dispatch_passes(target)
                + legalize
                + [dl.ApplyDefaultSchedule(*gpu_rules())]
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline
