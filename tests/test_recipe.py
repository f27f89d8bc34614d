"""Recipe loading: the shipped boards resolve, and every invalid recipe gets its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundler.config import recipe
from bundler.errors import RecipeError

CORPUS = sorted((Path(__file__).parent / "recipes" / "invalid").glob("*.toml"))


def expected_message(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} must start with '# expect: <message>'"
    return first[len("# expect: "):]


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_invalid_recipe_message(path, run_cli):
    rel = path.relative_to(Path.cwd()).as_posix()
    code, out, err = run_cli("show", rel)
    assert code == 2
    assert out == ""
    assert err.splitlines()[0] == f"tvmbundle: error: {expected_message(path)}"


def test_corpus_is_not_empty():
    assert len(CORPUS) >= 20


@pytest.mark.parametrize("board", ["rpi4", "rpi5", "x86_64", "aarch64"])
def test_shipped_boards_resolve(board):
    r = recipe.load(board)
    assert r.name == board
    assert r.target["kind"] == "llvm"
    assert r.runtime.source == "wheel"
    assert r.toolchain.cxx.endswith("g++")


def test_rpi4_extends_aarch64_and_overrides_only_the_cpu():
    r = recipe.load("rpi4")
    assert [p.name for p in r.chain] == ["rpi4.toml", "aarch64.toml"]
    assert r.target_dict() == {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"],
                               "mcpu": "cortex-a72"}
    assert r.origins["tvm.target.mcpu"] == "recipes/rpi4.toml"
    assert r.origins["tvm.target.mattr"] == "recipes/aarch64.toml"
    assert r.origins["toolchain.cxx"] == "derived"
    assert r.qemu == "qemu-aarch64" and r.ld_prefix == "/usr/aarch64-linux-gnu" and r.toolchain.sysroot == ""
    assert r.machine.glibc == "2.36"


def test_recipe_is_frozen():
    r = recipe.load("rpi4")
    with pytest.raises(Exception):
        r.install_prefix = "/tmp"  # type: ignore[misc]


def test_show_prints_every_value_and_its_origin(run_cli):
    code, out, err = run_cli("show", "rpi4")
    assert code == 0
    assert "tvm.target.mcpu" in out and "cortex-a72" in out
    line = next(l for l in out.splitlines() if l.startswith("toolchain.prefix"))
    assert "aarch64-linux-gnu-" in line and "recipes/aarch64.toml" in line
    line = next(l for l in out.splitlines() if l.startswith("verify.ld_prefix"))
    assert "/usr/aarch64-linux-gnu" in line and "derived" in line
    code, out, _ = run_cli("show", "rpi4", "--json")
    data = json.loads(out)
    assert data["values"]["host_machine.cpu"] == "cortex-a72"
    assert data["origins"]["service.user"] == "default"


def test_boards_lists_the_shipped_recipes(run_cli):
    code, out, _ = run_cli("boards")
    assert code == 0
    names = [l.split()[0] for l in out.splitlines()[1:] if l.strip()]
    assert {"rpi4", "x86_64", "aarch64"} <= set(names)


def test_recipe_path_env_adds_boards(tmp_path, monkeypatch, run_cli):
    (tmp_path / "myboard.toml").write_text('format = 1\nextends = "rpi4"\n[host_machine]\nglibc = "2.31"\n')
    monkeypatch.setenv("TVMBUNDLE_RECIPE_PATH", str(tmp_path))
    r = recipe.load("myboard")
    assert r.machine.glibc == "2.31" and r.machine.cpu == "cortex-a72"
    code, out, _ = run_cli("boards")
    assert "myboard" in out


def test_unknown_board_suggests(run_cli):
    code, out, err = run_cli("show", "rpi6")
    assert code == 2
    assert "no recipe named 'rpi6' (did you mean 'rpi5'?)" in err


def test_error_carries_file_and_key():
    bad = Path("tests/recipes/invalid/wrong-type.toml")
    with pytest.raises(RecipeError) as e:
        recipe.load(str(bad))
    assert e.value.file == bad.as_posix() and e.value.key == "toolchain.cc"


def test_every_key_is_one_field_and_documented_in_the_readme():
    """The section dataclasses are the schema: each key is a field with a doc, and the README's
    recipe format shows it."""
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme[readme.index("### Recipe format"):readme.index("### Runtimes built from source")]
    shown, section = set(), None
    for line in block.splitlines():
        m = re.match(r"^\[([a-z_.]+)\]", line)
        if m:
            section = m.group(1)
            continue
        m = re.match(r"^#?\s*([a-z_]+)\s*=", line)
        if m:
            shown.add(f"{section}.{m.group(1)}" if section else m.group(1))
    for key, spec in recipe.SCHEMA.items():
        assert spec.doc, f"{key} has no doc"
        assert key in shown or key == "tvm.target", f"README's recipe format does not show {key}"
    r = recipe.load("rpi4")
    for section, cls in recipe.SECTIONS.items():
        obj = getattr(r, "machine" if section == "host_machine" else section)
        assert isinstance(obj, cls)
