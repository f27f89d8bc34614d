"""Injective kernels: elementwise ops, broadcasts, padding, reshapes and transposes, and chains
of them that FuseOps put into one kernel."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .base import CPURule, Knobs, as_int, parallelize, product, vectorize_inner
from .cpu import CPU


def schedule_injective_block(sch: s_tir.Schedule, block, cpu: CPU) -> None:
    """Parallel over the outer loops, vector over the innermost (the output's contiguous
    axis), for a block whose loops are all spatial."""
    loops = sch.get_loops(block)
    if not loops:
        return
    extents = [as_int(sch.get(lp).extent) for lp in loops]
    bits = sch.get(block).writes[0].source.dtype.bits if sch.get(block).writes else 32
    vectorize_inner(sch, block, cpu.lanes(bits))
    loops = sch.get_loops(block)
    if len(extents) > 1 and all(e is not None for e in extents):
        # Parallel over as many outer loops as give each thread a few chunks.
        outer, span = [], 1
        for lp, e in zip(loops[:len(extents) - 1], extents[:-1]):
            outer.append(lp)
            span *= e
            if span >= 4 * cpu.threads:
                break
        parallelize(sch, outer, cpu, work=product(extents))
    elif len(extents) == 1 and extents[0] is not None and len(loops) == 2:
        parallelize(sch, [loops[0]], cpu, work=extents[0])


class Elementwise(CPURule):
    """Every block spatial-only: inline all into the last one (what FuseOps meant by fusing
    them) and schedule that."""

    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or any(not b.is_injective() for b in infos):
            return None
        for b in infos[:-1]:
            try:
                sch.compute_inline(b.block_rv)
            except Exception:  # noqa: BLE001 -- read by more blocks, or not inlinable: its own loops
                schedule_injective_block(sch, b.block_rv, cpu)
        schedule_injective_block(sch, infos[-1].block_rv, cpu)
        return sch
