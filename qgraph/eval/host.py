"""The CPU a number was measured on: model name, the ISA flags that pick ONNX Runtime's int8 kernels.

MLAS (ONNX Runtime's CPU math library) chooses its int8 GEMM by CPUID when a session starts, so the
same artifact runs different integer code on different hosts. Every benchmark table and report
carries this record, so a reader knows which kernel produced the numbers.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

# Flags (as /proc/cpuinfo names them) that decide which int8 kernel MLAS runs, in report order.
ISA_FLAGS = ("sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{'model', 'machine', 'isa': [flags], 'int8_dot': 'vnni' | 'arm64' | 'pmaddubsw'} of this host."""
    machine = platform.machine().lower()
    model, flags = platform.processor() or machine, set()
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "cpu model", "hardware") and value.strip():
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    isa = [f for f in ISA_FLAGS if f in flags]
    if machine in ("aarch64", "arm64"):
        int8_dot = "arm64"
    elif "avx512_vnni" in flags or "avx_vnni" in flags:
        int8_dot = "vnni"
    else:
        int8_dot = "pmaddubsw"
    return {"model": model, "machine": machine, "isa": isa, "int8_dot": int8_dot}


def describe_host() -> str:
    """One line for table headers, e.g. 'AMD EPYC (x86_64; avx2 fma; no VNNI: u8 x s8 sums pairs in int16)'."""
    info = cpu_info()
    dot = {
        "vnni": "VNNI: u8 x s8 dot products accumulate in int32",
        "arm64": "ARM64 int8 dot products accumulate in int32",
        "pmaddubsw": "no VNNI: ORT's u8 x s8 kernel sums byte pairs in int16 and saturates",
    }[info["int8_dot"]]
    return f"{info['model']} ({info['machine']}; {' '.join(info['isa']) or 'no SIMD flags read'}; {dot})"
