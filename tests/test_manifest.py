"""The typed manifest: loaded and checked once, written in one canonical form, and crafted bundles
refused by every consumer on this machine (verify, export, bench) before they read a file.

Deploy's own refusal (on the device, and before upload) is tested in tests/test_release.py.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from bundler.errors import UserError
from bundler.package import archive, bundle
from bundler.package.manifest import Manifest, canonical_json
from tests import bundletools, models
from tests.bundletools import repack

TRAVERSAL = "../../../../tmp/tvmbundle-escape"
OUTSIDE = Path("/tmp/tvmbundle-escape")


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return bundletools.built(tmp_path_factory, "x86_64", models.conv_net, "convnet")


def crafted(src: Path, dest: Path, change) -> Path:
    """A copy of ``src`` whose manifest ``change(manifest_dict)`` edited, checksums left as they are."""
    def mutate(top: Path) -> None:
        m = json.loads((top / "manifest.json").read_text())
        change(m)
        (top / "manifest.json").write_text(json.dumps(m))
    dest.mkdir(parents=True, exist_ok=True)
    return repack(src, dest, mutate, fix_manifest=False)


def traversal(m: dict) -> None:
    m["files"][0]["path"] = TRAVERSAL


def absolute(m: dict) -> None:
    m["files"][0]["path"] = "/etc/passwd"


def env_newline(m: dict) -> None:
    m["service"]["environment"] = {"MODE": "fast\nExecStartPre=/bin/touch /tmp/tvmbundle-pwned"}


PATH_PROBLEM = "is not allowed; a path in a bundle must be relative and stay inside the release"


# --- the manifest itself ---------------------------------------------------------------------

def test_manifest_round_trips_and_is_canonical(built, tmp_path):
    top = bundle.extract(built, tmp_path / "x")
    raw = (top / "manifest.json").read_text()
    m = Manifest.load(top, str(built))
    assert m.dumps() == raw                        # what make wrote is the canonical form
    assert Manifest.from_json(json.loads(raw), "again") == m
    shuffled = json.loads(raw, object_pairs_hook=lambda pairs: dict(reversed(pairs)))
    assert canonical_json(shuffled) == raw         # key order in memory never reaches the bytes
    assert m.model.file == "model/model.so" and m.file("model/model.so").mode == "0755"


@pytest.mark.parametrize("change, key, problem", [
    (traversal, "files[0].path", f"'{TRAVERSAL}' {PATH_PROBLEM}"),
    (absolute, "files[0].path", f"'/etc/passwd' {PATH_PROBLEM}"),
    (env_newline, "service.environment", "MODE: 'fast\\nExecStartPre=/bin/touch /tmp/tvmbundle-pwned' is not "
                                         "allowed; control characters"),
    (lambda m: m["install"].update(prefix="/opt/tvm bundle"), "install.prefix", "'/opt/tvm bundle' is not allowed"),
    (lambda m: m["service"].update(user="root\nUser=root"), "service.user", "is not allowed; expected a user name"),
    (lambda m: m.update(name="../x"), "name", "'../x' is not allowed"),
    (lambda m: m.update(unexpected=1), "unexpected", "unknown key"),
    (lambda m: m["model"].update(file="model/other.so"), "model.file", "is not one of the bundle's files"),
])
def test_manifest_refuses_crafted_values(built, tmp_path, change, key, problem):
    top = bundle.extract(built, tmp_path / "x")
    data = json.loads((top / "manifest.json").read_text())
    change(data)
    with pytest.raises(UserError) as e:
        Manifest.from_json(data, "b.tar.gz: manifest.json")
    assert str(e.value).startswith(f"b.tar.gz: manifest.json: {key}: ") and problem in str(e.value), str(e.value)


# --- every consumer refuses a crafted bundle ---------------------------------------------------

@pytest.mark.parametrize("change", [traversal, absolute], ids=["dotdot", "absolute"])
def test_verify_refuses_paths_outside_the_release(built, tmp_path, run_cli, change):
    bad = crafted(built, tmp_path / "bad", change)
    code, out, err = run_cli("verify", str(bad))
    assert code == 2 and out == ""
    assert "manifest.json: files[0].path: " in err and PATH_PROBLEM in err, err
    assert "Traceback" not in err


def test_export_refuses_paths_outside_the_release(built, tmp_path, run_cli):
    bad = crafted(built, tmp_path / "bad", traversal)
    code, _, err = run_cli("export", "buildroot", str(bad), "--out", str(tmp_path / "br"))
    assert code == 2 and "files[0].path" in err and PATH_PROBLEM in err, err
    assert not (tmp_path / "br").exists()


def test_bench_refuses_paths_outside_the_release(built, tmp_path, run_cli):
    bad = crafted(built, tmp_path / "bad", traversal)
    code, _, err = run_cli("bench", str(bad), "--runs", "1", "--warmup", "0")
    assert code == 2 and "files[0].path" in err and PATH_PROBLEM in err, err


def test_verify_refuses_a_unit_injection_in_the_manifest(built, tmp_path, run_cli):
    bad = crafted(built, tmp_path / "bad", env_newline)
    code, _, err = run_cli("verify", str(bad))
    assert code == 2 and "service.environment: MODE:" in err and "control characters" in err, err


# --- archives -------------------------------------------------------------------------------------

def _tar(path: Path, *members: tarfile.TarInfo, data: bytes = b"x") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for m in members:
            if m.isfile():
                m.size = len(data)
                tar.addfile(m, io.BytesIO(data))
            else:
                tar.addfile(m)
    return path


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    m = tarfile.TarInfo(name)
    m.type = kind
    m.linkname = link
    m.mode = 0o644
    return m


@pytest.mark.parametrize("members, problem", [
    ([_member("top/../../escape")], "member 'top/../../escape': absolute paths, '..' and empty names are not allowed"),
    ([_member("/tmp/escape")], "member '/tmp/escape': absolute paths, '..' and empty names are not allowed"),
    ([_member("top/link", tarfile.SYMTYPE, "/etc")], "member 'top/link': link to the absolute path '/etc' is not allowed"),
    ([_member("top/link", tarfile.SYMTYPE, "../../etc")], "member 'top/link': link to '../../etc' leads out of the archive"),
    ([_member("top/hard", tarfile.LNKTYPE, "../etc/passwd")], "member 'top/hard': link to '../etc/passwd' leads out"),
    ([_member("top/dev", tarfile.CHRTYPE)], "member 'top/dev': a character device is not allowed"),
    ([_member("top/fifo", tarfile.FIFOTYPE)], "member 'top/fifo': a FIFO is not allowed"),
])
def test_archive_refuses_members_that_escape(tmp_path, members, problem):
    path = _tar(tmp_path / "t.tar.gz", *members)
    with pytest.raises(archive.UnsafeArchive) as e:
        archive.extract(path, tmp_path / "out")
    assert str(e.value) == f"{path}: {problem}" or str(e.value).startswith(f"{path}: {problem}"), str(e.value)
    assert not (tmp_path / "out").exists(), "nothing may be written before every member is checked"


def test_archive_writes_no_file_through_a_link(tmp_path):
    """A link member, then a file 'inside' it: extracted naively, the file lands where the link points."""
    path = _tar(tmp_path / "t.tar.gz", _member("top/d", tarfile.SYMTYPE, "."), _member("top/d/f"))
    with pytest.raises(archive.UnsafeArchive) as e:
        archive.extract(path, tmp_path / "out")
    assert str(e.value) == (f"{path}: member 'top/d/f': its folder 'top/d' is a link in the archive; "
                            "writing through links is not allowed")
    assert not (tmp_path / "out").exists()


def test_archive_refuses_a_member_written_twice(tmp_path):
    path = _tar(tmp_path / "t.tar.gz", _member("top/f"), _member("top/f"))
    with pytest.raises(archive.UnsafeArchive, match="'top/f': appears twice"):
        archive.extract(path, tmp_path / "out")


def test_archive_extracts_a_plain_tree_without_special_modes(tmp_path):
    m = _member("top/bin/x")
    m.mode = 0o4755          # setuid must not survive
    path = _tar(tmp_path / "t.tar.gz", _member("top", tarfile.DIRTYPE), m)
    assert archive.extract(path, tmp_path / "out") == ["top", "top/bin/x"]
    assert os.stat(tmp_path / "out" / "top" / "bin" / "x").st_mode & 0o7777 == 0o755


def test_archive_rules_are_the_same_on_debians_python(tmp_path):
    """Debian 12's own python3 (3.11.2) has no tarfile data filter: the same refusal there."""
    debian = Path("/usr/bin/python3")
    if not debian.exists():
        pytest.skip("no /usr/bin/python3")
    path = _tar(tmp_path / "t.tar.gz", _member("top/../../escape"))
    code = ("import sys; sys.path.insert(0, sys.argv[2]); from bundler.package import archive\n"
            "try:\n    archive.extract(sys.argv[1], sys.argv[1] + '.out')\n"
            "except archive.UnsafeArchive as e:\n    print(e)\n")
    repo = str(Path(__file__).resolve().parent.parent)
    res = subprocess.run([str(debian), "-c", code, str(path), repo], capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": ""})
    if res.returncode != 0 and "No module named" in res.stderr:
        pytest.skip(f"Debian's python3 lacks a dependency of bundler.package: {res.stderr.strip().splitlines()[-1]}")
    assert res.stdout.strip() == (f"{path}: member 'top/../../escape': absolute paths, '..' and empty names are "
                                  "not allowed; every member must stay inside the archive"), res.stderr
    assert sys.version_info >= (3, 10)


def test_bundle_format_doc_describes_every_field():
    import dataclasses
    import typing

    doc = (Path(__file__).resolve().parent.parent / "docs" / "bundle-format.md").read_text()

    def names(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            inner = typing.get_args(t)[0] if typing.get_origin(t) is tuple else t
            if dataclasses.is_dataclass(inner) and inner.__name__ != "Tensor":
                yield from names(inner, f"{prefix}{f.name}{'[]' if inner is not t else ''}.")
            else:
                yield f"{prefix}{f.name}"

    missing = [n for n in names(Manifest) if f"`{n}`" not in doc]
    assert not missing, f"docs/bundle-format.md does not describe {missing}"
