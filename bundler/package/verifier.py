"""Checking a bundle before it ships.

Static checks first (manifest checksums, every ELF's machine and glibc /
libstdc++ needs against the board's floor, every NEEDED library resolvable on
the board), then the bundle's own ``selftest`` and ``info`` run under
qemu-user for foreign boards or natively.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bundler import cache, proc
from bundler.build import elf
from bundler.build.toolchain import read_yocto_sdk
from bundler.config import cpu
from bundler.config import recipe as recipe_mod
from bundler.errors import UserError, VerifyError, one_of
from bundler.package import bundle as bundle_mod
from bundler.package import layout, signing
from bundler.package.manifest import MANIFEST, Manifest
from bundler.package.service import render_unit
from bundler.progress import Progress

# Part of every verification record's key: a change to what verify checks re-verifies bundles.
VERIFIER_VERSION = 2


@dataclass(frozen=True)
class BoardFacts:
    """What verification needs to know about the board, from a recipe or from the manifest."""

    name: str
    machine: str
    bits: int
    float_abi: str | None
    glibc: str
    glibcxx: str | None
    base_libs: tuple[str, ...]
    qemu: str              # "" to run natively
    sysroot: str

    @classmethod
    def from_recipe(cls, r: recipe_mod.Recipe) -> BoardFacts:
        ld_prefix = r.ld_prefix
        if r.toolchain.yocto_sdk and r.qemu and r.origins.get("verify.ld_prefix") == "derived":
            # The SDK's target sysroot holds the board's own loader and libraries: run against those.
            sdk = read_yocto_sdk(r.toolchain.yocto_sdk, r.file_of("toolchain.yocto_sdk"))
            ld_prefix = str(sdk.sysroot or ld_prefix)
        return cls(r.name, r.machine.elf_machine, r.machine.bits, r.machine.float_abi, r.machine.glibc,
                   r.machine.glibcxx, r.machine.base_libs, r.qemu, ld_prefix)


@dataclass
class Report:
    bundle: str
    board: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)   # (check, passed, detail)
    info: dict[str, Any] = field(default_factory=dict)
    selftest: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        return [f"{name}: {detail}" for name, ok, detail in self.checks if not ok]

    @property
    def ok(self) -> bool:
        return not self.failures

    def add(self, name: str, problems: list[str], passed_detail: str = "") -> None:
        if problems:
            for p in problems:
                self.checks.append((name, False, p))
        else:
            self.checks.append((name, True, passed_detail))


def board_for(manifest: Manifest, board: str | recipe_mod.Recipe | None) -> BoardFacts:
    if isinstance(board, recipe_mod.Recipe):
        return BoardFacts.from_recipe(board)
    name = board or manifest.board.name
    try:
        return BoardFacts.from_recipe(recipe_mod.load(name))
    except UserError:
        if board:       # the user named a board that does not load: say so
            raise
    # The bundle's own record of its board: enough for every check; qemu and sysroot by convention.
    b = manifest.board
    f = cpu.FAMILIES.get(b.cpu_family)
    if f is None:
        raise UserError(f"{manifest.name}: {MANIFEST}: board.cpu_family: {b.cpu_family!r} is not allowed; "
                        f"expected {one_of(cpu.FAMILIES)}")
    native = b.cpu_family == recipe_mod.host_cpu_family()
    return BoardFacts(b.name, f.elf_machine, f.bits, b.float_abi, b.glibc, b.glibcxx,
                      b.base_libs or recipe_mod.BASE_LIBS, "" if native else f.qemu,
                      "" if native else f"/usr/{b.triple}")


def verify(bundle_path: Path | str, *, board: str | recipe_mod.Recipe | None = None, run: bool = True,
           progress: Progress | None = None, reverify: bool = False, trust: Sequence[Path] = ()) -> Report:
    """Verify a bundle tarball; raises VerifyError listing every problem found.

    A bundle whose exact bytes passed every check (selftest included) for the same board facts,
    qemu and sysroot is not checked again unless ``reverify``: the record is a cache entry.

    With ``trust`` (public key files), the manifest must carry a valid signature by one of them.
    """
    progress = progress or Progress(quiet=True)
    bundle_path = Path(bundle_path)
    if not bundle_path.is_file():
        raise UserError(f"bundle not found: {bundle_path}")
    record = None
    if run and isinstance(board, recipe_mod.Recipe) and not trust:
        # Only a recipe gives the board facts without unpacking: verify BUNDLE re-checks by default.
        facts = BoardFacts.from_recipe(board)
        record = _record_key(bundle_path, facts)
        if not reverify:
            earlier = cache.lookup("verified", record)
            if earlier is not None:
                saved = earlier.meta["report"]
                report = Report(str(bundle_path), facts.name, [tuple(c) for c in saved["checks"]],
                                saved["info"], saved["selftest"])
                progress.note(f"{bundle_path.name} was verified for {facts.name} before (same bytes, board, "
                              "qemu and sysroot): not run again (--reverify runs it)")
                return report
    with tempfile.TemporaryDirectory(prefix="tvmbundle-verify-") as tmp:
        top = bundle_mod.extract(bundle_path, Path(tmp))
        manifest = bundle_mod.load_manifest(top, str(bundle_path))
        facts = board_for(manifest, board)
        report = Report(str(bundle_path), facts.name)
        if trust:
            signer = signing.check_release(top, trust, str(bundle_path))   # before anything else is read
            report.add("signature", [], f"signed by {signer.fingerprint} ({signer.key})")
        with progress.step(f"check files of {bundle_path.name}") as s:
            report.add("files", check_files(top, manifest))
            report.add("elf", check_elves(top, facts))
            report.add("libraries", check_needed(top, facts))
            report.add("unit", check_unit(top, manifest, Path(tmp)))
            s.done(detail="ok" if report.ok else f"{len(report.failures)} problem(s)")
        if run and report.ok:
            with progress.step(f"run the selftest {'under ' + facts.qemu if facts.qemu else 'natively'}") as s:
                run_harness(top, facts, report)
                s.done(detail=_selftest_summary(report.selftest))
        elif run:
            report.checks.append(("selftest", True, "not run: the static checks failed"))
    if not report.ok:
        raise VerifyError(str(bundle_path), report.failures)
    if record is not None:
        saved = {"checks": report.checks, "info": report.info, "selftest": report.selftest}
        cache.get("verified", record, lambda _tmp: {"report": saved})
    return report


def _record_key(bundle_path: Path, facts: BoardFacts) -> str:
    """What a verification depends on: the bundle's bytes, the board facts, and the identity of the
    qemu and sysroot it ran with (path, size and time of change; no program is run for it)."""
    def stamp(path: str) -> list[Any]:
        if not path:
            return []
        st = os.stat(path) if os.path.exists(path) else None
        return [path, st.st_size if st else None, st.st_mtime_ns if st else None]
    qemu = shutil.which(facts.qemu) if facts.qemu else ""
    return cache.key("verified", cache.sha256_file(bundle_path), dataclasses.asdict(facts), stamp(qemu or ""),
                     stamp(facts.sysroot), {"verifier": VERIFIER_VERSION})


def check_files(top: Path, manifest: Manifest) -> list[str]:
    """Every listed file present with its size, sha256 and mode; nothing unlisted. The manifest's
    paths were checked to stay inside the release when it loaded."""
    problems = []
    listed = {}
    for entry in manifest.files:
        rel = entry.path
        listed[rel] = entry
        p = top / rel
        if p.is_symlink() or not p.is_file():
            problems.append(f"{rel}: listed in the manifest but missing (or not a regular file)")
            continue
        if p.stat().st_size != entry.size:
            problems.append(f"{rel}: size {p.stat().st_size} differs from the manifest's {entry.size}")
        elif cache.sha256_file(p) != entry.sha256:
            problems.append(f"{rel}: sha256 differs from the manifest (the file was changed)")
        mode = "0755" if os.access(p, os.X_OK) else "0644"
        if mode != entry.mode:
            problems.append(f"{rel}: mode {mode} differs from the manifest's {entry.mode}")
    for p in sorted(top.rglob("*")):
        rel = p.relative_to(top).as_posix()
        if p.is_file() and rel not in (bundle_mod.MANIFEST, signing.SIGNATURE) and rel not in listed:
            problems.append(f"{rel}: present but not listed in the manifest")
    return problems


def check_unit(top: Path, manifest: Manifest, work: Path) -> list[str]:
    """`systemd-analyze verify` on the bundle's rendered unit, offline, in a root that has the unit,
    its ExecStart program and the host's system units; any output on stderr is a problem, since
    systemd only warns about keys it does not know."""
    analyze = proc.which("systemd-analyze", why="check the bundle's systemd unit")
    root = work / "unit-root"
    unit = layout.unit_name(manifest.name)
    exe = root / layout.current(manifest.install.prefix, manifest.name).strip("/") / "bin" / "tvm-deploy"
    exe.parent.mkdir(parents=True)
    shutil.copyfile(top / "bin" / "tvm-deploy", exe)
    exe.chmod(0o755)
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / unit).write_text(render_unit(manifest))
    for system in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if system.is_dir() and not system.is_symlink():
            shutil.copytree(system, root / "usr" / "lib" / "systemd" / "system", symlinks=True, dirs_exist_ok=True)
            break
    res = proc.run([analyze, "verify", f"--root={root}", f"/etc/systemd/system/{unit}"], check=False, timeout=120)
    err = (res.stderr or "").strip()
    if res.returncode != 0 or err:
        return [f"{unit}: systemd-analyze verify: {_last(err or res.stdout)}"]
    return []


def _elves(top: Path) -> list[tuple[str, elf.ElfInfo]]:
    out = []
    for p in sorted(top.rglob("*")):
        if p.is_file() and elf.is_elf(p):
            info = elf.inspect(p)
            out.append((p.relative_to(top).as_posix(), info))
    return out


def check_elves(top: Path, facts: BoardFacts) -> list[str]:
    problems = []
    for rel, info in _elves(top):
        info = _renamed(info, rel)
        problems += elf.check_compat(info, machine=facts.machine, bits=facts.bits, float_abi=facts.float_abi,
                                     glibc=facts.glibc, glibcxx=facts.glibcxx)
    return problems


def _renamed(info: elf.ElfInfo, rel: str) -> elf.ElfInfo:
    return dataclasses.replace(info, path=rel)


def check_needed(top: Path, facts: BoardFacts) -> list[str]:
    bundled = {p.name for p in (top / "lib").glob("*")} if (top / "lib").is_dir() else set()
    problems = []
    for rel, info in _elves(top):
        for lib in info.needed:
            if lib not in bundled and lib not in facts.base_libs:
                problems.append(f"{rel}: needs {lib}, which is neither in the bundle's lib/ nor in the "
                                f"{facts.name} base system")
    return problems


def harness_argv(top: Path, facts: BoardFacts, *args: str) -> list[str]:
    exe = str(top / "bin" / "tvm-deploy")
    if not facts.qemu:
        return [exe, *args]
    qemu = proc.which(facts.qemu, why=f"run {facts.name} programs on this machine")
    argv = [qemu]
    if facts.sysroot:
        argv += ["-L", facts.sysroot]
    return [*argv, exe, *args]


def run_harness(top: Path, facts: BoardFacts, report: Report) -> None:
    info = proc.run(harness_argv(top, facts, "info", "--json"), check=False, timeout=600)
    if info.returncode != 0:
        report.add("info", [f"`tvm-deploy info` exited {info.returncode}: {_last(info.stderr or info.stdout)}"])
        return
    try:
        report.info = json.loads(info.stdout)
        report.add("info", [], f"bundle {report.info.get('bundle_id', '?')[:12]}")
    except ValueError:
        report.add("info", [f"`tvm-deploy info --json` printed no JSON: {_last(info.stdout)}"])
    st = proc.run(harness_argv(top, facts, "selftest", "--json"), check=False, timeout=1800)
    try:
        report.selftest = json.loads(st.stdout)
    except ValueError:
        report.selftest = {}
    if st.returncode != 0:
        report.add("selftest", [f"`tvm-deploy selftest` exited {st.returncode}: "
                                f"{_last(st.stderr) or _selftest_summary(report.selftest)}"])
    else:
        report.add("selftest", [], _selftest_summary(report.selftest))


def _selftest_summary(st: Mapping[str, Any]) -> str:
    outs = st.get("outputs") or []
    if not outs:
        return ""
    worst = max((o.get("max_abs_diff", 0.0) or 0.0) for o in outs)
    return f"{len(outs)} output(s) within tolerance, worst abs diff {worst:.3g}" if st.get("passed") else \
        f"worst abs diff {worst:.3g}"


def _last(text: str, n: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-n:])
