"""The board the benchmark scripts build for when they run the bundle here.

The shipped x86_64 board targets baseline x86-64 (SSE2), so that its bundles run on any x86-64
box; measured against onnxruntime, which picks this CPU's vector units at run time, the bundle
must use them too. Shared by scripts/bench-model and scripts/profile-model.
"""

from __future__ import annotations

from pathlib import Path


def write(folder: Path, threads: int) -> tuple[str, str]:
    """A recipe in ``folder``: the x86_64 board with mcpu set to this machine's CPU as LLVM names
    it, and ``threads`` service threads. Returns (its path, the CPU's name)."""
    import tvm

    cpu = tvm.get_global_func("tvm.codegen.llvm.GetHostCPUName")()
    board = folder / "host.toml"
    board.write_text(f'format = 1\nextends = "x86_64"\n[board]\nname = "this machine ({cpu})"\n'
                     f'[host_machine]\ncpu = "{cpu}"\n[tvm.target]\nmcpu = "{cpu}"\n'
                     f'[service]\nthreads = {threads}\n')
    return str(board), cpu
