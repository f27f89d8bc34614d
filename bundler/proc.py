"""The one way this project runs an external program.

argv lists only (never a shell string), the command is logged as ``cwd$ cmd``
before it runs, a missing program becomes a :class:`ToolMissing` with the
install command, and a failure becomes a :class:`CommandFailed` carrying the
tail of the program's output (kas ``run_cmd``, invoke's ``UnexpectedExit``).
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler.errors import CommandFailed, ToolMissing

log = logging.getLogger("tvmbundle.cmd")

TAIL_LINES = 25

# Where a program comes from on Debian, so a missing one gets an exact command.
_DEBIAN_PACKAGES = {
    "cmake": "pip install 'cmake>=3.26'",
    "ninja": "pip install ninja",
    "file": "apt-get install file",
    "readelf": "apt-get install binutils",
    "ssh-keygen": "apt-get install openssh-client",
    "sshd": "apt-get install openssh-server",
    "systemd-analyze": "apt-get install systemd",
    "dpkg-deb": "apt-get install dpkg",
}


def install_hint(tool: str) -> str | None:
    """The command that installs ``tool`` on Debian, where we know it."""
    name = os.path.basename(tool)
    if name in _DEBIAN_PACKAGES:
        return _DEBIAN_PACKAGES[name]
    if name.startswith("qemu-"):
        return "apt-get install qemu-user"
    for suffix, pkg in (("-g++", "g++"), ("-gcc", "gcc"), ("-strip", "binutils"), ("-readelf", "binutils")):
        if name.endswith(suffix) and name.count("-") >= 3:
            triple = name[: -len(suffix)]
            return f"apt-get install {pkg}-{triple}"
    return None


def format_argv(argv: Sequence[str]) -> str:
    return " ".join(shlex.quote(str(a)) for a in argv)


def which(tool: str, why: str = "", install: str | None = None) -> str:
    """Absolute path of ``tool`` or a ToolMissing that says how to install it."""
    found = shutil.which(tool)
    if not found:
        raise ToolMissing(tool, install or install_hint(tool), why)
    return found


@dataclass(frozen=True)
class Result:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def _prepare(argv: Sequence[str | os.PathLike], cwd: str | os.PathLike | None, what: str | None,
             install: str | None) -> tuple[list[str], str, str]:
    """(argv as strings, the program's path, the folder it runs in), logged as ``cwd$ cmd``;
    a missing program is a ToolMissing with its install command."""
    args = [os.fspath(a) for a in argv]
    if not args:
        raise ValueError("empty argv")
    exe = args[0]
    if os.sep not in exe:
        exe = which(exe, why=what or "", install=install)
    elif not os.path.exists(exe):
        raise ToolMissing(args[0], install or install_hint(args[0]), what or "")
    where = os.fspath(cwd) if cwd else os.getcwd()
    log.info("%s$ %s", where, format_argv(args))
    return args, exe, where


def run(
    argv: Sequence[str | os.PathLike],
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    check: bool = True,
    timeout: float | None = None,
    what: str | None = None,
    input: str | None = None,
    install: str | None = None,
) -> Result:
    """Run ``argv``; capture its output; raise CommandFailed on failure.

    ``what`` names the step for the error message ("cross-compile the harness").
    ``env`` is merged over os.environ.
    """
    args, exe, where = _prepare(argv, cwd, what, install)
    full_env = None
    if env:
        full_env = dict(os.environ)
        full_env.update(env)
    try:
        proc = subprocess.run(
            [exe, *args[1:]],
            cwd=cwd,
            env=full_env,
            input=input,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as e:
        out = (e.stderr or e.stdout or "")
        if isinstance(out, bytes):
            out = out.decode(errors="replace")
        raise CommandFailed(args, -1, tail(out) + f"\n(timed out after {timeout:g} s)", where, what) from None
    result = Result(args, proc.returncode, proc.stdout, proc.stderr)
    if check and proc.returncode != 0:
        raise CommandFailed(args, proc.returncode, tail(proc.stderr or proc.stdout), where, what)
    return result


def stream(
    argv: Sequence[str | os.PathLike],
    on_line: Callable[[str], None],
    *,
    cwd: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
    install: str | None = None,
    failure: Callable[[str], str] | None = None,
) -> Result:
    """Like :func:`run`, for long builds: each output line (stdout and stderr merged) goes to
    ``on_line`` as it comes.  ``failure`` turns the whole output into the message of a failure
    (a build tool knows which lines name the failing command); the default is the tail."""
    args, exe, where = _prepare(argv, cwd, what, install)
    full_env = dict(os.environ)
    full_env.update(env or {})
    lines: list[str] = []
    with subprocess.Popen([exe, *args[1:]], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace") as p:
        assert p.stdout is not None
        try:
            for line in p.stdout:
                line = line.rstrip("\n")
                lines.append(line)
                on_line(line)
        except BaseException:       # Ctrl-C: do not leave a compiler farm running
            p.kill()
            raise
        code = p.wait()
    out = "\n".join(lines)
    if code != 0:
        raise CommandFailed(args, code, failure(out) if failure else tail(out), where, what)
    return Result(args, code, out, "")


def tail(text: str, n: int = TAIL_LINES) -> str:
    """The last ``n`` lines, preceded by the first error lines when they scrolled out of the tail
    (a compiler's first error is the one to read; its notes fill the end of the output)."""
    lines = text.rstrip().splitlines()
    tail = lines[-n:]
    first_errors = [line for line in lines[:-n] if "error:" in line or "Error" in line][:3]
    if first_errors:
        return "\n".join([*first_errors, "...", *tail])
    return "\n".join(tail)


def tool_path(path_or_name: str) -> Path | None:
    """Resolve a tool given as a name on PATH or as a path; None when absent."""
    if os.sep in path_or_name:
        p = Path(path_or_name)
        return p if p.exists() else None
    found = shutil.which(path_or_name)
    return Path(found) if found else None
