"""Matrix products: dense layers (ONNX Gemm/MatMul with a constant weight), batched matmuls of
attention, GEMV (one row), with their fused epilogues (bias, activation, residual add).

One register tiling for all of them: an ``MR x NR`` tile of the output in registers, NR
columns as vectors (the output's contiguous axis), accumulated over the whole reduction from
MR broadcast elements of A and one packed row of B per step. A constant B (the weights) is
repacked at compile time to ``[N/NR, K, NR]`` (from ``[K, N]`` or, transposed, ``[N, K]``), so
each tile streams one contiguous panel; see :func:`conv.pack_weights`.
"""

from __future__ import annotations

from tvm import tirx
from tvm.tirx import IndexMap

from .base import (
    CPURule,
    Knobs,
    as_int,
    divisor_tile,
    is_var,
    layout_free_params,
    one_reduction,
    pack_weights,
    parallelize,
    param_index,
    pixel_tile_max,
    region_mins,
    register_tile,
    split_epilogue,
    tile_writeback,
    uses,
    vectorize_if_not,
)
from .cpu import CPU
from .elementwise import schedule_injective_block


def _panel_map(ndim: int, pos_j: int, pos_k: int, nr: int) -> IndexMap:
    """B's layout with its N axis split into panels of NR columns, each panel K x NR: the other
    (batch) axes first, then N/NR, K, NR."""
    def f(*idx):
        rest = [e for p, e in enumerate(idx) if p not in (pos_j, pos_k)]
        return (*rest, idx[pos_j] // nr, idx[pos_k], idx[pos_j] % nr)

    return IndexMap.from_func(f, ndim=ndim)


class Matmul(CPURule):
    """Matches a reduction block ``C[b.., i, j] += A[.., i, k] * B[.., k, j]`` (or ``B[.., j, k]``):
    one reduction iterator in both operands, the output's last iterator j in B only, the one
    before it (i, absent for a GEMV) in A only."""

    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, k_index = found
        info = infos[k_index]
        block = info.block_rv
        stmt = sch.get(block)
        if len(stmt.reads) != 2 or len(stmt.writes) != 1 or info.dom_kind().count("R") != 1:
            return None
        if "O" in info.dom_kind() or any(as_int(i.dom) is None for i in info.iters):
            return None
        kit = next(i for i in info.iters if i.kind == "R")
        out_vars = [e for e in region_mins(stmt.writes[0]) if not (isinstance(e, tirx.IntImm) and e.value == 0)]
        if not out_vars or not all(isinstance(e, tirx.Var) for e in out_vars):
            return None
        if any(not any(is_var(e, i.var) for i in info.iters) for e in out_vars):
            return None
        jv = out_vars[-1]
        reads = [region_mins(r) for r in stmt.reads]
        if not all(any(uses(e, kit.var) for e in r) for r in reads):
            return None
        b_index = [n for n, r in enumerate(reads) if any(uses(e, jv) for e in r)]
        if len(b_index) != 1:
            return None
        b_index = b_index[0]
        a_index = 1 - b_index
        iv = None
        if len(out_vars) >= 2 and any(uses(e, out_vars[-2]) for e in reads[a_index]) \
                and not any(uses(e, out_vars[-2]) for e in reads[b_index]):
            iv = out_vars[-2]
        # Every spatial iterator is an output index (no broadcast-reduction hybrids).
        if len(out_vars) != len([i for i in info.iters if i.kind == "S"]):
            return None
        jit = next(i for i in info.iters if i.var.same_as(jv))
        iit = [i for i in info.iters if iv is not None and i.var.same_as(iv)]
        iit = iit[0] if iit else None
        batch = [i for i in info.iters if i.kind == "S" and i is not jit and i is not iit]

        for b in infos[:k_index]:
            schedule_injective_block(sch, b.block_rv, cpu)

        lanes = cpu.lanes(stmt.writes[0].source.dtype.bits)
        N, K = as_int(jit.dom), as_int(kit.dom)
        M = as_int(iit.dom) if iit else 1
        nr = register_tile(N, lanes)
        if nr < max(2, lanes // 4) and N > 1:
            nr = divisor_tile(N, 2 * lanes, lanes)   # an odd N (1000 classes): one wide vector tile
        else:
            nr = knobs.pick("nr", nr, [t for t in (lanes // 2, lanes, 2 * lanes, 4 * lanes)
                                       if t >= max(2, lanes // 4) and N % t == 0 and pixel_tile_max(cpu, t, lanes) >= 2])
        mr_max = pixel_tile_max(cpu, nr, lanes)

        block, consumer = split_epilogue(sch, infos, k_index)
        bbuf = stmt.reads[b_index]
        bparam = param_index(func, bbuf.source)
        bmins = region_mins(bbuf)
        pos_j = [p for p, e in enumerate(bmins) if is_var(e, jv)]
        pos_k = [p for p, e in enumerate(bmins) if is_var(e, kit.var)]
        if bparam is not None and bparam in layout_free_params(func) and len(pos_j) == 1 and len(pos_k) == 1 \
                and N > nr and K > 1:
            pack_weights(sch, block, b_index, _panel_map(len(bmins), pos_j[0], pos_k[0], nr))

        jo, ji = sch.split(jit.loop_rv, [None, nr])
        io = ii = None
        if iit is not None:
            mr = divisor_tile(M, mr_max)
            mr = knobs.pick("mr", mr if mr * 2 > mr_max or mr == M else mr_max, range(2, min(mr_max, M) + 1))
            io, ii = sch.split(iit.loop_rv, [None, mr])
        outer = [b.loop_rv for b in batch]
        # B's panel (K x NR) is the bigger operand of a tile: the row tiles of A go inside it.
        tiles = [*outer, jo, *([io] if io else [])]
        sch.reorder(*tiles, kit.loop_rv, *([ii] if ii else []), ji)
        n_par = len(outer) + 1
        extent = 1
        for lp in tiles[:n_par]:
            extent *= as_int(sch.get(lp).extent) or 1
        if extent < 2 * cpu.threads and io is not None:
            n_par += 1
        fused = parallelize(sch, tiles[:n_par], cpu, work=M * N * max(1, K // 8))
        at = io if io is not None and n_par < len(tiles) else fused
        sch.reverse_compute_at(consumer, at, preserve_unit_loops=True)
        if lanes > 1:
            sch.vectorize(ji)
        else:
            sch.unroll(ji)
        if ii is not None:
            sch.unroll(ii)
        init = sch.decompose_reduction(block, kit.loop_rv)
        vectorize_if_not(sch, init, lanes)
        tile_writeback(sch, consumer, at, lanes)
        return sch
