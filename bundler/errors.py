"""The one family of user-facing errors.

Everything a user can fix (a bad recipe, a missing tool, a model TVM cannot
import, a bundle that fails verification) is a :class:`UserError`.  The CLI
maps it to exit code 2 and prints only its message; anything else is a bug and
gets a traceback and exit code 1 (the kas convention).  Library code raises,
it never exits.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Iterable


class UserError(Exception):
    """An error the user can act on. ``str(err)`` is the whole message."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if not hint else f"{message}\n  hint: {hint}")


class RecipeError(UserError):
    """A recipe (or inventory) file that does not follow its schema.

    Rendered as ``FILE: KEY.PATH: what is wrong`` so that an editor or a CI log
    points straight at the line to change (meson cross files, conan profiles).
    """

    def __init__(self, file: str, key: str, problem: str, *, hint: str | None = None):
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(where + problem, hint=hint)


class ToolMissing(UserError):
    """A program the step needs is not installed."""

    def __init__(self, tool: str, install: str | None, why: str = ""):
        self.tool = tool
        self.install = install
        msg = f"required tool not found: {tool}"
        if why:
            msg += f" (needed to {why})"
        super().__init__(msg, hint=f"install it with: {install}" if install else None)


class CommandFailed(UserError):
    """An external command exited non-zero; carries the tail of its output."""

    def __init__(self, argv: list[str], returncode: int, tail: str, cwd: str | None = None,
                 what: str | None = None):
        self.argv = argv
        self.returncode = returncode
        self.tail = tail
        head = f"{what} failed" if what else "command failed"
        msg = f"{head} (exit code {returncode}): {shlex.join(str(a) for a in argv)}"
        if cwd:
            msg += f"\n  in: {cwd}"
        if tail.strip():
            msg += "\n  last lines of output:\n" + "\n".join("    " + line for line in tail.rstrip().splitlines())
        super().__init__(msg)


class ModelError(UserError):
    """The model cannot be imported or compiled as given."""


class VerifyError(UserError):
    """A bundle failed one or more verification checks."""

    def __init__(self, bundle: str, failures: list[str]):
        self.bundle = bundle
        self.failures = failures
        lines = "\n".join(f"  - {f}" for f in failures)
        super().__init__(f"{bundle}: verification failed ({len(failures)} problem(s)):\n{lines}")


class DeployError(UserError):
    """A step of installing onto a device failed; names the host and the step."""

    def __init__(self, host: str, step: str, problem: str, *, hint: str | None = None):
        self.host = host
        self.step = step
        self.problem = problem
        super().__init__(f"{host}: {step}: {problem}", hint=hint)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def one_of(choices: Iterable[str]) -> str:
    """'one of: a, b, c' with the choices sorted for stable messages."""
    return "one of: " + ", ".join(sorted(choices))


# The exit codes, one place for every command: a user error carries its own (2).
EXIT_OK, EXIT_BUG, EXIT_USER, EXIT_INTERRUPT = 0, 1, 2, 130


def last_line(e: BaseException, limit: int | None = None) -> str:
    """The last line of an error from a library (TVM's and ONNX's put their message there, below
    their own tracebacks), or its type's name when it says nothing; at most ``limit`` characters."""
    text = str(e).strip()
    return (text.splitlines()[-1] if text else type(e).__name__)[:limit]
