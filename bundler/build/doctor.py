"""What this machine lacks to build and verify bundles for a board."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from bundler import proc
from bundler.build import toolchain, tvmsource
from bundler.config.recipe import Recipe
from bundler.errors import UserError


@dataclass(frozen=True)
class Finding:
    what: str
    ok: bool
    detail: str
    install: str = ""   # the command that fixes it


def examine(r: Recipe) -> list[Finding]:
    out: list[Finding] = []
    apt_all = " ".join(r.toolchain.debian_packages)
    compilers = () if r.toolchain.yocto_sdk else (("toolchain.cc", r.toolchain.cc), ("toolchain.cxx", r.toolchain.cxx))
    for key, tool in compilers:
        p = proc.tool_path(tool)
        out.append(Finding(f"{key} {tool}", p is not None, str(p) if p else "not found",
                           "" if p else f"apt-get install {apt_all}" if apt_all else proc.install_hint(tool) or ""))
    if all(f.ok for f in out):
        try:
            tc = toolchain.resolve(r)
            out.append(Finding("compiler target", True, tc.machine))
        except UserError as e:
            out.append(Finding("compiler target", False, e.message))
    for what, path in (("sysroot", r.toolchain.sysroot), ("qemu -L prefix", r.ld_prefix)):
        if path:
            ok = Path(path).is_dir()
            out.append(Finding(f"{what} {path}", ok, "present" if ok else "missing",
                               "" if ok else f"apt-get install {apt_all}"))
    if r.qemu:
        p = proc.tool_path(r.qemu)
        out.append(Finding(f"emulator {r.qemu}", p is not None, str(p) if p else "not found (verify needs it)",
                           "" if p else "apt-get install qemu-user"))
    else:
        out.append(Finding("emulator", True, "not needed: the board runs natively here"))
    p = proc.tool_path("systemd-analyze")
    out.append(Finding("systemd-analyze", p is not None, str(p) if p else "not found (verify checks the unit with it)",
                       "" if p else "apt-get install systemd"))
    if r.runtime.source == "git":
        p = proc.tool_path("git")
        out.append(Finding("git (runtime.source = 'git')", p is not None, str(p) if p else "not found",
                           "" if p else "apt-get install git"))
    elif r.runtime.source != "wheel":
        problem = tvmsource.not_a_tree(Path(r.runtime.source).expanduser())
        out.append(Finding(f"TVM tree {r.runtime.source}", problem is None, problem or "present"))
    for name, fn in (("cmake", toolchain.cmake), ("ninja", toolchain.ninja)):
        try:
            path = fn()
            version = proc.run([path, "--version"]).stdout.splitlines()[0]
            out.append(Finding(name, True, f"{path} ({version})"))
        except UserError as e:
            out.append(Finding(name, False, "not found", getattr(e, "install", "") or ""))
    for dist in ("apache-tvm", "apache-tvm-ffi", "onnx", "numpy"):
        try:
            out.append(Finding(f"python package {dist}", True, md.version(dist)))
        except md.PackageNotFoundError:
            pin = "'apache-tvm==0.27.*'" if dist == "apache-tvm" else dist
            out.append(Finding(f"python package {dist}", False, "not installed", f"pip install {pin}"))
    if importlib.util.find_spec("onnxruntime") is None:
        out.append(Finding("python package onnxruntime", True,
                           "optional, not installed (cross-checks TVM's outputs when present)"))
    return out


def fix_commands(findings: list[Finding]) -> list[str]:
    """The distinct install commands, apt ones merged into one line."""
    apt: list[str] = []
    other: list[str] = []
    for f in findings:
        if f.ok or not f.install:
            continue
        if f.install.startswith("apt-get install "):
            apt += [p for p in f.install.split()[2:] if p not in apt]
        elif f.install not in other:
            other.append(f.install)
    return ([f"apt-get install -y {' '.join(apt)}"] if apt else []) + other
