"""Reductions that are not contractions: pooling windows, and rows (softmax, layer norm, mean,
sum, max, argmax...).

* :class:`WindowReduction`: one reduction block whose innermost output axis also indexes its
  input innermost (max/avg pooling, a sum over a short window): that axis goes into vector
  lanes, with the window loops around it, and the accumulators stay in registers.
* :class:`Reduction`: kernels of one or more reduction blocks and elementwise blocks that share
  their leading spatial axes (softmax is max, exp, sum, divide; layer norm is two sums and a
  normalization): parallel over those axes, every block computed per row under them, so a row
  stays in cache between its passes; the elementwise passes vectorized. A reduction over the
  contiguous end of its input first adds its row into a vector of partial sums (reassociating
  the sum, as onnxruntime does); any other stays scalar.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func

from .base import (
    CPURule,
    Knobs,
    as_int,
    column_stride,
    compute_stages_at,
    divisor_tile,
    dtype_bits,
    is_var,
    log,
    one_reduction,
    parallelize,
    product,
    region_mins,
    register_tile,
    split_epilogue,
    tile_writeback,
    uses,
    vectorize_if_not,
    vectorize_inner,
)
from .cpu import CPU
from .elementwise import schedule_injective_block


class WindowReduction(CPURule):
    """Matches one reduction block (plus elementwise ones) whose output's innermost iterator
    indexes the innermost dimension of every input."""

    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        found = one_reduction(func)
        if found is None:
            return None
        sch, infos, k = found
        info = infos[k]
        kinds = info.dom_kind()
        if "O" in kinds or "R" not in kinds or "S" not in kinds or any(as_int(i.dom) is None for i in info.iters):
            return None
        stmt = sch.get(info.block_rv)
        if len(stmt.writes) != 1:
            return None
        spatial = [i for i in info.iters if i.kind == "S"]
        red = [i for i in info.iters if i.kind == "R"]
        x = spatial[-1]
        out = region_mins(stmt.writes[0])
        if not out or not (isinstance(out[-1], tirx.Var) and out[-1].same_as(x.var)):
            return None
        # The output's contiguous axis must index every input's contiguous axis too, and no
        # reduction iterator may: otherwise vector lanes would gather.
        for r in stmt.reads:
            mins = region_mins(r)
            if not mins or not uses(mins[-1], x.var):
                return None
        lanes = cpu.lanes(stmt.writes[0].source.dtype.bits)
        X = as_int(x.dom)
        if X < 2:
            return None

        outer = [i.loop_rv for i in spatial[:-1]]
        # Padding (or whatever else comes before the window) is computed one channel at a time
        # right before the rows that read it, while it is in cache, when there are channels
        # enough for every thread; else it is a parallel stage of its own. (ResNet's 64x112x112 max
        # pool, 2 threads: the whole padded input written and read back made it 6x onnxruntime.)
        planes = product(as_int(i.dom) for i in spatial[:-2]) if len(spatial) > 2 else 0
        local = k > 0 and planes >= 2 * cpu.threads and not knobs.pick("pad_apart", 0, (0, 1))
        if not local:
            for b in infos[:k]:
                schedule_injective_block(sch, b.block_rv, cpu)
        block, consumer = split_epilogue(sch, infos, k)
        # Without a vector unit the same tile, unrolled: its accumulators in registers.
        t = register_tile(X, lanes)
        if t < 4:
            t = divisor_tile(X, 2 * lanes if lanes > 1 else 4, lanes)
        xo, xi = sch.split(x.loop_rv, [None, t])
        sch.reorder(*outer, xo, *[i.loop_rv for i in red], xi)
        work = product(as_int(i.dom) for i in info.iters)
        if local:
            fused = parallelize(sch, outer[:-1], cpu, work=work)
            compute_stages_at(sch, [b.block_rv for b in infos[:k]], fused, lanes)
        elif outer:
            parallelize(sch, outer, cpu, work=work)
        sch.reverse_compute_at(consumer, xo, preserve_unit_loops=True)
        # A strided window unrolled for LLVM's SLP vectorizer: unlike Conv2D's strided pixels, a
        # pool's were slower in vectors, with their loads as shuffles (bundler.compile.lowering):
        # 131 against 114 us for a 3x3 stride-2 max pool of 64x112x112, 2 threads.
        strided = any((column_stride(region_mins(r)[-1], x.var) or 1) > 1 for r in stmt.reads)
        if lanes > 1 and (not strided or knobs.pick("vector_strided", 0, (0, 1))):
            sch.vectorize(xi)
        else:
            sch.unroll(xi)
        for r in red:
            e = as_int(r.dom)
            if e <= 4:
                sch.unroll(r.loop_rv)
        init = sch.decompose_reduction(block, red[0].loop_rv)
        vectorize_if_not(sch, init, lanes)
        tile_writeback(sch, consumer, xo, lanes)
        return sch


def _leading_spatial(kinds: str) -> int:
    return len(kinds) - len(kinds.lstrip("S"))


class Reduction(CPURule):
    """Matches kernels with a reduction whose blocks all share their leading spatial axes (a
    kernel without any, a single row, is only vectorized)."""

    def schedule(self, func, target, cpu: CPU, knobs: Knobs):
        try:
            sch = _vector_reductions(func, cpu)
        except Exception as e:  # noqa: BLE001 -- rfactor refused this reduction: the scalar rows below
            log.debug("Reduction: no vector partial sums: %s", str(e).strip().splitlines()[:1])
            sch = None
        if sch is not None:
            return sch
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if not infos or all(b.is_injective() for b in infos):
            return None
        lead = min(_leading_spatial(b.dom_kind()) for b in infos)
        if any("O" in b.dom_kind() for b in infos):
            return None
        if lead == 0:
            # One row (batch 1 normalized away): nothing to run in parallel, only the passes.
            return self._passes(sch, infos, cpu, 0)
        # All blocks must agree on the extents of the shared leading axes.
        dom0 = [as_int(d) for d in infos[-1].dom()[:lead]]
        if any(d is None for d in dom0):
            return None
        if any([as_int(d) for d in b.dom()[:lead]] != dom0 for b in infos):
            # Different rows (a softmax's max over a unit axis next to its exp over 10): each
            # pass by itself.
            return self._passes(sch, infos, cpu, 0)
        loops = sch.get_loops(infos[-1].block_rv)
        rows = product(dom0)
        row_work = max(1, product(as_int(d) or 1 for d in infos[-1].dom()) // rows)
        fused = parallelize(sch, loops[:lead], cpu, work=rows * row_work)
        for b in reversed(infos[:-1]):
            sch.compute_at(b.block_rv, fused, preserve_unit_loops=True)
        return self._passes(sch, infos, cpu, 1)

    @staticmethod
    def _passes(sch, infos, cpu: CPU, shared: int):
        """Each block's own loops (below the ``shared`` one all blocks are computed under, which
        must not be touched: it holds the other blocks too): vectors for the elementwise passes,
        a short unroll for the reductions."""
        last = infos[-1].block_rv
        bits = sch.get(last).writes[0].source.dtype.bits if sch.get(last).writes else 32
        lanes = cpu.lanes(bits)
        for b in infos:
            if len(sch.get_loops(b.block_rv)) <= shared:
                continue
            if b.is_injective():
                vectorize_inner(sch, b.block_rv, lanes)
            else:
                _unroll_inner(sch, b.block_rv, lanes)
        return sch


def _partial_sums(R: int, lanes: int) -> int:
    """How many partial sums (vector lanes) a row of ``R`` gets: a divisor of ``R`` (no bounds
    check in the vector loop), at most four vectors, with the fewest dependent additions: ``R / t``
    vector steps, then ``t`` scalar ones adding the partial sums up. 0 when no divisor pays."""
    best, cost = 0, R
    for t in range(4, min(R, 4 * lanes) + 1):
        if R % t == 0 and R // t + t < cost:
            best, cost = t, R // t + t
    return best


def _row_split(sch, info, lead: int, lanes: int) -> int:
    """For a reduction block over the contiguous end of its one input (the reduced axes are the
    input's last ones, whole and in order), the partial sums to split its row into; else 0."""
    stmt = sch.get(info.block_rv)
    if len(stmt.writes) != 1 or info.dom_kind()[lead:] != "R" * (len(info.iters) - lead):
        return 0
    reads = [r for r in stmt.reads if not r.source.same_as(stmt.writes[0].source)]
    if len(reads) != 1:
        return 0
    red = info.iters[lead:]
    mins = region_mins(reads[0])
    shape = [as_int(d) for d in reads[0].source.shape]
    if len(mins) < len(red) or not all(is_var(m, r.var) for m, r in zip(mins[-len(red):], red)) \
            or shape[-len(red):] != [as_int(r.dom) for r in red]:
        return 0
    return _partial_sums(product(as_int(r.dom) for r in red), lanes)


def _vector_reductions(func, cpu: CPU):
    """Rows reduced into vectors of partial sums: every reduction over the contiguous end of its
    input (a global average pool's H x W, softmax's max and sum over the last axis) is split by
    a divisor of the row and rfactored, its vector of partial sums added up after; all blocks are
    then computed row by row under one parallel loop, as the scalar path below does. A scalar
    reduction is bound by the latency of one addition per element: MobileNetV3's squeeze-excite
    means of 120x28x28 took 73 us against onnxruntime's 10, the encoder's softmax 141 against 22
    (2 threads). The sum is reassociated, as onnxruntime's and every vectorized one is. None when
    no reduction of the kernel is of this kind."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos or any("O" in b.dom_kind() for b in infos) or any(as_int(i.dom) is None for b in infos for i in b.iters):
        return None
    lead = min(_leading_spatial(b.dom_kind()) for b in infos)
    dom0 = [as_int(d) for d in infos[-1].dom()[:lead]]
    if lead == 0 or any([as_int(d) for d in b.dom()[:lead]] != dom0 for b in infos):
        return None
    lanes = cpu.lanes(dtype_bits(sch, infos[-1].block_rv))
    order, rfs = [], []
    for b in infos:
        t = 0 if b.is_injective() or lanes <= 1 else _row_split(sch, b, lead, lanes)
        if t:
            red = [i.loop_rv for i in b.iters[lead:]]
            _ro, ri = sch.split(sch.fuse(*red) if len(red) > 1 else red[0], [None, t])
            rf = sch.rfactor(ri, factor_axis=len(sch.get(b.block_rv).writes[0].region))
            order.append(rf)
            rfs.append(rf)
        order.append(b.block_rv)
    if not rfs:
        return None
    rows = product(dom0)
    work = rows * max(product(as_int(d) for d in b.dom()) // rows for b in infos)
    fused = parallelize(sch, sch.get_loops(order[-1])[:lead], cpu, work=work)
    for blk in reversed(order[:-1]):
        sch.compute_at(blk, fused, preserve_unit_loops=True)
    for rf in rfs:
        # compute_at made the rf block's loops in the order of its iterators: the partial sums'
        # axis first, the reduction over the row's chunks last. The chunks go outside, the
        # partial sums into vector lanes (of a buffer local to the row: registers).
        iv = sch.get(rf).iter_vars
        if iv[0].iter_type != tirx.IterVar.DataPar or iv[-1].iter_type != tirx.IterVar.CommReduce:
            raise ValueError("rfactor's block is not (partial sums, ..., chunks)")
        below = sch.get_loops(rf)[1:]     # under the fused row loop
        ri, ro = below[0], below[-1]
        sch.reorder(ro, ri)
        sch.set_scope(rf, 0, "local")
        sch.vectorize(ri)
        init = sch.decompose_reduction(rf, ro)
        vectorize_if_not(sch, init, lanes)
    for b in infos:
        if b.is_injective() and len(sch.get_loops(b.block_rv)) > 1:   # loops of its own under the row
            vectorize_inner(sch, b.block_rv, lanes)
    return sch


def _unroll_inner(sch, block, lanes) -> None:
    """Unroll a reduction's innermost loop by a few steps: keeps the loop overhead off a scalar
    reduction without the full unroll LLVM would otherwise do on a short constant row."""
    loops = sch.get_loops(block)
    e = as_int(sch.get(loops[-1]).extent)
    step = max(4, lanes)
    if e is None or e <= step:
        return
    t = divisor_tile(e, step)
    if t > 1:
        sch.unroll(sch.split(loops[-1], [None, t])[1])
