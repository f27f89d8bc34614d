"""What a binary needs from the board: machine, float ABI, libraries and symbol versions.

pyelftools reads ELF for every architecture and both byte orders without the
board's binutils; the symbol versions come from .gnu.version and
.gnu.version_r, which survive stripping.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerNeedSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

_MACHINES = {"EM_AARCH64": "aarch64", "EM_ARM": "arm", "EM_RISCV": "riscv64", "EM_X86_64": "x86_64",
             "EM_386": "i386"}
_KINDS = {"ET_EXEC": "executable", "ET_DYN": "shared-object", "ET_REL": "relocatable"}
EF_ARM_ABI_FLOAT_SOFT = 0x200
EF_ARM_ABI_FLOAT_HARD = 0x400
EF_RISCV_FLOAT_ABI = 0x6
_RISCV_FLOAT = {0x0: "soft", 0x2: "single", 0x4: "double", 0x6: "quad"}
_LIBC_FAMILY = re.compile(r"^(libc|libm|libpthread|libdl|librt|ld-linux.*|ld64)\.so")


@dataclass(frozen=True)
class ElfInfo:
    path: str
    machine: str
    bits: int
    little_endian: bool
    kind: str
    interpreter: str | None
    soname: str | None
    needed: tuple[str, ...]
    runpath: tuple[str, ...]
    float_abi: str | None
    version_needs: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    symbols_by_version: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def is_elf(path: Path | str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def inspect(path: Path | str) -> ElfInfo:
    """Read ``path``; ValueError when it is not an ELF file."""
    if not is_elf(path):
        raise ValueError(f"{path}: not an ELF file")
    with open(path, "rb") as f:
        e = ELFFile(f)
        raw_machine = e["e_machine"]
        machine = _MACHINES.get(raw_machine, str(raw_machine))
        if machine == "riscv64" and e.elfclass == 32:
            machine = "riscv32"
        kind = _KINDS.get(e["e_type"], str(e["e_type"]))
        interp = None
        for seg in e.iter_segments():
            if seg["p_type"] == "PT_INTERP":
                interp = seg.get_interp_name()
        if kind == "shared-object" and interp:
            kind = "pie-executable"
        needed: list[str] = []
        runpath: list[str] = []
        soname = None
        versions: dict[str, list[str]] = {}
        by_version: dict[str, set[str]] = {}
        verneed: dict[int, tuple[str, str]] = {}   # version index -> (library, version name)
        versym = None
        dynsym = None
        for sec in e.iter_sections():
            if isinstance(sec, DynamicSection):
                for tag in sec.iter_tags():
                    if tag.entry.d_tag == "DT_NEEDED":
                        needed.append(tag.needed)
                    elif tag.entry.d_tag == "DT_SONAME":
                        soname = tag.soname
                    elif tag.entry.d_tag in ("DT_RUNPATH", "DT_RPATH"):
                        runpath += (tag.runpath if tag.entry.d_tag == "DT_RUNPATH" else tag.rpath).split(":")
            elif isinstance(sec, GNUVerNeedSection):
                for vn, auxes in sec.iter_versions():
                    lib = vn.name
                    for aux in auxes:
                        versions.setdefault(lib, []).append(aux.name)
                        verneed[aux["vna_other"]] = (lib, aux.name)
            elif isinstance(sec, GNUVerSymSection):
                versym = sec
            elif isinstance(sec, SymbolTableSection) and sec.name == ".dynsym":
                dynsym = sec
        if versym is not None and dynsym is not None:
            for i, sym in enumerate(dynsym.iter_symbols()):
                if sym["st_shndx"] != "SHN_UNDEF" or not sym.name:
                    continue
                idx = versym.get_symbol(i)["ndx"]
                if isinstance(idx, int) and idx in verneed:
                    by_version.setdefault(verneed[idx][1], set()).add(sym.name)
        float_abi = None
        flags = e["e_flags"]
        if machine == "arm":
            float_abi = "hard" if flags & EF_ARM_ABI_FLOAT_HARD else "soft" if flags & EF_ARM_ABI_FLOAT_SOFT else None
        elif machine.startswith("riscv"):
            float_abi = _RISCV_FLOAT.get(flags & EF_RISCV_FLOAT_ABI)
        return ElfInfo(
            path=str(path), machine=machine, bits=64 if e.elfclass == 64 else 32, little_endian=e.little_endian,
            kind=kind, interpreter=interp, soname=soname, needed=tuple(needed), runpath=tuple(runpath),
            float_abi=float_abi,
            version_needs={lib: tuple(sorted(set(v), key=version_key)) for lib, v in versions.items()},
            symbols_by_version={v: tuple(sorted(s)) for v, s in by_version.items()})


def version_key(v: str) -> tuple[int, ...]:
    """``"GLIBC_2.34"`` or ``"2.34"`` -> ``(2, 34)``; numeric, so 2.9 < 2.10."""
    nums = re.findall(r"\d+", v.split("_", 1)[-1] if "_" in v else v)
    return tuple(int(n) for n in nums)


def _needed_versions(info: ElfInfo, prefix: str) -> list[str]:
    out = set()
    for lib, versions in info.version_needs.items():
        for v in versions:
            if v.startswith(prefix + "_") and v[len(prefix) + 1:][:1].isdigit():
                if prefix == "GLIBC" and not _LIBC_FAMILY.match(lib):
                    continue
                out.add(v)
    return sorted(out, key=version_key)


def max_version(info: ElfInfo, prefix: str) -> str | None:
    vs = _needed_versions(info, prefix)
    return vs[-1] if vs else None


def check_compat(info: ElfInfo, *, machine: str, bits: int | None = None, float_abi: str | None = None,
                 glibc: str | None = None, glibcxx: str | None = None) -> list[str]:
    """Problems (each naming the file) that keep ``info`` from running on the board; [] when none."""
    problems = []
    if info.machine != machine:
        return [f"{info.path}: built for {info.machine}, the board is {machine}"]
    if bits and info.bits != bits:
        problems.append(f"{info.path}: a {info.bits}-bit binary, the board is {bits}-bit")
    if float_abi and info.float_abi and info.float_abi != float_abi:
        problems.append(f"{info.path}: uses the {info.float_abi}-float ABI, the board's OS is {float_abi}-float")
    for prefix, floor, what in (("GLIBC", glibc, "glibc"), ("GLIBCXX", glibcxx, "libstdc++ GLIBCXX")):
        if not floor:
            continue
        for v in _needed_versions(info, prefix):
            if version_key(v) > version_key(floor):
                syms = info.symbols_by_version.get(v, ())
                shown = ", ".join(syms[:4]) + (f", +{len(syms) - 4} more" if len(syms) > 4 else "")
                problems.append(f"{info.path}: needs {v} ({shown or 'a versioned symbol'}), "
                                f"the board has {what} {floor}")
    if any(v == "GLIBC_PRIVATE" for vs in info.version_needs.values() for v in vs):
        problems.append(f"{info.path}: needs GLIBC_PRIVATE symbols, which differ between glibc builds")
    return problems
