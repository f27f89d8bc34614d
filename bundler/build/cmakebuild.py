"""Cross-building a CMake project for the board: TVM's runtime, tvm-ffi, our harness.

The project's own build lists do the work; this module only describes the board
to CMake (a toolchain file generated from the recipe), picks the size or speed
flags, drives Ninja with live progress, and on failure reports the command that
failed with its first errors rather than the last screenful of a parallel build.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bundler import proc
from bundler.build.toolchain import Toolchain, cmake, ninja
from bundler.config import cpu
from bundler.progress import Step

OPTIMIZE = ("size", "speed")
_STATUS = re.compile(r"^\[(\d+)/(\d+)\] (.*)$")


@dataclass(frozen=True)
class Flags:
    """What a build's objects depend on beyond the toolchain: part of the cache key."""

    build_type: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    ipo: bool
    libs: tuple[str, ...]        # appended to every link line (after the objects)

    def key(self) -> dict[str, object]:
        return {"build_type": self.build_type, "cflags": list(self.cflags), "ldflags": list(self.ldflags),
                "ipo": self.ipo, "libs": list(self.libs)}


def flags_for(tc: Toolchain, cpu_family: str, optimize: str = "size") -> Flags:
    """Size: -Os, one section per function and object so the linker can drop what nothing uses, and
    LTO; speed: -O2 (CMake's Release).  Outputs are stripped (-s keeps the dynamic symbols)."""
    if optimize not in OPTIMIZE:
        raise ValueError(optimize)
    cflags: list[str] = []
    ldflags: list[str] = ["-s"]
    if optimize == "size":
        cflags += ["-ffunction-sections", "-fdata-sections"]
        ldflags += ["-Wl,--gc-sections", "-Wl,-O1"]
    if cpu_family == "arm":
        cflags.append("-Wno-psabi")      # GCC's note on a 2017 ABI change, once per std::vector use
    # RISC-V has no native sub-word atomics: GCC calls libatomic, which is not linked by default.
    libs = cpu.FAMILIES[cpu_family].extra_libs
    return Flags(build_type="MinSizeRel" if optimize == "size" else "Release", cflags=tuple(cflags),
                 ldflags=tuple(ldflags), ipo=optimize == "size", libs=libs)


def build(source: Path, build_dir: Path, tc: Toolchain, flags: Flags, *, targets: Sequence[str],
          options: Mapping[str, str] | None = None, config_cmake: str | None = None,
          step: Step | None = None, what: str = "build") -> None:
    """Configure ``source`` for the board in ``build_dir`` and build ``targets`` with Ninja.

    ``options`` become ``-D`` cache settings.  ``config_cmake`` is written to
    ``build_dir/config.cmake`` for projects (like TVM) whose build lists read that file:
    its ``set()`` lines win over ``-D`` options, so the options TVM reads go there.
    """
    build_dir.mkdir(parents=True, exist_ok=True)
    toolchain_file = tc.cmake_toolchain_file(build_dir / "tvmbundle-toolchain.cmake",
                                             extra_cflags=flags.cflags, extra_ldflags=flags.ldflags)
    if config_cmake is not None:
        (build_dir / "config.cmake").write_text(config_cmake)
    defs = {
        "CMAKE_TOOLCHAIN_FILE": str(toolchain_file),
        "CMAKE_MAKE_PROGRAM": ninja(),
        "CMAKE_BUILD_TYPE": flags.build_type,
        "CMAKE_INTERPROCEDURAL_OPTIMIZATION": "ON" if flags.ipo else "OFF",
        "CMAKE_POLICY_DEFAULT_CMP0069": "NEW",   # let IPO apply to projects declaring an older minimum
        "CMAKE_C_STANDARD_LIBRARIES": " ".join(flags.libs),
        "CMAKE_CXX_STANDARD_LIBRARIES": " ".join(flags.libs),
        **(options or {}),
    }
    if step:
        step.update("configuring")
    proc.run([cmake(), "-G", "Ninja", "-S", str(source), "-B", str(build_dir),
              *(f"-D{k}={v}" for k, v in defs.items())], what=f"configure {what}")

    def on_line(line: str) -> None:
        m = _STATUS.match(line)
        if m and step:
            done, total = int(m[1]), int(m[2])
            step.update(f"[{done}/{total}] {_short(m[3])}", done / total if total else None)

    proc.stream([ninja(), "-C", str(build_dir), *targets], on_line, env={"NINJA_STATUS": "[%f/%t] "},
                what=what, failure=ninja_failure)


def _short(action: str) -> str:
    # "Building CXX object CMakeFiles/tvm_runtime_objs.dir/src/runtime/vm/vm.cc.o" -> "src/runtime/vm/vm.cc"
    m = re.search(r"\.dir/(.*?)\.o$", action)
    return m[1] if m else action


def ninja_failure(output: str) -> str:
    """The failing command and its first errors: in a parallel build the tail is often other
    files' progress lines, and the first error is the one to read."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("FAILED: ")]
    if not starts:
        return proc.tail(output)
    i = starts[0]
    block: list[str] = []
    for line in lines[i + 1:]:
        if _STATUS.match(line) or line.startswith(("ninja: build stopped", "FAILED: ")):
            break
        block.append(line)
    command = block[0] if block else ""
    if len(command) > 800:
        command = command[:800] + " ..."
    errors = [line for line in block[1:] if "error" in line.lower()][:5]
    rest = block[1:][-proc.TAIL_LINES:]
    out = [lines[i], f"$ {command}", *errors]
    if errors:
        out.append("...")
    out += rest
    if len(starts) > 1:
        out.append(f"({len(starts) - 1} more failed command(s))")
    return "\n".join(out)
