"""What tuning's builder processes run: kept free of the rest of tvmbundle, so a worker imports
only TVM (and this module and bundler.compile.lowering, which import nothing else) and keeps
working while tvmbundle itself is being edited or upgraded.
"""

from __future__ import annotations

import os
import signal
import tempfile


def init_worker(threads: int | None) -> None:
    """Run in each builder and runner worker process as it starts (see tuning.ignore_sigint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if threads:
        os.environ["TVM_NUM_THREADS"] = str(threads)


def build(f_export, mod, target) -> str:
    """Build one candidate: MetaSchedule's default build without its import of every tensor
    intrinsic TVM has (tens of seconds per worker, mostly CUDA's, and none needed here: a
    candidate arrives scheduled and tensorized already). Returns the artifact's path."""
    from tvm.driver import build as tvm_build
    from tvm.s_tir.meta_schedule.builder.local_builder import default_export
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    from bundler.compile import lowering

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return (f_export or default_export)(tvm_build(mod, target=target, pipeline=lowering.register()))


def cross_export(cxx: str, options: list[str], mod) -> str:
    """Export for a foreign board: link the candidate into a shared library with the board's
    compiler, since the board has no linker of its own."""
    from tvm.support import cc

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, fcompile=cc.cross_compiler(cxx, options=options))
    return path
