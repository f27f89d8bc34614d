"""Installing a bundle onto a device: atomic switch, health gate, rollback.

Device layout under the install prefix (bundler.package.layout; the same an overlay image lays down)::

    PREFIX/store/sha256/<hex>        every file ever uploaded, by content, shared by every bundle: a later
                                     bundle sends only the files the device lacks (a model-only update
                                     sends the model, a second model of the board its own files)
    PREFIX/bundles/NAME/releases/<id>/   a release of bundle NAME: store files hard-linked into the
                                     bundle's layout, its manifest.json and its own unit (.deploy/<unit>)
    PREFIX/bundles/NAME/current -> releases/<id>   NAME's live release, switched with one rename
    tvmbundle@NAME.service           NAME's service: deploying one bundle never restarts another
    PREFIX/staging/                  uploads in progress (*.part), checked on the device before use

NAME is the manifest's name. A device still in the single-service layout of tvmbundle 0.1
(PREFIX/releases, PREFIX/current, tvmbundle.service) is upgraded by the first deploy of the bundle
that layout serves: its releases are adopted (hard-linked into bundles/NAME, each with a unit
rendered here from its manifest, so a rollback to them works), its service gives way to NAME's
instance, and it is removed once that instance passed the health gate; until then it is intact.
A bundle of another name leaves it alone.

What runs on the device is code, not shell snippets: the bundle's own harness
(``bin/tvm-deploy``) has the subcommands ``survey``, ``prepare``, ``install``,
``activate``, ``gc`` and ``status`` (bundler/build/harness_src/device.h), each
taking argv and printing one JSON document -- the way Ansible ships its modules.
The harness and its libraries form the *agent*, kept content-addressed in the
login user's ``~/.cache/tvmbundle/agent/<id>/``; a device that lacks it gets it
first (after a few shell checks that refuse, before anything is sent, a device
the deploy could not finish on), and later deploys of the same harness find it.
The only shell left is the line that finds the agent: every value in it is quoted.

A deploy is: survey (one round trip; it also lists the device's other bundles, whose listen
addresses this one must not take), [prepare], upload of the missing files,
install (check every staged file's SHA-256, assemble the release from store hard
links, check it, run its selftest), activate (switch ``current``, install the
release's unit, daemon-reload, restart, health gate, prune). Until the switch
nothing the running release uses is touched; after it, a restart or health
failure switches back and restarts the previous release before the error is raised.

Signed releases: a bundle's ``manifest.json.sig`` (``tvmbundle sign``) is uploaded beside the staged
manifest and handed to install (``--signature``). The device decides: when its trust store
``/etc/tvmbundle/allowed_signers`` (``tvmbundle trust``) lists a key, install refuses, before anything
is stored, a release not signed by one of them, and activate re-checks the release it switches to
(step ``signature``). ``deploy(trust=[KEY.pub])`` also checks on the host, before connecting.

With ``sudo`` (``--sudo``) exactly the steps that need root -- creating the prefix
(then owned by the login user), installing the unit, systemctl -- run through
``sudo -n``; everything else runs as the login user.
"""

from __future__ import annotations

import json
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler.build.elf import version_key
from bundler.config import cpu, values
from bundler.device.ssh import Remote, Target
from bundler.errors import DeployError, UserError
from bundler.package import bundle as bundle_mod
from bundler.package import layout, signing
from bundler.package.manifest import MANIFEST, FileEntry, Manifest
from bundler.package.manifest import agent_id as agent_id_of
from bundler.package.service import is_loopback, render_unit
from bundler.progress import Progress

MARGIN = 1 << 20   # free space kept beyond what the upload needs
AGENT_HOME = '"${HOME:-/tmp}/.cache/tvmbundle/agent/"'   # expanded by the device's shell, per login user

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
    round_trips: dict[str, int] = field(default_factory=dict)   # SSH commands ("sh") and transfers ("put")
    signed: bool = False              # the release came with a valid manifest.json.sig
    signed_by: str | None = None      # SHA256:... of the key of the device's trust store that signed it


@dataclass
class DeviceStatus:
    """One bundle of a device."""
    host: str
    prefix: str
    name: str | None                 # None: a device with no bundle at all
    current: str | None
    releases: list[dict[str, Any]]
    service: str
    healthy: bool
    unit: str = ""
    legacy: bool = False             # in the single-service layout of tvmbundle 0.1
    health_problem: str = ""


@dataclass(frozen=True)
class Slot:
    """Where one bundle lives on a device: the prefix and the bundle's name (None: the legacy
    single-service layout). Every agent call names it the same way."""
    prefix: str
    name: str | None

    @property
    def unit(self) -> str:
        return layout.unit_name(self.name) if self.name else layout.LEGACY_UNIT

    def args(self) -> list[str]:
        return ["--prefix", self.prefix, *(["--name", self.name] if self.name else [])]

    def release_dir(self, bundle_id: str) -> str:
        return (layout.release_dir(self.prefix, self.name, bundle_id) if self.name
                else layout.legacy_release_dir(self.prefix, bundle_id))


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


# --- what the host checks before it connects ---------------------------------------------

def check_prefix(prefix: str) -> str:
    """The install prefix, or UserError before anything connects: absolute, normalised, and only
    characters that neither systemd (the unit's ExecStart=/ReadOnlyPaths=) nor a shell reads as syntax.
    (The device side quotes it anyway: every value reaches the device as an argv element or quoted.)"""
    p = prefix.rstrip("/") or "/"
    problem = values.install_prefix(p)
    if problem:
        raise UserError(f"--prefix: {problem}")
    return p


def _prefix_of(target: Target, manifest: Manifest) -> str:
    return check_prefix(target.prefix or manifest.install.prefix)


def check_manifest(manifest: Manifest, host: str) -> None:
    """What deploy reserves on top of what every manifest is checked for when it loads (paths inside
    the release, ids, names): the release's ``.deploy/`` folder, where its unit lives, and its
    ``manifest.json.sig``, which only a checked signature may become."""
    for i, f in enumerate(manifest.files):
        if f.path.split("/")[0] == ".deploy" or f.path == signing.SIGNATURE:
            raise DeployError(host, "preflight", f"the bundle's manifest.json lists files[{i}].path {f.path!r}: "
                                                 f"not allowed: {f.path.split('/')[0]} is reserved for the deploy "
                                                 "itself; nothing was sent")


# --- the agent: the bundle's own harness, run on the device ---------------------------------

class _Agent:
    """Calls `tvm-deploy SUBCOMMAND` on the device and reads its JSON answer."""

    def __init__(self, r: Remote, exe: str, setup: str = ""):
        self.r, self.exe, self.setup = r, exe, setup      # exe: a shell word ("$A/bin/tvm-deploy", quoted)

    def call(self, cmd: str, args: list[str], step: str, *, timeout: float | None = None,
             tail: str = "") -> dict[str, Any]:
        """``tail``: arguments already written as shell words (``--from "$A"``)."""
        script = f"{self.setup}exec {self.exe} {shlex.join([cmd, *args])}{tail}"
        res = self.r.sh(script, step, check=False, timeout=timeout)
        return _answer(self.r, cmd, step, res)


def _answer(r: Remote, cmd: str, step: str, res) -> dict[str, Any]:
    doc = None
    for line in reversed(res.out.strip().splitlines()):
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except ValueError:
                pass
            break
    if not isinstance(doc, dict):
        tail = " | ".join((res.err or res.out).strip().splitlines()[-3:])
        raise DeployError(r.target.name, step, f"tvm-deploy {cmd} on the device failed (exit {res.code}): "
                                               f"{tail or 'no output'}")
    if not doc.get("ok"):
        raise DeployError(r.target.name, doc.get("step") or step, doc.get("error") or f"tvm-deploy {cmd} failed")
    return doc


def _bootstrap_script(prefix: str, agent_id: str, files: list[FileEntry], survey: list[str]) -> str:
    """Run the agent's survey; without an agent, build it from the store when the files are there,
    else print the few facts the host needs to decide whether sending it is worth anything."""
    store = q(layout.store_dir(prefix))
    have = " && ".join(f"[ -f {store}/{q(f.sha256)} ]" for f in files)
    build = " && ".join(
        ['rm -rf "$A.new"', 'mkdir -p "$A.new/bin" "$A.new/lib"']
        + [f"{{ ln {store}/{q(f.sha256)} \"$A.new\"/{q(f.path)} 2>/dev/null || "
           f"cp {store}/{q(f.sha256)} \"$A.new\"/{q(f.path)}; }}" for f in files]
        + ['chmod 0755 "$A.new/bin/tvm-deploy"', 'mv -T "$A.new" "$A"'])
    stored = " ".join(f"$([ -f {store}/{q(f.sha256)} ] && echo {q(f.sha256)})" for f in files)
    facts = "; ".join([
        "echo agent=missing", 'echo "home=${HOME:-/tmp}"', 'echo "arch=$(uname -m)"',
        'echo "glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1)"',
        'echo "uid=$(id -u)"', 'echo "user=$(id -un)"',
        f"p={q(prefix)}", 'while [ ! -e "$p" ]; do p=$(dirname "$p"); done',
        (f'if [ -w "$p" ] && {{ [ "$p" = {q(prefix)} ] || [ ! -e {q(prefix)} ]; }}; '
         'then echo prefix_ok=yes; else echo prefix_ok=no; fi'),
        'echo "free_kb=$(df -Pk "$p" | tail -n 1 | awk \'{print $4}\')"',
        'if command -v systemctl >/dev/null 2>&1; then echo systemctl=yes; else echo systemctl=no; fi',
        # the agent's files an earlier deploy left in the store need not be sent again
        f'echo "stored={stored}"',
        *([('if sp=$(sudo -n true 2>&1); then echo sudo_ok=yes; else echo sudo_ok=no; '
             'echo "sudo_problem=$(printf %s "$sp" | tail -n 1)"; fi')] if "--sudo" in survey else []),
    ])
    return (f"A={AGENT_HOME}{q(agent_id)}; "
            f'if [ ! -x "$A/bin/tvm-deploy" ] && {have}; then {build}; fi; '
            f'if [ -x "$A/bin/tvm-deploy" ]; then exec "$A/bin/tvm-deploy" {shlex.join(["survey", *survey])}; fi; '
            f"{facts}")


def _facts_from_survey(doc: dict[str, Any]) -> dict[str, Any]:
    p, u = doc["prefix"], doc["unit_dir"]
    sudo = doc.get("sudo", {})
    return {
        "agent": True, "arch": doc["arch"], "glibc": doc.get("glibc", ""), "uid": doc.get("uid"),
        "user": doc.get("user", "?"),
        "prefix_ok": p["writable"] or (not p["exists"] and p["nearest_writable"]),
        "unit_dir_ok": u["writable"] or (not u["exists"] and u["nearest_writable"]),
        "free": p.get("free_bytes"), "systemctl": bool(doc.get("systemd", {}).get("systemctl")),
        "sudo_ok": sudo.get("ok", False), "sudo_problem": sudo.get("problem", ""),
        "prepared": doc.get("prepared", False), "current": doc.get("current"), "have": set(doc.get("have", [])),
        "trust": doc.get("trust"),      # None: a harness from before on-device signature checks
        "bundles": doc.get("bundles", []), "legacy": doc.get("legacy"),
    }


def _port_of(listen: str) -> tuple[str, str]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), port


def _same_socket(a: str, b: str) -> bool:
    """Whether two services listening on ``a`` and ``b`` (HOST:PORT) would collide: the same port on
    the same address, or on a wildcard address and any other. The device's `tvm-deploy install`
    applies the same rule (harness_src/device.cc, SameSocket) for installers that run no preflight
    here (Ansible, Mender); this one refuses before anything is sent."""
    (ha, pa), (hb, pb) = _port_of(a), _port_of(b)
    if pa != pb:
        return False
    wild = ("0.0.0.0", "::", "")
    return ha == hb or ha in wild or hb in wild or (is_loopback(ha) and is_loopback(hb) and
                                                    {ha, hb} <= {"localhost", "127.0.0.1", "::1"})


def _check_listen(target: Target, manifest: Manifest, facts: dict[str, Any]) -> None:
    """Refuse, before anything is sent, a bundle whose service would take another bundle's address."""
    mine = manifest.service.listen
    others = [(b["name"], b.get("unit") or layout.unit_name(b["name"]), b.get("listen") or "")
              for b in facts.get("bundles", []) if b.get("name") != manifest.name and b.get("current")]
    legacy = facts.get("legacy")
    if legacy and legacy.get("current") and legacy.get("name") != manifest.name:
        others.append((legacy.get("name") or "?", layout.LEGACY_UNIT, legacy.get("listen") or ""))
    for other, unit, listen in others:
        if listen and _same_socket(mine, listen):
            raise DeployError(target.name, "preflight",
                              f"bundle {manifest.name!r} listens on {mine}, which bundle {other!r} ({unit}) "
                              "already serves on this device; nothing was sent",
                              hint=f"give one of them its own address: tvmbundle make ... --listen HOST:PORT "
                                   f"(or [service] listen in the recipe), e.g. {_port_of(mine)[0] or '127.0.0.1'}:"
                                   f"{int(_port_of(mine)[1] or 8470) + 1}")


def _legacy_to_adopt(target: Target, manifest: Manifest, prefix: str, facts: dict[str, Any]) -> dict[str, str]:
    """The releases of the single-service layout a deploy of this bundle takes over (when that layout
    serves this bundle's name), each with its unit of the new layout, rendered from its own manifest."""
    legacy = facts.get("legacy")
    if not legacy or legacy.get("name") != manifest.name:
        return {}
    units = {}
    for rel in legacy.get("releases", []):
        if rel.get("name") != manifest.name or "manifest" not in rel:
            continue
        try:
            old = Manifest.from_json(json.loads(rel["manifest"]),
                                     f"{layout.legacy_release_dir(prefix, rel['id'])}/manifest.json")
            units[rel["id"]] = render_unit(old, prefix)
        except (UserError, ValueError) as e:
            if rel["id"] == legacy.get("current"):
                raise DeployError(target.name, "preflight",
                                  f"the device serves {manifest.name!r} from the single-service layout of an older "
                                  f"tvmbundle, and its current release's manifest cannot be read here ({e}); "
                                  "nothing was sent") from None
            continue            # an older kept release that cannot come back: pruned with the legacy layout
    return units


def _facts_from_shell(out: str) -> dict[str, Any]:
    kv = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
    free = kv.get("free_kb", "").strip()
    return {
        "agent": False, "home": kv.get("home", ""), "arch": kv.get("arch", "").strip(), "glibc": kv.get("glibc", ""),
        "uid": int(kv["uid"]) if kv.get("uid", "").strip().isdigit() else None, "user": kv.get("user", "?").strip(),
        "prefix_ok": kv.get("prefix_ok") == "yes", "unit_dir_ok": None, "free": int(free) * 1024 if free.isdigit() else None,
        "systemctl": kv.get("systemctl") == "yes", "sudo_ok": kv.get("sudo_ok") == "yes",
        "sudo_problem": kv.get("sudo_problem", "").strip(), "prepared": False, "current": None,
        "have": set(kv.get("stored", "").split()),
    }


def _preflight(target: Target, manifest: Manifest, prefix: str, facts: dict[str, Any], need: int,
               result: DeployResult) -> bool:
    """Refuse, before anything is sent or written, a device the bundle cannot run on or be installed into.
    The same rules read the shell's facts (a device without the agent) and the agent's survey."""
    name, board = target.name, manifest.board
    arch = facts["arch"]
    if cpu.from_uname(arch) != board.cpu_family:
        raise DeployError(name, "preflight", f"the device is {arch}, the bundle is for "
                                             f"{board.cpu_family} ({board.name}); nothing was sent")
    m = re.search(r"(\d+\.\d+)", facts.get("glibc", ""))
    if not m:
        result.warnings.append(f"could not read the device's glibc version ({facts.get('glibc')!r})")
    elif version_key(m.group(1)) < version_key(board.glibc):
        raise DeployError(name, "preflight", f"the device has glibc {m.group(1)}, the bundle needs "
                                             f"{board.glibc} or newer; nothing was sent")
    user, root = facts["user"], facts["uid"] == 0
    sudo_hint = (f"allow {user} to run sudo without a password (a sudoers.d rule: "
                 f"'{user} ALL=(ALL) NOPASSWD: ALL'), or deploy as root")
    if target.sudo and not root and not facts["sudo_ok"]:
        problem = facts["sudo_problem"] or "sudo -n true failed"
        if "password" in problem:
            problem = f"sudo needs a password for {user} ({problem})"
        raise DeployError(name, "preflight", f"--sudo: {problem}; nothing was sent", hint=sudo_hint)
    privileged = root or bool(target.sudo)
    if not facts["prefix_ok"] and not privileged:
        raise DeployError(name, "preflight", f"{prefix} is not writable by {user} (and cannot be created by it); "
                                             "nothing was sent",
                          hint=f"deploy with --sudo (then {prefix} is created and owned by {user}), or make it "
                               f"writable: sudo install -d -o {user} {prefix}")
    have_systemd = facts["systemctl"]
    if have_systemd and not privileged:
        raise DeployError(name, "preflight", f"{user} cannot install the unit into {target.unit_dir} nor run "
                                             "systemctl (both need root); nothing was sent",
                          hint=f"deploy with --sudo ({user} needs passwordless sudo), or log in as root")
    if have_systemd and root and facts["unit_dir_ok"] is False:
        raise DeployError(name, "preflight", f"{target.unit_dir} is not writable on the device; nothing was sent")
    free = facts.get("free")
    if free is not None and need + MARGIN > free:
        raise DeployError(name, "preflight", f"not enough space under {prefix}: {need + MARGIN} bytes needed, "
                                             f"{free} free; nothing was sent")
    if not have_systemd:
        result.warnings.append("systemd not found on the device: the service will not be (re)started")
    return have_systemd


# --- deploy -------------------------------------------------------------------------------

def deploy(bundle_path: Path | str, target: Target, *, keep: int = 3, health_timeout: float = 30.0,
           step_timeout: float = 60.0, progress: Progress | None = None, hook: Hook | None = None,
           trust: Sequence[Path] = ()) -> DeployResult:
    """Install ``bundle_path`` on ``target``; on any failure the previous release stays (or is again) current.
    ``trust``: public key files; the bundle must be signed by one of them (checked here, before connecting;
    the device checks again against its own trust store, whatever ``trust`` is)."""
    progress = progress or Progress(quiet=True)
    bundle_path = Path(bundle_path)
    with tempfile.TemporaryDirectory(prefix="tvmbundle-deploy-") as tmp:
        top = bundle_mod.extract(bundle_path, Path(tmp))
        manifest = bundle_mod.load_manifest(top, str(bundle_path))
        if trust:
            signing.check_release(top, [Path(k) for k in trust], str(bundle_path))
        return _deploy(top, manifest, target, keep, health_timeout, step_timeout, progress, hook)


def deploy_unpacked(top: Path, manifest: Manifest, target: Target, *, keep: int = 3, health_timeout: float = 30.0,
                    step_timeout: float = 60.0, progress: Progress | None = None,
                    hook: Hook | None = None) -> DeployResult:
    """:func:`deploy` of a bundle already unpacked at ``top`` (a rollout unpacks it once for every host)."""
    return _deploy(top, manifest, target, keep, health_timeout, step_timeout, progress or Progress(quiet=True), hook)


def _deploy(top: Path, manifest: Manifest, target: Target, keep: int, health_timeout: float,
            step_timeout: float, progress: Progress, hook: Hook | None) -> DeployResult:
    check_manifest(manifest, target.name)            # before anything is read from the bundle or sent
    bid = manifest.bundle_id
    prefix = _prefix_of(target, manifest)
    slot = Slot(prefix, manifest.name)
    result = DeployResult(target.name, bid, None)
    step = _Steps(result, progress, hook, target.name)
    files = list(manifest.files)
    agent_files = manifest.agent_files()
    if not any(f.path == "bin/tvm-deploy" for f in agent_files):
        raise DeployError(target.name, "preflight", "the bundle has no bin/tvm-deploy; nothing was sent")
    agent_id = agent_id_of(agent_files)
    sudo = ["--sudo"] if target.sudo else []
    r = Remote(target, step_timeout=step_timeout)
    with step("connect"):
        r.open()
    try:
        with r:
            _deploy_on(r, top, manifest, target, slot, files, agent_files, agent_id, sudo, keep,
                       health_timeout, step_timeout, result, step, hook)
    finally:
        result.round_trips = dict(r.calls)
    return result


def _deploy_on(r: Remote, top: Path, manifest: Manifest, target: Target, slot: Slot,
               files: list[FileEntry], agent_files: list[FileEntry], agent_id: str, sudo: list[str],
               keep: int, health_timeout: float, step_timeout: float, result: DeployResult, step, hook) -> None:
    bid, prefix, unit = manifest.bundle_id, slot.prefix, slot.unit
    want = sorted({f.sha256 for f in files})
    survey_args = [*slot.args(), "--unit-dir", target.unit_dir, *sudo, *(a for s in want for a in ("--want", s))]
    setup = f"A={AGENT_HOME}{q(agent_id)}; "
    agent = _Agent(r, '"$A/bin/tvm-deploy"', setup)
    with step("preflight") as s:
        res = r.sh(_bootstrap_script(prefix, agent_id, agent_files, survey_args), "preflight", check=False)
        if res.out.lstrip().startswith("{"):
            facts = _facts_from_survey(_answer(r, "survey", "preflight", res))
        else:
            # No agent on the device: decide from the shell's facts whether sending it is any use,
            # then send it (into the login user's cache, not the prefix) and ask it for the survey.
            facts = _facts_from_shell(res.out)
            _preflight(target, manifest, prefix, facts, sum(f.size for f in files), result)
            res = _send_agent(r, top, prefix, facts, agent_id, agent_files, survey_args, result, hook)
            facts = _facts_from_survey(_answer(r, "survey", "preflight", res))
        missing = {f.sha256: f for f in files if f.sha256 not in facts["have"]}
        need = sum(f.size for f in missing.values())
        have_systemd = _preflight(target, manifest, prefix, facts, need, result)
        _check_listen(target, manifest, facts)
        adopt = _legacy_to_adopt(target, manifest, prefix, facts)
        result.skipped_bytes = sum(f.size for f in files if f.sha256 in facts["have"])
        result.previous_id = facts["current"] or (facts["legacy"]["current"] if adopt else None)
        s.done(detail=f"{len(missing)} of {len(files)} files to send ({need} bytes)"
                      + (f"; takes over {len(adopt)} release(s) of the single-service layout" if adopt else ""))
    if not facts["prepared"]:
        agent.call("prepare", [*slot.args(), *sudo], "prepare")
    agent_shas = {f.sha256 for f in agent_files}
    with step("upload") as s:
        # The agent's files reach the store from the agent folder (install --from): not sent twice.
        _upload(r, top, prefix, {k: v for k, v in missing.items() if k not in agent_shas}, result, hook)
        staging = layout.staging_dir(prefix)
        staged_manifest = f"{staging}/{bid}.manifest.json"
        staged_unit = f"{staging}/{bid}.{unit}"
        r.write_text((top / MANIFEST).read_text(), staged_manifest, "upload")   # its own bytes: a signature holds
        r.write_text(render_unit(manifest, prefix), staged_unit, "upload")
        for old_id, text in adopt.items():
            r.write_text(text, f"{staging}/{old_id}.{unit}", "upload")
        sig_args: list[str] = []
        if (top / signing.SIGNATURE).is_file():
            if facts.get("trust") is None:
                result.signed = True
                result.warnings.append("the bundle is signed, but its harness predates on-device signature checks: "
                                       "the device did not check the signature")
            else:
                staged_sig = f"{staged_manifest}.sig"
                r.put(top / signing.SIGNATURE, staged_sig, "upload")
                sig_args = ["--signature", staged_sig]
        s.done(detail=f"{result.uploaded_bytes} bytes sent, {result.skipped_bytes} already there")
    with step("install"):
        try:
            done = agent.call("install", [*slot.args(), "--manifest", staged_manifest, "--unit", staged_unit,
                                          *sig_args, "--selftest"], "install", timeout=max(step_timeout, 300),
                              tail=' --from "$A"')
        except DeployError:
            _clean_staging(r, prefix)
            raise
        result.signed, result.signed_by = bool(done.get("signed", result.signed)), done.get("signed_by")
    if result.previous_id == bid:
        result.warnings.append("this release was already current; restarting it")
    with step("activate"):
        args = [*slot.args(), "--release", bid, "--unit-dir", target.unit_dir, "--unit", unit, *sudo,
                "--health-timeout", f"{health_timeout:g}", "--keep", str(max(1, keep))]
        if result.previous_id:
            args += ["--protect", result.previous_id]
        args += [a for old_id in adopt for a in ("--adopt", old_id)]
        try:
            done = agent.call("activate", args, "activate", timeout=health_timeout + max(step_timeout, 60))
        except DeployError as failure:
            if failure.step in ("restart", "health", "activate"):
                _roll_back_after(r, target, slot, result.previous_id, health_timeout, failure, sudo, agent)
            raise
        result.warnings += done.get("warnings", [])
        if not have_systemd and not done.get("warnings"):
            result.warnings.append("systemd not found: the service was not restarted and no health gate ran")


def _send_agent(r: Remote, top: Path, prefix: str, facts: dict[str, Any], agent_id: str,
                agent_files: list[FileEntry], survey_args: list[str], result: DeployResult, hook: Hook | None):
    """Upload the harness and its libraries the store lacks beside the login user's home, check them,
    put them in place with the ones the store has, and run the agent's survey (one round trip)."""
    home = facts["home"]
    if not home.startswith("/"):
        raise DeployError(r.target.name, "preflight", f"the login user has no usable home folder ({home!r})")
    store = q(layout.store_dir(prefix))
    parts, copies = [], []
    for f in agent_files:
        if f.sha256 in facts["have"]:
            copies.append(f)
            continue
        part = f"{home}/.tvmbundle-agent-{agent_id}-{f.sha256[:16]}.part"
        r.put(top / f.path, part, "upload", timeout=max(r.step_timeout, f.size / 1e6))
        result.uploaded_bytes += f.size
        parts.append((f, part))
        if hook:
            hook("uploaded", f.path)
    checks = [(f, part) for f, part in parts] + [(f, f"{layout.store_dir(prefix)}/{f.sha256}") for f in copies]
    sums = " ".join(q(f"{f.sha256}  {path}") for f, path in checks)
    script = "; ".join([
        f"A={AGENT_HOME}{q(agent_id)}",
        (f"if ! printf '%s\\n' {sums} | sha256sum -c --quiet >/dev/null; then rm -f {' '.join(q(p) for _, p in parts)}; "
         "echo 'the agent arrived damaged' >&2; exit 9; fi"),
        'rm -rf "$A.new"', 'mkdir -p "$A.new/bin" "$A.new/lib"',
        *(f'mv -f {q(part)} "$A.new"/{q(f.path)}' for f, part in parts),
        *(f'{{ ln {store}/{q(f.sha256)} "$A.new"/{q(f.path)} 2>/dev/null || '
          f'cp {store}/{q(f.sha256)} "$A.new"/{q(f.path)}; }}' for f in copies),
        'chmod 0755 "$A.new/bin/tvm-deploy"', 'rm -rf "$A"', 'mv -T "$A.new" "$A"',
        f'exec "$A/bin/tvm-deploy" {shlex.join(["survey", *survey_args])}',
    ])
    res = r.sh(script, "upload", check=False)
    if res.code == 9:
        raise DeployError(r.target.name, "upload", "the harness arrived damaged (its SHA-256 does not match); "
                                                   "nothing was installed")
    return res


def _upload(r: Remote, top: Path, prefix: str, missing: dict[str, FileEntry], result: DeployResult,
            hook: Hook | None) -> None:
    staging = layout.staging_dir(prefix)
    try:
        for sha, f in sorted(missing.items(), key=lambda kv: kv[1].path):
            r.put(top / f.path, f"{staging}/{sha}.part", "upload", timeout=max(r.step_timeout, f.size / 1e6))
            result.uploaded_bytes += f.size
            if hook:
                hook("uploaded", f.path)
    except DeployError:
        # A full disk leaves a partial file behind: do not let it eat the space the running release needs.
        _clean_staging(r, prefix)
        raise


def _clean_staging(r: Remote, prefix: str) -> None:
    transport = r.conn.client.get_transport() if r.conn is not None else None
    if transport is not None and transport.is_active():
        try:
            staging = q(layout.staging_dir(prefix))
            r.sh(f"rm -f {staging}/*.part {staging}/*.manifest.json {staging}/*.manifest.json.sig {staging}/*.service",
                 "upload", check=False)
        except DeployError:
            pass


def _roll_back_after(r: Remote, target: Target, slot: Slot, previous: str | None,
                     health_timeout: float, failure: DeployError, sudo: list[str], fallback: _Agent) -> None:
    try:
        args = [*slot.args(), "--release", previous or "none", "--unit-dir", target.unit_dir, "--unit", slot.unit,
                *sudo, "--health-timeout", f"{health_timeout:g}"]
        # The previous release's own harness switches back to it (when it knows this layout); the new
        # agent otherwise.
        agent = _release_agent(r, slot, previous) if previous else fallback
        try:
            done = agent.call("activate", args, "rollback", timeout=health_timeout + 60)
            ok = done.get("healthy", True)
        except DeployError as e:
            if e.step != "health":
                raise
            ok = False
        if previous:
            state = f"the previous release {previous[:12]} is current again" + ("" if ok else " but NOT healthy")
        else:
            state = "there was no previous release: the service is stopped"
    except DeployError as e:
        state = f"rolling back failed too ({e.step}: {e.problem})"
    raise DeployError(target.name, failure.step, f"{failure.problem}; {state}", hint=failure.hint)


# A harness that has the device commands of this layout says so in its --help.
_CAPABLE = "grep -q -- '--name N'"


def _release_agent(r: Remote, slot: Slot, release: str) -> _Agent:
    """A release's own harness, or (a release installed by an older tvmbundle, whose harness lacks the
    device commands of this layout) the newest agent of the login user that has them."""
    own = q(f"{slot.release_dir(release)}/bin/tvm-deploy")
    setup = (f"A={own}; if ! \"$A\" --help 2>/dev/null | {_CAPABLE}; then for a in "
             f"$(ls -t {AGENT_HOME}*/bin/tvm-deploy 2>/dev/null); do if \"$a\" --help 2>/dev/null | {_CAPABLE}; "
             "then A=$a; break; fi; done; fi; ")
    return _Agent(r, '"$A"', setup)


def _any_agent(prefix: str) -> str:
    """Shell lines that find a harness with the device commands: the login user's newest agent, else a
    current release's (a device updated by Ansible or Mender has no agent folder), else the legacy
    layout's (an older harness: it answers for that layout only); the caller runs `"$A" ...`."""
    bundles = f"{q(prefix)}/bundles/*/current/bin/tvm-deploy"
    legacy = q(f"{layout.legacy_current(prefix)}/bin/tvm-deploy")
    return (f"A=; for a in $(ls -t {AGENT_HOME}*/bin/tvm-deploy 2>/dev/null) {bundles}; do "
            f"if [ -x \"$a\" ] && \"$a\" --help 2>/dev/null | {_CAPABLE}; then A=$a; break; fi; done; "
            f"if [ -z \"$A\" ] && [ -x {legacy} ] && {legacy} --help 2>/dev/null | grep -q ' survey '; then A={legacy}; fi; "
            'if [ -z "$A" ]; then echo \'{"ok": true, "command": "none", "no_agent": true}\'; exit 0; fi; ')


# --- status and rollback ------------------------------------------------------------------

def _statuses(target: Target, prefix: str, doc: dict[str, Any]) -> list[DeviceStatus]:
    def one(b: dict[str, Any], name: str | None, legacy: bool) -> DeviceStatus:
        return DeviceStatus(target.name, prefix, name, b.get("current"), b.get("releases", []),
                            b.get("service", "unknown"), bool(b.get("healthy")),
                            unit=b.get("unit") or (layout.LEGACY_UNIT if legacy else layout.unit_name(name or "")),
                            legacy=legacy, health_problem=b.get("health_problem", ""))

    if doc.get("no_agent"):
        return []
    if "bundles" not in doc:        # an older harness: the single-service layout only
        names = {x.get("name") for x in doc.get("releases", []) if x.get("current")}
        return [one(doc, next(iter(names), None), True)] if doc.get("releases") else []
    return [one(b, b.get("name"), b.get("layout") == "legacy") for b in doc["bundles"]]


def status(target: Target, *, name: str | None = None, prefix: str | None = None,
           step_timeout: float = 30.0) -> list[DeviceStatus]:
    """The device's bundles (or the one named), each with its releases, service state and health; one
    round trip."""
    prefix = check_prefix(prefix or target.prefix or "/opt/tvmbundle")
    with Remote(target, step_timeout=step_timeout) as r:
        doc = _Agent(r, '"$A"', _any_agent(prefix)).call("status", ["--prefix", prefix], "status")
    found = _statuses(target, prefix, doc)
    return [st for st in found if st.name == name] if name else found


def _pick(target: Target, found: list[DeviceStatus], name: str | None, step: str) -> DeviceStatus:
    names = ", ".join(sorted(f"{st.name}" for st in found)) or "none"
    if name:
        hits = [st for st in found if st.name == name]
        if not hits:
            raise DeployError(target.name, step, f"no bundle {name!r} on the device; it has: {names}")
        return next((st for st in hits if not st.legacy), hits[0])
    if len(found) == 1:
        return found[0]
    if not found:
        raise DeployError(target.name, step, "no bundle is installed on the device")
    raise DeployError(target.name, step, f"the device has {len(found)} bundles ({names}): say which with --name")


def rollback(target: Target, *, name: str | None = None, to: str | None = None, prefix: str | None = None,
             health_timeout: float = 30.0, step_timeout: float = 60.0,
             progress: Progress | None = None) -> DeployResult:
    """Switch bundle ``name`` (needed when the device has several) back to the newest kept release other
    than the current one (or to ``to``); its own unit comes back with it. Other bundles are not touched."""
    progress = progress or Progress(quiet=True)
    prefix = check_prefix(prefix or target.prefix or "/opt/tvmbundle")
    sudo = ["--sudo"] if target.sudo else []
    with Remote(target, step_timeout=step_timeout) as r:
        doc = _Agent(r, '"$A"', _any_agent(prefix)).call("status", ["--prefix", prefix], "rollback")
        st = _pick(target, _statuses(target, prefix, doc), name, "rollback")
        slot = Slot(prefix, None if st.legacy else st.name)
        current = st.current
        listing = [x["id"] for x in st.releases]
        candidates = [x for x in listing if x != current]
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
        args = [*slot.args(), "--release", chosen, "--unit-dir", target.unit_dir, "--unit", slot.unit, *sudo,
                "--health-timeout", f"{health_timeout:g}"]
        with step("activate"):
            try:
                done = _release_agent(r, slot, chosen).call("activate", args, "switch", timeout=health_timeout + 60)
                result.signed, result.signed_by = bool(done.get("signed")), done.get("signed_by")
            except DeployError as failure:
                if failure.step in ("restart", "health"):
                    fallback = _release_agent(r, slot, current or chosen)
                    _roll_back_after(r, target, slot, current, health_timeout, failure, sudo, fallback)
                raise
        result.round_trips = dict(r.calls)
    return result
