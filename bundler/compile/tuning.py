"""Tuning a model's kernels with MetaSchedule, and the database that keeps the results.

TVM 0.27's default CPU pipeline legalizes and fuses operators but leaves every kernel
unscheduled (one thread, no vectorization). ``tvmbundle tune`` measures candidate schedules
for each fused kernel of the model, on the board itself, and keeps the best in a MetaSchedule
JSON database; ``tvmbundle make`` applies a matching database when it compiles.

A database belongs to one model (its prepared graph), one board target and one TVM version:
it lives in the cache under ``tuning/<key>/`` with the key hashing exactly those. Records are
appended as they are measured, so Ctrl-C keeps what was measured; the trial budget counts
every record already there, so a second run resumes instead of starting over.

Where candidates run: natively on this machine when the board is this machine's architecture
(MetaSchedule's local runner), otherwise on the board through TVM's RPC (see :mod:`bundler.rpc`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.compile.model import to_relax
from bundler.compile.pipeline import board_target, lower_for_tuning
from bundler.config.recipe import Recipe
from bundler.errors import ModelError, UserError

log = logging.getLogger("tvmbundle")

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
META = "tuning.json"


# --- the database -----------------------------------------------------------------------------

def database_key(model_id: str, target: dict[str, Any], versions: dict[str, str]) -> str:
    return cache.key("tuning", model_id, target, versions)


def database_dir(model_id: str, target: dict[str, Any], versions: dict[str, str]) -> Path:
    return cache.root() / "tuning" / database_key(model_id, target, versions)


@dataclass(frozen=True)
class Database:
    path: Path
    key: str
    records: int          # measured candidates (each one a record)
    workloads: int        # kernels with at least one record
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return cache.sha256_file(self.path / RECORDS) if (self.path / RECORDS).is_file() else ""

    def manifest(self) -> dict[str, Any]:
        """What a bundle's manifest says about the tuning it was built with."""
        return {"database": self.key, "records": self.records, "workloads": self.workloads,
                "records_sha256": self.sha256, "trials": self.meta.get("trials"),
                "runner": self.meta.get("runner"), "seconds": self.meta.get("seconds"),
                "apache-tvm": self.meta.get("apache-tvm")}


def _count(path: Path) -> tuple[int, int]:
    """(records, distinct workloads with a valid measurement) of a JSON database folder."""
    f = path / RECORDS
    if not f.is_file():
        return 0, 0
    records, good = 0, set()
    for line in f.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            wl, rec = json.loads(line)
        except ValueError:      # a line cut by a crash: MetaSchedule skips it too
            continue
        records += 1
        secs = rec[1] if isinstance(rec, list) and len(rec) > 1 else None
        if isinstance(secs, list) and secs and all(isinstance(s, (int, float)) and s < 1e9 for s in secs):
            good.add(wl)
    return records, len(good)


def open_database(path: Path) -> Database | None:
    """The database in ``path`` if it holds any record."""
    path = Path(path)
    records, workloads = _count(path)
    if records == 0:
        return None
    meta = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    return Database(path, meta.get("key", path.name), records, workloads, meta)


def find(model_id: str, recipe: Recipe, versions: dict[str, str]) -> Database | None:
    """The tuning database for this model, board target and TVM version, if one was written."""
    return open_database(database_dir(model_id, board_target(recipe), versions))


# --- tuning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class TuneResult:
    database: Database | None
    tasks: int
    measured: int            # trials measured by this run
    previously: int          # records that were there before
    seconds: float
    stopped: str             # "budget", "time limit", "already tuned", "no tasks"


def tune(recipe: Recipe, prepared, model_id: str, source: Path, versions: dict[str, str], *,
         trials: int, timeout: float, runner: Any, builder: Any, runner_name: str,
         on_progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Measure up to ``trials`` candidates in total (counting earlier runs) within ``timeout`` s.

    ``runner``/``builder`` are MetaSchedule objects from :func:`bundler.rpc.measure_setup`.
    """
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target_dict = board_target(recipe)
    target = tvm.target.Target(target_dict)
    path = database_dir(model_id, target_dict, versions)
    path.mkdir(parents=True, exist_ok=True)
    before, _ = _count(path)
    remaining = trials - before
    start = time.monotonic()

    mod = lower_for_tuning(to_relax(prepared, source), target)
    extracted = [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled", False)]
    if not extracted:
        return TuneResult(open_database(path), 0, 0, before, 0.0, "no tasks")
    if remaining <= 0:
        return TuneResult(open_database(path), len(extracted), 0, before, 0.0, "already tuned")

    check_serialization()
    # Spread the budget over the kernels, so a small one still touches each of them.
    per_task = max(1, -(-remaining // len(extracted)))
    work = Path(tempfile.mkdtemp(prefix="tvmbundle-tune-"))
    database = ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=True)
    deadline = start + timeout if timeout > 0 else None
    state = {"measured": 0, "stopped": "budget"}

    def on_batch(n: int) -> bool:
        state["measured"] += n
        if on_progress:
            on_progress(before + state["measured"], trials)
        if deadline is not None and time.monotonic() >= deadline:
            state["stopped"] = "time limit"
            return False
        return True

    try:
        tasks, weights = _tune_contexts(extracted, work, per_task)
        ms.tune.tune_tasks(
            tasks=tasks, task_weights=weights, work_dir=str(work), max_trials_global=remaining,
            max_trials_per_task=per_task, num_trials_per_iter=max(1, min(per_task, 16)),
            builder=builder, runner=runner, database=database,
            measure_callbacks=[*ms.MeasureCallback.create("default"), _stop_callback(on_batch)],
            task_scheduler="gradient")
    except KeyboardInterrupt:
        _write_meta(path, model_id, target_dict, versions, trials, runner_name, recipe, source,
                    time.monotonic() - start, interrupted=True)
        raise
    except Exception as e:
        last = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ModelError(f"{source}: tuning for {recipe.name} failed: {last}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.monotonic() - start
    _write_meta(path, model_id, target_dict, versions, trials, runner_name, recipe, source, seconds)
    after, _ = _count(path)
    return TuneResult(open_database(path), len(extracted), after - before, before, seconds, state["stopped"])


def check_serialization() -> None:
    """MetaSchedule ships every kernel to its builder processes and database as JSON. With
    apache-tvm-ffi 0.1.15 under apache-tvm 0.27 serializing any TIR node crashes the process
    (unbounded recursion in libtvm_ffi); say so instead of segfaulting."""
    import importlib.metadata as md

    v = md.version("apache-tvm-ffi")
    parts = [int(x) for x in v.split(".post")[0].split(".")[:3] if x.isdigit()]
    if md.version("apache-tvm").startswith("0.27") and parts >= [0, 1, 15]:
        raise UserError(f"tuning cannot run with apache-tvm-ffi {v}: with apache-tvm 0.27 it crashes "
                        "serializing TIR, which MetaSchedule does for every candidate",
                        hint="pip install 'apache-tvm-ffi==0.1.14.post0' (what pyproject.toml pins)")


def _tune_contexts(extracted, work: Path, per_task: int):
    """One TuneContext per kernel, as MetaSchedule's relax integration makes them, except for the
    mutators: in TVM 0.27 (apache-tvm wheel) a TuneContext holding MutateParallel or
    MutateComputeLocation crashes the process (unbounded recursion in libtvm_ffi), so the search
    mutates tile sizes and unrolling only; sampling still explores parallelism and compute location."""
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir
    from tvm.s_tir.meta_schedule.utils import fork_seed

    threads = max(1, min(os.cpu_count() or 1, 2))
    tasks, weights = [], []
    import contextlib
    import sys

    with contextlib.redirect_stdout(sys.stderr):   # its handlers bind to the stdout of this moment
        loggers = get_loggers_from_work_dir(str(work), [t.task_name for t in extracted])
    _quiet_metaschedule()
    for task, logger, rand_state in zip(extracted, loggers, fork_seed(0, n=len(extracted))):
        kinds = ms.Mutator.create("llvm")
        safe = {m: p for m, p in kinds.items() if type(m).__name__ in ("MutateTileSize", "MutateUnroll")}
        space = ms.space_generator.PostOrderApply(sch_rules="from-target", postprocs="from-target",
                                                  mutator_probs=safe)
        # MetaSchedule's defaults (512 candidates evolved 4 times per round) are for budgets of
        # thousands of trials on big machines; a population a few times the round's trials finds
        # as good candidates for small budgets at a fraction of the search time.
        population = max(64, min(512, 8 * per_task))
        strategy = ms.search_strategy.EvolutionarySearch(
            population_size=population, init_min_unmeasured=min(50, population // 4),
            genetic_num_iters=2 if population < 512 else 4)
        tasks.append(ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space,
                                    search_strategy=strategy, task_name=task.task_name, logger=logger,
                                    rand_state=rand_state, num_threads=threads).clone())
        weights.append(task.weight)
    return tasks, weights


def _quiet_metaschedule() -> None:
    """MetaSchedule logs its task tables to stdout: send them to stderr (stdout carries our result,
    e.g. --json), and only with -v."""
    import sys

    verbose = logging.getLogger("tvmbundle.cmd").isEnabledFor(logging.INFO)
    names = [n for n in logging.root.manager.loggerDict if n.startswith("tvm.s_tir.meta_schedule")]
    for name in ["tvm.s_tir.meta_schedule", *names]:
        for h in logging.getLogger(name).handlers:
            if type(h) is logging.StreamHandler:
                h.setStream(sys.stderr)
                h.setLevel(logging.INFO if verbose else logging.WARNING)


def _write_meta(path: Path, model_id: str, target: dict[str, Any], versions: dict[str, str], trials: int,
                runner_name: str, recipe: Recipe, source: Path, seconds: float, interrupted: bool = False) -> None:
    old = json.loads((path / META).read_text()) if (path / META).is_file() else {}
    meta = {"key": path.name, "model_sha256": model_id, "model": source.name, "board": recipe.name,
            "target": target, **versions, "trials": trials, "runner": runner_name,
            "seconds": round(float(old.get("seconds", 0)) + seconds, 1), "interrupted": interrupted,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path / f".{META}.tmp"
    tmp.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    tmp.replace(path / META)
    # Listed (and pruned) by `tvmbundle cache` like every other entry.
    (path / ".complete.json").write_text(json.dumps({"created": time.time(), "tuning": True}))


def _stop_callback(on_batch: Callable[[int], bool]):
    """A measure callback that reports each measured batch and ends every task once
    ``on_batch`` says so (the time limit)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms

    @derived_object
    class _Stop(ms.measure_callback.PyMeasureCallback):
        def __init__(self) -> None:
            self.stopped = False

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results) -> None:
            if self.stopped:
                return
            if not on_batch(len(runner_results)):
                self.stopped = True
                for i in range(len(task_scheduler.tasks_)):
                    try:
                        task_scheduler.terminate_task(i)
                    except Exception:  # already finished
                        pass

    return _Stop()


def parse_duration(text: str) -> float:
    """'90', '90s', '15m', '2h' -> seconds."""
    t = str(text).strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600}
    try:
        if t and t[-1] in scale:
            return float(t[:-1]) * scale[t[-1]]
        return float(t)
    except ValueError:
        raise UserError(f"--time-limit: expected seconds or a duration like 90s, 15m, 2h; got {text!r}") from None
