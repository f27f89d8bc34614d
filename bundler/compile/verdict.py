"""The whole-model check of a model's tuning: the model built with all of it, with only the default
rules' knobs, and with none, timed whole on the board in alternating rounds; make applies the
fastest (:meth:`bundler.compile.tuning.Database.for_model` reads the verdict).

Why a check at all: `tune` keeps a kernel's record or knobs only where they beat its default
schedule, but it times each kernel alone (its weights flushed from the caches, its input warm),
and inside the model a kernel finds other caches: what the kernel before it left, and the
weights of none. A sum of per-kernel wins can still be a slower model: in one run (MobileNetV2,
6 minutes of tuning, x86_64 with 2 threads) the tuned bundle was 1.30x onnxruntime against
1.21x for its default schedules. Only timing the model itself sees that, and it costs two or
three compiles (the one `make` then reuses among them) and a few seconds on the board.

The verdict is kept in the database's file for the model, for the digest of the tuning it judged:
tuning that model or another one changes what applies to it, and then it is unchecked again
until the next `tune` (a run with nothing left to measure only checks).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundler.build import toolchain
from bundler.compile import rpc, tuning
from bundler.compile.model import compile_for_board, make_inputs
from bundler.compile.pipeline import identity as pipeline_identity
from bundler.config.recipe import Recipe
from bundler.errors import UserError, last_line

log = logging.getLogger("tvmbundle")

ROUNDS = 9            # alternating rounds of every variant; the median of each is compared
ROUND_SECONDS = 0.1   # a round runs the model about this long (at least once)
SEED = 0              # of the inputs it runs on (latency does not depend on their values)
MARGIN = 0.03         # a less tuned variant wins only by more than this: a smaller difference is noise


@dataclass(frozen=True)
class Verdict:
    choice: str                   # one of tuning.CHOICES: what make applies
    ms: dict[str, float]          # each variant's median latency over the rounds, in ms
    rounds: int
    where: str                    # what ran it: "this machine", "RPC (pi@10.0.0.7 via SSH)", ...
    measured: bool = True         # False: the verdict of an earlier run, still valid

    def to_json(self) -> dict[str, Any]:
        return {"choice": self.choice, "ms": self.ms, "rounds": self.rounds, "where": self.where,
                "measured": self.measured}

    def describe(self) -> str:
        figures = ", ".join(f"{c} {self.ms[c]:.3g} ms" for c in self.ms)
        return f"{figures} ({self.rounds} rounds, {self.where}): {self.choice} applied" + \
            ("" if self.measured else " (checked before)")


def check(recipe: Recipe, prepared, model_id: str, source: Path, versions: dict[str, str],
          endpoint: rpc.Endpoint | None, where: str, deadline: float | None = None) -> Verdict | None:
    """Time the model with and without its tuning and keep the verdict in the database. None when
    there is nothing to check (no tuning applies to the model) or ``deadline`` (time.monotonic())
    passed first. ``endpoint`` None: the board is this machine, and its own RPC server runs here
    (the bundle's runtime and threads, as candidates were measured)."""
    db = tuning.find(model_id, recipe, versions)
    if db is None:
        return None
    full = db.for_model(prepared, model_id, source, recipe, "tuned")
    if full.digest is None:
        return None
    store = tuning.Store(db.path)
    earlier = store.model_check(model_id, full.digest)
    if earlier:
        return Verdict(earlier["choice"], dict(earlier.get("ms", {})), int(earlier.get("rounds", 0)),
                       str(earlier.get("where", "")), measured=False)
    variants = ["tuned"]
    if full.path is not None and full.knobs:      # records and knobs: is either one the loser?
        variants.append("knobs")
    variants.append("defaults")
    tc = toolchain.resolve(recipe)
    libs = {}
    for choice in variants:
        if _past(deadline):
            return None
        libs[choice] = compile_for_board(prepared, model_id, source, recipe, tc, versions,
                                         database=db, choice=choice).path
    inputs = make_inputs(prepared.inputs, SEED)
    with contextlib.ExitStack() as stack:
        if endpoint is None:
            endpoint = stack.enter_context(rpc.local_server(recipe))
        # The session lives in a process of its own, as MetaSchedule's runner's do: with --host its
        # bytes go through the SSH tunnel's threads in this process, and a call blocked in TVM's
        # RPC client here starved them (the VM never loaded).
        timed = _timed_apart((endpoint, {c: str(p) for c, p in libs.items()}, inputs, deadline))
        if isinstance(timed, UserError):
            raise timed
        if isinstance(timed, str):
            raise UserError(f"{source.name}: timing the whole model ({where}) failed: {timed}",
                            hint="the tuning measured so far is kept, unchecked (make applies all of it); "
                                 "run the same tune again to check it")
        ms, rounds = timed
    if not rounds:
        return None
    choice = choose(variants, ms)
    verdict = Verdict(choice, ms, rounds, where)
    store.update_model(model_id, check={"digest": full.digest, "schedules": pipeline_identity(), "choice": choice,
                                        "ms": ms, "rounds": rounds, "where": where,
                                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    if choice != "tuned":
        log.warning("%s: the whole model is faster with %s than with all of its tuning (%s): make applies those",
                    source.name, "the default rules' knobs only" if choice == "knobs" else "the default schedules",
                    ", ".join(f"{c} {ms[c]:.3g} ms" for c in ms))
    return verdict


def choose(variants: list[str], ms: dict[str, float]) -> str:
    """The most tuned variant (``variants`` from most to least tuned) unless a less tuned one is
    faster by more than MARGIN. Tuning kept each kernel's record only where it won by that much
    already; two bundles within a few percent of each other on a whole model differ by the
    board's noise (on one run: the encoder 1.66 against 1.67 ms), and a coin toss would flip
    make's bundle from one `tune` to the next."""
    choice = variants[0]
    for c in variants[1:]:
        if ms[c] < ms[choice] * (1 - MARGIN):
            choice = c
    return choice


def _timed_apart(args) -> tuple[dict[str, float], int] | UserError | str:
    """:func:`_time` in a child process of a process group of its own: its result, a UserError it
    raised, or the last line of another error.

    Its own process group keeps a terminal's Ctrl-C away from it: the Ctrl-C reaches this process
    alone, which then kills the child (the check stops at once, and no traceback comes from the
    child). A multiprocessing worker had to be spawned with SIGINT ignored here, so that it started
    ignoring it; a Ctrl-C in that moment was lost, and the check went on against the RPC server
    the same Ctrl-C had stopped (exit 2, "cannot reach the RPC server", instead of 130)."""
    here = str(Path(__file__).resolve().parents[2])        # this tvmbundle, whatever sys.path holds
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])))
    child = subprocess.Popen([sys.executable, "-c", "from bundler.compile.verdict import _child; _child()"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, process_group=0)
    try:
        out, _ = child.communicate(pickle.dumps(args))
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    if not out:
        return f"the timing process ended with exit code {child.returncode} and no result"
    kind, *value = pickle.loads(out)
    if kind == "ok":
        return value[0]
    return UserError(value[0], hint=value[1]) if kind == "user" else value[0]


def _child() -> None:
    """The timing process: arguments from stdin, the answer on stdout (pickled); what TVM prints
    goes to stderr, so the answer is all that stdout carries."""
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    args = pickle.load(sys.stdin.buffer)
    try:
        reply: tuple = ("ok", _time(*args))
    except UserError as e:
        reply = ("user", e.message, e.hint)
    except Exception as e:  # noqa: BLE001 -- TVM's RPC errors, named by the parent with the model
        reply = ("error", last_line(e))
    answer.write(pickle.dumps(reply))
    answer.close()


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _time(endpoint: rpc.Endpoint, libs: dict[str, str], inputs, deadline: float | None) -> tuple[dict[str, float], int]:
    """({variant: median ms}, rounds): every variant loaded on the board at once, then timed in
    rounds that alternate their order, so that a slow spell of a shared board falls on all."""
    import tvm
    from tvm import relax

    session = rpc.connect(endpoint)
    dev = session.cpu()
    timers = {}
    for choice, path in libs.items():
        name = f"model-{choice}.so"
        session.upload(path, name)
        vm = relax.VirtualMachine(session.load_module(name), dev)
        # The stateful call: time_evaluator cannot return a tuple of outputs over RPC.
        vm.set_input("main", *[tvm.runtime.tensor(a, device=dev) for a in inputs])
        once = vm.time_evaluator("invoke_stateful", dev, number=1, repeat=1)("main").mean
        number = max(1, min(1000, round(ROUND_SECONDS / max(once, 1e-6))))
        timers[choice] = vm.time_evaluator("invoke_stateful", dev, number=number, repeat=1)
    samples: dict[str, list[float]] = {c: [] for c in libs}
    order = list(libs)
    for i in range(ROUNDS):
        if _past(deadline):
            break
        for choice in order if i % 2 == 0 else order[::-1]:
            samples[choice].append(timers[choice]("main").mean)
    rounds = min(len(v) for v in samples.values())
    return ({c: round(statistics.median(v[:rounds]) * 1e3, 4) for c, v in samples.items()} if rounds else {}), rounds
