"""The ``tvmbundle`` commands, one module each, in the order ``--help`` lists them.

Each module has ``register(subparsers)``, which adds its parser and sets ``func`` to its
``run(args) -> exit code``, as tvmc's ``register_parser`` does. Commands are thin: they parse,
call the typed API of their stage and print. The parser needs every module, so a module imports
its stage (onnx, numpy, fabric: most of a second in all) inside ``run``, and ``tvmbundle boards``
or a warm ``make`` pays only for what it uses.
"""

from bundler.commands import (
                              bench,
                              boards,
                              cache,
                              deploy,
                              doctor,
                              export,
                              make,
                              rollback,
                              rollout,
                              show,
                              sign,
                              status,
                              trust,
                              tune,
                              verify,
)

COMMANDS = (boards, show, doctor, make, tune, bench, verify, sign, trust, deploy, status, rollback, rollout, cache, export)
