"""Building the C++ deploy harness (``bin/tvm-deploy``) for the board with CMake."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path

from bundler import cache, proc
from bundler.errors import UserError
from bundler.build.runtime import Runtime
from bundler.build.toolchain import Toolchain, cmake, ninja

SOURCE_DIR = Path(__file__).resolve().parent / "harness_src"
BINARY = "tvm-deploy"


def ffi_include_dir() -> Path:
    """tvm-ffi's headers in the installed package, found without importing it: importing tvm_ffi
    imports torch when torch is installed (eight seconds here), and a warm make has no use for it."""
    spec = importlib.util.find_spec("tvm_ffi")
    for location in (spec.submodule_search_locations or []) if spec else []:
        include = Path(location) / "include"
        if (include / "tvm" / "ffi").is_dir():
            return include
    raise UserError("the tvm-ffi headers are missing from the installed apache-tvm-ffi package",
                    hint="pip install --force-reinstall 'apache-tvm-ffi>=0.1.14,<0.1.15'")


@dataclass(frozen=True)
class Harness:
    path: Path
    cached: bool


def build(tc: Toolchain, rt: Runtime, options: dict[str, str] | None = None) -> Harness:
    """Cross-build the harness against the board's runtime; cached by sources, toolchain and runtime.

    ``options`` are extra CMake cache settings (e.g. ``{"TVMBUNDLE_SANITIZE": "address"}`` for tests).
    """
    options = dict(options or {})
    include_dir = rt.include_dir or ffi_include_dir()
    headers = cache.sha256_tree(rt.include_dir) if rt.include_dir else md.version("apache-tvm-ffi")
    key = cache.key("harness", cache.sha256_tree(SOURCE_DIR), tc.identity(), options,
                    {"runtime": [cache.sha256_file(p) for p in rt.libs]}, {"tvm-ffi headers": headers})

    def do_build(tmp: Path) -> dict[str, object]:
        build_dir = tmp / "build"
        build_dir.mkdir()
        toolchain_file = tc.cmake_toolchain_file(tmp / "toolchain.cmake")
        proc.run([cmake(), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja()}", "-S", str(SOURCE_DIR),
                  "-B", str(build_dir), f"-DCMAKE_TOOLCHAIN_FILE={toolchain_file}",
                  "-DCMAKE_BUILD_TYPE=Release", f"-DTVM_FFI_INCLUDE_DIR={include_dir}",
                  f"-DTVM_RUNTIME_LIB_DIR={rt.lib_dir}",
                  *(f"-D{k}={v}" for k, v in sorted(options.items()))],
                 what="configure the deploy harness")
        proc.run([cmake(), "--build", str(build_dir)], what="build the deploy harness")
        (tmp / BINARY).write_bytes((build_dir / BINARY).read_bytes())
        (tmp / BINARY).chmod(0o755)
        shutil.rmtree(build_dir)
        return {}

    entry = cache.get("harness", key, do_build)
    return Harness(entry.path / BINARY, entry.hit)
