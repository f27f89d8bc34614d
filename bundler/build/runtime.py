"""The TVM runtime for the board, locked to the installed compiler's version.

A model compiled by apache-tvm X must run on the runtime of apache-tvm X, so
the runtime libraries always come from the wheels of exactly the installed
``apache-tvm`` and ``apache-tvm-ffi`` versions.  When the board's platform is
the one the compiler was installed for, the installed wheels' own files are
used (checked against their RECORD); otherwise the wheels for the board's
platform are downloaded with pip.  Either way the result is cached.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import shutil
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bundler import cache, proc
from bundler.build import cmakebuild, elf, toolchain, tvmsource
from bundler.config.recipe import Recipe
from bundler.errors import UserError
from bundler.progress import Step

LIBS = {"apache-tvm": "tvm/lib/libtvm_runtime.so", "apache-tvm-ffi": "tvm_ffi/lib/libtvm_ffi.so"}


@dataclass(frozen=True)
class Runtime:
    lib_dir: Path           # holds libtvm_runtime.so and libtvm_ffi.so for the board
    origin: str             # "wheel" or "source"
    platform: str           # wheel platform tag, or the toolchain's target for source builds
    versions: dict[str, str]
    sources: dict[str, str]  # library -> where it came from (wheel file name, or "installed")
    cached: bool
    include_dir: Path | None = None     # tvm-ffi headers matching the libraries (None: the installed ones)
    build: dict[str, object] | None = None   # source builds: the tree and options

    @property
    def libs(self) -> list[Path]:
        """The runtime's libraries and any toolchain library they need that the board lacks."""
        return sorted(p for p in self.lib_dir.iterdir() if p.is_file())

    def manifest(self) -> dict[str, object]:
        out: dict[str, object] = {"origin": self.origin, "platform": self.platform, **self.versions,
                                  "sources": self.sources}
        if self.build:
            out["build"] = self.build
        return out


def compiler_versions() -> dict[str, str]:
    """Versions of the installed compiler packages; the runtime must match them exactly."""
    out = {}
    for dist in LIBS:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            raise UserError(f"the TVM compiler package {dist} is not installed",
                            hint="pip install 'apache-tvm==0.27.*'") from None
    return out


def _installed_tags(dist: str) -> set[str]:
    wheel = md.distribution(dist).read_text("WHEEL") or ""
    return {line.split(":", 1)[1].strip().split("-")[-1] for line in wheel.splitlines() if line.startswith("Tag:")}


def get(recipe: Recipe, *, source: str | None = None, allow_mismatch: bool | None = None,
        step: Step | None = None) -> Runtime:
    """The board's runtime: from the wheels, or built from a TVM source tree.

    ``source`` and ``allow_mismatch`` override the recipe's runtime.source and
    runtime.allow_version_mismatch (the CLI's --runtime-source, --allow-runtime-mismatch).
    """
    source = source or recipe.runtime.source
    if source != "wheel":
        return _from_source(recipe, source, recipe.runtime.allow_version_mismatch
                            if allow_mismatch is None else allow_mismatch, step)
    platform = recipe.runtime.platform
    assert platform
    versions = compiler_versions()
    installed = all(platform in _installed_tags(d) for d in LIBS)
    key = cache.key("runtime-wheel", platform, versions, installed)

    def build(tmp: Path) -> dict[str, object]:
        lib_dir = tmp / "lib"
        lib_dir.mkdir()
        sources = {}
        if installed:
            for dist, member in LIBS.items():
                _copy_installed(dist, member, lib_dir)
                sources[Path(member).name] = f"installed {dist} {versions[dist]} wheel"
        else:
            wheels = _download(platform, versions, tmp / "wheels")
            for dist, member in LIBS.items():
                whl = wheels[dist]
                with zipfile.ZipFile(whl) as z:
                    try:
                        data = z.read(member)
                    except KeyError:
                        raise UserError(f"{whl.name} has no {member}; cannot take the runtime from it") from None
                _install_lib(data, lib_dir / Path(member).name)
                sources[Path(member).name] = whl.name
            shutil.rmtree(tmp / "wheels")
        return {"sources": sources}

    entry = cache.get("runtime", key, build)
    return Runtime(lib_dir=entry.path / "lib", origin="wheel", platform=platform, versions=versions,
                   sources=entry.meta["sources"], cached=entry.hit)


def _copy_installed(dist: str, member: str, dest: Path) -> None:
    """Copy a library out of the installed wheel, checked against the wheel's RECORD."""
    d = md.distribution(dist)
    src = Path(d.locate_file(member))
    record = {}
    for line in (d.read_text("RECORD") or "").splitlines():
        parts = line.rsplit(",", 2)
        if len(parts) == 3:
            record[parts[0]] = parts[1]
    want = record.get(member, "")
    if want.startswith("sha256="):
        got = base64.urlsafe_b64encode(hashlib.sha256(src.read_bytes()).digest()).rstrip(b"=").decode()
        if got != want[len("sha256="):]:
            raise UserError(f"{src} differs from the {dist} wheel it was installed from",
                            hint=f"reinstall it: pip install --force-reinstall --no-deps {dist}=={d.version}")
    shutil.copy2(src, dest / Path(member).name)


def _download(platform: str, versions: dict[str, str], dest: Path) -> dict[str, Path]:
    dest.mkdir(parents=True, exist_ok=True)
    pyver = f"{sys.version_info.major}{sys.version_info.minor}"
    proc.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
              "--disable-pip-version-check", "--platform", platform, "--python-version", pyver,
              "--implementation", "cp", "-d", str(dest),
              *(f"{dist}=={v}" for dist, v in versions.items())],
             what=f"download the TVM runtime wheels for {platform}")
    found = {}
    for dist in versions:
        stem = dist.replace("-", "_") + "-"
        matches = sorted(dest.glob(f"{stem}*.whl"))
        if not matches:
            raise UserError(f"pip did not download a {dist} wheel for {platform}")
        found[dist] = matches[0]
    return found


# --- from TVM's sources -------------------------------------------------------------------------

BUILD_RECIPE = 2     # bump when the way we drive TVM's build changes what it produces


def config_cmake(recipe: Recipe) -> str:
    """TVM reads ``config.cmake`` from its build folder and its ``set()`` lines win over ``-D``
    options, so the options go here: only what a deployed harness needs."""
    rt = recipe.runtime
    on = {True: "ON", False: "OFF"}
    return "\n".join([
        "# Written by tvmbundle for the board's runtime: CPU only, no compiler.",
        "set(USE_LLVM OFF)",
        f"set(USE_RPC {on[rt.rpc]})",
        "set(USE_CPP_RPC OFF)",
        "set(USE_THREADS ON)",
        "set(USE_OPENMP none)",
        "set(USE_GTEST OFF)",
        "set(USE_CCACHE OFF)",
        "set(USE_ALTERNATIVE_LINKER OFF)",
        "set(BUILD_STATIC_RUNTIME OFF)",
        "set(INSTALL_DEV OFF)",
        "set(SUMMARIZE OFF)",
        "set(BUILD_TESTING OFF)",
        f"set(TVM_FFI_USE_LIBBACKTRACE {on[rt.backtrace]})",
        f"set(TVM_FFI_BACKTRACE_ON_SEGFAULT {on[rt.backtrace]})",
        "set(TVM_FFI_BUILD_TESTS OFF)",
        "set(TVM_FFI_BUILD_PYTHON_MODULE OFF)",
        "",
    ])


def _from_source(recipe: Recipe, source: str, allow: bool, step: Step | None) -> Runtime:
    tree = tvmsource.locate(recipe, source, recipe.file_of("runtime.source"), step)
    matched = tvmsource.check_lock(tree, recipe, allow)
    tc = toolchain.resolve(recipe)
    flags = cmakebuild.flags_for(tc, recipe.machine.cpu_family, recipe.runtime.optimize)
    config = config_cmake(recipe)
    versions = compiler_versions()
    key = cache.key("runtime-source", BUILD_RECIPE, tree.identity, tc.identity(), flags.key(), config)

    def build(tmp: Path) -> dict[str, object]:
        build_dir = tmp / "build"
        cmakebuild.build(tree.path, build_dir, tc, flags, targets=["runtime"], config_cmake=config, step=step,
                         what=f"build the TVM runtime for {recipe.name}")
        lib_dir = tmp / "lib"
        lib_dir.mkdir()
        for member in LIBS.values():
            name = Path(member).name
            found = sorted(build_dir.rglob(name), key=lambda p: len(p.parts))
            if not found:
                raise UserError(f"TVM's build of {tree.path} made no {name}; is it a TVM release tree?")
            _install_lib(found[0].resolve(), lib_dir / name)
        _add_toolchain_libs(lib_dir, tc, recipe)
        # The headers that go with these libraries, for the harness.
        inc = tmp / "include"
        shutil.copytree(tree.path / tvmsource.FFI / "include", inc)
        shutil.copytree(tree.path / tvmsource.FFI / "3rdparty" / "dlpack" / "include", inc, dirs_exist_ok=True)
        shutil.rmtree(build_dir)
        return {"tree": tree.manifest()}

    entry = cache.get("runtime", key, build)
    info: dict[str, object] = {"tree": entry.meta["tree"], "lock": matched,
                               "options": {"optimize": recipe.runtime.optimize, "rpc": recipe.runtime.rpc,
                                           "backtrace": recipe.runtime.backtrace},
                               "toolchain": tc.version}
    return Runtime(lib_dir=entry.path / "lib", origin="source", platform=tc.machine, versions=versions,
                   sources={Path(m).name: f"built from TVM {tree.version or 'sources'} ({tree.identity[:19]})"
                            for m in LIBS.values()},
                   cached=entry.hit, include_dir=entry.path / "include", build=info)


def _install_lib(src: Path | bytes, dest: Path) -> None:
    """A shared library into the runtime's lib/, executable as the loader and packagers expect."""
    if isinstance(src, bytes):
        dest.write_bytes(src)
    else:
        shutil.copyfile(src, dest)
    dest.chmod(0o755)


def _add_toolchain_libs(lib_dir: Path, tc, recipe: Recipe) -> None:
    """Bundle the compiler's own libraries the runtime needs beyond the board's base system
    (riscv64: libatomic.so.1, which GCC calls for sub-word atomics and Debian does not always
    install), taken from the cross toolchain that linked against them."""
    have = {p.name for p in lib_dir.iterdir()}
    for lib in sorted(lib_dir.iterdir()):
        for needed in elf.inspect(lib).needed:
            if needed in have or needed in recipe.machine.base_libs:
                continue
            found = proc.run([tc.cxx, *tc.cflags, *([f"--sysroot={tc.sysroot}"] if tc.sysroot else []),
                              f"-print-file-name={needed}"], what=f"find {needed} in the toolchain").stdout.strip()
            if found and Path(found).is_file():
                _install_lib(Path(found).resolve(), lib_dir / needed)
                have.add(needed)
