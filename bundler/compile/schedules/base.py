"""What every rule shares: matching is cheap and never raises, scheduling helpers that pick
tile sizes the loop extents divide.

A rule that raises would fail the whole model compile, and a rule's match can only be
approximate (FuseOps produces kernels no rule was written for), so :class:`CPURule` turns any
error while scheduling into "not mine" and lets the next rule, finally :class:`Fallback`, take
the kernel.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.sym.pattern import detect_linear_equation
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target
from tvm.tirx.analysis import undefined_vars

from .cpu import CPU, describe

log = logging.getLogger("tvmbundle.schedules")

#: The annotation MetaSchedule's RewriteLayout postproc puts on a weight-packing block; Relax's
#: SplitLayoutRewritePreproc moves such blocks into their own function, which :mod:`.packing`
#: then runs at compile time on the constant weights.
PREPROC = "meta_schedule.layout_rewrite_preproc"

#: The kernel attribute naming the rule that scheduled it.
RULE_ATTR = "tvmbundle.schedule_rule"

#: The kernel attribute listing the tuned knobs (``name=value,...``) that changed its schedule.
KNOBS_ATTR = "tvmbundle.knobs"

# At most this many copies of a loop body from explicit unrolling, per tile: enough for
# register tiles, little enough that LLVM's code generation stays quick.
UNROLL_BUDGET = 64

# Below this many output elements a parallel launch costs more than it saves.
MIN_PARALLEL_WORK = 4096


class Knobs:
    """A kernel's tunable choices: a rule asks for each one by name (:meth:`pick`) with the value
    it would take alone and the alternatives worth measuring. With nothing fixed every choice is
    its default, so an untuned kernel gets exactly the rule's own schedule; `tune` fixes some
    (:class:`bundler.compile.tuning.RuleSearch`) and measures what they give.

    The space is found while scheduling, not declared apart: which choices there are depends on
    the path the rule takes for this kernel (a depthwise tiling has other knobs than a packed
    one), and a choice defined where it is used cannot drift from the code that uses it (as
    AutoTVM's ``cfg.define_knob`` templates do)."""

    def __init__(self, fixed: dict[str, int] | None = None) -> None:
        self.fixed = {str(k): int(v) for k, v in (fixed or {}).items()}
        self.space: dict[str, tuple[int, tuple[int, ...]]] = {}

    def pick(self, name: str, default: int, options=()) -> int:
        opts = tuple(sorted({int(o) for o in options if int(o) > 0} | {int(default)}))
        self.space[name] = (int(default), opts)
        v = self.fixed.get(name)
        return v if v in opts else int(default)

    def chosen(self) -> dict[str, int]:
        """The fixed choices this kernel's schedule used that differ from the defaults."""
        return {k: v for k, v in self.fixed.items() if k in self.space and v != self.space[k][0]
                and v in self.space[k][1]}


class CPURule(ScheduleRule):
    """A rule for the LLVM CPU targets; ``schedule`` returns None when the kernel is not its kind."""

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool, knobs: Knobs | None = None):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            sch = self.schedule(func, target, describe(target), knobs if knobs is not None else Knobs())
        except Exception as e:  # noqa: BLE001 -- a ScheduleError, or a kernel the match let through
            log.debug("%s does not apply: %s", type(self).__name__, str(e).strip().splitlines()[:1])
            return None
        return sch

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def schedule(self, func: tirx.PrimFunc, target: Target, cpu: CPU, knobs: Knobs) -> s_tir.Schedule | None:
        raise NotImplementedError


# --- facts about a kernel -------------------------------------------------------------------

def as_int(x) -> int | None:
    return int(x.value) if isinstance(x, tirx.IntImm) else (x if isinstance(x, int) else None)


def layout_free_params(func: tirx.PrimFunc) -> set[int]:
    """Parameters bound to constants (model weights), as AttachAttrLayoutFreeBuffers marks them:
    only those may be repacked at compile time."""
    attr = func.attrs.get("layout_free_buffers") if func.attrs else None
    return {int(i) for i in attr} if attr is not None else set()


def param_index(func: tirx.PrimFunc, buffer) -> int | None:
    # TVM 0.27 represents a buffer parameter as the buffer's own variable.
    for i, p in enumerate(func.params):
        if p.same_as(buffer):
            return i
    return None


def region_mins(region) -> list:
    return [r.min for r in region.region]


def column_stride(index, var) -> int | None:
    """The constant step of ``index`` per step of ``var`` (a window's stride), or None when
    ``index`` is not linear in it."""
    coef = detect_linear_equation(index, [var])
    return as_int(coef[0]) if len(coef) == 2 else None


def is_var(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def uses(expr, var) -> bool:
    return any(u.same_as(var) for u in undefined_vars(expr))


def dtype_bits(sch: s_tir.Schedule, block) -> int:
    stmt = sch.get(block)
    return stmt.writes[0].source.dtype.bits if stmt.writes else 32


# --- choosing tiles ------------------------------------------------------------------------

def divisor_tile(extent: int, limit: int, multiple: int = 1) -> int:
    """The largest divisor of ``extent`` that is at most ``limit``, preferring multiples of
    ``multiple`` (a vector's lanes): a tile that divides its loop needs no bounds check, and a
    check inside a vectorized loop would make TVM scalarize it."""
    limit = max(1, min(limit, extent))
    if multiple > 1:
        for t in range(limit - limit % multiple, 0, -multiple):
            if t and extent % t == 0:
                return t
    for t in range(limit, 0, -1):
        if extent % t == 0:
            return t
    return 1


def register_tile(extent: int, lanes: int) -> int:
    """Columns of an accumulator tile: a power of two (a whole or half vector register, or two
    registers) that divides the loop. A tile like 24 lanes on AVX-512 (1.5 registers) makes LLVM
    give up keeping the accumulators in registers, twenty times slower."""
    if lanes <= 1:
        return divisor_tile(extent, 4)
    t = 2 * lanes
    while t >= 2:
        if extent % t == 0:
            return t
        t //= 2
    return 1


def vectorize_inner(sch: s_tir.Schedule, block, lanes: int, max_vectors: int = 4) -> None:
    """Vectorize a block's innermost loop with a tile that divides it (at most ``max_vectors``
    registers wide: LLVM splits a longer vector, a non power of two like <7 x float> too)."""
    loops = sch.get_loops(block)
    if not loops or lanes <= 1:
        return
    inner = loops[-1]
    extent = as_int(sch.get(inner).extent)
    if extent is None or extent < 2:
        return
    t = divisor_tile(extent, lanes * max_vectors, lanes)
    if t < 2:
        return
    if t < extent:
        inner = sch.split(inner, [None, t])[1]
    sch.vectorize(inner)


def parallelize(sch: s_tir.Schedule, loops: list, cpu: CPU, work: int | None = None) -> object | None:
    """Fuse ``loops`` (outermost first) and run the result in parallel, when there is more than
    one thread and enough work (``work``: elements computed under the loops) to pay for it."""
    if not loops:
        return None
    fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
    if cpu.threads > 1 and (work is None or work >= MIN_PARALLEL_WORK):
        extent = as_int(sch.get(fused).extent)
        if extent is None or extent > 1:
            sch.parallel(fused)
    return fused


def product(xs) -> int:
    p = 1
    for x in xs:
        p *= x
    return p


# --- register tiles shared by the contraction rules ---------------------------------------

def pack_weights(sch: s_tir.Schedule, block, read_index: int, index_map) -> None:
    """Repack a constant operand of ``block`` with ``index_map``, in a block that Relax's
    SplitLayoutRewritePreproc moves out of the kernel and FoldConstant then evaluates at compile
    time: the bundle ships the packed weights and never repacks at run time. (A Relax layout
    pass before legalization would do the same, but it would have to run identically for
    tuning, which MetaSchedule matches structurally; done here it touches nothing tuning sees.)"""
    cache = sch.cache_read(block, read_index, "global")
    sch.annotate(cache, PREPROC, True)
    sch.transform_layout(block, ("read", read_index), index_map)


def split_epilogue(sch: s_tir.Schedule, infos, main_index: int):
    """Inline the elementwise blocks after the main (reduction) block into the last one and
    return that last block, or a write-back block of the main one's accumulators when nothing
    follows it. Either way the main block then writes a "local" buffer that LLVM keeps in
    registers once the consumer is computed tile by tile."""
    main = infos[main_index].block_rv
    post = infos[main_index + 1:]
    if any(not b.is_injective() for b in post):
        raise ValueError("a reduction after the main block")
    for b in post[:-1]:
        sch.compute_inline(b.block_rv)
    if post:
        consumer = post[-1].block_rv
        sch.set_scope(main, 0, "local")
    else:
        consumer = sch.cache_write(main, 0, "local")
    return main, consumer


def pixel_tile_max(cpu: CPU, nr: int, lanes: int) -> int:
    """Rows of an accumulator tile: as many as the vector registers hold next to the B operand's
    vectors and a broadcast, at most 8 (more only lengthens the unrolled code)."""
    if lanes <= 1:
        return 4
    vecs = -(-nr // lanes)
    return max(1, min(8, (cpu.vector_registers - vecs - 2) // vecs))


def compute_stages_at(sch: s_tir.Schedule, blocks, loop, lanes: int) -> None:
    """Compute the producer stages ``blocks`` (in program order) under ``loop``, each vectorized
    over its innermost loop: the last one first, as compute_at needs its consumer placed."""
    for b in reversed(list(blocks)):
        sch.compute_at(b, loop, preserve_unit_loops=True)
        vectorize_inner(sch, b, lanes)


def vectorize_if_not(sch, block, lanes) -> None:
    loops = sch.get_loops(block)
    if loops and sch.get(loops[-1]).kind != tirx.ForKind.VECTORIZED:
        vectorize_inner(sch, block, lanes)


def tile_writeback(sch, consumer, at, lanes) -> None:
    """The epilogue of one register tile: its innermost loop (the output's contiguous axis) as
    vectors, the loops around it unrolled while the whole stays a few dozen vectors. (An epilogue
    can be much bigger than its tile: an SE block's scale multiplies a whole feature map by each
    channel of a 1x1 convolution; unrolled, that is thousands of statements for LLVM.)"""
    vectorize_inner(sch, consumer, lanes)
    if at is None:
        return
    loops = sch.get_loops(consumer)
    here = [i for i, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(at))]
    budget = UNROLL_BUDGET
    for lp in reversed(loops[here[0] + 1:-1] if here else []):
        e = as_int(sch.get(lp).extent)
        if e is None or sch.get(lp).kind != tirx.ForKind.SERIAL or e > budget:
            break
        if e > 1:
            sch.unroll(lp)
            budget //= e


def one_reduction(func):
    """(schedule, the kernel's normalized blocks, the index of its one reduction block) when the
    kernel has exactly one reduction (plus any number of injective blocks), else None: what the
    contraction and window rules all start from."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if not infos:
        return None
    reds = [i for i, b in enumerate(infos) if not b.is_injective()]
    if len(reds) != 1:
        return None
    return sch, infos, reds[0]
