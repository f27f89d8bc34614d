"""A TVM source tree to build the board's runtime from: cloned at the compiler's version, or the user's.

A model compiled by apache-tvm X must run on the runtime of X, so a tree is
identified (version from its tags or version file, commit, content hash) and
refused when it is not the installed compiler's, unless the recipe allows it.
TVM's own CMake builds the runtime; nothing of its build lists is copied here.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from bundler import cache, proc
from bundler.config.recipe import Recipe
from bundler.errors import RecipeError, UserError

FFI = "3rdparty/tvm-ffi"
# What a runtime build reads: the content hash of a tree that is not a clean git checkout.
_HASHED = ("CMakeLists.txt", "cmake", "include", "src/runtime", "src/support", FFI)
_SKIP_DIRS = {".git", "__pycache__", "build", "tests", "docs", "python", "rust"}


@dataclass(frozen=True)
class Tree:
    path: Path
    origin: str          # "git <url> <ref>" or "path"
    version: str         # e.g. "0.27.0.post1", "0.27.dev35"; "" when the tree does not say
    commit: str          # full commit id, "" outside git
    identity: str        # what the build depends on: "git:<commit>" for a clean checkout, else a content hash
    ffi_version: str

    def manifest(self) -> dict[str, str]:
        return {"origin": self.origin, "version": self.version, "commit": self.commit,
                "identity": self.identity, "tvm-ffi": self.ffi_version}


def compiler_release() -> tuple[str, str]:
    """The installed apache-tvm's version and the commit it was built from ("" if unknown)."""
    version = md.version("apache-tvm")
    commit = ""
    try:
        text = Path(md.distribution("apache-tvm").locate_file("tvm/_version.py")).read_text()
        m = re.search(r"commit_id\s*=\s*['\"]g?([0-9a-f]{7,40})['\"]", text)
        commit = m[1] if m else ""
    except OSError:
        pass
    return version, commit


def default_ref(version: str) -> str:
    """The release tag of a compiler version: 0.27.0.post1 -> v0.27.0.post1 (TVM tags every release)."""
    return f"v{version}"


def locate(recipe: Recipe, source: str, file: str, step=None) -> Tree:
    """The tree for ``runtime.source`` (``git`` or a path), identified."""
    if source == "git":
        version, _ = compiler_release()
        ref = recipe.runtime.git_ref or default_ref(version)
        path = clone(recipe.runtime.git_url, ref, step)
        return identify(path, origin=f"git {recipe.runtime.git_url} {ref}")
    path = Path(source).expanduser()
    if not path.is_absolute():
        # Relative to the recipe that names it, like meson's cross files.
        path = (recipe.path.parent / path) if file.endswith(".toml") else path
    path = path.resolve()
    problem = not_a_tree(path)
    if problem:
        raise RecipeError(file, "runtime.source", f"{source!r}: {problem}")
    return identify(path, origin="path")


def not_a_tree(path: Path) -> str | None:
    if not path.is_dir():
        return "no such folder; expected 'wheel', 'git' or the path of a TVM source tree"
    if not (path / "CMakeLists.txt").is_file() or not (path / "src" / "runtime").is_dir():
        return "not a TVM source tree (no CMakeLists.txt and src/runtime/ in it)"
    if not (path / FFI / "CMakeLists.txt").is_file():
        return (f"{FFI} is empty: TVM's submodules are not checked out; run "
                f"`git -C {path} submodule update --init --recursive {FFI}`")
    if not any((path / FFI).glob("3rdparty/dlpack/include/dlpack/dlpack.h")):
        return (f"{FFI}/3rdparty/dlpack is empty: run "
                f"`git -C {path / FFI} submodule update --init --recursive`")
    return None


def clone(url: str, ref: str, step=None) -> Path:
    """A shallow checkout of ``ref`` with the submodule the runtime needs, cached by (url, ref)
    for tags and commits; a branch moves, so it is fetched again each time."""
    git = proc.which("git", why="clone TVM's sources", install="apt-get install git")
    pinned = bool(re.fullmatch(r"[0-9a-f]{40}", ref)) or ref.startswith("v")

    def do_clone(tmp: Path) -> dict[str, object]:
        dest = tmp / "tvm"
        if step:
            step.update(f"cloning {url} at {ref}")
        # Only 3rdparty/tvm-ffi (and its own dlpack): TVM's other submodules are GPU libraries
        # of hundreds of MB that a CPU runtime never reads.
        proc.run([git, "init", "-q", str(dest)], what="clone TVM's sources")
        proc.run([git, "-C", str(dest), "remote", "add", "origin", url], what="clone TVM's sources")
        # One commit, and the tag itself when ref is one (its name is the tree's version); never
        # --tags, which would bring a snapshot of every release.
        fetch = [git, "-C", str(dest), "fetch", "-q", "--depth", "1", "--no-tags", "origin"]
        try:
            if not re.fullmatch(r"[0-9a-f]{40}", ref):
                tag = proc.run([*fetch, f"+refs/tags/{ref}:refs/tags/{ref}"], check=False, timeout=1800)
                if tag.returncode == 0:
                    proc.run([git, "-C", str(dest), "update-ref", "FETCH_HEAD", f"refs/tags/{ref}^{{commit}}"],
                             what="check out TVM's sources")
            if re.fullmatch(r"[0-9a-f]{40}", ref) or tag.returncode != 0:
                proc.run([*fetch, ref], what=f"fetch {ref} from {url}", timeout=1800)
        except UserError as e:
            raise UserError(f"cannot fetch {ref!r} from {url}: {e}",
                            hint="set runtime.git_url to a reachable mirror and runtime.git_ref to a tag, "
                                 "branch or full commit id, or point runtime.source at a TVM checkout") from None
        proc.run([git, "-C", str(dest), "-c", "advice.detachedHead=false", "checkout", "-q", "FETCH_HEAD"],
                 what="check out TVM's sources")
        proc.run([git, "-C", str(dest), "submodule", "update", "-q", "--init", "--recursive", "--depth", "1",
                  "--", FFI], what=f"check out {FFI}", timeout=1800)
        return {"url": url, "ref": ref}

    key = cache.key("tvm-source", url, ref)
    if not pinned:
        old = cache.root() / "tvm-source" / key
        shutil.rmtree(old, ignore_errors=True)
    return cache.get("tvm-source", key, do_clone).path / "tvm"


def identify(path: Path, origin: str) -> Tree:
    commit, version, clean = "", "", False
    if (path / ".git").exists() and shutil.which("git"):
        git = shutil.which("git") or "git"
        r = proc.run([git, "-C", str(path), "rev-parse", "HEAD"], check=False)
        commit = r.stdout.strip() if r.returncode == 0 else ""
        if commit:
            st = proc.run([git, "-C", str(path), "status", "--porcelain", "--untracked-files=no",
                           "--ignore-submodules=untracked"], check=False)
            clean = st.returncode == 0 and not st.stdout.strip()
            d = proc.run([git, "-C", str(path), "describe", "--tags", "--match", "v[0-9]*"], check=False)
            version = version_from_describe(d.stdout.strip()) if d.returncode == 0 else ""
    if not version:
        version = _version_file(path)
    if clean:
        ffi = _ffi_commit(path)
        identity = f"git:{commit}" + (f"+ffi:{ffi}" if ffi else "")
    else:
        identity = "sha256:" + content_hash(path)
    return Tree(path=path, origin=origin, version=version, commit=commit, identity=identity,
                ffi_version=_ffi_version(path))


def version_from_describe(described: str) -> str:
    """setuptools_scm's guess-next-dev, as TVM's pyproject configures it:
    v0.27.0.post1 -> 0.27.0.post1; v0.27.dev0-35-g5d4dc87 -> 0.27.dev35; v0.26.0-3-gabc -> 0.26.1.dev3."""
    m = re.fullmatch(r"v(?P<tag>[0-9][^-]*)(?:-(?P<n>\d+)-g[0-9a-f]+)?", described)
    if not m:
        return ""
    tag, n = m["tag"], int(m["n"] or 0)
    if not n:
        return tag
    dev = re.fullmatch(r"(.*)\.dev(\d+)", tag)
    if dev:
        return f"{dev[1]}.dev{int(dev[2]) + n}"
    parts = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", tag)
    if not parts:
        return ""
    return f"{parts[1]}.{parts[2]}.{int(parts[3] or 0) + 1}.dev{n}"


def _version_file(path: Path) -> str:
    for rel in ("python/tvm/_version.py", "version.py", "python/tvm/libinfo.py"):
        p = path / rel
        if p.is_file():
            m = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]", p.read_text(errors="replace"))
            if m:
                return m[1]
    return ""


def _ffi_commit(path: Path) -> str:
    r = proc.run(["git", "-C", str(path / FFI), "rev-parse", "HEAD"], check=False)
    return r.stdout.strip() if r.returncode == 0 else ""


def _ffi_version(path: Path) -> str:
    ffi = path / FFI
    if (ffi / ".git").exists():
        d = proc.run(["git", "-C", str(ffi), "describe", "--tags", "--match", "v[0-9]*"], check=False)
        if d.returncode == 0 and d.stdout.strip():
            return d.stdout.strip().lstrip("v")
    pkg = ffi / "PKG-INFO"
    if pkg.is_file():
        m = re.search(r"^Version: (\S+)", pkg.read_text(errors="replace"), re.M)
        if m:
            return m[1]
    return ""


def content_hash(path: Path) -> str:
    """sha256 over the names and contents of what a runtime build reads (a few thousand files)."""
    h = hashlib.sha256()
    for rel in _HASHED:
        top = path / rel
        if top.is_file():
            h.update(rel.encode() + b"\0" + cache.sha256_file(top).encode())
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
            for name in sorted(filenames):
                p = Path(dirpath) / name
                if p.is_file():
                    h.update(p.relative_to(path).as_posix().encode() + b"\0" + cache.sha256_file(p).encode())
    return h.hexdigest()


def check_lock(tree: Tree, recipe: Recipe, allow: bool) -> str:
    """Refuse a tree that is not the installed compiler's release; returns how it matched."""
    version, commit = compiler_release()
    if commit and tree.commit.startswith(commit):
        return f"commit {commit}"
    if tree.version and tree.version == version:
        return f"version {version}"
    if allow:
        return "mismatch allowed"
    what = f"{tree.version or 'of unknown version'}" + (f" (commit {tree.commit[:10]})" if tree.commit else "")
    key = "runtime.allow_version_mismatch"
    raise UserError(
        f"{recipe.file_of('runtime.source')}: runtime.source: the TVM tree {tree.path} is {what}, but the installed "
        f"compiler is apache-tvm {version}" + (f" (commit {commit})" if commit else "") +
        "; a model compiled by one may not load on the runtime of the other",
        hint=f"check out {default_ref(version)} in that tree (and `git submodule update --init --recursive`), "
             f"or set {key} = true in the recipe (or pass --allow-runtime-mismatch) to build it anyway")
