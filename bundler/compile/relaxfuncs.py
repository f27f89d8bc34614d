"""Running a Relax expression mutator over every Relax function of a module: what the graph
rewrites of :mod:`bundler.compile.deconv` and :mod:`bundler.compile.schedules.packing` share."""

from __future__ import annotations

import tvm
from tvm import relax


def mutate_functions(mutator, mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with each Relax function replaced by what ``mutator`` (a PyExprMutator made on
    ``mod``) makes of it; the TIR functions stay as they are."""
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
