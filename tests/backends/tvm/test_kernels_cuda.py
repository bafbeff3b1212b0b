"""CUDA builds of the verified kernels: schedule transformations only, compiled with nvcc (CUDA cannot run here)."""

from __future__ import annotations

import re
import shutil

import pytest

pytest.importorskip("tvm")
if shutil.which("nvcc") is None:
    pytest.skip("nvcc is not installed", allow_module_level=True)

from qgraph.backends.tvm import kernels as K  # noqa: E402

KERNELS = {
    "q4_decode": (K.q4_linear(576, 1536, 128, m=1), True),
    "q4_prefill": (K.q4_linear(576, 1536, 128), False),
    "q4zp_tail_decode": (K.q4_linear(100, 37, 32, m=1, zero_points=True), True),
    "i8_decode": (K.int8_linear(576, 1536, m=1), True),
    "i8_prefill": (K.int8_linear(576, 192), False),
    "i4a8_decode": (K.int8_linear(576, 1536, m=1, w_bits=4), True),
    "i4a8_prefill": (K.int8_linear(100, 64, w_bits=4), False),
}


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def built(request):
    return request.param, *K.build_cuda(KERNELS, request.param)


def kernel_bodies(source: str) -> dict[str, str]:
    """CUDA source of each __global__ function definition, by name."""
    bodies = {}
    for match in re.finditer(r'extern "C" __global__ void (?:__launch_bounds__\(\d+\) )?(\w+)\([^)]*\) \{', source):
        depth, i = 1, match.end()
        while depth:
            depth += {"{": 1, "}": -1}.get(source[i], 0)
            i += 1
        bodies[match.group(1)] = source[match.end():i]
    return bodies


def test_one_fused_kernel_per_linear(built):
    _, source, _ = built
    bodies = kernel_bodies(source)
    assert sorted(bodies) == sorted(f"{name}_kernel" for name in KERNELS)
    for name in ("q4_decode", "q4_prefill", "q4zp_tail_decode"):
        body = bodies[f"{name}_kernel"]
        # the 4-bit decode (shift, mask, zero, scale) happens inside the matmul kernel itself
        # (prefill loads two words at a time, so the mask may be a uint2 of 15s)
        assert "w_ptr[" in body and "(uint)15" in body and "scales_ptr[" in body and "x_ptr" in body
    assert "zeros_ptr[" in bodies["q4zp_tail_decode_kernel"]
    # decode reduces K across threadIdx.y; prefill tiles through shared memory
    assert "threadIdx.y" in bodies["q4_decode_kernel"] and "__shared__" in bodies["q4_prefill_kernel"]
    # the int8 rescale (activation scale x per-channel weight scale) is fused after the int32 sum
    assert "w_scale_ptr[" in bodies["i8_decode_kernel"] and "a_zero_ptr[" in bodies["i8_prefill_kernel"]
    # w4a8: the int4 words are shifted, masked and offset by 8 inside the int8 kernel (decode: in the int32
    # update; prefill: into the shared-memory weight tile), then the same int32 sum and rescale
    for name in ("i4a8_decode", "i4a8_prefill"):
        body = bodies[f"{name}_kernel"]
        assert "w_ptr[" in body and ">>" in body and "(uint)15" in body and "a_zero_ptr" in body, name
    assert re.search(r"\(uint\)15\)\) - 8\)", bodies["i4a8_decode_kernel"])
    assert re.search(r"__shared__ alignas\(64\) int decode_reindex(_pad)?_shared_ptr", bodies["i4a8_prefill_kernel"])


def test_nvcc_compiles_a_cubin_for_the_arch(built):
    arch, _, cubin = built
    assert cubin[:4] == b"\x7fELF" and len(cubin) > 10_000, arch
