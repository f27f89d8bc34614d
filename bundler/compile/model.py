"""Compiling a prepared ONNX model with TVM (Relax) for the board, and its selftest vectors."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bundler import cache, proc
from bundler.build.toolchain import Toolchain
from bundler.compile.pipeline import board_target, pipeline
from bundler.compile.pipeline import identity as pipeline_identity
from bundler.compile.prepared import Prepared, TensorSpec
from bundler.config.recipe import Recipe, display_path
from bundler.errors import ModelError, RecipeError, last_line

log = logging.getLogger("tvmbundle")


def _tvm():
    # TVM takes about a second to import: only the steps that compile pay for it.
    import tvm
    from tvm.relax.frontend.onnx import from_onnx

    return tvm, from_onnx


def target_for(recipe: Recipe):
    tvm, _ = _tvm()
    try:
        return tvm.target.Target(recipe.target_dict())
    except Exception as e:  # TVM raises its own error types for a bad target
        raise RecipeError(recipe.origins.get("tvm.target", display_path(recipe.path)), "tvm.target",
                          f"TVM rejects {recipe.target_dict()}: {str(e).strip().splitlines()[-1]}") from None


def to_relax(prepared: Prepared, source: Path):
    """Import into Relax, naming the model file on failure."""
    _, from_onnx = _tvm()
    try:
        return from_onnx(prepared.load(), keep_params_in_input=False)
    except Exception as e:
        last = last_line(e)
        raise ModelError(f"{source}: TVM cannot import the model: {last}") from None


@dataclass(frozen=True)
class CompiledModel:
    path: Path          # model.so for the board
    cached: bool


def compile_for_board(prepared: Prepared, model_id: str, source: Path, recipe: Recipe, tc: Toolchain,
                      versions: dict[str, str], database=None, choice: str | None = None) -> CompiledModel:
    """``model_id`` is ``prepared.model_id`` (the prepared graph's sha256).

    ``database`` (a :class:`bundler.compile.tuning.Database`) supplies tuned schedules: the best record of
    each of the model's kernels it has (from any model); kernels it lacks get the default schedules.
    ``choice`` is what of it to apply (:meth:`~bundler.compile.tuning.Database.for_model`; default:
    what the model's whole-model check chose). The target carries the board's thread count (num-cores)."""
    applied = database.for_model(prepared, model_id, source, recipe, choice) if database else None
    key = cache.key("model", model_id, board_target(recipe), versions, tc.identity(),
                    {"tuning": applied.sha256 if applied else None, "pipeline": pipeline_identity()})

    def build(tmp: Path) -> dict[str, Any]:
        tvm, _ = _tvm()
        from bundler.compile import lowering  # imports TVM

        mod = to_relax(prepared, source)
        target_for(recipe)  # names the recipe when TVM rejects its target
        target = tvm.target.Target(board_target(recipe))
        try:
            ex = tvm.compile(mod, target=target,
                             relax_pipeline=pipeline(target, applied.path if applied else None,
                                                     applied.knobs if applied else None),
                             tir_pipeline=lowering.register())
        except Exception as e:
            raise ModelError(f"{source}: TVM failed to compile the model for {recipe.name}: "
                             f"{str(e).strip().splitlines()[-1]}") from None
        ex.export_library(str(tmp / "model.so"), fcompile=_linker(tc), workspace_dir=str(_workdir(tmp)))
        return {}

    entry = cache.get("model", key, build)
    return CompiledModel(entry.path / "model.so", entry.hit)


def _workdir(tmp: Path) -> Path:
    w = tmp / "objects"
    w.mkdir()
    return w


def _linker(tc: Toolchain):
    """An fcompile for export_library that links through our command wrapper.

    ``-s`` drops the debug info LLVM emits, which would carry the temporary
    build folder's path and make the library differ from build to build.
    """
    def fcompile(output: str, objects: list[str], options: list[str] | None = None, **_: Any) -> None:
        argv = [str(tc.cxx), "-shared", "-fPIC", "-s", "-o", output, *objects]
        if tc.sysroot:
            argv.append(f"--sysroot={tc.sysroot}")
        argv += [*tc.ldflags, *(options or [])]
        proc.run(argv, what="link the compiled model")
        # Objects are only inputs: drop them so nothing of them lands in the cache entry.
        for o in objects:
            Path(o).unlink(missing_ok=True)

    fcompile.output_format = "so"  # type: ignore[attr-defined]
    return fcompile


# --- selftest vectors -------------------------------------------------------------------

def make_inputs(specs: tuple[TensorSpec, ...], seed: int) -> list[np.ndarray]:
    """Seeded inputs: floats in [-1, 1), integers in [0, 10) (safe as indices), random booleans."""
    rng = np.random.default_rng(seed)
    out = []
    for s in specs:
        dt = np.dtype(s.dtype)
        if dt.kind == "f":
            out.append(rng.uniform(-1.0, 1.0, size=s.shape).astype(dt))
        elif dt.kind in "iu":
            out.append(rng.integers(0, 10, size=s.shape).astype(dt))
        elif dt.kind == "b":
            out.append(rng.integers(0, 2, size=s.shape).astype(bool))
        else:
            raise ModelError(f"input {s.name!r}: dtype {s.dtype} is not supported for selftest vectors")
    return out


@dataclass(frozen=True)
class Vectors:
    inputs: list[Path]
    expected: list[Path]
    reference: str       # what computed the expected outputs
    cached: bool


def selftest_vectors(prepared: Prepared, model_id: str, source: Path, seed: int,
                     versions: dict[str, str]) -> Vectors:
    """Inputs and the outputs of the same model compiled for and run on the build host."""
    key = cache.key("vectors", model_id, seed, versions)

    def build(tmp: Path) -> dict[str, Any]:
        tvm, _ = _tvm()
        from tvm import relax

        inputs = make_inputs(prepared.inputs, seed)
        mod = to_relax(prepared, source)
        ex = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm"}))
        vm = relax.VirtualMachine(ex, tvm.cpu())
        result = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
        outs = list(result) if not hasattr(result, "numpy") else [result]
        if len(outs) != len(prepared.outputs):
            raise ModelError(f"{source}: the compiled model returns {len(outs)} outputs, "
                             f"the ONNX graph declares {len(prepared.outputs)}")
        arrays = [o.numpy() for o in outs]
        for i, a in enumerate(inputs):
            np.save(tmp / f"input_{i}.npy", a)
        for i, (a, spec) in enumerate(zip(arrays, prepared.outputs)):
            if tuple(a.shape) != tuple(spec.shape) or str(a.dtype) != spec.dtype:
                raise ModelError(f"{source}: output {spec.name!r} is {a.dtype}{list(a.shape)} after "
                                 f"compilation, the graph says {spec.dtype}{list(spec.shape)}")
            np.save(tmp / f"expected_{i}.npy", a)
        return {"reference": f"apache-tvm {versions['apache-tvm']} on the build host (llvm)",
                "crosscheck": _crosscheck(prepared, inputs, arrays)}

    entry = cache.get("vectors", key, build)
    if entry.meta.get("crosscheck"):
        log.warning("%s: %s", source, entry.meta["crosscheck"])
    n_in, n_out = len(prepared.inputs), len(prepared.outputs)
    return Vectors([entry.path / f"input_{i}.npy" for i in range(n_in)],
                   [entry.path / f"expected_{i}.npy" for i in range(n_out)],
                   entry.meta["reference"], entry.hit)


def _crosscheck(prepared: Prepared, inputs: list[np.ndarray], outs: list[np.ndarray]) -> str:
    """Compare TVM's outputs with onnxruntime's where it is installed: a frontend bug shows here."""
    try:
        import onnxruntime as ort
    except ImportError:
        return ""
    try:
        sess = ort.InferenceSession(str(prepared.graph), providers=["CPUExecutionProvider"])
        ref = sess.run(None, {s.name: a for s, a in zip(prepared.inputs, inputs)})
    except Exception as e:  # onnxruntime may lack an op TVM has: not our verdict to give
        return f"onnxruntime could not run the model for a cross-check ({type(e).__name__})"
    for spec, a, r in zip(prepared.outputs, outs, ref):
        if a.dtype.kind == "f" and not np.allclose(a, r, rtol=1e-3, atol=1e-4):
            worst = float(np.max(np.abs(a.astype(np.float64) - r)))
            return f"TVM and onnxruntime disagree on output {spec.name!r} (max abs diff {worst:.3g})"
    return ""
