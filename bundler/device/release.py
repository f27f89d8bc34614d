"""Installing a bundle onto a device: atomic switch, health gate, rollback.

Device layout under the install prefix (the same an overlay image lays down)::

    PREFIX/store/sha256/<hex>        every file ever uploaded, by content: a later bundle sends only
                                     the files the device lacks (a model-only update sends the model)
    PREFIX/releases/<bundle id>/     a release: store files hard-linked into the bundle's layout
    PREFIX/current -> releases/<id>  the live release, switched with one rename
    PREFIX/staging/                  uploads in progress (*.part), checked on the device before use

Every step is idempotent, so re-running a deploy that was interrupted anywhere
finishes it; and until the switch nothing the running release uses is touched.
After the switch, a restart or health failure switches back and restarts the
previous release before the error is raised.
"""

from __future__ import annotations

import json
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler.build.elf import version_key
from bundler.config import cpu
from bundler.device.ssh import Remote, Target
from bundler.errors import DeployError, UserError
from bundler.package import bundle as bundle_mod
from bundler.package.service import UNIT, render_unit
from bundler.progress import Progress

MARGIN = 1 << 20   # free space kept beyond what the upload needs

Hook = Callable[[str, str], None]   # (event, detail): "step" name, "uploaded" file; tests use it to inject faults


@dataclass
class DeployResult:
    host: str
    bundle_id: str
    previous_id: str | None
    steps: list[tuple[str, float]] = field(default_factory=list)
    uploaded_bytes: int = 0
    skipped_bytes: int = 0
    warnings: list[str] = field(default_factory=list)


@dataclass
class DeviceStatus:
    host: str
    prefix: str
    current: str | None
    releases: list[dict[str, Any]]
    service: str
    healthy: bool


def q(s: str) -> str:
    return shlex.quote(s)


class _Steps:
    def __init__(self, result: DeployResult, progress: Progress, hook: Hook | None, host: str):
        self.result, self.progress, self.hook, self.host = result, progress, hook, host

    def __call__(self, name: str):
        outer = self

        class _Ctx:
            def __enter__(self):
                self.t = time.monotonic()
                if outer.hook:
                    outer.hook("step", name)
                self.cm = outer.progress.step(f"{outer.host}: {name}")
                return self.cm.__enter__()

            def __exit__(self, *exc):
                outer.result.steps.append((name, time.monotonic() - self.t))
                return self.cm.__exit__(*exc)

        return _Ctx()


# --- the device side, as shell commands ---------------------------------------------------

def _prefix_of(target: Target, manifest: dict[str, Any]) -> str:
    prefix = (target.prefix or manifest.get("install", {}).get("prefix") or "/opt/tvmbundle").rstrip("/")
    if not prefix.startswith("/"):
        raise UserError(f"--prefix: {prefix!r} is not allowed; expected an absolute path")
    return prefix


def _health(r: Remote, prefix: str, deadline_s: float) -> tuple[bool, str]:
    """Poll the service's /healthz from the device until it answers 200 or the deadline passes."""
    end = time.monotonic() + deadline_s
    last = ""
    while True:
        res = r.sh(f"{q(prefix + '/current/bin/tvm-deploy')} probe --timeout 2", "health", check=False, timeout=15)
        if res.code == 0:
            return True, ""
        last = (res.err or res.out).strip().splitlines()[-1:] or [""]
        last = last[0]
        if time.monotonic() >= end:
            return False, last
        time.sleep(0.5)


def _systemd(r: Remote) -> bool:
    return r.sh("command -v systemctl >/dev/null 2>&1", "preflight", check=False).code == 0


def _restart(r: Remote, unit: str) -> None:
    r.run(["systemctl", "restart", unit], "restart", timeout=60)


def _switch(r: Remote, prefix: str, release_id: str | None, step: str) -> None:
    """Point PREFIX/current at releases/ID with one rename (atomic), or remove it for None."""
    if release_id is None:
        r.run(["rm", "-f", f"{prefix}/current"], step)
        return
    new = f"{prefix}/.current.new"
    r.sh(f"ln -sfn {q('releases/' + release_id)} {q(new)} && mv -Tf {q(new)} {q(prefix + '/current')}", step)


def _current(r: Remote, prefix: str) -> str | None:
    res = r.sh(f"readlink {q(prefix + '/current')}", "status", check=False)
    link = res.out.strip()
    return link.rsplit("/", 1)[-1] if res.code == 0 and link else None


# --- deploy -------------------------------------------------------------------------------

def deploy(bundle_path: Path | str, target: Target, *, keep: int = 3, health_timeout: float = 30.0,
           step_timeout: float = 60.0, progress: Progress | None = None, hook: Hook | None = None) -> DeployResult:
    """Install ``bundle_path`` on ``target``; on any failure the previous release stays (or is again) current."""
    progress = progress or Progress(quiet=True)
    bundle_path = Path(bundle_path)
    with tempfile.TemporaryDirectory(prefix="tvmbundle-deploy-") as tmp:
        top = bundle_mod.extract(bundle_path, Path(tmp))
        manifest = bundle_mod.read_manifest(top, str(bundle_path))
        return _deploy(top, manifest, target, keep, health_timeout, step_timeout, progress, hook)


def _deploy(top: Path, manifest: dict[str, Any], target: Target, keep: int, health_timeout: float,
            step_timeout: float, progress: Progress, hook: Hook | None) -> DeployResult:
    bid = manifest["bundle_id"]
    prefix = _prefix_of(target, manifest)
    unit = manifest.get("service", {}).get("unit", UNIT)
    result = DeployResult(target.name, bid, None)
    step = _Steps(result, progress, hook, target.name)
    files = manifest["files"]
    r = Remote(target, step_timeout=step_timeout)
    with step("connect"):
        r.open()
    with r:
        with step("preflight") as s:
            facts = _survey(r, prefix)
            have_systemd = _preflight(r, target, manifest, prefix, facts, result)
            store = {h for h in facts.get("store", "").split() if len(h) == 64}
            missing = {f["sha256"]: f for f in files if f["sha256"] not in store}
            need = sum(f["size"] for f in missing.values())
            _check_space(r, prefix, facts.get("df", ""), need)
            result.skipped_bytes = sum(f["size"] for f in files if f["sha256"] in store)
            result.previous_id = facts.get("current", "").rsplit("/", 1)[-1] or None
            s.done(detail=f"{len(missing)} of {len(files)} files to send ({need} bytes)")
        r.run(["mkdir", "-p", f"{prefix}/store/sha256", f"{prefix}/releases", f"{prefix}/staging"], "prepare")
        with step("upload") as s:
            _upload(r, top, prefix, missing, result, hook)
            s.done(detail=f"{result.uploaded_bytes} bytes sent, {result.skipped_bytes} already there")
        with step("assemble"):
            _assemble(r, prefix, manifest)
        with step("check"):
            rel = f"{prefix}/releases/{bid}"
            # Through a file, not stdin: invoke feeds stdin a byte at a time with a sleep between.
            sums = "".join(f"{f['sha256']}  {f['path']}\n" for f in files)
            sums_file = f"{prefix}/staging/{bid}.sha256"
            r.write_text(sums, sums_file, "check")
            r.sh(f"cd {q(rel)} && sha256sum -c --quiet {q(sums_file)}; rc=$?; rm -f {q(sums_file)}; exit $rc",
                 "check")
            res = r.run([f"{rel}/bin/tvm-deploy", "selftest"], "selftest", check=False, timeout=max(step_timeout, 300))
            if res.code != 0:
                raise DeployError(target.name, "selftest",
                                  f"the selftest of {bid[:12]} failed on the device (exit {res.code}): "
                                  + " | ".join((res.err or res.out).strip().splitlines()[-3:])
                                  + "; nothing was switched")
        if result.previous_id == bid:
            result.warnings.append("this release was already current; restarting it")
        with step("switch"):
            if have_systemd:
                r.write_text(render_unit(manifest, prefix), f"{prefix}/staging/{unit}", "switch")
                r.run(["mkdir", "-p", target.unit_dir], "switch")
                r.run(["mv", "-f", f"{prefix}/staging/{unit}", f"{target.unit_dir}/{unit}"], "switch")
                r.run(["systemctl", "daemon-reload"], "switch")
                r.run(["systemctl", "enable", unit], "switch", check=False)
            _switch(r, prefix, bid, "switch")
        try:
            if have_systemd:
                with step("restart"):
                    _restart(r, unit)
                with step("health") as s:
                    ok, why = _health(r, prefix, health_timeout)
                    if not ok:
                        raise DeployError(target.name, "health", f"no healthy answer within {health_timeout:g} s "
                                                                 f"({why or 'no reply'})")
            else:
                result.warnings.append("systemd not found: the service was not restarted and no health gate ran")
        except DeployError as failure:
            _roll_back_after(r, target, prefix, unit, result.previous_id, health_timeout, failure)
            raise AssertionError("unreachable")  # _roll_back_after always raises
        with step("prune"):
            _prune(r, prefix, keep, bid, result.previous_id)
    return result


def _survey(r: Remote, prefix: str) -> dict[str, str]:
    """Everything preflight needs to know about the device, in one round trip."""
    script = "; ".join([
        f"p={q(prefix)}; while [ ! -e \"$p\" ]; do p=$(dirname \"$p\"); done",
        'echo "arch=$(uname -m)"',
        'echo "libc=$(getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1)"',
        'if test -w "$p"; then echo writable=yes; else echo writable=no; fi',
        'if command -v systemctl >/dev/null 2>&1; then echo systemd=yes; else echo systemd=no; fi',
        'echo "df=$(df -Pk "$p" | tail -n 1)"',
        f'echo "current=$(readlink {q(prefix + "/current")} 2>/dev/null)"',
        f'echo "store=$(ls {q(prefix + "/store/sha256")} 2>/dev/null | tr "\\n" " ")"',
    ])
    facts = {}
    for line in r.sh(script, "preflight").out.splitlines():
        key, _, value = line.partition("=")
        facts[key] = value.strip()
    return facts


def _preflight(r: Remote, target: Target, manifest: dict[str, Any], prefix: str, facts: dict[str, str],
               result: DeployResult) -> bool:
    """Refuse, before anything is written, a device the bundle cannot run on or install into."""
    import re

    board = manifest["board"]
    arch = facts.get("arch", "")
    if cpu.from_uname(arch) != board["cpu_family"]:
        raise DeployError(target.name, "preflight", f"the device is {arch}, the bundle is for "
                                                    f"{board['cpu_family']} ({board['name']}); nothing was sent")
    m = re.search(r"(\d+\.\d+)", facts.get("libc", ""))
    if not m:
        result.warnings.append(f"could not read the device's glibc version ({facts.get('libc')!r})")
    elif version_key(m.group(1)) < version_key(board["glibc"]):
        raise DeployError(target.name, "preflight", f"the device has glibc {m.group(1)}, the bundle needs "
                                                    f"{board['glibc']} or newer; nothing was sent")
    if facts.get("writable") != "yes" or target.sudo:
        raise DeployError(target.name, "preflight", f"{prefix} is not writable by {target.user}; installing "
                                                    "through sudo is not supported yet, so nothing was sent",
                          hint=f"make {prefix} writable by {target.user}, or deploy as its owner")
    have = facts.get("systemd") == "yes"
    if not have:
        result.warnings.append("systemd not found on the device: the service will not be (re)started")
    return have


def _check_space(r: Remote, prefix: str, df_line: str, need: int) -> None:
    try:
        avail = int(df_line.split()[3]) * 1024
    except (IndexError, ValueError):
        return
    if need + MARGIN > avail:
        raise DeployError(r.target.name, "preflight",
                          f"not enough space under {prefix}: {need + MARGIN} bytes needed, {avail} free; "
                          "nothing was sent")


def _upload(r: Remote, top: Path, prefix: str, missing: dict[str, dict[str, Any]], result: DeployResult,
            hook: Hook | None) -> None:
    staging = f"{prefix}/staging"
    r.sh(f"rm -f {q(staging)}/*.part", "upload")       # leftovers of an interrupted deploy
    try:
        for sha, f in sorted(missing.items(), key=lambda kv: kv[1]["path"]):
            part = f"{staging}/{sha}.part"
            r.put(top / f["path"], part, "upload", timeout=max(r.step_timeout, f["size"] / 1e6))
            # One round trip: check the content on the device, then move it into the store.
            store_path = f"{prefix}/store/sha256/{sha}"
            res = r.sh(f"got=$(sha256sum {q(part)} | cut -d' ' -f1); if [ \"$got\" != {q(sha)} ]; then "
                       f"echo \"$got\"; exit 9; fi; chmod {q('0' + f['mode'][-3:])} {q(part)} && "
                       f"mv -f {q(part)} {q(store_path)}", "upload", check=False)
            if res.code == 9:
                raise DeployError(r.target.name, "upload", f"{f['path']} arrived damaged (sha256 "
                                                           f"{res.out.strip()[:12]}, expected {sha[:12]})")
            if res.code != 0:
                raise DeployError(r.target.name, "upload", f"{f['path']}: storing it failed: "
                                                           + " | ".join(res.err.strip().splitlines()[-3:]))
            result.uploaded_bytes += f["size"]
            if hook:
                hook("uploaded", f["path"])
    except DeployError:
        # A full disk leaves a partial file behind: do not let it eat the space the running release needs.
        if r.conn is not None and r.conn.client.get_transport() and r.conn.client.get_transport().is_active():
            r.sh(f"rm -f {q(staging)}/*.part", "upload", check=False)
        raise


def _assemble(r: Remote, prefix: str, manifest: dict[str, Any]) -> None:
    bid = manifest["bundle_id"]
    final = f"{prefix}/releases/{bid}"
    if r.sh(f"test -f {q(final + '/manifest.json')}", "assemble", check=False).code == 0:
        return   # assembled by an earlier run; `check` below re-verifies every file
    partial = f"{final}.partial"
    lines = [f"rm -rf {q(partial)}", f"mkdir -p {q(partial)}"]
    for d in sorted({str(Path(f['path']).parent) for f in manifest["files"]} - {"."}):
        lines.append(f"mkdir -p {q(partial + '/' + d)}")
    for f in manifest["files"]:
        lines.append(f"ln {q(prefix + '/store/sha256/' + f['sha256'])} {q(partial + '/' + f['path'])}")
    r.sh(" && ".join(lines), "assemble", timeout=120)
    r.write_text(json.dumps(manifest, indent=2) + "\n", f"{partial}/manifest.json", "assemble")
    r.run(["mv", "-T", partial, final], "assemble")


def _roll_back_after(r: Remote, target: Target, prefix: str, unit: str, previous: str | None,
                     health_timeout: float, failure: DeployError) -> None:
    try:
        if previous:
            _switch(r, prefix, previous, "rollback")
            _restart(r, unit)
            ok, _ = _health(r, prefix, health_timeout)
            state = f"the previous release {previous[:12]} is current again" + ("" if ok else " but NOT healthy")
        else:
            r.run(["systemctl", "stop", unit], "rollback", check=False)
            _switch(r, prefix, None, "rollback")
            state = "there was no previous release: the service is stopped"
    except DeployError as e:
        state = f"rolling back failed too ({e.step}: {e.problem})"
    raise DeployError(target.name, failure.step, f"{failure.problem}; {state}", hint=failure.hint)


def _prune(r: Remote, prefix: str, keep: int, current: str, previous: str | None) -> None:
    listing = r.sh(f"cd {q(prefix + '/releases')} && ls -1t", "prune", check=False).out.split()
    releases = [x for x in listing if not x.endswith(".partial")]
    protected = {current, previous}
    kept = [x for x in releases if x in protected]
    for x in releases:
        if x not in protected and len(kept) < keep:
            kept.append(x)
    doomed = [x for x in releases if x not in kept]
    for x in doomed:
        r.run(["rm", "-rf", f"{prefix}/releases/{x}"], "prune")
    # Store files no release links any more (link count 1) are garbage.
    r.sh(f"find {q(prefix + '/store/sha256')} -type f -links 1 -exec rm -f {{}} +", "prune", check=False)


# --- status and rollback ------------------------------------------------------------------

def status(target: Target, *, prefix: str | None = None, step_timeout: float = 30.0) -> DeviceStatus:
    prefix = (prefix or target.prefix or "/opt/tvmbundle").rstrip("/")
    with Remote(target, step_timeout=step_timeout) as r:
        current = _current(r, prefix)
        rels = []
        listing = r.sh(f"cd {q(prefix + '/releases')} 2>/dev/null && ls -1t", "status", check=False).out.split()
        for rid in [x for x in listing if not x.endswith(".partial")]:
            m = r.sh(f"cat {q(f'{prefix}/releases/{rid}/manifest.json')}", "status", check=False)
            try:
                man = json.loads(m.out)
            except ValueError:
                man = {}
            rels.append({"id": rid, "name": man.get("name", "?"), "board": man.get("board", {}).get("name", "?"),
                         "created": man.get("created", "?"), "current": rid == current})
        service = "no systemd"
        if _systemd(r):
            service = r.run(["systemctl", "is-active", UNIT], "status", check=False).out.strip() or "unknown"
        healthy = bool(current) and r.sh(f"{q(prefix + '/current/bin/tvm-deploy')} probe --timeout 2", "status",
                                         check=False).code == 0
    return DeviceStatus(target.name, prefix, current, rels, service, healthy)


def rollback(target: Target, *, to: str | None = None, prefix: str | None = None, health_timeout: float = 30.0,
             step_timeout: float = 60.0, progress: Progress | None = None) -> DeployResult:
    """Switch back to the newest kept release other than the current one (or to ``to``)."""
    progress = progress or Progress(quiet=True)
    prefix = (prefix or target.prefix or "/opt/tvmbundle").rstrip("/")
    with Remote(target, step_timeout=step_timeout) as r:
        current = _current(r, prefix)
        listing = r.sh(f"cd {q(prefix + '/releases')} 2>/dev/null && ls -1t", "rollback", check=False).out.split()
        candidates = [x for x in listing if not x.endswith(".partial") and x != current]
        if to:
            matches = [x for x in listing if x.startswith(to)]
            if len(matches) != 1:
                raise DeployError(target.name, "rollback", f"{to!r} matches {len(matches)} kept releases; "
                                                           f"kept: {', '.join(x[:12] for x in listing) or 'none'}")
            chosen = matches[0]
        elif not candidates:
            raise DeployError(target.name, "rollback", "no other release is kept on the device")
        else:
            chosen = candidates[0]
        result = DeployResult(target.name, chosen, current)
        step = _Steps(result, progress, None, target.name)
        with step("switch"):
            _switch(r, prefix, chosen, "switch")
        if _systemd(r):
            try:
                with step("restart"):
                    _restart(r, UNIT)
                with step("health"):
                    ok, why = _health(r, prefix, health_timeout)
                    if not ok:
                        raise DeployError(target.name, "health", f"{chosen[:12]} did not become healthy ({why})")
            except DeployError as failure:
                _roll_back_after(r, target, prefix, UNIT, current, health_timeout, failure)
        # Touch it so "newest kept" ordering and pruning see it as the latest choice.
        r.run(["touch", "-h", f"{prefix}/releases/{chosen}"], "switch", check=False)
    return result
