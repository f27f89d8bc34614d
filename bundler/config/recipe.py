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
from dataclasses import field as dataclass_field
from dataclasses import fields as dataclass_fields
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
    key: str | None = None               # the TOML key, when it is not the attribute's name
    leaf: bool = False                   # a table with free keys (checked as a whole), merged key by key
    coerce: Callable[[Any], Any] | None = None   # TOML value -> attribute value (lists to tuples...)


def key(check: Callable[[Any], str | None], doc: str, default: Any = None, *, required: bool = False,
        toml: str | None = None, leaf: bool = False, coerce: Callable[[Any], Any] | None = None) -> Any:
    """A recipe key, declared as a field of its section's dataclass: the dataclasses are the schema."""
    return dataclass_field(default=None, metadata={"recipe": Field(check, doc, default, required, toml, leaf,
                                                                   coerce)})


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


# --- the schema: each section's dataclass declares its keys ----------------------------------

def _pairs(table: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted(table.items()))


def _shapes(table: Mapping[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return tuple(sorted((k, tuple(v)) for k, v in table.items()))


def _target(table: Mapping[str, Any]) -> Mapping[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}


def _with_base_libs(libs: list[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys([*BASE_LIBS, *libs]))


def _is_target(v: Any) -> str | None:
    return None if isinstance(v, dict) else f"expected a table, got {_show(v)}"


@dataclass(frozen=True, kw_only=True)
class Board:
    """[board]: what the board is (its recipe file's stem is its name)."""

    name: str = ""                                                    # the recipe's file stem, not a key
    title: str = key(is_nonempty_str, "the board's full name", required=True, toml="name")
    vendor: str = key(is_str, "who makes the board", "")
    url: str = key(is_str, "where to read about the board", "")
    os: str = key(is_str, "the operating system the glibc floor refers to", "")


@dataclass(frozen=True, kw_only=True)
class Machine:
    """[host_machine]: the board as meson's cross files name it."""

    system: str = key(is_choice("linux"), "the board's kernel", "linux")
    cpu_family: str = key(is_choice(*cpu.FAMILIES), "CPU family", required=True)
    cpu: str = key(is_nonempty_str, "CPU model, e.g. cortex-a72", required=True)
    triple: str = key(is_nonempty_str, "GNU target triple", required=True)
    glibc: str = key(is_version, "oldest glibc of the board's OS", required=True)
    glibcxx: str | None = key(is_version, "oldest libstdc++ (GLIBCXX_) version of the board's OS")
    float_abi: str | None = key(is_choice("hard", "soft", "double", "single"),
                                "float ABI of the OS (arm: hard/soft; riscv: double/single/soft)")
    cores: int = key(is_int(1, 1024), "CPU cores", 1)
    base_libs: tuple[str, ...] = key(is_str_list, "extra shared libraries the board's base system provides", [],
                                     coerce=_with_base_libs)

    @property
    def elf_machine(self) -> str:
        return cpu.FAMILIES[self.cpu_family].elf_machine

    @property
    def bits(self) -> int:
        return cpu.FAMILIES[self.cpu_family].bits


@dataclass(frozen=True, kw_only=True)
class ToolchainSpec:
    """[toolchain]: the cross compilers and where the board's libraries are."""

    prefix: str | None = key(is_str, "prefix of the cross tools (PREFIXgcc, PREFIXg++, PREFIXstrip)",
                             _default_prefix)
    cc: str = key(is_nonempty_str, "C compiler, a name on PATH or a path")
    cxx: str = key(is_nonempty_str, "C++ compiler, a name on PATH or a path")
    sysroot: str = key(is_str, "--sysroot for the compiler ('': the compiler's built-in paths, right for "
                               "Debian's cross g++)", "")
    cflags: tuple[str, ...] = key(is_str_list, "extra compile flags", [], coerce=tuple)
    ldflags: tuple[str, ...] = key(is_str_list, "extra link flags", [], coerce=tuple)
    debian_packages: tuple[str, ...] = key(is_str_list, "Debian packages that provide the toolchain", [],
                                           coerce=tuple)
    yocto_sdk: str = key(is_str, "a Yocto SDK's environment-setup-* script: CC, CXX, the sysroot and flags are "
                                 "read from it ('' : none)", "")


@dataclass(frozen=True, kw_only=True)
class TvmSpec:
    """[tvm]: what TVM compiles the model for."""

    target: Mapping[str, Any] = key(_is_target, "TVM target, passed to tvm.target.Target as a dict",
                                    required=True, leaf=True, coerce=_target)


@dataclass(frozen=True, kw_only=True)
class RuntimeSpec:
    """[runtime]: where the board's TVM runtime comes from."""

    source: str = key(is_runtime_source, "where the TVM runtime comes from: 'wheel' (PyPI), 'git' (TVM's "
                      "repository at the compiler's version) or the path of a TVM source tree",
                      _default_runtime_source)
    platform: str | None = key(is_nonempty_str, "wheel platform tag for runtime.source = 'wheel'",
                               _default_platform)
    git_url: str = key(is_nonempty_str, "repository runtime.source = 'git' clones", DEFAULT_TVM_GIT_URL)
    git_ref: str = key(is_str, "tag, branch or commit to build ('': the installed compiler's release tag)", "")
    allow_version_mismatch: bool = key(is_bool, "build from a TVM tree whose version is not the compiler's", False)
    optimize: str = key(is_choice(*RUNTIME_OPTIMIZE), "source builds: 'size' (-Os, LTO, section GC) or "
                        "'speed' (-O2)", "size")
    rpc: bool = key(is_bool, "source builds: include TVM's RPC support (for tuning on the board)", False)
    backtrace: bool = key(is_bool, "source builds: include libbacktrace for symbolized error traces", False)

    @property
    def from_source(self) -> bool:
        return self.source != "wheel"


@dataclass(frozen=True, kw_only=True)
class InstallSpec:
    """[install]: where bundles live on the device."""

    prefix: str = key(values.install_prefix, "install root on the device", "/opt/tvmbundle")


@dataclass(frozen=True, kw_only=True)
class ServiceSpec:
    """[service]: the inference service's unit."""

    listen: str = key(values.listen_address, "address the inference service listens on", "127.0.0.1:8470")
    threads: int = key(is_int(1, 1024), "inference threads", lambda v: v["host_machine.cores"])
    user: str = key(values.unix_user, "unprivileged user the service runs as", "tvmbundle")
    environment: tuple[tuple[str, str], ...] = key(values.environment, "extra environment of the service", {},
                                                   leaf=True, coerce=_pairs)


@dataclass(frozen=True, kw_only=True)
class ModelSpec:
    """[model]: defaults for models built for this board."""

    input_shapes: tuple[tuple[str, tuple[int, ...]], ...] = key(
        is_shapes, "fixed shapes for inputs with dynamic dims", {}, leaf=True, coerce=_shapes)
    seed: int = key(is_int(0, 2**32 - 1), "seed of the selftest inputs", 0)
    rtol: float = key(is_float, "relative tolerance of the selftest", 1e-3, coerce=float)
    atol: float = key(is_float, "absolute tolerance of the selftest", 1e-4, coerce=float)


@dataclass(frozen=True, kw_only=True)
class TuneSpec:
    """[tune]: defaults of `tvmbundle tune`."""

    trials: int = key(is_int(0, 1_000_000), "candidates `tvmbundle tune` measures in all (MetaSchedule trials; 0: only the default schedules' knobs)",
                      64)
    time_limit: float = key(is_float, "seconds `tvmbundle tune` may run (0: no limit)", 0, coerce=float)


@dataclass(frozen=True, kw_only=True)
class VerifySpec:
    """[verify]: how this machine runs the board's programs."""

    qemu: str = key(is_str, "qemu-user binary that runs the board's programs ('' runs natively)", _default_qemu)
    ld_prefix: str = key(is_str, "where qemu finds the board's dynamic loader and libraries (qemu -L)",
                         _default_ld_prefix)


# Section name -> its dataclass, in the order values are resolved (derived defaults read earlier ones).
SECTIONS: dict[str, type] = {"board": Board, "host_machine": Machine, "toolchain": ToolchainSpec, "tvm": TvmSpec,
                             "runtime": RuntimeSpec, "install": InstallSpec, "service": ServiceSpec,
                             "model": ModelSpec, "tune": TuneSpec, "verify": VerifySpec}


def _keys(cls: type) -> Iterator[tuple[str, str, Field]]:
    """(attribute, TOML key, Field) of a section's declared keys."""
    for f in dataclass_fields(cls):
        spec = f.metadata.get("recipe")
        if spec is not None:
            yield f.name, spec.key or f.name, spec


SCHEMA: dict[str, Field] = {
    "format": Field(is_int(1, 1), "recipe schema version", required=True),
    "extends": Field(is_nonempty_str, "a recipe this one builds on (its values are overridden here)"),
    **{f"{section}.{toml}": spec for section, cls in SECTIONS.items() for _, toml, spec in _keys(cls)},
}
# Tables whose keys are free (checked by their own Field), so they are leaves of the key tree.
_LEAF_TABLES = {k for k, spec in SCHEMA.items() if spec.leaf}
SECTION_NAMES = sorted(SECTIONS)


def _section(section: str, values: Mapping[str, Any], **extra: Any) -> Any:
    cls = SECTIONS[section]
    kwargs = {}
    for attr, toml, spec in _keys(cls):
        v = values[f"{section}.{toml}"]
        kwargs[attr] = spec.coerce(v) if spec.coerce is not None and v is not None else v
    return cls(**kwargs, **extra)


def host_cpu_family() -> str:
    m = os.uname().machine
    return {"amd64": "x86_64", "arm64": "aarch64", "armv7l": "arm"}.get(m, m)


@dataclass(frozen=True)
class Recipe:
    """A resolved recipe: one instance of each section's dataclass, and where each value came from."""

    path: Path
    board: Board
    machine: Machine                              # [host_machine]
    toolchain: ToolchainSpec
    tvm: TvmSpec
    runtime: RuntimeSpec
    install: InstallSpec
    service: ServiceSpec
    model: ModelSpec
    tune: TuneSpec
    verify: VerifySpec
    origins: Mapping[str, str] = field(repr=False)  # dotted key -> file that set it, "default" or "derived"
    values: Mapping[str, Any] = field(repr=False)   # dotted key -> resolved value (for `show`)
    chain: tuple[Path, ...] = ()                  # this recipe and those it extends, nearest first

    @property
    def target(self) -> Mapping[str, Any]:
        return self.tvm.target

    @property
    def install_prefix(self) -> str:
        return self.install.prefix

    @property
    def qemu(self) -> str:
        """The qemu-user binary for the board's programs; "" when the board runs natively here."""
        return self.verify.qemu

    @property
    def ld_prefix(self) -> str:
        """qemu -L: where the board's loader and libraries are."""
        return self.verify.ld_prefix

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


def check_format(file: str, data: Mapping[str, Any], kind: str) -> None:
    """The ``format = 1`` every recipe and inventory starts with (``kind`` names which, in errors)."""
    if "format" not in data:
        raise RecipeError(file, "format", f"missing; every {kind} starts with 'format = {FORMAT}'")
    if data["format"] != FORMAT or isinstance(data["format"], bool):
        raise RecipeError(file, "format", f"{_show(data['format'])} is not allowed; "
                                          f"this tvmbundle reads {kind} format {FORMAT}")


def read_toml(path: Path) -> dict[str, Any]:
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
        data = read_toml(current)
        check_format(file, data, "recipe")
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

    sections = {name: _section(name, values, **({"name": path.stem} if name == "board" else {}))
                for name in SECTIONS}
    return Recipe(path=path, **{("machine" if n == "host_machine" else n): s for n, s in sections.items()},
                  origins=dict(origins), values=values, chain=chain)
