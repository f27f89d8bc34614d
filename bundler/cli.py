"""The ``tvmbundle`` command: a thin layer over the typed API, one module per command in
:mod:`bundler.commands`.

Exit codes, in this one place: 0 success, 2 a user error (bad input, missing
tool, failed verification), 1 a bug (with its traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bundler import __version__
from bundler.commands import COMMANDS
from bundler.errors import EXIT_INTERRUPT, EXIT_USER, UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tvmbundle", description="Ship TVM-compiled models to embedded Linux boards.")
    p.add_argument("--version", action="version", version=f"tvmbundle {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log every external command as `cwd$ cmd`")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in COMMANDS:
        command.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse exits on --help and on usage errors
        return int(e.code or 0) if e.code in (0, None) else EXIT_USER
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr, force=True)
    try:
        return args.func(args)
    except UserError as e:
        print(f"tvmbundle: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("tvmbundle: interrupted", file=sys.stderr)
        return EXIT_INTERRUPT


def entry_point() -> None:
    sys.exit(main())
