"""The Relax pipeline that compiles a model for a board, and the part of it tuning shares.

Tuning and compiling must lower a model through exactly the same passes up to the fused
kernels, or no tuned workload would match at compile time: :func:`lower_for_tuning` and
:func:`pipeline` share :func:`_pre_tuning_passes` for that reason.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.config.recipe import Recipe


def board_target(recipe: Recipe) -> dict[str, Any]:
    """The recipe's target with ``num-cores`` set to the threads the bundle runs with.

    MetaSchedule reads num-cores to size parallel loops (it refuses a CPU target without it),
    and kernels tuned for N threads are what the harness runs with ``--threads N``.
    """
    t = recipe.target_dict()
    t.setdefault("num-cores", recipe.service.threads)
    return t


@functools.cache
def identity() -> str:
    """The version of the compile pipeline and of the default schedules: the hash of their
    sources. The model cache keys on it (a change recompiles instead of reusing old code), and
    the tuning database stamps its default-schedule timings and knobs with it (measured against
    other default schedules, they say nothing about these). Hashed once per process, so that
    sources edited while it runs cannot make its own timings look stale."""
    here = Path(__file__).parent
    files = [here / "pipeline.py", here / "lowering.py", here / "deconv.py", here / "fastmath.py", here / "channelblocks.py", here / "relaxfuncs.py", *sorted((here / "schedules").glob("*.py"))]
    return cache.key(*(cache.sha256_file(f) for f in files))


def _pre_tuning_passes():
    """Relax passes up to the fused kernels: what tasks are extracted from and what the database
    is applied to. Tuning and compiling must run exactly these, or no workload would match."""
    from tvm import relax

    from bundler.compile.channelblocks import channel_blocks
    from bundler.compile.deconv import non_overlapping_deconv
    from bundler.compile.fastmath import fast_math

    t = relax.transform
    return [non_overlapping_deconv, fast_math, t.DecomposeOpsForInference(), t.CanonicalizeBindings(), relax.backend.DispatchSampling(),
            relax.backend.DispatchSortScan(), t.LegalizeOps(), t.AnnotateTIROpPattern(), t.FoldConstant(),
            t.FuseOps(), t.FuseTIR(), channel_blocks]


def lower_for_tuning(mod, target):
    """The model's IRModule with its fused kernels, ready for task extraction."""
    import tvm

    with target:
        return tvm.transform.Sequential(_pre_tuning_passes())(mod)


def pipeline(target, database: Path | None = None, knobs: dict[str, dict] | None = None):
    """The Relax pipeline `make` compiles with: the default CPU pipeline, plus the tuned
    schedules of ``database`` where it has them, plus tvmbundle's default CPU schedules
    (:mod:`bundler.compile.schedules`) for every kernel it does not, with the knobs ``knobs``
    (:func:`~bundler.compile.schedules.kernel_key` -> rule and knobs) `tune` found for them."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as relax_pipeline

    from bundler.compile.schedules import default_schedule_pass  # imports TVM: only compiles pay for it

    @tvm.transform.module_pass(opt_level=0, name="tvmbundle_pipeline")
    def _pipeline(mod, _ctx):
        with target, contextlib.ExitStack() as stack:
            passes = list(_pre_tuning_passes())
            if database is not None:
                # Opened here rather than given as a folder: for a folder the pass logs a warning
                # (with the cache's paths) on every compile.
                from tvm.s_tir import meta_schedule as ms

                stack.enter_context(ms.database.JSONDatabase(work_dir=str(database), allow_missing=False))
                passes.append(relax.transform.MetaScheduleApplyDatabase())
            passes.append(default_schedule_pass(target, knobs))
            passes += relax_pipeline.dataflow_lower_passes(target) + relax_pipeline.finalize_passes(target)
            return tvm.transform.Sequential(passes)(mod)

    return _pipeline
