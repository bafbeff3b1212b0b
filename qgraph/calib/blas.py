"""numpy's OpenBLAS held at a fixed thread count while a model compiles, so the artifact is the same everywhere.

OpenBLAS splits a float32 matrix product differently for 1 and for 2+ threads, and the two give results
that differ in the last bits (measured: X^T X for a 600 x 576 float32 X). qgraph's searches compare such
products (SmoothQuant's strength, clip ratios) and GPTQ rounds with a Gram matrix made of them, so the
thread count a machine defaults to would leak into the weights. ONNX Runtime's calibration sessions pin
their threads (calib.stats.CALIB_THREADS); this pins numpy's to the same number. The library is found the
way threadpoolctl finds it (the loaded shared object, then its set/get symbols); where there is none
(another BLAS, another OS), nothing is pinned.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
from collections.abc import Iterator

# Symbol names: numpy >= 2 wheels ship scipy-openblas (64-bit ints), older wheels plain OpenBLAS.
_SETTERS = ("scipy_openblas_set_num_threads64_", "openblas_set_num_threads64_", "openblas_set_num_threads")
_GETTERS = ("scipy_openblas_get_num_threads64_", "openblas_get_num_threads64_", "openblas_get_num_threads")


@functools.cache
def _openblas() -> tuple | None:
    """(set, get) of the OpenBLAS numpy loaded, or None."""
    import numpy  # noqa: F401 - loads the BLAS whose mapping is looked up below

    try:  # Linux: the shared objects this process mapped
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if len(line.split()) >= 6}
    except OSError:
        return None
    paths = {p for p in paths if "openblas" in os.path.basename(p).lower() and ".so" in os.path.basename(p)}
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)  # already loaded: the same handle
        except OSError:
            continue
        setter = next((getattr(lib, s) for s in _SETTERS if hasattr(lib, s)), None)
        getter = next((getattr(lib, g) for g in _GETTERS if hasattr(lib, g)), None)
        if setter is not None and getter is not None:
            getter.restype = ctypes.c_int
            return setter, getter
    return None


@contextlib.contextmanager
def blas_threads(count: int) -> Iterator[None]:
    """Run the block with numpy's OpenBLAS on `count` threads, then restore the previous count."""
    found = _openblas()
    if found is None:
        yield
        return
    setter, getter = found
    previous = getter()
    setter(count)
    try:
        yield
    finally:
        setter(previous)
