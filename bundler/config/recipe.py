"""Board recipes: strict, versioned TOML data resolved into frozen dataclasses.

A recipe is loaded in two stages, like meson cross files and conan profiles:
*load* reads the TOML (following ``extends``) and remembers which file set
each key; *resolve* checks every key against :data:`SCHEMA`, fills defaults
and derived values, and returns a :class:`Recipe`.  Every error names the
file, the dotted key, the bad value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib  # type: ignore[no-redef]

from bundler.config import cpu, values
from bundler.errors import RecipeError, UserError, did_you_mean, one_of

FORMAT = 1
# Libraries every glibc-based board has; a NEEDED entry outside the bundle must be one of these.
BASE_LIBS = (
    "libc.so.6", "libm.so.6", "libdl.so.2", "libpthread.so.0", "librt.so.1",
    "libstdc++.so.6", "libgcc_s.so.1",
    "ld-linux-aarch64.so.1", "ld-linux-armhf.so.3", "ld-linux-riscv64-lp64d.so.1",
    "ld-linux-x86-64.so.2",
)
RUNTIME_SOURCES = ("wheel", "git")   # or a path to a TVM source tree
RUNTIME_OPTIMIZE = ("size", "speed")
DEFAULT_TVM_GIT_URL = "https://github.com/apache/tvm.git"
TARGET_KEYS = ("kind", "mtriple", "mcpu", "mattr", "mfloat-abi", "mabi", "num-cores", "keys", "tag",
               "host", "opt-level", "vector-width")
_VERSION_RE = re.compile(r"^\d+\.\d+(\.\d+)?$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


# --- the schema ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Field:
    """One key of the schema: its check, its default and a line of documentation."""

    check: Callable[[Any], str | None]   # returns a problem ("expected ...") or None
    doc: str
    default: Any = None                  # a value, or a callable(values) -> value for derived defaults
    required: bool = False


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "array",
            dict: "table"}.get(type(v), type(v).__name__)


def _show(v: Any) -> str:
    if isinstance(v, str):
        return repr(v)
    return f"{v!r} ({_type_name(v)})"


def is_str(v: Any) -> str | None:
    return None if isinstance(v, str) else f"expected a string, got {_show(v)}"


def is_nonempty_str(v: Any) -> str | None:
    return is_str(v) or (None if v.strip() else "expected a non-empty string, got ''")


def is_int(lo: int = 0, hi: int = 1 << 31) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if isinstance(v, bool) or not isinstance(v, int):
            return f"expected an integer, got {_show(v)}"
        if not lo <= v <= hi:
            return f"expected an integer from {lo} to {hi}, got {v}"
        return None
    return check


def is_float(v: Any) -> str | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
        return f"expected a non-negative number, got {_show(v)}"
    return None


def is_choice(*choices: str) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v in choices:
            return None
        return f"{_show(v)} is not allowed; expected {one_of(choices)}" + (
            did_you_mean(v, choices) if isinstance(v, str) else "")
    return check


def is_version(v: Any) -> str | None:
    if isinstance(v, str) and _VERSION_RE.match(v):
        return None
    return f"expected a version like \"2.36\", got {_show(v)}"


def is_str_list(v: Any) -> str | None:
    if isinstance(v, list) and all(isinstance(x, str) for x in v):
        return None
    return f"expected an array of strings, got {_show(v)}"


def is_bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else f"expected true or false, got {_show(v)}"


def is_runtime_source(v: Any) -> str | None:
    if v in RUNTIME_SOURCES:
        return None
    if isinstance(v, str) and ("/" in v or v.startswith("~")):
        return None     # a TVM source tree the user already has
    return (f"{_show(v)} is not allowed; expected 'wheel', 'git' or the path of a TVM source tree "
            "(with a '/', e.g. \"~/src/tvm\")" + (did_you_mean(v, RUNTIME_SOURCES) if isinstance(v, str) else ""))


def is_shapes(v: Any) -> str | None:
    # Each entry is checked on its own in load(), so the error can name the input.
    return None if isinstance(v, dict) else f"expected a table of NAME = [positive integers], got {_show(v)}"


def _default_prefix(values: Mapping[str, Any]) -> str | None:
    if values.get("toolchain.cc") or values.get("toolchain.cxx"):
        return None
    return f"{values['host_machine.triple']}-"


def _default_ld_prefix(values: Mapping[str, Any]) -> str:
    # Debian's cross packages put the board's libraries in /usr/<triple>, which is not a
    # sysroot the compiler takes (its linker scripts name absolute paths) but is one qemu takes.
    if values["toolchain.sysroot"]:
        return values["toolchain.sysroot"]
    return f"/usr/{values['host_machine.triple']}" if _is_foreign(values) else ""


def _is_foreign(values: Mapping[str, Any]) -> bool:
    return values["host_machine.cpu_family"] != host_cpu_family()


def _default_platform(values: Mapping[str, Any]) -> str | None:
    return cpu.FAMILIES[values["host_machine.cpu_family"]].wheel_platform


def _default_runtime_source(values: Mapping[str, Any]) -> str:
    # PyPI's wheels where they exist (fast, official); TVM's sources for every other CPU.
    return "wheel" if cpu.FAMILIES[values["host_machine.cpu_family"]].wheel_platform else "git"


def _default_qemu(values: Mapping[str, Any]) -> str:
    return cpu.FAMILIES[values["host_machine.cpu_family"]].qemu if _is_foreign(values) else ""


SCHEMA: dict[str, Field] = {
    "format": Field(is_int(1, 1), "recipe schema version", required=True),
    "extends": Field(is_nonempty_str, "a recipe this one builds on (its values are overridden here)"),
    "board.name": Field(is_nonempty_str, "the board's full name", required=True),
    "board.vendor": Field(is_str, "who makes the board", default=""),
    "board.url": Field(is_str, "where to read about the board", default=""),
    "board.os": Field(is_str, "the operating system the glibc floor refers to", default=""),
    "host_machine.system": Field(is_choice("linux"), "the board's kernel", default="linux"),
    "host_machine.cpu_family": Field(is_choice(*cpu.FAMILIES), "CPU family", required=True),
    "host_machine.cpu": Field(is_nonempty_str, "CPU model, e.g. cortex-a72", required=True),
    "host_machine.triple": Field(is_nonempty_str, "GNU target triple", required=True),
    "host_machine.glibc": Field(is_version, "oldest glibc of the board's OS", required=True),
    "host_machine.glibcxx": Field(is_version, "oldest libstdc++ (GLIBCXX_) version of the board's OS"),
    "host_machine.float_abi": Field(is_choice("hard", "soft", "double", "single"),
                                    "float ABI of the OS (arm: hard/soft; riscv: double/single/soft)"),
    "host_machine.cores": Field(is_int(1, 1024), "CPU cores", default=1),
    "host_machine.base_libs": Field(is_str_list, "extra shared libraries the board's base system provides",
                                    default=[]),
    "toolchain.prefix": Field(is_str, "prefix of the cross tools (PREFIXgcc, PREFIXg++, PREFIXstrip)",
                              default=_default_prefix),
    "toolchain.cc": Field(is_nonempty_str, "C compiler, a name on PATH or a path"),
    "toolchain.cxx": Field(is_nonempty_str, "C++ compiler, a name on PATH or a path"),
    "toolchain.sysroot": Field(is_str, "--sysroot for the compiler ('': the compiler's built-in paths, "
                                       "right for Debian's cross g++)", default=""),
    "toolchain.cflags": Field(is_str_list, "extra compile flags", default=[]),
    "toolchain.ldflags": Field(is_str_list, "extra link flags", default=[]),
    "toolchain.debian_packages": Field(is_str_list, "Debian packages that provide the toolchain", default=[]),
    "toolchain.yocto_sdk": Field(is_str, "a Yocto SDK's environment-setup-* script: CC, CXX, the sysroot and "
                                 "flags are read from it ('' : none)", default=""),
    "tvm.target": Field(lambda v: None if isinstance(v, dict) else f"expected a table, got {_show(v)}",
                        "TVM target, passed to tvm.target.Target as a dict", required=True),
    "runtime.source": Field(is_runtime_source, "where the TVM runtime comes from: 'wheel' (PyPI), 'git' "
                            "(TVM's repository at the compiler's version) or the path of a TVM source tree",
                            default=_default_runtime_source),
    "runtime.platform": Field(is_nonempty_str, "wheel platform tag for runtime.source = 'wheel'",
                              default=_default_platform),
    "runtime.git_url": Field(is_nonempty_str, "repository runtime.source = 'git' clones",
                             default=DEFAULT_TVM_GIT_URL),
    "runtime.git_ref": Field(is_str, "tag, branch or commit to build ('': the installed compiler's release tag)",
                             default=""),
    "runtime.allow_version_mismatch": Field(is_bool, "build from a TVM tree whose version is not the compiler's",
                                            default=False),
    "runtime.optimize": Field(is_choice(*RUNTIME_OPTIMIZE), "source builds: 'size' (-Os, LTO, section GC) or "
                              "'speed' (-O2)", default="size"),
    "runtime.rpc": Field(is_bool, "source builds: include TVM's RPC support (for tuning on the board)",
                         default=False),
    "runtime.backtrace": Field(is_bool, "source builds: include libbacktrace for symbolized error traces",
                               default=False),
    "install.prefix": Field(values.install_prefix, "install root on the device", default="/opt/tvmbundle"),
    "service.listen": Field(values.listen_address, "address the inference service listens on",
                            default="127.0.0.1:8470"),
    "service.threads": Field(is_int(1, 1024), "inference threads",
                             default=lambda v: v["host_machine.cores"]),
    "service.user": Field(values.unix_user, "unprivileged user the service runs as", default="tvmbundle"),
    "service.environment": Field(values.environment, "extra environment of the service", default={}),
    "model.input_shapes": Field(is_shapes, "fixed shapes for inputs with dynamic dims", default={}),
    "model.seed": Field(is_int(0, 2**32 - 1), "seed of the selftest inputs", default=0),
    "model.rtol": Field(is_float, "relative tolerance of the selftest", default=1e-3),
    "model.atol": Field(is_float, "absolute tolerance of the selftest", default=1e-4),
    "tune.trials": Field(is_int(1, 1_000_000), "candidates `tvmbundle tune` measures in all (MetaSchedule trials)",
                         default=64),
    "tune.time_limit": Field(is_float, "seconds `tvmbundle tune` may run (0: no limit)", default=0),
    "verify.qemu": Field(is_str, "qemu-user binary that runs the board's programs ('' runs natively)",
                         default=_default_qemu),
    "verify.ld_prefix": Field(is_str, "where qemu finds the board's dynamic loader and libraries (qemu -L)",
                              default=_default_ld_prefix),
}
# Tables whose keys are free (checked by their own Field), so they are leaves of the key tree.
_LEAF_TABLES = {"tvm.target", "service.environment", "model.input_shapes"}
SECTIONS = sorted({k.split(".")[0] for k in SCHEMA if "." in k} | {"tvm"})


def host_cpu_family() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "arm"}.get(m, m)


# --- the resolved recipe ------------------------------------------------------------------

@dataclass(frozen=True)
class Board:
    name: str            # the recipe's name, e.g. "rpi4"
    title: str           # board.name
    vendor: str
    url: str
    os: str


@dataclass(frozen=True)
class Machine:
    system: str
    cpu_family: str
    cpu: str
    triple: str
    glibc: str
    glibcxx: str | None
    float_abi: str | None
    cores: int
    base_libs: tuple[str, ...]

    @property
    def elf_machine(self) -> str:
        return cpu.FAMILIES[self.cpu_family].elf_machine

    @property
    def bits(self) -> int:
        return cpu.FAMILIES[self.cpu_family].bits


@dataclass(frozen=True)
class ToolchainSpec:
    prefix: str | None
    cc: str
    cxx: str
    sysroot: str
    cflags: tuple[str, ...]
    ldflags: tuple[str, ...]
    debian_packages: tuple[str, ...]
    yocto_sdk: str = ""


@dataclass(frozen=True)
class RuntimeSpec:
    source: str                 # "wheel", "git" or a path
    platform: str | None
    git_url: str = DEFAULT_TVM_GIT_URL
    git_ref: str = ""
    allow_version_mismatch: bool = False
    optimize: str = "size"
    rpc: bool = False
    backtrace: bool = False

    @property
    def from_source(self) -> bool:
        return self.source != "wheel"


@dataclass(frozen=True)
class ServiceSpec:
    listen: str
    threads: int
    user: str
    environment: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class ModelSpec:
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    seed: int
    rtol: float
    atol: float


@dataclass(frozen=True)
class Recipe:
    path: Path
    board: Board
    machine: Machine
    toolchain: ToolchainSpec
    target: Mapping[str, Any]
    runtime: RuntimeSpec
    install_prefix: str
    service: ServiceSpec
    model: ModelSpec
    qemu: str                                     # "" when the board runs natively here
    ld_prefix: str                                # qemu -L: the board's loader and libraries
    origins: Mapping[str, str] = field(repr=False)  # dotted key -> file that set it, "default" or "derived"
    values: Mapping[str, Any] = field(repr=False)   # dotted key -> resolved value (for `show`)
    chain: tuple[Path, ...] = ()                  # this recipe and those it extends, nearest first

    @property
    def name(self) -> str:
        return self.board.name

    @property
    def foreign(self) -> bool:
        return bool(self.qemu)

    def file_of(self, key: str) -> str:
        """The recipe file that set ``key``, for errors (``FILE: KEY: problem``); this recipe's own
        file when the value is a default or derived."""
        origin = self.origins.get(key, "")
        return origin if origin.endswith(".toml") else display_path(self.path)

    def target_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.target.items()}


# --- finding and loading ------------------------------------------------------------------

def search_path() -> list[Path]:
    """Where `tvmbundle make NAME` looks for NAME.toml, first match wins."""
    dirs = [Path(p) for p in os.environ.get("TVMBUNDLE_RECIPE_PATH", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "recipes")
    dirs.append(shipped_recipes_dir())
    seen, out = set(), []
    for d in dirs:
        key = os.path.realpath(d)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def shipped_recipes_dir() -> Path:
    """The recipes that come with tvmbundle (``recipes/`` of the source tree, or package data)."""
    package = Path(__file__).resolve().parents[1]
    source_tree = package.parent / "recipes"
    if source_tree.is_dir():
        return source_tree
    return package / "recipes"


def find(name_or_path: str, *, near: Path | None = None) -> Path:
    """A recipe file from a board name ("rpi4") or a path ("my/board.toml")."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        p = Path(name_or_path)
        if not p.is_file():
            raise UserError(f"recipe file not found: {name_or_path}")
        return p
    dirs = ([near] if near else []) + search_path()
    for d in dirs:
        p = d / f"{name_or_path}.toml"
        if p.is_file():
            return p
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.toml")})
    raise UserError(
        f"no recipe named '{name_or_path}'{did_you_mean(name_or_path, known)}; "
        f"known boards: {', '.join(known) or 'none'}",
        hint="`tvmbundle boards` lists them; a path to a .toml file works too")


def available() -> list[Path]:
    """Every recipe on the search path (the first of each name)."""
    seen: dict[str, Path] = {}
    for d in search_path():
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                seen.setdefault(p.stem, p)
    return [seen[k] for k in sorted(seen)]


def display_path(p: Path) -> str:
    """A path as the user would write it: relative to the working directory when below it."""
    try:
        return os.path.relpath(p) if Path(os.path.abspath(p)).is_relative_to(Path.cwd()) else str(p)
    except ValueError:
        return str(p)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(display_path(path), "", f"not valid TOML: {e}") from None
    except OSError as e:
        raise UserError(f"{display_path(path)}: cannot read: {e.strerror}") from None


def _flatten(data: Mapping[str, Any], file: str, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """Dotted keys down to the schema's leaves; unknown keys fail with a did-you-mean."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if dotted in SCHEMA or dotted in _LEAF_TABLES:
            yield dotted, value
            continue
        children = [k for k in [*SCHEMA, *_LEAF_TABLES] if k.startswith(dotted + ".")]
        if children and isinstance(value, dict):
            yield from _flatten(value, file, dotted + ".")
            continue
        if children:
            raise RecipeError(file, dotted, f"expected a table, got {_show(value)}")
        siblings = sorted({k[len(prefix):].split(".")[0] for k in [*SCHEMA, *_LEAF_TABLES] if k.startswith(prefix)})
        where = f"in [{prefix[:-1]}]" if prefix else "at the top level"
        raise RecipeError(file, dotted, f"unknown key{did_you_mean(key, siblings)}; "
                                        f"allowed {where}: {', '.join(siblings)}")


def load(name_or_path: str) -> Recipe:
    """Load a recipe by board name or path and resolve it."""
    path = find(name_or_path)
    raw: dict[str, Any] = {}
    origins: dict[str, str] = {}
    chain: list[Path] = []
    current: Path | None = path
    while current is not None:
        if any(os.path.samefile(current, c) for c in chain):
            cycle = " -> ".join(display_path(c) for c in [*chain, current])
            raise RecipeError(display_path(chain[-1]), "extends", f"recipes extend each other in a cycle: {cycle}")
        chain.append(current)
        file = display_path(current)
        data = _read_toml(current)
        if "format" not in data:
            raise RecipeError(file, "format", f"missing; every recipe starts with 'format = {FORMAT}'")
        if data["format"] != FORMAT or isinstance(data["format"], bool):
            raise RecipeError(file, "format", f"{_show(data['format'])} is not allowed; "
                                              f"this tvmbundle reads recipe format {FORMAT}")
        for key, value in _flatten(data, file):
            if key == "format":
                continue
            problem = SCHEMA[key].check(value) if key in SCHEMA else None
            if problem:
                raise RecipeError(file, key, problem)
            if key == "tvm.target":
                _check_target(value, file)
            if key == "model.input_shapes":
                for name, shape in value.items():
                    if not (isinstance(shape, list) and shape and all(
                            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape)):
                        raise RecipeError(file, f"{key}.{name}",
                                          f"expected an array of positive integers, got {_show(shape)}")
            if key in _LEAF_TABLES:
                # Free tables merge key by key, so a board can override just target.mcpu.
                for sub in value:
                    origins.setdefault(f"{key}.{sub}", file)
                raw[key] = {**value, **raw.get(key, {})}
            else:
                raw.setdefault(key, value)    # nearer recipes win
            origins.setdefault(key, file)
        parent = data.get("extends")
        if parent:
            try:
                current = find(parent, near=current.parent)
            except UserError:
                known = sorted({p.stem for d in [current.parent, *search_path()] if d.is_dir()
                                for p in d.glob("*.toml")})
                raise RecipeError(file, "extends", f"no recipe named {parent!r}{did_you_mean(parent, known)}; "
                                                   "expected a board name from `tvmbundle boards` "
                                                   "or a path to a .toml file") from None
        else:
            current = None
    return _resolve(path, raw, origins, tuple(chain))


def _check_target(target: Mapping[str, Any], file: str) -> None:
    for k, v in target.items():
        key = f"tvm.target.{k}"
        if k not in TARGET_KEYS:
            raise RecipeError(file, key, f"unknown target option{did_you_mean(k, TARGET_KEYS)}; "
                                         f"allowed: {', '.join(TARGET_KEYS)}")
        if k in ("mattr", "keys"):
            problem = is_str_list(v)
        elif k in ("num-cores", "opt-level", "vector-width"):
            problem = is_int(0, 4096)(v)
        elif k == "mfloat-abi":
            problem = is_choice("hard", "soft")(v)
        else:
            problem = is_nonempty_str(v)
        if problem:
            raise RecipeError(file, key, problem)


def _resolve(path: Path, raw: dict[str, Any], origins: dict[str, str], chain: tuple[Path, ...]) -> Recipe:
    file = display_path(path)
    values: dict[str, Any] = {}
    for key, spec in SCHEMA.items():  # SCHEMA order puts what derived defaults read first
        if key in ("format", "extends"):
            continue
        if key in raw:
            values[key] = raw[key]
        elif spec.required:
            raise RecipeError(file, key, f"missing; required ({spec.doc})")
        elif callable(spec.default):
            values[key] = spec.default(values)
            origins[key] = "derived"
        else:
            values[key] = spec.default
            origins[key] = "default"

    def where(key: str) -> str:
        o = origins.get(key, "")
        return o if o and o not in ("default", "derived") else file

    family = values["host_machine.cpu_family"]
    triple = values["host_machine.triple"]
    if not triple.split("-")[0].startswith({"arm": "arm", "x86_64": "x86_64"}.get(family, family)):
        raise RecipeError(where("host_machine.triple"), "host_machine.triple",
                          f"{triple!r} does not match cpu_family {family!r}")
    target = values["tvm.target"]
    if target.get("kind") != "llvm":
        raise RecipeError(where("tvm.target.kind"), "tvm.target.kind",
                          f"{_show(target['kind']) + ' is not allowed' if 'kind' in target else 'missing'}; "
                          "tvmbundle compiles for board CPUs: expected 'llvm'")
    if target.get("mtriple") and not str(target["mtriple"]).startswith(triple.split("-")[0][:3]):
        raise RecipeError(where("tvm.target.mtriple"), "tvm.target.mtriple",
                          f"{target['mtriple']!r} is for another architecture than host_machine.triple {triple!r}")
    if family == "arm" and target.get("mfloat-abi") != "hard" and values["host_machine.float_abi"] != "soft":
        raise RecipeError(where("tvm.target"), "tvm.target.mfloat-abi",
                          f"{_show(target.get('mfloat-abi')) if 'mfloat-abi' in target else 'missing'}; "
                          "armv7 hard-float boards need mfloat-abi = \"hard\" (or host_machine.float_abi = \"soft\")")
    if values["runtime.source"] == "wheel" and not values["runtime.platform"]:
        default = " (the default)" if origins["runtime.source"] == "default" else ""
        raise RecipeError(where("runtime.source"), "runtime.source",
                          f"'wheel'{default} is not available for cpu_family {family!r}: PyPI has TVM runtime "
                          "wheels only for aarch64 and x86_64: use runtime.source = 'git' (or the path of a TVM "
                          "source tree) to build it from TVM's sources, or set runtime.platform if you have a wheel")

    prefix = values["toolchain.prefix"]
    if values["toolchain.yocto_sdk"] and origins.get("toolchain.prefix") == "derived":
        prefix = values["toolchain.prefix"] = None       # the SDK names its own tools
        origins["toolchain.prefix"] = "toolchain.yocto_sdk"
    if values["toolchain.yocto_sdk"]:
        # Read when the toolchain is resolved (the script is the user's machine's, not recipe data).
        cc = values["toolchain.cc"] or ""
        cxx = values["toolchain.cxx"] or ""
        for k in ("toolchain.cc", "toolchain.cxx"):
            if not values[k]:
                origins[k] = "toolchain.yocto_sdk"
    else:
        cc = values["toolchain.cc"] or f"{prefix or ''}gcc"
        cxx = values["toolchain.cxx"] or f"{prefix or ''}g++"
    values["toolchain.cc"], values["toolchain.cxx"] = cc, cxx
    origins.setdefault("toolchain.cc", "derived")
    origins.setdefault("toolchain.cxx", "derived")
    if origins["toolchain.cc"] == "default":
        origins["toolchain.cc"] = "derived"
    if origins["toolchain.cxx"] == "default":
        origins["toolchain.cxx"] = "derived"

    frozen_target = {k: tuple(v) if isinstance(v, list) else v for k, v in target.items()}
    return Recipe(
        path=path,
        board=Board(name=path.stem, title=values["board.name"], vendor=values["board.vendor"],
                    url=values["board.url"], os=values["board.os"]),
        machine=Machine(
            system=values["host_machine.system"], cpu_family=family, cpu=values["host_machine.cpu"],
            triple=triple, glibc=values["host_machine.glibc"], glibcxx=values["host_machine.glibcxx"],
            float_abi=values["host_machine.float_abi"], cores=values["host_machine.cores"],
            base_libs=tuple(dict.fromkeys([*BASE_LIBS, *values["host_machine.base_libs"]]))),
        toolchain=ToolchainSpec(
            prefix=prefix, cc=cc, cxx=cxx, sysroot=values["toolchain.sysroot"],
            cflags=tuple(values["toolchain.cflags"]), ldflags=tuple(values["toolchain.ldflags"]),
            debian_packages=tuple(values["toolchain.debian_packages"]), yocto_sdk=values["toolchain.yocto_sdk"]),
        target=frozen_target,
        runtime=RuntimeSpec(source=values["runtime.source"], platform=values["runtime.platform"],
                            git_url=values["runtime.git_url"], git_ref=values["runtime.git_ref"],
                            allow_version_mismatch=values["runtime.allow_version_mismatch"],
                            optimize=values["runtime.optimize"], rpc=values["runtime.rpc"],
                            backtrace=values["runtime.backtrace"]),
        install_prefix=values["install.prefix"],
        service=ServiceSpec(listen=values["service.listen"], threads=values["service.threads"],
                            user=values["service.user"],
                            environment=tuple(sorted(values["service.environment"].items()))),
        model=ModelSpec(input_shapes=tuple(sorted((k, tuple(v)) for k, v in values["model.input_shapes"].items())),
                        seed=values["model.seed"], rtol=float(values["model.rtol"]),
                        atol=float(values["model.atol"])),
        qemu=values["verify.qemu"],
        ld_prefix=values["verify.ld_prefix"],
        origins=dict(origins),
        values=values,
        chain=chain,
    )
