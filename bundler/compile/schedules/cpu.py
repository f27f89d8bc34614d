"""What a schedule needs to know about the board's CPU, read from the TVM target.

TVM's own helper (``llvm_get_vector_width``) answers for the build host's CPU, not the target's
(512 bits for a Haswell target on an AVX-512 host, 128 for a RISC-V core without a vector
unit), so the width is derived here from the features LLVM resolves for the target's
``mtriple``/``mcpu``/``mattr``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from tvm.target import Target
from tvm.target.codegen import target_has_features


@dataclass(frozen=True)
class CPU:
    vector_bits: int      # 0: no SIMD unit for floats (rv64gc): loops stay scalar
    vector_registers: int
    threads: int          # what parallel loops are split over (the service's threads)

    def lanes(self, dtype_bits: int = 32) -> int:
        """Elements of that width in one vector register; 1 without a vector unit."""
        return max(1, self.vector_bits // dtype_bits)


def _arch(target: Target) -> str:
    triple = str(target.attrs.get("mtriple", "") or "")
    if not triple:
        # A target without a triple compiles for the build host.
        from tvm.target.codegen import llvm_get_system_triple

        triple = llvm_get_system_triple()
    return triple.split("-")[0]


def _has(feature: str, target: Target) -> bool:
    try:
        return bool(target_has_features(feature, target))
    except Exception:  # noqa: BLE001 -- LLVM does not know the feature for this architecture
        return False


def describe(target: Target) -> CPU:
    # Asked for every kernel by every rule; LLVM's feature lookup is not free.
    return _describe(str(target))


@functools.lru_cache(maxsize=64)
def _describe(text: str) -> CPU:
    target = Target(text)
    arch = _arch(target)
    threads = int(target.attrs.get("num-cores", 0) or 0) or 1
    if arch in ("x86_64", "i386", "i686", "x86"):
        if _has("avx512f", target):
            return CPU(512, 32, threads)
        if _has("avx", target):
            return CPU(256, 16, threads)
        return CPU(128, 16, threads)       # SSE2 is part of x86-64
    if arch in ("aarch64", "arm64", "aarch64_be"):
        return CPU(128, 32, threads)       # Advanced SIMD is mandatory on AArch64
    if arch.startswith(("arm", "thumb")):
        return CPU(128 if _has("neon", target) else 0, 16, threads)
    if arch.startswith("riscv"):
        # The V extension guarantees VLEN >= 128; rv64gc (VisionFive 2's U74) has none.
        return CPU(128 if _has("v", target) else 0, 32, threads)
    return CPU(0, 16, threads)
