"""Runtimes built from sources with the board's cross toolchain.

What runs where:
- Always (CI): the CMake/toolchain-file driver cross-builds a real CMake project that PyPI has
  in full, the ``apache-tvm-ffi`` sdist, for armhf and riscv64 with Debian's cross compilers;
  the libraries are checked with readelf and loaded by a harness-style program under qemu-user.
  The runtime cache and version lock run against a small CMake project that stands in for TVM's
  tree (TVM has no sdist and CI cannot clone it), built for real with the same driver.
- With ``TVMBUNDLE_TEST_TVM_SOURCE=/path/to/tvm`` (a checkout with its submodules): the real
  runtime for armhf and riscv64, and a compiled model run under qemu against the host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bundler import cache
from bundler.build import cmakebuild, elf, runtime, toolchain, tvmsource
from bundler.config import recipe
from bundler.errors import CommandFailed, RecipeError, UserError
from bundler.package import archive
from tests import models

BOARDS = {"rpi3-armhf": ("arm", "qemu-arm", "/usr/arm-linux-gnueabihf"),
          "visionfive2": ("riscv64", "qemu-riscv64", "/usr/riscv64-linux-gnu")}


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/setup installs them)")


def has_symtab(path: Path) -> bool:
    from elftools.elf.elffile import ELFFile

    with open(path, "rb") as f:
        return ELFFile(f).get_section_by_name(".symtab") is not None


# --- the driver on a real project: the tvm-ffi sdist -------------------------------------------

@pytest.fixture(scope="session")
def ffi_sdist(tmp_path_factory) -> Path:
    """The sdist of exactly the installed apache-tvm-ffi, unpacked (downloaded once per cache)."""
    import importlib.metadata as md

    version = md.version("apache-tvm-ffi")
    dest = Path(os.environ.get("TVMBUNDLE_TEST_CACHE") or tmp_path_factory.mktemp("sdist")) / f"ffi-sdist-{version}"
    if not (dest / "CMakeLists.txt").exists():
        dl = tmp_path_factory.mktemp("dl")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "apache-tvm-ffi",
                        "--disable-pip-version-check", "-d", str(dl), f"apache-tvm-ffi=={version}"], check=True)
        (sdist,) = dl.glob("apache_tvm_ffi-*.tar.gz")
        archive.extract(sdist, dl)         # tarfile's data filter is missing from Debian's Python 3.11.2
        (top,) = [p for p in dl.iterdir() if p.is_dir()]
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(top), dest)
    return dest


FFI_PROGRAM = r"""
// What a harness does first: load libtvm_ffi, register a function, find it by name, call it.
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/array.h>
#include <cstdio>
int main() {
  namespace ffi = tvm::ffi;
  ffi::Function::SetGlobal("test.sum", ffi::Function::FromTyped([](ffi::Array<int64_t> xs) {
    int64_t s = 0;
    for (int64_t x : xs) s += x;
    return s;
  }));
  auto f = ffi::Function::GetGlobal("test.sum");
  if (!f.has_value()) { std::puts("test.sum not found"); return 1; }
  int64_t got = (*f)(ffi::Array<int64_t>({40, 1, 1})).cast<int64_t>();
  std::printf("sum %lld\n", static_cast<long long>(got));
  return got == 42 ? 0 : 1;
}
"""


@pytest.mark.slow
@pytest.mark.parametrize("board", sorted(BOARDS))
def test_ffi_sdist_cross_builds_and_loads_under_qemu(board, ffi_sdist, tmp_path):
    family, qemu, ld_prefix = BOARDS[board]
    r = recipe.load(board)
    need(r.toolchain.cxx, qemu)
    tc = toolchain.resolve(r)
    flags = cmakebuild.flags_for(tc, family, "size")
    build = tmp_path / "build"
    cmakebuild.build(ffi_sdist, build, tc, flags, targets=["tvm_ffi_shared"],
                     options={"TVM_FFI_USE_LIBBACKTRACE": "OFF", "TVM_FFI_BACKTRACE_ON_SEGFAULT": "OFF"},
                     what=f"build tvm-ffi for {board}")
    (lib,) = [p for p in build.rglob("libtvm_ffi.so") if not p.is_symlink()]

    info = elf.inspect(lib)
    assert elf.check_compat(info, machine=r.machine.elf_machine, bits=r.machine.bits,
                            float_abi=r.machine.float_abi, glibc=r.machine.glibc, glibcxx=r.machine.glibcxx) == []
    assert not has_symtab(lib), "size builds are stripped"
    file_says = subprocess.run(["file", "-L", str(lib)], capture_output=True, text=True).stdout
    assert {"arm": "ARM, EABI5", "riscv64": "RISC-V"}[family] in file_says, file_says

    src = tmp_path / "main.cc"
    src.write_text(FFI_PROGRAM)
    exe = tmp_path / "ffi-check"
    subprocess.run([str(tc.cxx), *tc.cflags, "-std=c++17", "-O1", "-I", str(ffi_sdist / "include"),
                    "-I", str(ffi_sdist / "3rdparty" / "dlpack" / "include"), str(src), "-o", str(exe),
                    f"-L{lib.parent}", "-ltvm_ffi", *tc.ldflags], check=True)
    run = subprocess.run([qemu, "-L", ld_prefix, str(exe)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "LD_LIBRARY_PATH": str(lib.parent)})
    assert run.returncode == 0 and "sum 42" in run.stdout, run.stdout + run.stderr


@pytest.mark.slow
def test_a_failing_compile_reports_the_command_and_its_first_error(tmp_path):
    need("arm-linux-gnueabihf-g++")
    src = tmp_path / "proj"
    src.mkdir()
    (src / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.18)\nproject(p CXX)\n"
                                        "add_library(good SHARED good.cc)\nadd_library(bad SHARED bad.cc)\n")
    (src / "good.cc").write_text("int good() { return 1; }\n")
    (src / "bad.cc").write_text("int bad() { return undeclared_thing; }\n")
    tc = toolchain.resolve(recipe.load("rpi3-armhf"))
    with pytest.raises(CommandFailed) as e:
        cmakebuild.build(src, tmp_path / "b", tc, cmakebuild.flags_for(tc, "arm"), targets=["all"], what="build p")
    msg = str(e.value)
    assert "build p failed" in msg
    assert "FAILED: " in msg and "bad.cc" in msg
    assert "arm-linux-gnueabihf-g++" in msg                # the failing command itself
    assert re.search(r"undeclared_thing.{1,3} was not declared", msg)    # and its first error


# --- the runtime step: cache key and version lock, on a stand-in tree -----------------------------

STANDIN_TOP = r"""
# Stands in for TVM's tree in tests: same entry points (config.cmake in the build folder,
# the `runtime` target, 3rdparty/tvm-ffi), two tiny libraries.
cmake_minimum_required(VERSION 3.18)
project(tvm C CXX)
if(EXISTS ${CMAKE_BINARY_DIR}/config.cmake)
  include(${CMAKE_BINARY_DIR}/config.cmake)
endif()
foreach(v USE_LLVM USE_RPC TVM_FFI_USE_LIBBACKTRACE)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "config.cmake did not set ${v}")
  endif()
endforeach()
if(USE_LLVM)
  message(FATAL_ERROR "a board runtime must not build LLVM")
endif()
add_subdirectory(3rdparty/tvm-ffi)
add_library(tvm_runtime SHARED src/runtime/runtime.cc)
target_compile_definitions(tvm_runtime PRIVATE RPC_ENABLED=$<BOOL:${USE_RPC}>)
target_link_libraries(tvm_runtime PUBLIC tvm_ffi_shared)
set_target_properties(tvm_runtime PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/lib)
add_custom_target(runtime DEPENDS tvm_runtime)
"""


def make_standin_tree(path: Path, version: str) -> Path:
    (path / "src" / "runtime").mkdir(parents=True)
    (path / "include").mkdir()
    ffi = path / "3rdparty" / "tvm-ffi"
    (ffi / "include" / "tvm" / "ffi").mkdir(parents=True)
    (ffi / "3rdparty" / "dlpack" / "include" / "dlpack").mkdir(parents=True)
    (ffi / "3rdparty" / "dlpack" / "include" / "dlpack" / "dlpack.h").write_text("/* stand-in */\n")
    (ffi / "include" / "tvm" / "ffi" / "c_api.h").write_text("/* stand-in */\n")
    (ffi / "CMakeLists.txt").write_text(
        "add_library(tvm_ffi_shared SHARED ffi.cc)\n"
        "set_target_properties(tvm_ffi_shared PROPERTIES OUTPUT_NAME tvm_ffi "
        "LIBRARY_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/lib)\n")
    (ffi / "ffi.cc").write_text("extern \"C\" int TVMFFIStandIn() { return 42; }\n")
    (path / "src" / "runtime" / "runtime.cc").write_text(
        "extern \"C\" int TVMFFIStandIn();\nextern \"C\" int TVMRuntimeStandIn() { return TVMFFIStandIn() + RPC_ENABLED; }\n")
    (path / "CMakeLists.txt").write_text(STANDIN_TOP)
    (path / "python" / "tvm").mkdir(parents=True)
    (path / "python" / "tvm" / "_version.py").write_text(f"__version__ = version = '{version}'\n")
    return path


def board_recipe(tmp_path: Path, name: str, extra: str = "") -> recipe.Recipe:
    p = tmp_path / f"{name}.toml"
    p.write_text(f'format = 1\nextends = "rpi3-armhf"\n[board]\nname = "test"\n{extra}')
    return recipe.load(str(p))


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv("TVMBUNDLE_CACHE", str(d))
    return d


@pytest.mark.slow
def test_runtime_cache_key_follows_tree_toolchain_and_options(tmp_path, own_cache):
    need("arm-linux-gnueabihf-g++")
    version, _ = tvmsource.compiler_release()
    tree = make_standin_tree(tmp_path / "tvm", version)
    r = board_recipe(tmp_path, "a")

    first = runtime.get(r, source=str(tree))
    assert not first.cached and first.origin == "source"
    assert first.build["lock"] == f"version {version}" and first.build["tree"]["version"] == version
    assert {p.name for p in first.lib_dir.iterdir()} == {"libtvm_runtime.so", "libtvm_ffi.so"}
    assert elf.inspect(first.lib_dir / "libtvm_runtime.so").machine == "arm"
    assert (first.include_dir / "dlpack" / "dlpack.h").exists()

    # Same tree, toolchain and options from another recipe (another board): the same build.
    again = runtime.get(board_recipe(tmp_path, "b", '[service]\nthreads = 2\n'), source=str(tree))
    assert again.cached and again.lib_dir == first.lib_dir

    # A changed option, a changed toolchain, a changed tree: each builds anew.
    rpc = runtime.get(board_recipe(tmp_path, "c", "[runtime]\nrpc = true\n"), source=str(tree))
    flags = runtime.get(board_recipe(tmp_path, "d", '[toolchain]\ncflags = ["-DBOARD_REV=2"]\n'), source=str(tree))
    speed = runtime.get(board_recipe(tmp_path, "e", '[runtime]\noptimize = "speed"\n'), source=str(tree))
    (tree / "src" / "runtime" / "runtime.cc").write_text(
        (tree / "src" / "runtime" / "runtime.cc").read_text() + "// a patch\n")
    patched = runtime.get(r, source=str(tree))
    dirs = {first.lib_dir, rpc.lib_dir, flags.lib_dir, speed.lib_dir, patched.lib_dir}
    assert len(dirs) == 5 and not any(x.cached for x in (rpc, flags, speed, patched))
    assert sum(1 for e in cache.entries() if e.kind == "runtime") == 5


@pytest.mark.slow
def test_a_tree_of_another_version_is_refused_unless_allowed(tmp_path, own_cache, run_cli):
    need("arm-linux-gnueabihf-g++")
    tree = make_standin_tree(tmp_path / "tvm", "0.19.0")
    r = board_recipe(tmp_path, "a")
    with pytest.raises(UserError) as e:
        runtime.get(r, source=str(tree))
    msg = str(e.value)
    assert "runtime.source" in msg and "0.19.0" in msg and tvmsource.compiler_release()[0] in msg
    assert "allow_version_mismatch" in msg and not list(own_cache.glob("runtime/*"))

    allowed = runtime.get(board_recipe(tmp_path, "b", "[runtime]\nallow_version_mismatch = true\n"),
                          source=str(tree))
    assert allowed.build["lock"] == "mismatch allowed" and allowed.build["tree"]["version"] == "0.19.0"

    # The CLI says the same, with exit code 2, naming the tree.
    models.conv_net(tmp_path / "m.onnx")
    code, _, err = run_cli("make", "rpi3-armhf", "--model", str(tmp_path / "m.onnx"), "--runtime-source", str(tree))
    assert code == 2 and "0.19.0" in err and str(tree) in err


@pytest.mark.parametrize("source, problem", [
    ("./nowhere", "no such folder"),
    ("wheels", "'wheels' is not allowed; expected 'wheel', 'git' or the path of a TVM source tree"),
])
def test_bad_runtime_source_names_file_key_and_allowed(tmp_path, run_cli, source, problem):
    p = tmp_path / "b.toml"
    p.write_text(f'format = 1\nextends = "rpi3-armhf"\n[board]\nname = "x"\n[runtime]\nsource = "{source}"\n')
    models.conv_net(tmp_path / "m.onnx")
    code, _, err = run_cli("make", str(p), "--model", str(tmp_path / "m.onnx"))
    assert code == 2
    assert "b.toml: runtime.source:" in err and problem in err, err


def test_a_tree_without_submodules_says_how_to_get_them(tmp_path, own_cache):
    tree = make_standin_tree(tmp_path / "tvm", "0.27.0")
    shutil.rmtree(tree / "3rdparty" / "tvm-ffi")
    (tree / "3rdparty" / "tvm-ffi").mkdir()
    with pytest.raises(RecipeError) as e:
        runtime.get(board_recipe(tmp_path, "a"), source=str(tree))
    assert "submodule update --init --recursive" in str(e.value)


@pytest.mark.slow
def test_git_source_clones_the_ref_and_locks_to_its_tag(tmp_path, own_cache):
    """runtime.source = 'git' against a local repository (the network is not for tests)."""
    need("git", "arm-linux-gnueabihf-g++")
    version, _ = tvmsource.compiler_release()
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.org",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.org"}

    def git(cwd: Path, *args: str) -> None:
        subprocess.run(["git", "-c", "protocol.file.allow=always", *args], cwd=cwd, env=env, check=True,
                       capture_output=True)

    standin = make_standin_tree(tmp_path / "work", version)
    ffi_repo = tmp_path / "tvm-ffi.git"
    shutil.move(str(standin / "3rdparty" / "tvm-ffi"), ffi_repo)
    git(ffi_repo, "init", "-q")
    git(ffi_repo, "add", "-A")
    git(ffi_repo, "commit", "-qm", "ffi")
    (standin / "python" / "tvm" / "_version.py").unlink()     # the version comes from the tag now
    git(standin, "init", "-q")
    git(standin, "submodule", "add", "-q", str(ffi_repo), "3rdparty/tvm-ffi")
    git(standin, "add", "-A")
    git(standin, "commit", "-qm", "tvm")
    git(standin, "tag", f"v{version}")
    git(standin, "commit", "-q", "--allow-empty", "-m", "after the release")

    r = board_recipe(tmp_path, "a", f'[runtime]\nsource = "git"\ngit_url = "file://{standin}"\n')
    os.environ["GIT_CONFIG_COUNT"] = "1"          # file:// submodules are off by default since git 2.38
    os.environ["GIT_CONFIG_KEY_0"] = "protocol.file.allow"
    os.environ["GIT_CONFIG_VALUE_0"] = "always"
    try:
        rt = runtime.get(r)
        assert rt.build["tree"]["origin"] == f"git file://{standin} v{version}"
        assert rt.build["tree"]["version"] == version and rt.build["lock"] == f"version {version}"
        assert rt.build["tree"]["identity"].startswith("git:")
        # The branch head is one commit past the release: refused.
        head = board_recipe(tmp_path, "b", f'[runtime]\nsource = "git"\ngit_url = "file://{standin}"\n'
                                           'git_ref = "master"\n')
        with pytest.raises(UserError, match=r"is (of unknown version|\S+dev1) \(commit [0-9a-f]{10}\)"):
            runtime.get(head)
    finally:
        for k in ("GIT_CONFIG_COUNT", "GIT_CONFIG_KEY_0", "GIT_CONFIG_VALUE_0"):
            os.environ.pop(k, None)


@pytest.mark.parametrize("described, version", [
    ("v0.27.0.post1", "0.27.0.post1"),
    ("v0.27.dev0-35-g5d4dc87213", "0.27.dev35"),
    ("v0.26.0-3-gabcdef1", "0.26.1.dev3"),
    ("not-a-tag", ""),
])
def test_tree_versions_follow_tvms_setuptools_scm_scheme(described, version):
    assert tvmsource.version_from_describe(described) == version


# --- the real TVM runtime, when a tree is given ---------------------------------------------

TVM_TREE = os.environ.get("TVMBUNDLE_TEST_TVM_SOURCE")


@pytest.mark.skipif(not TVM_TREE, reason="set TVMBUNDLE_TEST_TVM_SOURCE to a TVM checkout (with submodules)")
@pytest.mark.parametrize("board", sorted(BOARDS))
def test_runtime_from_a_tvm_tree_runs_a_model_under_qemu(board, run_cli, tmp_path):
    family, qemu, _ = BOARDS[board]
    need(recipe.load(board).toolchain.cxx, qemu)
    models.conv_net(tmp_path / "convnet.onnx")
    models.multi_io(tmp_path / "multi.onnx")
    extra = ["--runtime-source", TVM_TREE]
    if os.environ.get("TVMBUNDLE_TEST_TVM_MISMATCH"):
        extra.append("--allow-runtime-mismatch")   # a development tree near the installed release
    code, out, err = run_cli("make", board, "--model", str(tmp_path / "convnet.onnx"), "--out",
                             str(tmp_path / "dist"), "--json", *extra)
    assert code == 0, err
    result = json.loads(out)
    steps = {s["name"].split(" ")[0] + " " + s["name"].split(" ")[1]: s for s in result["steps"]}
    assert any(s["name"].startswith("run the selftest under " + qemu) for s in result["steps"]), result
    # A second model for the same board builds no runtime.
    code, out, err = run_cli("make", board, "--model", str(tmp_path / "multi.onnx"), "--out",
                             str(tmp_path / "dist"), "--json", *extra)
    assert code == 0, err
    again = json.loads(out)
    rt_step = [s for s in again["steps"] if s["name"].startswith("get the TVM runtime")][0]
    assert rt_step["cached"], again
    assert steps
