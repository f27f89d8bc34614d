"""Default CPU schedules for the kernels of TVM 0.27's Relax CPU pipeline.

``relax.backend.cpu_generic`` legalizes and fuses operators but schedules none of them, and
dlight has only a GEMV and a row-reduction rule for CPUs: untuned, nearly every kernel of a
CNN runs on one thread without SIMD. These rules, in dlight's style (each one matched on a
kernel's block structure, the first that matches schedules it), give every kernel a
parallel, vectorized and, for the contractions, register-tiled schedule sized from the target
alone: its vector width (from the features LLVM resolves for mtriple/mcpu/mattr) and
``num-cores``, the threads the bundle runs with.

Kernels a tuning database covers are scheduled already (``tirx.is_scheduled``) and left alone.
"""

from __future__ import annotations

import tvm
import tvm_ffi
from tvm import relax
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.s_tir.stmt import SBlock
from tvm.target import Target

from .base import KNOBS_ATTR, PREPROC, RULE_ATTR, CPURule, Knobs
from .conv import Conv2D
from .cpu import CPU, describe
from .elementwise import Elementwise
from .fallback import Fallback
from .matmul import Matmul
from .packing import fold_weight_packing
from .reduction import Reduction, WindowReduction

__all__ = [
    "CPU",
    "KNOBS_ATTR",
    "ApplySchedules",
    "Conv2D",
    "Elementwise",
    "Fallback",
    "Knobs",
    "Matmul",
    "Reduction",
    "WindowReduction",
    "default_schedule_pass",
    "describe",
    "kernel_key",
    "rules",
    "schedule_kernel",
    "scheduled_by",
]


def rules(target: Target | None = None) -> list[ScheduleRule]:
    """The rules in the order they are tried; :class:`Fallback` takes whatever is left.
    (The target is read per kernel, from the kernel's own attribute or the current target.)"""
    return [Conv2D(), Matmul(), WindowReduction(), Reduction(), Elementwise(), Fallback()]


def scheduled_by(mod: tvm.IRModule) -> dict[str, str]:
    """Kernel name -> the rule that scheduled it, for the kernels these rules scheduled."""
    return {gv.name_hint: str(f.attrs[RULE_ATTR]) for gv, f in mod.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and RULE_ATTR in f.attrs}


def kernel_key(func: tvm.tirx.PrimFunc) -> str:
    """What identifies a kernel to its tuned knobs: the structural hash of its body, which is
    the same in `tune`'s extracted task and in make's pipeline (where AttachAttrLayoutFreeBuffers
    has renamed the kernel and added attributes, so MetaSchedule's workload hash differs)."""
    return f"{tvm_ffi.structural_hash(func.body, map_free_vars=True) & 0xFFFFFFFFFFFFFFFF:016x}"


def schedule_kernel(func: tvm.tirx.PrimFunc, target: Target, rule_list: list[ScheduleRule],
                    tuned: dict | None = None):
    """(scheduled function, the rule's name, its knobs) for the first rule that takes ``func``, or
    (None, None, None). ``tuned`` ({"rule": name, "knobs": {...}}, from `tune`) fixes the knobs
    of the rule it names; another rule taking the kernel ignores them."""
    for rule in rule_list:
        name = type(rule).__name__
        knobs = Knobs(tuned.get("knobs") if tuned and tuned.get("rule") == name else None)
        sch = rule.apply(func, target, False, knobs) if isinstance(rule, CPURule) else rule.apply(func, target, False)
        if sch is not None:
            out = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, name)
            if knobs.chosen():
                out = out.with_attr(KNOBS_ATTR, ",".join(f"{k}={v}" for k, v in sorted(knobs.chosen().items())))
            return out, name, knobs
    return None, None, None


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.ApplySchedules")
class ApplySchedules:
    """dlight's ApplyDefaultSchedule, which also names the rule in each kernel's attributes
    (``tvmbundle.schedule_rule``, and ``tvmbundle.knobs`` where tuned knobs changed it): what
    scheduled a kernel shows in any dump of the IR. ``tuned``: :func:`kernel_key` -> the knobs
    `tune` found for that kernel."""

    def __init__(self, *rules: ScheduleRule, tuned: dict[str, dict] | None = None):
        self.rules = list(rules)
        self.tuned = tuned or {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
                continue
            target = func.attrs.get("target") if func.attrs else None
            target = target or Target.current(allow_none=False)
            out, _name, _knobs = schedule_kernel(func, target, self.rules,
                                                 self.tuned.get(kernel_key(func)) if self.tuned else None)
            if out is not None:
                updates[gv] = out
        for gv, func in updates.items():
            mod[gv] = func
        return mod


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"])


def _has_preproc(func: tvm.tirx.PrimFunc) -> bool:
    found = []

    def visit(block):
        if PREPROC in block.annotations:
            found.append(block)

    tvm_ffi.structural_walk(func.body, [(SBlock, visit)], order="post")
    return bool(found)


@tvm.transform.module_pass(opt_level=0, name="tvmbundle.SplitLayoutRewritePreproc")
def _split_layout_rewrite_preproc(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Relax's SplitLayoutRewritePreproc, shown only the kernels that repack a weight: it fails on
    a kernel without any block inside its root (an opaque scan or sort) even when there is
    nothing to split. It only ever looks the other kernels up through its own split table."""
    others = {gv: f for gv, f in mod.functions_items()
              if isinstance(f, tvm.tirx.PrimFunc) and not _has_preproc(f)}
    if len(others) == sum(isinstance(f, tvm.tirx.PrimFunc) for _, f in mod.functions_items()):
        return mod
    sub = tvm.IRModule({gv: f for gv, f in mod.functions_items() if gv not in others}, attrs=mod.attrs,
                       global_infos=mod.global_infos)
    out = relax.transform.SplitLayoutRewritePreproc()(sub)
    for gv, f in others.items():
        out[gv] = f
    return out


def default_schedule_pass(target: Target | None = None, tuned: dict[str, dict] | None = None) -> tvm.transform.Pass:
    """Schedule every kernel not scheduled yet; in the Relax pipeline after FuseTIR (and after
    MetaScheduleApplyDatabase, which it leaves alone), before the dataflow lowering.

    Around :class:`ApplySchedules` (dlight's ApplyDefaultSchedule): AttachAttrLayoutFreeBuffers
    tells the rules which kernel parameters are constant weights (only those are repacked);
    SplitLayoutRewritePreproc splits the repacking out of the kernels; numpy (:mod:`.packing`;
    FoldConstant for anything it does not recognize) runs it at compile time; a second
    ApplySchedules catches a packing kernel that could not be folded, so none runs unscheduled.
    ``tuned``: the knobs `tune` found per kernel (:class:`ApplySchedules`)."""
    t = relax.transform
    return tvm.transform.Sequential([
        t.AttachAttrLayoutFreeBuffers(),
        ApplySchedules(*rules(target), tuned=tuned),
        _split_layout_rewrite_preproc,
        fold_weight_packing,
        t.FoldConstant(),
        t.DeadCodeElimination(),
        ApplySchedules(*rules(target)),
    ], name="tvmbundle.default_schedules")
