"""Fleet rollouts: one bundle to many devices, in waves, stopping and rolling back on failures.

The inventory (:mod:`bundler.config.inventory`) lists the hosts.  A rollout plans waves (a canary wave, then batches of a
size or a percentage), deploys the hosts of a wave in parallel up to a limit,
and lets the next wave start only when the failures so far stay within the
threshold.  When they cross it, the hosts of the failed wave that did switch are
rolled back, hosts not reached are left untouched, and the rollout stops.
Hosts already on the bundle are skipped, so re-running a stopped rollout
continues where it stopped.
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bundler.config.inventory import Host
from bundler.config.inventory import load as load_inventory  # noqa: F401 (the fleet's API)
from bundler.device import release
from bundler.device.ssh import Target
from bundler.errors import DeployError, UserError
from bundler.package import bundle as bundle_mod
from bundler.package.manifest import Manifest


def parse_amount(text: str, total: int, what: str) -> int:
    """'25%' of total (at least 1) or a plain count."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(%?)\s*", str(text))
    if not m:
        raise UserError(f"{what}: {text!r} is not allowed; expected a count like 5 or a share like 25%")
    value = float(m.group(1))
    if m.group(2):
        return max(1, int(total * value / 100 + 0.999999)) if value > 0 else 0
    return int(value)


def plan_waves(hosts: list[Host], canary: int, batch: int) -> list[list[Host]]:
    waves = []
    rest = list(hosts)
    if canary > 0:
        waves.append(rest[:canary])
        rest = rest[canary:]
    batch = max(1, batch)
    while rest:
        waves.append(rest[:batch])
        rest = rest[batch:]
    return [w for w in waves if w]


@dataclass
class HostReport:
    host: str
    address: str
    wave: int
    result: str = "pending"      # ok | skipped | failed | rolled-back | not-reached
    step: str = ""
    error: str = ""
    seconds: float = 0.0
    uploaded_bytes: int = 0
    previous_id: str | None = None


@dataclass
class RolloutReport:
    bundle: str
    bundle_id: str
    completed: bool = False
    stopped_reason: str = ""
    waves: list[list[str]] = field(default_factory=list)
    hosts: list[HostReport] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"bundle": self.bundle, "bundle_id": self.bundle_id, "completed": self.completed,
                "stopped_reason": self.stopped_reason, "waves": self.waves,
                "hosts": [asdict(h) for h in self.hosts]}


Listener = Callable[[HostReport], None]


def rollout(bundle_path: Path | str, hosts: list[Host], *, group: str | None = None, canary: int = 1,
            batch: str = "25%", max_failures: str = "10%", parallel: int = 16, dry_run: bool = False,
            identity: Path | None = None, known_hosts: Path | None = None, accept_new_host_key: bool = False,
            sudo: bool | None = None, unit_dir: str | None = None, keep: int = 3, health_timeout: float = 30.0, step_timeout: float = 60.0,
            report_path: Path | None = None, listener: Listener | None = None,
            stop: threading.Event | None = None) -> RolloutReport:
    bundle_path = Path(bundle_path)
    # Unpacked once for the whole rollout: unpacking it again per host was half the controller's CPU.
    with tempfile.TemporaryDirectory(prefix="tvmbundle-rollout-") as tmp:
        top = bundle_mod.extract(bundle_path, Path(tmp))
        manifest = bundle_mod.load_manifest(top, str(bundle_path))
        return _rollout(bundle_path, top, manifest, hosts, group=group, canary=canary, batch=batch,
                        max_failures=max_failures, parallel=parallel, dry_run=dry_run, identity=identity,
                        known_hosts=known_hosts, accept_new_host_key=accept_new_host_key, sudo=sudo,
                        unit_dir=unit_dir, keep=keep, health_timeout=health_timeout, step_timeout=step_timeout,
                        report_path=report_path, listener=listener, stop=stop)


def _rollout(bundle_path: Path, top: Path, manifest: Manifest, hosts: list[Host], *, group: str | None,
             canary: int, batch: str, max_failures: str, parallel: int, dry_run: bool, identity: Path | None,
             known_hosts: Path | None, accept_new_host_key: bool, sudo: bool | None, unit_dir: str | None,
             keep: int, health_timeout: float, step_timeout: float, report_path: Path | None,
             listener: Listener | None, stop: threading.Event | None) -> RolloutReport:
    bid, board = manifest.bundle_id, manifest.board.name
    chosen = [h for h in hosts if group is None or group in h.groups]
    if not chosen:
        raise UserError(f"--group: no host of the inventory is in group {group!r}")
    wrong = [h for h in chosen if h.board != board]
    if wrong:
        raise UserError(f"{bundle_path.name} is for board {board!r}; refusing to start, these hosts run another "
                        "board: " + ", ".join(f"{h.name} ({h.board})" for h in wrong))
    total = len(chosen)
    waves = plan_waves(chosen, canary, parse_amount(batch, total, "--batch"))
    allowed = parse_amount(max_failures, total, "--max-failures")
    report = RolloutReport(str(bundle_path), bid, waves=[[h.name for h in w] for w in waves])
    by_name = {}
    for i, w in enumerate(waves):
        for h in w:
            hr = HostReport(h.name, f"{h.user}@{h.address}:{h.port}", i)
            report.hosts.append(hr)
            by_name[h.name] = hr
    if dry_run:
        for hr in report.hosts:
            hr.result = "planned"
        return report
    stop = stop or threading.Event()

    def target(h: Host) -> Target:
        # sudo: the inventory's per host (or [defaults]) unless the caller says so for all
        kw: dict[str, Any] = {"identity": identity, "known_hosts": known_hosts,
                              "accept_new_host_key": accept_new_host_key, "prefix": h.prefix,
                              "sudo": h.sudo if sudo is None else sudo}
        if unit_dir:
            kw["unit_dir"] = unit_dir
        return Target(host=h.address, user=h.user, port=h.port, **kw)

    def one(h: Host) -> HostReport:
        hr = by_name[h.name]
        if stop.is_set():
            return hr
        t0 = time.monotonic()
        hr.result, hr.step = "running", "connect"
        if listener:
            listener(hr)
        try:
            if _already_current(target(h), manifest, step_timeout):
                hr.result = "skipped"
            else:
                def hook(event: str, detail: str) -> None:
                    if event == "step":
                        hr.step = detail
                        if listener:
                            listener(hr)

                res = release.deploy_unpacked(top, manifest, target(h), keep=keep, health_timeout=health_timeout,
                                              step_timeout=step_timeout, hook=hook)
                hr.result, hr.uploaded_bytes, hr.previous_id = "ok", res.uploaded_bytes, res.previous_id
        except DeployError as e:
            hr.result, hr.step, hr.error = "failed", e.step, e.problem
        except UserError as e:
            hr.result, hr.error = "failed", e.message
        hr.seconds = time.monotonic() - t0
        if listener:
            listener(hr)
        return hr

    failures = 0
    try:
        for i, wave in enumerate(waves):
            if stop.is_set():
                report.stopped_reason = "interrupted"
                break
            with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
                futures = {}
                for h in wave:
                    if stop.is_set():
                        break
                    futures[pool.submit(one, h)] = h
                try:
                    for f in as_completed(futures):
                        f.result()
                except KeyboardInterrupt:
                    # Start no new host; the ones in flight finish (or roll themselves back).
                    stop.set()
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
            failures = sum(1 for hr in report.hosts if hr.result == "failed")
            if failures > allowed:
                report.stopped_reason = (f"{failures} host(s) failed, more than the {allowed} allowed "
                                         f"(--max-failures {max_failures}); wave {i} rolled back")
                _roll_back_wave(wave, by_name, target, manifest.name, health_timeout, step_timeout, listener)
                break
            if stop.is_set():
                report.stopped_reason = "interrupted"
                break
    except KeyboardInterrupt:
        stop.set()
        report.stopped_reason = "interrupted"
    for hr in report.hosts:
        if hr.result in ("pending", "running"):
            hr.result = "not-reached"
    report.completed = not report.stopped_reason and all(hr.result in ("ok", "skipped") for hr in report.hosts)
    if not report.completed and not report.stopped_reason:
        report.stopped_reason = f"{failures} host(s) failed (within the {allowed} allowed)"
    if report_path:
        report_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return report


def _already_current(t: Target, manifest: Manifest, step_timeout: float) -> bool:
    """One round trip: the device's `tvm-deploy status` says the bundle is current and healthy."""
    found = release.status(t, name=manifest.name, prefix=t.prefix or manifest.install.prefix, step_timeout=step_timeout)
    return any(st.current == manifest.bundle_id and st.healthy and not st.legacy for st in found)


def _roll_back_wave(wave: list[Host], by_name: dict[str, HostReport], target, name: str, health_timeout: float,
                    step_timeout: float, listener: Listener | None) -> None:
    """Hosts of the failed wave that switched go back to what they ran before."""
    for h in wave:
        hr = by_name[h.name]
        if hr.result != "ok" or not hr.previous_id:
            continue
        try:
            release.rollback(target(h), name=name, to=hr.previous_id, health_timeout=health_timeout,
                             step_timeout=step_timeout)
            hr.result = "rolled-back"
        except DeployError as e:
            hr.result, hr.step, hr.error = "failed", "rollback", e.problem
        if listener:
            listener(hr)
