"""The rule for any kernel the others do not match, so that none runs as TVM leaves it (one
thread, scalar): each top-level loop nest gets its outer spatial loops in parallel and its
innermost loop vectorized, wherever TVM proves that legal; where it does not, the loop stays as
it was. The kernel counts as scheduled either way, which is what keeps it out of the next
rule pass."""

from __future__ import annotations

from tvm import s_tir
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .base import CPURule, Knobs, as_int, log, parallelize
from .cpu import CPU
from .elementwise import schedule_injective_block


class Fallback(CPURule):
    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos:
            for b in infos:
                _try(lambda b=b: _schedule_block(sch, b, cpu))
            return sch
        # Opaque or imperfectly nested kernels (sort, scan, gather with loops of their own):
        # only the outermost loop of each top-level nest, and only when TVM proves it parallel.
        try:
            root = sch.get_sblock("root")
            children = sch.get_child_blocks(root)
        except Exception:  # noqa: BLE001 -- no root block to speak of: leave the kernel as it is
            return sch
        for blk in children:
            def par(blk=blk):
                loops = sch.get_loops(blk)
                if loops and cpu.threads > 1 and (as_int(sch.get(loops[0]).extent) or 2) > 1:
                    sch.parallel(loops[0])
            _try(par)
        return sch


def _schedule_block(sch: s_tir.Schedule, info, cpu: CPU) -> None:
    if info.is_injective():
        schedule_injective_block(sch, info.block_rv, cpu)
        return
    kinds = info.dom_kind()
    lead = len(kinds) - len(kinds.lstrip("S"))
    if lead:
        loops = sch.get_loops(info.block_rv)
        parallelize(sch, loops[:lead], cpu)


def _try(fn) -> None:
    # A rejected primitive leaves the schedule as it was before it (TVM checks, then mutates).
    try:
        fn()
    except Exception as e:  # noqa: BLE001 -- not legal here: this loop stays as it was
        log.debug("fallback: %s", str(e).strip().splitlines()[:1])
