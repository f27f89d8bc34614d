"""A model's signature, its inputs and outputs, and the command line's way of fixing an input's
shape: what every stage after preparation needs to know about a model, without onnx."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bundler.errors import UserError


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: its name, numpy dtype name and static shape."""

    name: str
    dtype: str              # numpy dtype name: "float32", "int64", "uint8", "bool", ...
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TensorSpec:
        return cls(str(d["name"]), str(d["dtype"]), tuple(int(x) for x in d["shape"]))


_SHAPE_FORM = "expected NAME=D0,D1,... with positive integer dims, e.g. input=1,3,224,224"


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"x=1,3,224,224"`` -> ``("x", (1, 3, 224, 224))``, for ``--input-shape``.

    The name is everything before the last ``=`` (ONNX names may hold ``:``, ``/``, ``.``).
    """
    name, eq, dims = text.rpartition("=")
    name = name.strip()
    if not eq:
        problem = "no '='"
    elif not name:
        problem = "no input name before '='"
    elif not dims.strip():
        problem = "no dims after '='"
    else:
        bad = [d.strip() for d in dims.split(",") if not (re.fullmatch(r"[0-9]+", d.strip()) and int(d) > 0)]
        problem = f"{bad[0]!r} is not a positive integer" if bad else ""
    if problem:
        raise UserError(f"--input-shape {text!r}: {problem}; {_SHAPE_FORM}")
    return name, tuple(int(d) for d in dims.split(","))
