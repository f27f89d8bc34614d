"""Facts per CPU family, in one table: what every stage needs to know about an architecture.

A new family (or a fact about one) is one edit here. The names are the ``host_machine.cpu_family``
values a recipe allows, which are meson's cpu_family names.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CpuFamily:
    name: str                    # meson's cpu_family, the recipe's host_machine.cpu_family
    elf_machine: str             # what bundler.build.elf reports for the family's ELF e_machine
    bits: int
    qemu: str                    # qemu-user binary that runs the family's programs here
    wheel_platform: str | None   # PyPI platform tag of apache-tvm's wheels, None where PyPI has none
    cmake_processor: str         # CMAKE_SYSTEM_PROCESSOR for cross builds
    debian_arch: str             # dpkg architecture of a .deb for it
    uname: tuple[str, ...]       # what `uname -m` prints on such a board
    buildroot: tuple[str, ...]   # Buildroot Kconfig symbols that select it
    yocto_host: str              # Yocto COMPATIBLE_HOST pattern (TARGET_SYS)
    extra_libs: tuple[str, ...]  # libraries the runtime links beyond libc/libstdc++ (riscv64: atomics)
    vector_bits: int             # SIMD register width the default schedules vectorize for (0: none)


FAMILIES: dict[str, CpuFamily] = {f.name: f for f in (
    CpuFamily("aarch64", "aarch64", 64, "qemu-aarch64", "manylinux_2_28_aarch64", "aarch64", "arm64",
              ("aarch64", "arm64"), ("BR2_aarch64",), "aarch64.*-linux", (), 128),
    CpuFamily("x86_64", "x86_64", 64, "qemu-x86_64", "manylinux_2_28_x86_64", "x86_64", "amd64",
              ("x86_64", "amd64"), ("BR2_x86_64",), "x86_64.*-linux", (), 256),
    CpuFamily("arm", "arm", 32, "qemu-arm", None, "armv7-a", "armhf",
              ("armv7l", "armv6l", "armv8l"), ("BR2_arm",), "arm.*-linux", (), 128),
    CpuFamily("riscv64", "riscv64", 64, "qemu-riscv64", None, "riscv64", "riscv64",
              ("riscv64",), ("BR2_riscv", "BR2_RISCV_64"), "riscv64.*-linux", ("-latomic",), 0),
)}


def family(name: str) -> CpuFamily:
    return FAMILIES[name]


def from_uname(machine: str) -> str:
    """The cpu_family of a board whose `uname -m` prints ``machine`` (itself when unknown)."""
    for f in FAMILIES.values():
        if machine in f.uname:
            return f.name
    return machine
