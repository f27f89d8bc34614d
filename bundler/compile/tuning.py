"""Tuning kernels with MetaSchedule, and the database that keeps the results for every model.

TVM 0.27's default CPU pipeline legalizes and fuses operators but leaves every kernel
unscheduled. ``tvmbundle tune`` measures candidate schedules for each fused kernel of a model,
on the board itself, and keeps them in a MetaSchedule JSON database; ``tvmbundle make`` applies
the best record of every kernel of its model that the database has, whatever model it was
tuned for.

The database belongs to a board target and a TVM version, not to a model: it lives under
``<cache>/tuning/<key>/`` (or ``$TVMBUNDLE_TUNING_DIR/<key>/``), the key hashing the target
(with the thread count as num-cores) and the TVM package versions. MetaSchedule identifies a
kernel (a "workload") by the structural hash of its TIR, so two models with the same conv
share its records. The folder holds

* ``database_workload.json`` / ``database_tuning_record.json``: MetaSchedule's JSONDatabase
  files (what ``MetaScheduleApplyDatabase`` reads), appended under a lock (``.lock``) so
  several ``tune`` runs can share it;
* ``models/<model sha256>.json``: which workloads a model has and which its own runs measured
  (so ``make`` can tell kernels tuned for this model from kernels tuned for another), and what
  timing the whole model with and without its tuning chose (:mod:`bundler.compile.verdict`);
* ``default_schedules.json``: what tvmbundle's default schedule of each kernel measured, with
  the same builder and runner as the candidates;
* ``rule_schedules.json``: for each kernel, the knobs of its default rule (tile sizes, loop
  order: :class:`bundler.compile.schedules.Knobs`) that measured fastest (:class:`RuleSearch`);
* ``tuning.json``: what it is for, the runs that wrote it, and the version of the default
  schedules the two files above were measured against (``schedules``): after an upgrade that
  changes them, make applies no record on their word and the next ``tune`` measures them again.

Per-model folders of earlier versions (``tuning/<model key>/``) are merged into it on first use.

Tuning is our own loop over MetaSchedule's search strategies rather than its task scheduler:
candidates build in a pool of worker processes kept for the whole run on every core of this
machine, are measured by MetaSchedule's runner (here, or on the boards over RPC, several at
once behind a tracker), and every measured batch is appended to the database. The time limit
and Ctrl-C stop the run between two polls (a fraction of a second, or one search step), kill
the builds and measurements in flight, and keep everything measured before.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import math
import os
import queue
import shutil
import signal
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler import cache
from bundler.compile import candidates
from bundler.compile.model import to_relax
from bundler.compile.pipeline import board_target, lower_for_tuning
from bundler.compile.pipeline import identity as pipeline_identity
from bundler.config.recipe import Recipe
from bundler.errors import ModelError, UserError, last_line

log = logging.getLogger("tvmbundle")

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
META = "tuning.json"
DEFAULTS = "default_schedules.json"    # what the default schedule of each kernel measured
RULES = "rule_schedules.json"          # the knobs of tvmbundle's own rules `tune` found per kernel
MODELS = "models"
LOCK = ".lock"
EXPORT_FORMAT = "tvmbundle-tuning-records"
LOWERING = 4           # bump when pipeline._pre_tuning_passes changes: models/ lists go stale
FAILED = 1e10           # MetaSchedule's run time for a candidate that did not build or run


# --- where databases live ---------------------------------------------------------------------

def root() -> Path:
    env = os.environ.get("TVMBUNDLE_TUNING_DIR")
    return Path(env) if env else cache.root() / "tuning"


def database_key(target: dict[str, Any], versions: dict[str, str]) -> str:
    return cache.key("tuning-db", target, versions)


def database_dir(target: dict[str, Any], versions: dict[str, str]) -> Path:
    return root() / database_key(target, versions)


def legacy_key(model_id: str, target: dict[str, Any], versions: dict[str, str]) -> str:
    """The key of the per-model folders earlier versions wrote."""
    return cache.key("tuning", model_id, target, versions)


# --- the files of a database ------------------------------------------------------------------

def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def _lines(path: Path) -> Iterator[Any]:
    """The JSON values of a JSON-lines file, skipping a line cut by a crash (MetaSchedule does too)."""
    if not path.is_file():
        return
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue


def _good(rec: Any) -> float | None:
    """The mean run time of a record that measured, None for a failed one."""
    secs = rec[1] if isinstance(rec, list) and len(rec) > 1 else None
    if isinstance(secs, list) and secs and all(isinstance(s, (int, float)) and s < 1e9 for s in secs):
        return sum(secs) / len(secs)
    return None


def _read_json(path: Path) -> Any:
    """A database file's JSON; {} when it is missing or cut by a crash."""
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        return {}


def _write_json(path: Path, data: Any) -> None:
    """Replace a database file whole (readers never see half of it); callers hold the lock."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    tmp.replace(path)


def _is_check(model_id: Any, v: Any) -> bool:
    # The model's sha256 names a file on this machine: nothing else may.
    return isinstance(model_id, str) and len(model_id) == 64 and all(c in "0123456789abcdef" for c in model_id) \
        and isinstance(v, dict) and isinstance(v.get("digest"), str) and v.get("choice") in CHOICES


def _is_rule_entry(v: Any) -> bool:
    """An entry of rule_schedules.json (:meth:`Store.rule_schedules`) as make can use it."""
    return (isinstance(v, dict) and isinstance(v.get("knobs"), dict) and isinstance(v.get("secs"), (int, float))
            and isinstance(v.get("key"), str))


class Store:
    """The files of one database folder, safe to append to from several processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._wl_offset = 0
        self._wl_index: dict[str, int] = {}
        self._wl_count = 0

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def workloads(self) -> list[list]:
        return [w for w in _lines(self.path / WORKLOADS) if isinstance(w, list) and len(w) == 2]

    def records(self) -> Iterator[tuple[int, Any]]:
        for r in _lines(self.path / RECORDS):
            if isinstance(r, list) and len(r) == 2 and isinstance(r[0], int):
                yield r[0], r[1]

    def by_workload(self) -> dict[str, list[Any]]:
        """shash -> its records (MetaSchedule's JSON of each)."""
        shash = [w[0] for w in self.workloads()]
        out: dict[str, list[Any]] = {}
        for i, rec in self.records():
            if 0 <= i < len(shash):
                out.setdefault(shash[i], []).append(rec)
        return out

    def _refresh_index(self) -> None:
        """Read the workloads appended since the last look (under the lock)."""
        f = self.path / WORKLOADS
        if not f.is_file():
            return
        with open(f, "rb") as fh:
            fh.seek(self._wl_offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1           # a line being written is read next time
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                w = json.loads(line)
            except ValueError:
                w = None
            if isinstance(w, list) and len(w) == 2:
                self._wl_index.setdefault(w[0], self._wl_count)
                self._wl_count += 1
        self._wl_offset += end

    @staticmethod
    def _append_lines(path: Path, lines: list[str]) -> None:
        if not lines:
            return
        with open(path, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":      # a line cut by a crash: do not glue ours to it
                    f.write(b"\n")
            f.write(("\n".join(lines) + "\n").encode())
            f.flush()

    def append(self, pairs: list[tuple[list, Any]], dedupe: bool = False) -> int:
        """Append (workload JSON, record JSON) pairs, adding workloads as needed; returns how many
        records were written (``dedupe``: dropping those already there, for imports)."""
        if not pairs:
            return 0
        with self.lock():
            self._refresh_index()
            seen: set[tuple[int, str]] = set()
            if dedupe:
                seen = {(i, _canon(rec[0])) for i, rec in self.records()}
            new_wl, new_rec = [], []
            for wl, rec in pairs:
                i = self._wl_index.get(wl[0])
                if i is None:
                    i = self._wl_count + len(new_wl)
                    self._wl_index[wl[0]] = i
                    new_wl.append(json.dumps(wl))
                k = (i, _canon(rec[0]))
                if dedupe and k in seen:
                    continue
                seen.add(k)
                new_rec.append(json.dumps([i, rec]))
            self._append_lines(self.path / WORKLOADS, new_wl)
            self._wl_count += len(new_wl)
            self._wl_offset = (self.path / WORKLOADS).stat().st_size if new_wl else self._wl_offset
            self._append_lines(self.path / RECORDS, new_rec)
        return len(new_rec)

    # which model has which workloads, and measured which
    def model_file(self, model_id: str) -> Path:
        return self.path / MODELS / f"{model_id}.json"

    def model_info(self, model_id: str) -> dict[str, Any]:
        return _read_json(self.model_file(model_id))

    def update_model(self, model_id: str, **changes: Any) -> None:
        """Merge ``changes`` into the model's file ("measured" lists are united)."""
        try:
            with self.lock():
                info = self.model_info(model_id)
                for k, v in changes.items():
                    info[k] = sorted(set(info.get(k, [])) | set(v)) if k == "measured" else v
                f = self.model_file(model_id)
                f.parent.mkdir(parents=True, exist_ok=True)
                _write_json(f, info)
        except OSError as e:           # a read-only --tuning-db folder: the index is only a cache
            log.debug("cannot write %s: %s", self.model_file(model_id), e)

    def model_check(self, model_id: str, digest: str) -> dict[str, Any] | None:
        """The model's whole-model check (:mod:`bundler.compile.verdict`) if it timed the tuning of
        this ``digest`` (:attr:`Applied.digest`) with this version's default schedules, else None."""
        check = self.model_info(model_id).get("check")
        if _is_check(model_id, check) and check["digest"] == digest and check.get("schedules") == pipeline_identity():
            return check
        return None

    def model_checks(self) -> dict[str, dict[str, Any]]:
        """Model sha256 -> its whole-model check (:mod:`bundler.compile.verdict`), for every model."""
        out = {}
        for f in sorted((self.path / MODELS).glob("*.json")):
            info = _read_json(f)
            check = info.get("check") if isinstance(info, dict) else None
            if _is_check(f.stem, check):
                out[f.stem] = check
        return out

    def current(self) -> bool:
        """Whether the default-schedule timings and knobs were measured against this version's
        default schedules (``schedules`` in tuning.json: :func:`~bundler.compile.pipeline.identity`).
        When not, they are ignored: make applies no record or knobs on their word, and the next
        `tune` measures them again."""
        return self.meta().get("schedules") == pipeline_identity()

    def _save_timings(self, defaults: dict[str, float], rules: dict[str, dict[str, Any]]) -> None:
        """Under the lock: both files, stamped as measured against this version's schedules (so
        stale entries in either one go with the other's)."""
        _write_json(self.path / DEFAULTS, defaults)
        _write_json(self.path / RULES, rules)
        _write_json(self.path / META, {**self.meta(), "schedules": pipeline_identity()})

    def defaults(self) -> dict[str, float]:
        """Workload hash -> mean run time of tvmbundle's default schedule of that kernel, measured
        by `tune` with the same builder and runner as the candidates (:meth:`_Loop.measure_defaults`);
        {} when measured against other default schedules (:meth:`current`)."""
        data = _read_json(self.path / DEFAULTS) if self.current() else None
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}

    def add_defaults(self, secs: dict[str, float]) -> None:
        with self.lock():
            self._save_timings({**self.defaults(), **secs}, self.rule_schedules())

    def rule_schedules(self) -> dict[str, dict[str, Any]]:
        """Workload hash -> what :class:`RuleSearch` found for the kernel: ``key`` (its
        :func:`~bundler.compile.schedules.kernel_key`), ``rule``, ``knobs`` ({} when none beat the
        rule's own choices), ``secs`` (the best measured) and ``default_secs``; {} when measured
        against other default schedules (:meth:`current`)."""
        data = _read_json(self.path / RULES) if self.current() else None
        return {k: v for k, v in data.items() if _is_rule_entry(v)} if isinstance(data, dict) else {}

    def add_rule_schedules(self, entries: dict[str, dict[str, Any]]) -> int:
        """Merge entries, keeping the faster one of a kernel found twice; returns how many changed."""
        changed = 0
        with self.lock():
            merged = self.rule_schedules()
            for k, v in entries.items():
                if k not in merged or float(v["secs"]) < float(merged[k]["secs"]):
                    merged[k] = v
                    changed += 1
            self._save_timings(self.defaults(), merged)
        return changed

    def meta(self) -> dict[str, Any]:
        return _read_json(self.path / META)

    def write_meta(self, **changes: Any) -> None:
        with self.lock():
            _write_json(self.path / META, {**self.meta(), **changes})
            # Listed by `tvmbundle cache` like every other entry; "created" is the last write, so
            # `cache prune --older-than` removes databases nobody has tuned into for that long.
            (self.path / ".complete.json").write_text(json.dumps({"created": time.time(), "tuning": True}))


def _count(path: Path) -> tuple[int, int]:
    """(records, distinct workloads with a valid measurement) of a JSON database folder."""
    records, good = 0, set()
    for i, rec in Store(path).records():
        records += 1
        if _good(rec) is not None:
            good.add(i)
    return records, len(good)


# --- the database as make sees it -------------------------------------------------------------

@dataclass(frozen=True)
class Applied:
    """What a database holds for one model: its best records, in a folder of their own, and the
    tuned knobs of the default rules for the kernels where those are faster."""
    path: Path | None         # None when no kernel of the model has a record worth applying
    sha256: str | None        # of what is applied (records and knobs); None: nothing is
    kernels: int              # the model's tunable kernels
    tuned: int                # ... with a record or knobs measured while tuning this model
    reused: int               # ... with a record or knobs only from other models (or imported)
    defaulted: int            # ... with neither: the default schedules as they are
    records: int              # records the database has for the model's kernels
    default_faster: int = 0   # kernels whose best record lost to the default schedule (not applied)
    knobs: dict[str, dict] = field(default_factory=dict)   # kernel_key -> {"rule", "knobs"}
    with_knobs: int = 0       # kernels scheduled by their rule with tuned knobs
    # What the whole-model check (:mod:`bundler.compile.verdict`) chose for this tuning: one of
    # CHOICES, or "unchecked" (no `tune` timed it since it changed). Only what it chose is applied.
    check: str = "unchecked"
    digest: str | None = None     # of all the tuning the database has for the model, before the check


CHOICES = ("tuned", "knobs", "defaults")    # all the tuning; the default rules' knobs only; none


@dataclass(frozen=True)
class Database:
    path: Path
    key: str
    records: int          # measured candidates (each one a record), all models
    workloads: int        # kernels with at least one good record, all models
    meta: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict, compare=False)   # set by for_model

    @property
    def sha256(self) -> str:
        if self.usage.get("records_sha256"):
            return self.usage["records_sha256"]
        return cache.sha256_file(self.path / RECORDS) if (self.path / RECORDS).is_file() else ""

    def manifest(self) -> dict[str, Any]:
        """What a bundle's manifest says about the tuning it was built with: after
        :meth:`for_model`, how many of the model's kernels were tuned for it, taken from other
        models' tuning, or left to default schedules."""
        if not self.usage:
            return {"database": self.key, "records": self.records, "workloads": self.workloads,
                    "records_sha256": self.sha256, "apache-tvm": self.meta.get("apache-tvm")}
        # Only what this model's bundle depends on: tuning another model (another kernel) must
        # not change it.
        u = self.usage
        return {"database": self.key, "records": u["model_records"],
                "workloads": u["kernels_tuned"] + u["kernels_from_other_models"],
                "records_sha256": u["records_sha256"], "kernels": u["kernels"],
                "kernels_tuned": u["kernels_tuned"], "kernels_from_other_models": u["kernels_from_other_models"],
                "kernels_defaulted": u["kernels_defaulted"],
                "kernels_default_faster": u.get("kernels_default_faster", 0),
                "kernels_tuned_knobs": u.get("kernels_tuned_knobs", 0), "model_check": u.get("model_check", "unchecked"),
                "apache-tvm": self.meta.get("apache-tvm")}

    def for_model(self, prepared, model_id: str, source: Path, recipe: Recipe, choice: str | None = None) -> Applied:
        """The best record of each of the model's kernels, as a database folder of its own (in the
        build cache, named by its content) for MetaScheduleApplyDatabase, and the knobs of the
        default rules where they are faster.

        Each kernel's tuning beat its default schedule alone, but the model as a whole can still
        be slower with it (kernels timed one by one see other caches than in the model), so only
        what the model's whole-model check chose is applied. ``choice`` (one of CHOICES) overrides
        it: what that check builds to compare."""
        store = Store(self.path)
        kernels = model_kernels(store, prepared, model_id, source, recipe)
        measured_here = set(store.model_info(model_id).get("measured", []))
        wanted = {k["workload"] for k in kernels}
        wls = {w[0]: w for w in store.workloads() if w[0] in wanted}
        best: dict[str, tuple[float, Any]] = {}
        records = 0
        for shash, recs in store.by_workload().items():
            if shash not in wanted:
                continue
            records += len(recs)
            for rec in recs:
                secs = _good(rec)
                if secs is not None and (shash not in best or secs < best[shash][0]):
                    best[shash] = (secs, rec)
        # A record that is no faster than tvmbundle's default schedule of its kernel (measured by the
        # same runner), or than that schedule with its tuned knobs, is not applied: the default one
        # is, with its weights packed at compile time, which MetaSchedule's candidates cannot do in
        # TVM 0.27 (a trace with a layout rewrite does not serialize), so on convolutions
        # MetaSchedule alone loses to the defaults.
        if best and not store.current():
            # Compared with the default schedules of an earlier version, a record may have beaten
            # those and lose to these: the defaults stay until `tune` measures them again.
            log.warning("%s: %d kernels' tuning records were compared with the default schedules of "
                        "another tvmbundle version and are not applied; `tvmbundle tune` measures them "
                        "again (--trials 0: the defaults and their knobs alone)", self.path.name, len(best))
            best = {}
        defaults = store.defaults()
        rules = {k: v for k, v in store.rule_schedules().items() if k in wanted}
        own = {k: min(defaults.get(k, math.inf), float(rules[k]["secs"]) if k in rules else math.inf) for k in wanted}
        lost = {k for k, (secs, _rec) in best.items() if own[k] <= secs}
        for k in lost:
            del best[k]
        knobs = {}
        for k, v in rules.items():
            if k not in best and v["knobs"] and float(v["secs"]) < defaults.get(k, float(v.get("default_secs", math.inf))):
                knobs[v["key"]] = {"rule": v["rule"], "knobs": v["knobs"]}
        def digest_of(best, knobs) -> str | None:
            return cache.key("tuning-applied", sorted((k, json.dumps(best[k][1])) for k in best), knobs) \
                if best or knobs else None

        everything = digest_of(best, knobs)
        check = "unchecked"
        if choice is None and everything:
            verdict = store.model_check(model_id, everything)
            if verdict:
                choice = check = verdict["choice"]
        elif choice is not None:
            check = choice
        if choice in ("knobs", "defaults"):
            best = {}
        if choice == "defaults":
            knobs = {}
        with_knobs = {k for k, v in rules.items() if v["key"] in knobs}
        improved = set(best) | with_knobs
        tuned = sum(1 for k in improved if k in measured_here)
        digest = digest_of(best, knobs)
        path = None
        if best:
            order = sorted(best)
            wl_text = "".join(json.dumps(wls[k]) + "\n" for k in order)
            rec_text = "".join(json.dumps([i, best[k][1]]) + "\n" for i, k in enumerate(order))

            def build(tmp: Path) -> dict[str, Any]:
                (tmp / WORKLOADS).write_text(wl_text)
                (tmp / RECORDS).write_text(rec_text)
                return {"database": self.key, "model_sha256": model_id}

            path = cache.get("tuning-applied", cache.key("tuning-applied", wl_text, rec_text), build).path
        applied = Applied(path, digest, len(wanted), tuned, len(improved) - tuned, len(wanted) - len(improved),
                          records, len(lost), knobs, len(with_knobs), check if everything else "unchecked", everything)
        self.usage.clear()
        self.usage.update({"records_sha256": applied.sha256, "kernels": applied.kernels,
                           "kernels_tuned": applied.tuned, "kernels_from_other_models": applied.reused,
                           "kernels_defaulted": applied.defaulted, "model_records": applied.records,
                           "kernels_default_faster": applied.default_faster,
                           "kernels_tuned_knobs": applied.with_knobs, "model_check": applied.check})
        return applied


def open_database(path: Path) -> Database | None:
    """The database in ``path`` if it holds any record."""
    path = Path(path)
    records, workloads = _count(path)
    if records == 0 and not Store(path).rule_schedules():
        return None
    meta = Store(path).meta()
    return Database(path, meta.get("key", path.name), records, workloads, meta)


def open_store(target: dict[str, Any], versions: dict[str, str]) -> Store:
    """The board target's database (created, and earlier per-model folders merged in)."""
    path = database_dir(target, versions)
    store = Store(path)
    if not (path / META).is_file():
        path.mkdir(parents=True, exist_ok=True)
        store.write_meta(key=path.name, target=target, **versions, shared=True,
                         created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    _migrate_legacy(store, target, versions)
    return store


def find(model_id: str, recipe: Recipe, versions: dict[str, str]) -> Database | None:
    """The board target's tuning database for this TVM version, if it has any record (of any
    model: :meth:`Database.for_model` picks this model's)."""
    target = board_target(recipe)
    if not root().is_dir():
        return None
    open_store(target, versions)
    return open_database(database_dir(target, versions))


def _migrate_legacy(store: Store, target: dict[str, Any], versions: dict[str, str]) -> None:
    """Merge the per-model folders of earlier versions (same target and TVM) into ``store``, once."""
    base = store.path.parent
    if not base.is_dir():
        return
    for d in base.iterdir():
        if d == store.path or not (d / META).is_file():
            continue
        old = Store(d)
        meta = old.meta()
        model_id = meta.get("model_sha256")
        if not model_id or meta.get("migrated_to") or meta.get("target") != target \
                or any(meta.get(k) != v for k, v in versions.items()) \
                or d.name != legacy_key(model_id, target, versions):
            continue
        shash = [w for w in old.workloads()]
        pairs = [(shash[i], rec) for i, rec in old.records() if 0 <= i < len(shash)]
        added = store.append(pairs, dedupe=True)
        store.update_model(model_id, model=meta.get("model"), measured=[w[0] for w, _ in pairs])
        old.write_meta(migrated_to=store.path.name)
        log.info("merged %d records of %s (%s) into the shared tuning database %s",
                 added, d.name, meta.get("model"), store.path.name)


def model_kernels(store: Store, prepared, model_id: str, source: Path, recipe: Recipe) -> list[dict[str, Any]]:
    """The model's tunable kernels (workload hash, name, weight, estimated cost), remembered in
    the database's models/ folder."""
    info = store.model_info(model_id)
    if isinstance(info.get("kernels"), list) and info.get("lowering") == LOWERING:
        return info["kernels"]
    tasks = extract(prepared, source, recipe)
    kernels = [_describe(t) for t in tasks]
    store.update_model(model_id, model=source.name, kernels=kernels, lowering=LOWERING)
    return kernels


def extract(prepared, source: Path, recipe: Recipe):
    """MetaSchedule's tasks for the model's kernels that are not scheduled already."""
    return _lowered_tasks(prepared, source, recipe)[1]


def _lowered_tasks(prepared, source: Path, recipe: Recipe):
    import tvm
    from tvm.s_tir import meta_schedule as ms

    target = tvm.target.Target(board_target(recipe))
    mod = lower_for_tuning(to_relax(prepared, source), target)
    return mod, [t for t in ms.relax_integration.extract_tasks(mod, target)
                 if not t.mod.attrs or not t.mod.attrs.get("tirx.is_scheduled", False)]


def extract_with_weights(prepared, source: Path, recipe: Recipe):
    """:func:`extract`, and for each kernel's name the parameters that are constant weights (what
    make's default schedules may repack at compile time), as AttachAttrLayoutFreeBuffers marks them.
    Only `tune` needs the weights: make's lookup of a model's kernels does not mark them."""
    import tvm
    import tvm_ffi
    from tvm import relax

    mod, tasks = _lowered_tasks(prepared, source, recipe)
    # The pass marks copies of the kernels under new names (fused_conv2d_add_relu1): match them to
    # the tasks by the kernel body, which the marking leaves as it is.
    marked = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
    by_body = {tvm_ffi.structural_hash(f.body, map_free_vars=True): f.attrs["layout_free_buffers"]
               for _gv, f in marked.functions_items()
               if isinstance(f, tvm.tirx.PrimFunc) and f.attrs is not None and "layout_free_buffers" in f.attrs}
    weights = {}
    for t in tasks:
        lf = by_body.get(tvm_ffi.structural_hash(t.dispatched[0]["main"].body, map_free_vars=True))
        if lf is not None:
            weights[t.task_name] = lf
    return tasks, weights


def _workload_json(mod) -> list:
    from tvm.s_tir import meta_schedule as ms

    return ms.database.Workload(mod).as_json()


def _describe(task) -> dict[str, Any]:
    mod = task.dispatched[0]
    return {"workload": _workload_json(mod)[0], "name": task.task_name, "weight": int(task.weight),
            "cost": _cost(mod)}


def _cost(mod) -> float:
    """A kernel's estimated cost per call: its FLOPs, or the elements it touches when that is more
    (data movement kernels have no FLOPs but still take time)."""
    flops = 0.0
    try:
        from tvm.s_tir.analysis import estimate_tir_flops

        flops = float(estimate_tir_flops(mod))
    except Exception as e:  # noqa: BLE001 -- TVM's analysis rejects some kernels; the size still counts
        log.debug("no FLOP estimate: %s", e)
    elements = 0
    for func in mod.functions.values():
        for p in getattr(func, "params", []):
            buf = func.buffer_map.get(p) if hasattr(func, "buffer_map") else None
            if buf is not None:
                with contextlib.suppress(TypeError, ValueError):
                    elements += math.prod(int(d) for d in buf.shape)
    return max(flops, float(elements), 1.0)


def allocate(total: int, shares: list[float]) -> list[int]:
    """``total`` trials split by ``shares`` (largest remainders)."""
    s = sum(shares)
    if total <= 0 or s <= 0:
        return [0] * len(shares)
    exact = [total * x / s for x in shares]
    out = [int(e) for e in exact]
    for i in sorted(range(len(shares)), key=lambda i: (exact[i] - out[i], shares[i]), reverse=True)[:total - sum(out)]:
        out[i] += 1
    return out


# --- export and import ------------------------------------------------------------------------

def export_records(store: Store, dest: Path, target: dict[str, Any], versions: dict[str, str]) -> int:
    """Write the database as one portable JSON-lines file: a header, one line per record with its
    workload, then (format version 2) the default schedules' timings and tuned knobs, which make
    compares records with and applies, and the models' whole-model checks (which hold where the
    same tuning applies). Returns the number of records."""
    wls = store.workloads()
    lines = []
    for i, rec in store.records():
        if 0 <= i < len(wls):
            lines.append(json.dumps({"workload": wls[i], "record": rec}))
    records = len(lines)
    defaults, rules = store.defaults(), store.rule_schedules()
    if defaults:
        lines.append(json.dumps({"default_schedules": defaults}, sort_keys=True))
    if rules:
        lines.append(json.dumps({"rule_schedules": rules}, sort_keys=True))
    checks = store.model_checks()
    if checks:
        lines.append(json.dumps({"model_checks": checks}, sort_keys=True))
    header = {"format": EXPORT_FORMAT, "version": 2, "target": target, "versions": versions,
              "records": records, "rule_schedules": len(rules), "schedules": pipeline_identity(),
              "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    tmp.write_text(json.dumps(header, sort_keys=True) + "\n" + "".join(x + "\n" for x in lines))
    tmp.replace(dest)
    return records


def import_records(store: Store, src: Path, target: dict[str, Any], versions: dict[str, str]) -> tuple[int, int]:
    """Merge an exported file into ``store``: (records added, duplicates dropped). Default-schedule
    timings this database lacks are taken, and tuned knobs where they measured faster."""
    src = Path(src)
    try:
        with open(src) as f:
            header = json.loads(f.readline() or "null")
    except (OSError, ValueError) as e:
        raise UserError(f"--import: {src}: not a tuning records file ({e})") from None
    if not isinstance(header, dict) or header.get("format") != EXPORT_FORMAT:
        raise UserError(f"--import: {src}: not a tuning records file (written by `tvmbundle tune --export`)")
    if header.get("version", 1) not in (1, 2):
        raise UserError(f"--import: {src}: format version {header.get('version')!r}; this tvmbundle reads 1 and 2",
                        hint="upgrade tvmbundle on this machine")
    if header.get("target") != target:
        raise UserError(f"--import: {src}: its records are for the target {header.get('target')}, "
                        f"this board tunes for {target}")
    if header.get("versions") != versions:
        raise UserError(f"--import: {src}: its records were measured with {header.get('versions')}, "
                        f"this machine has {versions}: MetaSchedule records do not carry over between TVM versions")
    pairs, defaults, rules, checks = [], {}, {}, {}
    for i, obj in enumerate(_lines(src)):
        if i == 0 or not isinstance(obj, dict):
            continue
        if isinstance(obj.get("workload"), list) and isinstance(obj.get("record"), list):
            pairs.append((obj["workload"], obj["record"]))
        elif isinstance(obj.get("default_schedules"), dict):
            defaults.update({k: float(v) for k, v in obj["default_schedules"].items() if isinstance(v, (int, float))})
        elif isinstance(obj.get("rule_schedules"), dict):
            rules.update({k: v for k, v in obj["rule_schedules"].items() if _is_rule_entry(v)})
        elif isinstance(obj.get("model_checks"), dict):
            checks.update({k: v for k, v in obj["model_checks"].items() if _is_check(k, v)})
    added = store.append(pairs, dedupe=True)
    if (defaults or rules) and header.get("schedules") != pipeline_identity():
        # Timings of another version's default schedules: this one measures its own.
        log.info("%s: its default-schedule timings and knobs are for another tvmbundle version: not imported", src)
        defaults, rules = {}, {}
    known = store.defaults()
    if any(k not in known for k in defaults):
        store.add_defaults({k: v for k, v in defaults.items() if k not in known})
    knobs = store.add_rule_schedules(rules) if rules else 0
    for model_id, check in checks.items():
        # This machine's own verdict stays; one for what applies here now is taken (for_model
        # ignores one of other tuning by its digest).
        if not isinstance(store.model_info(model_id).get("check"), dict):
            store.update_model(model_id, check=check)
    store.write_meta(imported=[*store.meta().get("imported", []),
                               {"file": src.name, "records": added, "rule_schedules": knobs,
                                "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}])
    return added, len(pairs) - added


# --- tuning -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CandidateBuilder:
    """How candidates are built: ``workers`` processes on this machine, kept for the whole run,
    each with ``timeout`` seconds per candidate; ``f_export`` links for a foreign board."""
    workers: int = 1
    timeout: float = 120.0
    f_export: Callable | None = None


def ignore_sigint(threads: int | None = None) -> Callable[[], Any]:
    """An initializer for MetaSchedule's worker processes: Ctrl-C in a terminal goes to the whole
    process group, and the workers must leave it to this process (which stops them). ``threads``:
    the threads a local runner's worker measures with, the bundle's own (TVM's default is the
    number of cores, and a worker started before the caller set TVM_NUM_THREADS never sees it)."""
    return functools.partial(candidates.init_worker, threads)


@dataclass(frozen=True)
class TuneResult:
    database: Database | None
    tasks: int
    measured: int            # trials measured by this run
    previously: int          # records the model's kernels had before
    seconds: float
    stopped: str             # "budget", "time limit", "interrupted", "already tuned", "no tasks", "no model"
    kernels_measured: int = 0    # kernels this run measured
    kernels_skipped: int = 0     # kernels that had their share of the budget already (from any model)
    build_workers: int = 0
    measure_workers: int = 0
    imported: int = 0            # records --import added
    exported: int = 0            # records --export wrote
    variants: int = 0            # knob variants of the default rules measured (RuleSearch)
    kernels_knobs: int = 0       # kernels whose rule got knobs faster than its own choices
    check: dict[str, Any] | None = None   # the whole-model check (bundler.compile.verdict.Verdict.to_json)

    @property
    def trials_per_minute(self) -> float:
        return round(self.measured * 60.0 / self.seconds, 1) if self.seconds > 0 else 0.0


def tune(recipe: Recipe, prepared, model_id: str, source: Path, versions: dict[str, str], *,
         trials: int, timeout: float, runner: Any, builder: Any, runner_name: str,
         on_progress: Callable[[int, int], None] | None = None) -> TuneResult:
    """Bring the model's kernels to ``trials`` records in all, split by each kernel's share of the
    model's time (calls x estimated cost), counting records from earlier runs of any model;
    stop after ``timeout`` s (0: no limit) or at Ctrl-C, keeping what was measured.

    ``runner`` is a MetaSchedule runner and ``builder`` a :class:`CandidateBuilder`, both from
    :func:`bundler.rpc.measure_setup`. Ctrl-C raises KeyboardInterrupt once the records are saved.
    """
    start = time.monotonic()
    session = _Session(start + timeout if timeout > 0 else None)
    try:
        with session.signals():
            result = _tune(session, recipe, prepared, model_id, source, versions, trials, runner, builder,
                           runner_name, on_progress, start)
    finally:
        # Also when no loop ran ("already tuned"): left to the collector, the runner's pool shuts
        # down at exit, where a Ctrl-C prints its traceback.
        _shutdown(getattr(runner, "pool", None))
    if result.stopped == "interrupted":
        raise KeyboardInterrupt
    return result


def _tune(session, recipe, prepared, model_id, source, versions, trials, runner, builder, runner_name,
          on_progress, start) -> TuneResult:
    import tvm

    target_dict = board_target(recipe)
    target = tvm.target.Target(target_dict)
    store = open_store(target_dict, versions)
    _cpu_tensor_intrinsics(target)
    tasks, weights = extract_with_weights(prepared, source, recipe)
    if not tasks:
        return TuneResult(open_database(store.path), 0, 0, 0, 0.0, "no tasks")
    if session.stopped():
        return TuneResult(open_database(store.path), len(tasks), 0, 0, time.monotonic() - start, session.stop)
    kernels = [_describe(t) for t in tasks]
    store.update_model(model_id, model=source.name, kernels=kernels, lowering=LOWERING)
    have = {k: len(v) for k, v in store.by_workload().items()}
    previously = sum(have.get(k["workload"], 0) for k in kernels)
    shares = [k["weight"] * k["cost"] for k in kernels]
    need = [max(0, a - have.get(k["workload"], 0)) for a, k in zip(allocate(trials, shares), kernels)]
    skipped = sum(1 for n, k in zip(need, kernels) if n == 0 and have.get(k["workload"]))
    # Kernels whose default schedule has not been measured and its knobs searched (a database of an
    # earlier version): that comes first whatever the budget, since make compares with it. (Every
    # kernel RuleSearch has seen has an entry, a failed one where its default did not build.)
    searched = store.rule_schedules()
    unsearched = {k["workload"] for k in kernels if k["workload"] not in searched}
    if sum(need) == 0 and not unsearched:
        return TuneResult(open_database(store.path), len(tasks), 0, previously, time.monotonic() - start,
                          "already tuned", 0, skipped)
    check_serialization()
    work = [(t, k, n) for t, k, n in zip(tasks, kernels, need) if n > 0 or k["workload"] in unsearched]
    loop = _Loop(session, store, target, work, runner, builder, model_id,
                 lambda done: on_progress(previously + done, previously + sum(need)) if on_progress else None,
                 weights)
    try:
        loop.run()
    except KeyboardInterrupt:        # a second Ctrl-C: stop now, still keeping what was committed
        session.stop = "interrupted"
    except Exception as e:  # noqa: BLE001 -- TVM's own error types: reported with the model's name
        last = last_line(e)
        raise ModelError(f"{source}: tuning for {recipe.name} failed: {last}") from None
    finally:
        loop.close()
        store.update_model(model_id, model=source.name, measured=sorted(loop.measured_workloads))
        seconds = time.monotonic() - start
        meta = store.meta()
        runs = meta.get("runs", [])[-49:]
        runs.append({"model": source.name, "model_sha256": model_id, "board": recipe.name, "trials": trials,
                     "measured": loop.measured, "runner": runner_name, "seconds": round(seconds, 1),
                     "stopped": session.stop or "budget",
                     "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        store.write_meta(key=store.path.name, target=target_dict, **versions, trials=trials, runner=runner_name,
                         seconds=round(float(meta.get("seconds", 0)) + seconds, 1), runs=runs,
                         updated=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    return TuneResult(open_database(store.path), len(tasks), loop.measured, previously, time.monotonic() - start,
                      session.stop or "budget", len(loop.measured_workloads), skipped,
                      loop.build_workers, loop.measure_workers, variants=loop.variants,
                      kernels_knobs=loop.kernels_knobs)


class _Session:
    """The run's stop flag: set by the time limit or Ctrl-C (a second Ctrl-C raises)."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline
        self.stop: str | None = None

    def stopped(self) -> bool:
        if self.stop is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.stop = "time limit"
        return self.stop is not None

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(_sig, _frame) -> None:
            if self.stop == "interrupted":
                raise KeyboardInterrupt
            self.stop = "interrupted"

        old = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, old)


class _Loop:
    """Our own round loop over MetaSchedule's search strategies (see the module docstring)."""

    POLL = 0.05

    def __init__(self, session: _Session, store: Store, target, work, runner, builder, model_id: str,
                 on_batch: Callable[[int], None], weights: dict[str, Any] | None = None) -> None:
        from tvm.s_tir import meta_schedule as ms

        self.ms = ms
        self.weights = weights or {}
        self.session, self.store, self.target, self.runner = session, store, target, runner
        self.on_batch = on_batch
        self.measured = 0
        self.failed = 0
        self.variants = 0
        self.kernels_knobs = 0
        self.measured_workloads: set[str] = set()
        if isinstance(builder, CandidateBuilder):
            self.build_cfg = builder
        else:   # a MetaSchedule LocalBuilder: take its settings, build with our pool
            self.build_cfg = CandidateBuilder(getattr(builder, "max_workers", None) or 1,
                                              getattr(builder, "timeout_sec", 120.0), getattr(builder, "f_export", None))
        self.build_workers = max(1, self.build_cfg.workers)
        pool = getattr(runner, "pool", None)
        self.measure_workers = max(1, getattr(getattr(pool, "_threadpool", None), "_max_workers", 1))
        # Measuring here while building here would time the candidates against the builds.
        self.streaming = type(runner).__name__ != "LocalRunner"
        self.work = work
        self.pool = None
        self.threads: list[threading.Thread] = []
        self.to_measure: queue.Queue = queue.Queue()
        self.measured_q: queue.Queue = queue.Queue()
        self.token = 0

    def run(self) -> None:
        ms = self.ms
        from tvm.support.popen_pool import PopenPoolExecutor

        self.pool = PopenPoolExecutor(max_workers=self.build_workers, timeout=self.build_cfg.timeout,
                                      initializer=ignore_sigint())
        for _ in range(self.measure_workers):
            t = threading.Thread(target=self._measure_worker, daemon=True, name="tvmbundle-measure")
            t.start()
            self.threads.append(t)
        self.measure_defaults()
        RuleSearch(self).run()
        self.work = [w for w in self.work if w[2] > 0]
        threads = max(1, min(os.cpu_count() or 1, 2))
        cost_model = ms.cost_model.CostModel.create("xgb", num_tuning_cores=threads, tree_method="auto")
        database = self.database = ms.database.MemoryDatabase()
        existing = self.store.by_workload()
        tasks = []
        for task, kernel, need in self.work:
            if self.session.stopped():
                return
            ctx, batch = _context(task, need, threads)
            mod = task.dispatched[0]
            workload = database.commit_workload(mod)
            for rec in existing.get(kernel["workload"], []):
                with contextlib.suppress(Exception):    # a record of another TVM build: not ours to judge
                    database.commit_tuning_record(ms.database.TuningRecord.from_json(rec, workload))
            ctx.pre_tuning(max_trials=need, num_trials_per_iter=batch, design_spaces=ctx.generate_design_space(),
                           database=database, cost_model=cost_model)
            tasks.append({"ctx": ctx, "need": need, "done": 0, "workload": workload,
                          "wl_json": _workload_json(mod), "shash": kernel["workload"]})
        while tasks and not self.session.stopped():
            # The kernel furthest behind its share goes next: at any moment (a time limit) every
            # kernel has had about the same fraction of its budget.
            t = min(tasks, key=lambda t: (t["done"] / t["need"], -t["need"]))
            cands = t["ctx"].generate_measure_candidates()
            if not cands:
                tasks.remove(t)
                continue
            results = self._measure_batch(cands)
            keep = [i for i, r in enumerate(results) if r is not None]
            if keep:
                self._commit(t, [cands[i] for i in keep], [results[i] for i in keep])
            if len(keep) < len(cands):         # stopped in the middle
                return
            cost_model.update(t["ctx"], cands, results)
            t["ctx"].notify_runner_results(cands, results)
            t["done"] += len(cands)
            if t["done"] >= t["need"]:
                tasks.remove(t)

    def kernel_func(self, task):
        """The kernel as make's default schedules see it: with its constant weights marked."""
        func = task.dispatched[0]["main"]
        if task.task_name in self.weights:
            func = func.with_attr("layout_free_buffers", self.weights[task.task_name])
        return func

    def rule_candidate(self, func, tuned: dict | None):
        """(candidate, rule name, Knobs) of tvmbundle's rules on ``func`` with ``tuned`` knobs: the
        kernel as make schedules it, built and measured like a MetaSchedule candidate (its weight
        repacking removed, as MetaSchedule's builder removes a candidate's, and its arguments
        those of the kernel with packed weights)."""
        import types

        import tvm

        from bundler.compile.schedules import rules, schedule_kernel

        with self.target:
            out, rule, knobs = schedule_kernel(func, self.target, rules(self.target), tuned)
        if out is None:
            raise ValueError("no rule schedules it")
        scheduled = tvm.IRModule({"main": out})
        args = self.ms.arg_info.ArgInfo.from_entry_func(scheduled, remove_preproc=True)
        return types.SimpleNamespace(sch=types.SimpleNamespace(mod=scheduled), args_info=args), rule, knobs

    def measure_defaults(self) -> None:
        """tvmbundle's default schedule of each kernel, built and measured like a candidate: make
        applies a tuning record only where it beats this. Kernels measured before are not
        measured again."""
        known = self.store.defaults()
        todo, cands = [], []
        for task, kernel, _need in self.work:
            if kernel["workload"] in known:
                continue
            try:
                cand, _rule, _knobs = self.rule_candidate(self.kernel_func(task), None)
            except Exception as e:  # noqa: BLE001 -- no default to compare with: records apply as before
                log.info("%s: no default schedule to measure (%s)", task.task_name, e)
                continue
            todo.append(kernel["workload"])
            cands.append(cand)
        if not cands or self.session.stopped():
            return
        results = self._measure_batch(cands)
        secs = {}
        for shash, r in zip(todo, results):
            mean = _mean_secs(r)
            if mean is not None:
                secs[shash] = mean
        if secs:
            self.store.add_defaults(secs)

    def _commit(self, t, cands, results) -> None:
        ms = self.ms
        pairs = []
        for c, r in zip(cands, results):
            secs = [float(s) for s in r.run_secs] if r.run_secs is not None else [FAILED]
            if r.run_secs is None:
                self.failed += 1
                if self.failed == 1:
                    log.warning("%s: a candidate failed (%d failures so far are normal in a search): %s",
                                t["ctx"].task_name, self.failed, (r.error_msg or "").strip()[-1500:])
            record = ms.database.TuningRecord(c.sch.trace, t["workload"], secs, self.target, c.args_info)
            self.database.commit_tuning_record(record)    # what the search draws its elites from
            pairs.append((t["wl_json"], record.as_json()))
        self.store.append(pairs)
        self.measured += len(pairs)
        self.measured_workloads.add(t["shash"])
        self.on_batch(self.measured)

    def _measure_batch(self, cands) -> list[Any]:
        """Build and run one batch; a result per candidate, None for those cut by a stop."""
        ms = self.ms
        self.token += 1
        token = self.token
        n = len(cands)
        results: list[Any] = [None] * n
        artifacts: list[str | None] = [None] * n
        futures = {i: self.pool.submit(candidates.build, self.build_cfg.f_export, c.sch.mod, self.target)
                   for i, c in enumerate(cands)}
        held: list[int] = []
        device = "cpu" if self.target.kind.name in ("llvm", "c") else self.target.kind.name
        try:
            while True:
                if self.session.stopped():
                    self._kill()
                    return results
                for i, f in list(futures.items()):
                    if not f.done():
                        continue
                    del futures[i]
                    try:
                        artifacts[i] = f.result()
                    except TimeoutError:
                        results[i] = ms.runner.RunnerResult(None, f"build timed out after {self.build_cfg.timeout:g} s")
                        continue
                    except Exception as e:  # noqa: BLE001 -- the candidate failed to build: a result too
                        results[i] = ms.runner.RunnerResult(None, f"build failed: {str(e).strip()[-2000:]}")
                        continue
                    held.append(i)
                if held and (self.streaming or not futures):
                    for i in held:
                        self.to_measure.put((token, i, ms.runner.RunnerInput(artifacts[i], device, cands[i].args_info)))
                    held = []
                with contextlib.suppress(queue.Empty):
                    while True:
                        tok, i, res = self.measured_q.get_nowait()
                        if tok == token:
                            results[i] = res
                if all(r is not None for r in results):
                    return results
                time.sleep(self.POLL)
        finally:
            for a in artifacts:
                if a:
                    shutil.rmtree(os.path.dirname(a), ignore_errors=True)

    def _measure_worker(self) -> None:
        ms = self.ms
        while True:
            item = self.to_measure.get()
            if item is None:
                return
            tok, i, inp = item
            if tok != self.token or self.session.stop:
                continue
            try:
                res = self.runner.run([inp])[0].result()
            except Exception as e:  # noqa: BLE001 -- reported as the candidate's result
                res = ms.runner.RunnerResult(None, f"measurement failed: {e}")
            self.measured_q.put((tok, i, res))

    def _kill(self) -> None:
        """End the builds and measurements in flight (their processes; the pools stay usable)."""
        self.token += 1
        with contextlib.suppress(queue.Empty):
            while True:
                self.to_measure.get_nowait()
        for pool in (self.pool, getattr(self.runner, "pool", None)):
            _kill_workers(pool)

    def close(self) -> None:
        self.token += 1
        for _ in self.threads:
            self.to_measure.put(None)
        # MetaSchedule's pools shut down (and join their threads) when collected, which can
        # happen on one of those very threads ("RuntimeError: cannot join current thread"): shut
        # them down here. The runner is used up.
        _shutdown(self.pool)
        self.pool = None
        _shutdown(getattr(self.runner, "pool", None))


def _mean_secs(result) -> float | None:
    if result is None or result.run_secs is None:
        return None
    runs = [float(x) for x in result.run_secs]
    return sum(runs) / len(runs) if runs and all(x < 1e9 for x in runs) else None


class RuleSearch:
    """Tunes tvmbundle's own default rules: for each kernel, the choices its rule makes (tile
    sizes, loop orders: :class:`bundler.compile.schedules.Knobs`) are varied one at a time from
    the best so far (coordinate descent), and each variant is built and measured like a
    MetaSchedule candidate. The best are kept in the database (``rule_schedules.json``) for make.

    Why our own search and not only MetaSchedule's: the default rules pack weights at compile
    time, which MetaSchedule's candidates cannot in TVM 0.27 (see :meth:`Database.for_model`), so
    on convolutions its best schedules lose to them; the rules' few choices, measured on the
    board, are what beats them. Coordinate descent over a few dozen variants per kernel is enough
    for spaces this small (two to four knobs of two to seven values) and costs about a minute of
    building per model on two cores.

    Kernels go largest share first (calls x default time), a few per batch, so a time limit cuts
    the smallest; every batch is saved as it completes."""

    ROUNDS = 3          # passes of coordinate descent per kernel
    MIN_GAIN = 0.03     # a variant must beat the best by this fraction: the runner's noise
    BATCH = 24          # candidates built and measured together

    def __init__(self, loop: _Loop) -> None:
        self.loop = loop

    def run(self) -> None:
        loop = self.loop
        from bundler.compile.schedules import kernel_key

        if loop.session.stopped():
            return
        done = loop.store.rule_schedules()
        defaults = loop.store.defaults()
        pending, unschedulable = [], {}
        for task, kernel, _need in loop.work:
            shash = kernel["workload"]
            if shash in done:
                continue
            func = loop.kernel_func(task)
            try:
                _cand, rule, knobs = loop.rule_candidate(func, None)
                if shash not in defaults:
                    raise ValueError("its default schedule did not build or run")
            except Exception as e:  # noqa: BLE001 -- nothing to search: make schedules it as it can
                log.info("%s: no rule to tune (%s)", task.task_name, e)
                # Remembered, so that a later run does not try again.
                unschedulable[shash] = {"key": kernel_key(func), "rule": "", "knobs": {}, "secs": FAILED,
                                        "default_secs": FAILED, "variants": 0}
                continue
            pending.append({"task": task, "shash": shash, "func": func, "rule": rule, "key": kernel_key(func),
                            "best": {}, "secs": defaults[shash], "default": defaults[shash], "round": 0,
                            "space": knobs.space, "seen": {()}, "measured": 0,
                            "share": float(kernel.get("weight", 1)) * defaults[shash]})
        if unschedulable:
            loop.store.add_rule_schedules(unschedulable)
        pending.sort(key=lambda p: -p["share"])
        for p in pending:
            p["done"] = not p["space"]
        stopped = False
        while not stopped and not loop.session.stopped():
            # The next batch: the next round of variants of the largest kernels still searching.
            batch, owners, rounds = [], [], []
            for p in pending:
                if p["done"]:
                    continue
                variants = self._variants(p)
                if not variants:
                    p["done"] = True
                    continue
                rounds.append(p)
                for fixed in variants:
                    try:
                        cand, rule, _knobs = loop.rule_candidate(p["func"], {"rule": p["rule"], "knobs": fixed})
                    except Exception:  # noqa: BLE001 -- a variant the rule refuses is no candidate
                        continue
                    if rule == p["rule"]:
                        batch.append(cand)
                        owners.append((p, fixed))
                if len(batch) >= self.BATCH:
                    break
            if not rounds:
                break
            results = loop._measure_batch(batch) if batch else []
            stopped = any(r is None for r in results)
            for (p, fixed), r in zip(owners, results):
                if r is None:
                    continue
                p["measured"] += 1
                loop.variants += 1
                secs = _mean_secs(r)
                if secs is not None and secs < p["round_best"][0] * (1 - self.MIN_GAIN):
                    p["round_best"] = (secs, fixed)
            if stopped:              # cut in the middle of a round: keep what it measured
                for p in rounds:
                    secs, fixed = p["round_best"]
                    p["secs"], p["best"] = secs, fixed
                break
            for p in rounds:
                secs, fixed = p["round_best"]
                if secs < p["secs"]:
                    p["secs"], p["best"] = secs, fixed
                else:
                    p["done"] = True      # no single change helps: a local optimum
                if p["round"] >= self.ROUNDS:
                    p["done"] = True
            self._save([p for p in rounds if p["done"]])
        self._save([p for p in pending if p["measured"] or not p["space"]])
        loop.kernels_knobs += sum(1 for p in pending if p["best"])

    def _variants(self, p) -> list[dict[str, int]]:
        """The knob settings one change away from the kernel's best (not measured before)."""
        if p["round"] >= self.ROUNDS:
            return []
        _c, _r, knobs = self.loop.rule_candidate(p["func"], {"rule": p["rule"], "knobs": p["best"]})
        out = []
        for name, (default, options) in sorted(knobs.space.items()):
            current = p["best"].get(name, default)
            for v in options:
                if v == current:
                    continue
                fixed = {**p["best"], name: v}
                if v == default:
                    del fixed[name]
                key = tuple(sorted(fixed.items()))
                if key in p["seen"]:
                    continue
                p["seen"].add(key)
                out.append(fixed)
        p["round"] += 1
        p["round_best"] = (p["secs"], p["best"])
        return out

    def _save(self, kernels) -> None:
        entries = {}
        for p in kernels:
            if p.get("saved") == (p["secs"], tuple(sorted(p["best"].items()))):
                continue
            p["saved"] = (p["secs"], tuple(sorted(p["best"].items())))
            entries[p["shash"]] = {"key": p["key"], "rule": p["rule"], "knobs": p["best"], "secs": p["secs"],
                                   "default_secs": p["default"], "variants": p["measured"]}
            self.loop.measured_workloads.add(p["shash"])
        if entries:
            self.loop.store.add_rule_schedules(entries)


def _kill_workers(pool) -> None:
    """SIGKILL a PopenPoolExecutor's worker processes (and what they started, e.g. a linker). Only
    the process: the pool's thread reading from it sees the pipe close and cleans up itself
    (closing the pipe from here instead would block on that thread's read)."""
    from tvm.support.popen_pool import kill_child_processes

    for w in list(getattr(pool, "_worker_map", {}).values()):
        proc = getattr(w, "_proc", None)
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(Exception):
                kill_child_processes(proc.pid)
            with contextlib.suppress(OSError):
                proc.kill()


def _shutdown(pool) -> None:
    if pool is None or getattr(pool, "_shutdown", True):
        return
    _kill_workers(pool)
    with contextlib.suppress(Exception):
        pool._threadpool.shutdown(wait=False, cancel_futures=True)
    pool._shutdown = True


def _cpu_tensor_intrinsics(target) -> None:
    """MetaSchedule's TuneContext imports ``tvm.s_tir.tensor_intrin``, which parses every tensor
    intrinsic TVM has: about 20 s of CPU, 30 of them CUDA's. For a CPU target register only the
    CPU ones (what its schedule rules can tensorize with)."""
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules or target.kind.name != "llvm":
        return
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = types.ModuleType(name, "CPU tensor intrinsics only (tvmbundle)")
    pkg.__path__ = list(spec.submodule_search_locations)
    pkg.__package__ = name
    pkg.__spec__ = spec
    sys.modules[name] = pkg
    try:
        for sub in ("arm_cpu", "x86", "riscv_cpu"):
            setattr(pkg, sub, importlib.import_module(f"{name}.{sub}"))
    except Exception:  # noqa: BLE001 -- a layout this code does not know: let TVM import it all
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]


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


def _context(task, need: int, threads: int):
    """A TuneContext for one kernel, as MetaSchedule's relax integration makes them, except for the
    mutators: in TVM 0.27 (apache-tvm wheel) a TuneContext holding MutateParallel or
    MutateComputeLocation crashes the process (unbounded recursion in libtvm_ffi), so the search
    mutates tile sizes and unrolling only; sampling still explores parallelism and compute location.
    Returns (context, trials per batch)."""
    from tvm.s_tir import meta_schedule as ms

    _quiet_metaschedule()
    kinds = ms.Mutator.create("llvm")
    safe = {m: p for m, p in kinds.items() if type(m).__name__ in ("MutateTileSize", "MutateUnroll")}
    space = ms.space_generator.PostOrderApply(sch_rules="from-target", postprocs="from-target",
                                              mutator_probs=safe)
    batch = max(1, min(need, 16))
    # MetaSchedule's defaults (512 candidates evolved 4 times per round) are for budgets of
    # thousands of trials on big machines; a population a few times the round's trials finds
    # as good candidates for small budgets at a fraction of the search time.
    population = max(64, min(512, 8 * batch))
    strategy = ms.search_strategy.EvolutionarySearch(
        population_size=population, init_min_unmeasured=min(50, population // 4),
        genetic_num_iters=2 if population < 512 else 4)
    ctx = ms.TuneContext(mod=task.dispatched[0], target=task.target, space_generator=space,
                         search_strategy=strategy, task_name=task.task_name,
                         logger=logging.getLogger("tvm.s_tir.meta_schedule.tvmbundle"),
                         rand_state=zlib.crc32(task.task_name.encode()) & 0x7FFFFFFF, num_threads=threads)
    return ctx, batch


def _quiet_metaschedule() -> None:
    """MetaSchedule logs to stdout: send it to stderr (stdout carries our result, e.g. --json),
    and only with -v."""
    verbose = logging.getLogger("tvmbundle.cmd").isEnabledFor(logging.INFO)
    names = [n for n in logging.root.manager.loggerDict if n.startswith("tvm.s_tir.meta_schedule")]
    for name in ["tvm.s_tir.meta_schedule", *names]:
        lg = logging.getLogger(name)
        if not verbose:
            lg.setLevel(logging.WARNING)
        for h in lg.handlers:
            if type(h) is logging.StreamHandler:
                h.setStream(sys.stderr)
                h.setLevel(logging.INFO if verbose else logging.WARNING)


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
