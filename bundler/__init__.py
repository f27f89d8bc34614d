"""tvmbundle: ship models compiled with Apache TVM to embedded Linux boards.

The Python API::

    import bundler
    result = bundler.make("rpi4", "net.onnx")      # -> MakeResult(bundle=Path("dist/net-rpi4-....tar.gz"), ...)
    bundler.verify(result.bundle)                  # raises VerifyError listing every problem
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Imported on first use: `tvmbundle show` should not pay for numpy, onnx and TVM.
_LAZY = {
    "make": "api", "MakeResult": "api",
    "verify": "package.verifier", "Report": "package.verifier",
    "UserError": "errors",
    "Recipe": "config.recipe", "load_recipe": ("config.recipe", "load"),
}

__all__ = [*_LAZY, "__version__"]


def __getattr__(name: str) -> Any:
    where = _LAZY.get(name)
    if where is None:
        raise AttributeError(f"module 'bundler' has no attribute {name!r}")
    module, attr = (where, name) if isinstance(where, str) else where
    return getattr(importlib.import_module(f".{module}", __name__), attr)
