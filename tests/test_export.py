"""`tvmbundle export buildroot|yocto`: the trees those tools need, checked against their manuals.

No Buildroot or BitBake runs here: the generated files are parsed with small parsers of
our own and compared with the variable names the Buildroot manual (generic-package,
br2-external) and the Yocto reference manual document.  The install commands of both
are run with their variables substituted, into a scratch root, and must give the same
layout as the overlay (bundler.package.layout: PREFIX/bundles/NAME/releases/<id>,
PREFIX/bundles/NAME/current, the rendered unit tvmbundle@NAME.service). Two bundles' overlays and
exports go into one image side by side.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from bundler import api
from bundler.package import bundle, debian, layout, service
from tests.conftest import REPO, session_cache

EPOCH = "1700000000"


def _make(tmp_path_factory, model: Path):
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("HOME", str(tmp_path_factory.mktemp("home")))
        mp.setenv("TVMBUNDLE_CACHE", str(session_cache(tmp_path_factory)))
        mp.setenv("SOURCE_DATE_EPOCH", EPOCH)
        mp.delenv("TVMBUNDLE_RECIPE_PATH", raising=False)
        mp.chdir(REPO)
        result = api.make("x86_64", model, out_dir=tmp_path_factory.mktemp("dist"), run_verify=False)
    finally:
        mp.undo()
    return result.bundle, result.manifest.to_json()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One x86_64 bundle of the example model for the whole module: (tarball, manifest)."""
    return _make(tmp_path_factory, REPO / "examples" / "tinycnn.onnx")


@pytest.fixture(scope="module")
def second(tmp_path_factory):
    """Another bundle for the same board, named det (the same graph: its build is the cache's)."""
    model = tmp_path_factory.mktemp("det") / "det.onnx"
    shutil.copyfile(REPO / "examples" / "tinycnn.onnx", model)
    return _make(tmp_path_factory, model)


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def export(run_cli, target: str, bundle_path: Path, out: Path) -> dict:
    code, stdout, err = run_cli("export", target, str(bundle_path), "--out", str(out), "--json")
    assert code == 0, err
    result = json.loads(stdout)          # --json: nothing but JSON on stdout
    assert result["path"] == str(out) and result["target"] == target
    return result


# --- small parsers ------------------------------------------------------------------------

def parse_make(text: str) -> dict[str, str]:
    """`VAR = value` assignments and `define VAR ... endef` blocks of a Buildroot .mk file."""
    out: dict[str, str] = {}
    lines = iter(text.splitlines())
    for line in lines:
        if m := re.match(r"^define ([A-Z0-9_]+)$", line):
            body = []
            for inner in lines:
                if inner == "endef":
                    break
                assert inner.startswith("\t"), f"command not indented with a tab: {inner!r}"
                body.append(inner[1:])
            out[m.group(1)] = "\n".join(body)
        elif m := re.match(r"^([A-Z0-9_]+) (\+?=) (.*)$", line):
            out[m.group(1)] = m.group(3)
        else:
            assert line == "" or line.startswith("#") or line == "$(eval $(generic-package))", line
    return out


def parse_kconfig(text: str) -> dict[str, dict]:
    """config/comment entries of a Config.in: their type, prompt, depends and help."""
    entries: dict[str, dict] = {}
    cur: dict | None = None
    in_help = False
    for line in text.splitlines():
        if m := re.match(r"^(config|comment) (.+)$", line):
            cur = entries.setdefault(m.group(2), {"kind": m.group(1), "depends": [], "help": []})
            in_help = False
        elif in_help and (line.startswith("\t  ") or line == ""):
            if line:
                cur["help"].append(line[3:])
        elif m := re.match(r"^\t(bool|string) \"(.+)\"$", line):
            cur["type"], cur["prompt"] = m.groups()
        elif m := re.match(r"^\tdepends on (.+)$", line):
            cur["depends"].append(m.group(1))
        elif line == "\thelp":
            in_help = True
        else:
            assert line == "", f"unexpected Config.in line {line!r}"
    return entries


def parse_bitbake(text: str) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(variables, functions, inherited classes) of a .bb or .conf file."""
    variables: dict[str, str] = {}
    functions: dict[str, str] = {}
    inherits: list[str] = []
    lines = iter(text.splitlines())
    for line in lines:
        if m := re.match(r"^(python )?([A-Za-z0-9_]*) ?\(\) \{$", line):
            body = []
            for inner in lines:
                if inner == "}":
                    break
                body.append(inner)
            functions[m.group(2) or "__anonymous"] = "\n".join(body)
        elif m := re.match(r'^([A-Za-z0-9_${}:\[\]-]+) (=|\?=|\?\?=|\+=|\.=|:=) "(.*)"$', line):
            variables[m.group(1)] = m.group(3)
        elif line.startswith("inherit "):
            inherits += line.split()[1:]
        else:
            assert line == "" or line.startswith("#"), f"unexpected line {line!r}"
    return variables, functions, inherits


def run_install(commands: str, subst: dict[str, str]) -> None:
    for name, value in subst.items():
        commands = commands.replace(name, value)
    assert "$(" not in commands and "${" not in commands, commands
    subprocess.run(["sh", "-ec", commands], check=True)


def check_installed(root: Path, manifest: dict, unit_dir: str) -> None:
    """The layout deploy and the overlay keep: every file with its mode, `current`, the unit."""
    prefix, name, bid = manifest["install"]["prefix"], manifest["name"], manifest["bundle_id"]
    current = root / layout.current(prefix, name).lstrip("/")
    assert current.readlink() == Path(layout.current_target(bid))
    assert current.resolve() == (root / layout.release_dir(prefix, name, bid).lstrip("/")).resolve()
    for f in manifest["files"]:
        p = current / f["path"]
        assert sha256(p) == f["sha256"] and oct(p.stat().st_mode & 0o777) == oct(int(f["mode"], 8)), f
    assert json.loads((current / "manifest.json").read_text()) == manifest
    unit = (root / unit_dir.strip("/") / layout.unit_name(name)).read_text()
    assert unit == service.render_unit(manifest)
    assert f"ExecStart={layout.current(prefix, name)}/bin/tvm-deploy serve " in unit


def files_of(root: Path) -> set[str]:
    """Every file and link below ``root`` (not the folders, which packages may share)."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_symlink() or not p.is_dir()}


def external_name(tree: Path) -> str:
    desc = dict(line.split(": ", 1) for line in (tree / "external.desc").read_text().splitlines())
    return desc["name"]


# --- Buildroot ----------------------------------------------------------------------------

def test_buildroot_external_tree(run_cli, built, tmp_path):
    tarball, manifest = built
    out = tmp_path / "br2-tvmbundle"
    result = export(run_cli, "buildroot", tarball, out)
    pkg = result["package"]
    assert re.fullmatch(r"[a-z0-9-]+", pkg)
    var = pkg.upper().replace("-", "_")

    # external.desc: name (only [A-Za-z0-9_]) and desc; Config.in and external.mk at the top.
    desc = dict(line.split(": ", 1) for line in (out / "external.desc").read_text().splitlines())
    assert set(desc) == {"name", "desc"} and re.fullmatch(r"[A-Za-z0-9_]+", desc["name"])
    ext_path = f"BR2_EXTERNAL_{desc['name']}_PATH"
    sourced = re.findall(r'^source "\$' + ext_path + r'/(.+)"$', (out / "Config.in").read_text(), re.MULTILINE)
    assert sourced == [f"package/{pkg}/Config.in"]
    include = (out / "external.mk").read_text().strip()
    assert include == f"include $(sort $(wildcard $({ext_path})/package/*/*.mk))"

    # package/<pkg>/Config.in: config BR2_PACKAGE_<PKG>, a bool, for the bundle's architecture.
    kconfig = parse_kconfig((out / "package" / pkg / "Config.in").read_text())
    entry = kconfig[f"BR2_PACKAGE_{var}"]
    assert entry["kind"] == "config" and entry["type"] == "bool" and entry["prompt"] == pkg
    assert "BR2_x86_64" in entry["depends"] and "BR2_TOOLCHAIN_USES_GLIBC" in entry["depends"]
    assert "BR2_INSTALL_LIBSTDCPP" in entry["depends"] and entry["help"]
    assert all(len(line) <= 62 for line in entry["help"])

    # <pkg>.mk: the generic-package variables, the bundle as the source of a file site.
    mk_text = (out / "package" / pkg / f"{pkg}.mk").read_text()
    assert mk_text.rstrip().endswith("$(eval $(generic-package))")
    mk = parse_make(mk_text)
    for suffix in ("VERSION", "SOURCE", "SITE", "SITE_METHOD", "LICENSE", "INSTALL_TARGET_CMDS",
                   "INSTALL_INIT_SYSTEMD", "USERS"):
        assert f"{var}_{suffix}" in mk, suffix
    assert mk[f"{var}_SITE_METHOD"] == "file" and mk[f"{var}_SOURCE"] == tarball.name
    assert mk[f"{var}_LICENSE"] == "Apache-2.0"
    assert mk[f"{var}_VERSION"] == result["version"] and manifest["bundle_id"][:8] in mk[f"{var}_VERSION"]
    site = Path(mk[f"{var}_SITE"].replace(f"$({ext_path})", str(out)))
    assert (site / tarball.name).read_bytes() == tarball.read_bytes()
    user = mk[f"{var}_USERS"].split()
    assert user[0] == manifest["service"]["user"] and len(user) >= 8   # username uid group gid password home shell groups

    # <pkg>.hash: 'sha256  HASH  FILE' for the source.
    hashes = [line.split() for line in (out / "package" / pkg / f"{pkg}.hash").read_text().splitlines()
              if line and not line.startswith("#")]
    assert hashes == [["sha256", sha256(tarball), tarball.name]]

    # The install commands, run into a scratch target: the same layout as the overlay.
    target = tmp_path / "target"
    src = bundle.extract(tarball, tmp_path / "build")
    subst = {"$(INSTALL)": "install", "$(@D)": str(src), "$(TARGET_DIR)": str(target),
             f"$({var}_PKGDIR)": str(out / "package" / pkg)}
    run_install(mk[f"{var}_INSTALL_TARGET_CMDS"], subst)
    run_install(mk[f"{var}_INSTALL_INIT_SYSTEMD"], subst)
    check_installed(target, manifest, "/usr/lib/systemd/system")
    unit = layout.unit_name(manifest["name"])
    wants = target / "etc/systemd/system/multi-user.target.wants" / unit
    assert wants.resolve() == (target / "usr/lib/systemd/system" / unit).resolve()
    assert (out / "package" / pkg / unit).is_file()
    assert desc["name"] == var     # one external tree per bundle: Buildroot refuses two of one name


# --- Yocto --------------------------------------------------------------------------------

def test_yocto_layer(run_cli, built, tmp_path):
    tarball, manifest = built
    out = tmp_path / "meta-tvmbundle"
    result = export(run_cli, "yocto", tarball, out)
    pkg, version = result["package"], result["version"]

    conf, _, _ = parse_bitbake((out / "conf" / "layer.conf").read_text())
    assert conf["BBPATH"] == ":${LAYERDIR}"
    collection = conf["BBFILE_COLLECTIONS"]
    assert re.fullmatch(r"[a-z0-9-]+", collection)
    for key in ("BBFILE_PATTERN", "BBFILE_PRIORITY", "LAYERSERIES_COMPAT"):
        assert f"{key}_{collection}" in conf, key
    assert conf[f"BBFILE_PATTERN_{collection}"] == "^${LAYERDIR}/"
    assert conf[f"BBFILE_PRIORITY_{collection}"].isdigit()
    assert {"kirkstone", "scarthgap"} <= set(conf[f"LAYERSERIES_COMPAT_{collection}"].split())

    assert collection == pkg           # one collection per bundle: an image takes the layers of several
    recipes = [p.relative_to(out).as_posix() for p in out.rglob("*.bb")]
    assert recipes == [f"recipes-tvmbundle/{pkg}/{pkg}_{version}.bb"]
    assert any(fnmatch.fnmatch(f"{out}/{recipes[0]}", pattern.replace("${LAYERDIR}", str(out)))
               for pattern in conf["BBFILES"].split())
    variables, functions, inherits = parse_bitbake((out / recipes[0]).read_text())

    for key in ("SUMMARY", "LICENSE", "LIC_FILES_CHKSUM", "SRC_URI", "S", "do_install", "FILES:${PN}",
                "RDEPENDS:${PN}", "SYSTEMD_SERVICE:${PN}", "SYSTEMD_AUTO_ENABLE:${PN}", "INSANE_SKIP:${PN}",
                "USERADD_PACKAGES", "USERADD_PARAM:${PN}", "COMPATIBLE_HOST"):
        assert key in variables or key in functions, key
    assert {"systemd", "useradd"} <= set(inherits)
    assert variables["LICENSE"] == "Apache-2.0"
    assert re.fullmatch(r"file://\$\{COMMON_LICENSE_DIR\}/Apache-2\.0;md5=[0-9a-f]{32}", variables["LIC_FILES_CHKSUM"])
    expand = {"${TVMBUNDLE_SOURCE}": variables["TVMBUNDLE_SOURCE"]}
    uris = variables["SRC_URI"]
    for k, v in expand.items():
        uris = uris.replace(k, v)
    unit = layout.unit_name(manifest["name"])
    assert uris.split() == [f"file://{tarball.name}", f"file://{unit}"]
    assert variables["SRC_URI[sha256sum]"] == sha256(tarball)
    files = out / "recipes-tvmbundle" / pkg / "files"
    assert (files / tarball.name).read_bytes() == tarball.read_bytes()
    assert (files / unit).read_text() == service.render_unit(manifest)
    top = tarball.name[: -len(".tar.gz")]
    assert variables["S"] == "${TVMBUNDLE_SRCDIR}/" + top
    assert variables["SYSTEMD_SERVICE:${PN}"] == unit and variables["SYSTEMD_AUTO_ENABLE:${PN}"] == "enable"
    assert variables["USERADD_PACKAGES"] == "${PN}"
    assert variables["USERADD_PARAM:${PN}"].split()[-1] == manifest["service"]["user"]
    assert {"already-stripped", "ldflags"} <= set(variables["INSANE_SKIP:${PN}"].split())
    assert {"glibc", "libstdc++"} <= set(variables["RDEPENDS:${PN}"].split())
    assert variables["COMPATIBLE_HOST"] == "x86_64.*-linux"
    assert variables["TVMBUNDLE_ID"] == manifest["bundle_id"]
    assert variables["TVMBUNDLE_PREFIX"] == manifest["install"]["prefix"]
    assert "${TVMBUNDLE_PREFIX}" in variables["FILES:${PN}"] and unit in variables["FILES:${PN}"]
    for name, body in functions.items():       # the python functions at least compile
        if name != "do_install":
            compile(__import__("textwrap").dedent(body), name, "exec")

    # do_install, run into a scratch ${D}: the same layout as the overlay.
    image = tmp_path / "image"
    unpack = tmp_path / "unpack"
    bundle.extract(tarball, unpack)
    (unpack / unit).write_bytes((files / unit).read_bytes())
    run_install(functions["do_install"], {
        "${S}": str(unpack / top), "${D}": str(image), "${TVMBUNDLE_SRCDIR}": str(unpack),
        "${TVMBUNDLE_PREFIX}": variables["TVMBUNDLE_PREFIX"], "${TVMBUNDLE_ID}": variables["TVMBUNDLE_ID"],
        "${systemd_system_unitdir}": "/lib/systemd/system"})
    check_installed(image, manifest, "/lib/systemd/system")


# --- both, and several bundles in one image ------------------------------------------------

def test_package_names_differ_per_bundle_name():
    """A package per bundle name: names that the package alphabets fold together stay apart."""
    names = ["net", "Net", "my_net", "my-net", "my.net", "my--net", "det"]
    for allowed in ("a-z0-9+.-", "a-z0-9-"):          # Debian's, Buildroot's and Yocto's
        packages = {n: debian.package_name(SimpleNamespace(name=n), allowed) for n in names}
        assert len(set(packages.values())) == len(names), packages
        assert all(re.fullmatch(f"[{allowed}]+", p) for p in packages.values()), packages
    assert debian.package_name(SimpleNamespace(name="net")) == "tvmbundle-net"
    assert debian.package_name(SimpleNamespace(name="my.net")) == "tvmbundle-my.net"
    assert re.fullmatch(r"tvmbundle-my-net-[0-9a-f]{8}", debian.package_name(SimpleNamespace(name="My_Net")))


def test_two_bundles_share_an_image(run_cli, built, second, tmp_path):
    """A detector and a recognizer in one image: their overlays, laid onto one root, and their
    Buildroot and Yocto exports, installed into one target, give two releases, two `current` links
    and two enabled units, and no file comes from both."""
    bundles = [built, second]
    assert len({m["name"] for _, m in bundles}) == 2
    wants = "etc/systemd/system/multi-user.target.wants"

    image, seen = tmp_path / "image", set()
    for tarball, manifest in bundles:
        src = bundle.extract(tarball, tmp_path / f"x-{manifest['name']}")
        tree = tmp_path / f"overlay-{manifest['name']}"
        tree.mkdir()
        bundle.write_overlay(src, bundle.load_manifest(src, str(tarball)), tree)
        files = files_of(tree)
        assert not files & seen, sorted(files & seen)
        seen |= files
        shutil.copytree(tree, image, symlinks=True, dirs_exist_ok=True)
    units = sorted(layout.unit_name(m["name"]) for _, m in bundles)
    assert sorted(p.name for p in (image / wants).iterdir()) == units
    for _, manifest in bundles:
        check_installed(image, manifest, layout.UNIT_DIR)
        unit = layout.unit_name(manifest["name"])
        assert (image / wants / unit).resolve() == (image / layout.UNIT_DIR.lstrip("/") / unit).resolve()

    # Buildroot: two external trees (BR2_EXTERNAL=/a:/b), of two names, with two packages
    target, externals, seen = tmp_path / "target", set(), set()
    for tarball, manifest in bundles:
        out = tmp_path / f"br2-{manifest['name']}"
        result = export(run_cli, "buildroot", tarball, out)
        pkg = result["package"]
        var = pkg.upper().replace("-", "_")
        externals.add(external_name(out))
        mk = parse_make((out / "package" / pkg / f"{pkg}.mk").read_text())
        src = bundle.extract(tarball, tmp_path / f"br-build-{manifest['name']}")
        alone = tmp_path / f"br-alone-{manifest['name']}"
        for dest in (alone, target):
            subst = {"$(INSTALL)": "install", "$(@D)": str(src), "$(TARGET_DIR)": str(dest),
                     f"$({var}_PKGDIR)": str(out / "package" / pkg)}
            run_install(mk[f"{var}_INSTALL_TARGET_CMDS"], subst)
            run_install(mk[f"{var}_INSTALL_INIT_SYSTEMD"], subst)
        files = files_of(alone)
        assert not files & seen, sorted(files & seen)
        seen |= files
    assert len(externals) == 2
    assert sorted(p.name for p in (target / wants).iterdir()) == units
    for _, manifest in bundles:
        check_installed(target, manifest, "/usr/lib/systemd/system")

    # Yocto: two layers, of two collections, with two recipes
    collections = set()
    for tarball, manifest in bundles:
        out = tmp_path / f"meta-{manifest['name']}"
        result = export(run_cli, "yocto", tarball, out)
        conf, _, _ = parse_bitbake((out / "conf" / "layer.conf").read_text())
        collections.add(conf["BBFILE_COLLECTIONS"])
        assert [p.parent.name for p in out.rglob("*.bb")] == [result["package"]]
    assert len(collections) == 2


def tree(root: Path) -> dict[str, tuple]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else (p.read_bytes() if p.is_file() else None)
        out[p.relative_to(root).as_posix()] = (st.st_mode, int(st.st_mtime), body)
    return out


@pytest.mark.parametrize("target", ["buildroot", "yocto"])
def test_exports_are_reproducible(run_cli, built, tmp_path, target):
    tarball, _ = built
    a = export(run_cli, target, tarball, tmp_path / "a")
    b = export(run_cli, target, tarball, tmp_path / "b")
    assert a["files"] == b["files"]
    first = tree(tmp_path / "a")
    assert first == tree(tmp_path / "b")
    assert {mtime for _, mtime, _ in first.values()} == {int(EPOCH)}     # the bundle's time, not now
    # Exporting again over an earlier export replaces it with the same tree.
    (tmp_path / "a" / "stale").write_text("left from before")
    export(run_cli, target, tarball, tmp_path / "a")
    assert tree(tmp_path / "a") == first


def test_export_bad_input(run_cli, built, tmp_path):
    tarball, _ = built
    cases = []
    code, out, err = run_cli("export", "yocto", str(tmp_path / "missing.tar.gz"), "--out", str(tmp_path / "o"))
    cases.append((code, out, err, "missing.tar.gz: no such file", "expected a bundle tarball"))
    junk = tmp_path / "junk.tar.gz"
    junk.write_text("not a tarball")
    code, out, err = run_cli("export", "buildroot", str(junk), "--out", str(tmp_path / "o"))
    cases.append((code, out, err, "junk.tar.gz: not a readable bundle", "expected a bundle tarball"))
    code, out, err = run_cli("export", "buildroot", str(tmp_path), "--out", str(tmp_path / "o"))
    cases.append((code, out, err, "is a folder, not a file", "expected a bundle tarball"))
    code, out, err = run_cli("export", "buildroot", str(tarball), "--out", str(junk))
    cases.append((code, out, err, "junk.tar.gz: exists and is not a folder", "--out must be"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    code, out, err = run_cli("export", "yocto", str(tarball), "--out", str(mine))
    cases.append((code, out, err, "mine: a folder that tvmbundle did not write", "--out must be"))
    code, out, err = run_cli("export", "nix", str(tarball))
    cases.append((code, out, err, "invalid choice: 'nix'", "buildroot"))
    for code, out, err, problem, allowed in cases:
        assert code == 2 and out == "" and problem in err and allowed in err, err
        assert "Traceback" not in err
    assert (mine / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "o").exists()


def test_default_out_is_one_folder_per_bundle(run_cli, built, second, tmp_path, monkeypatch):
    """Without --out each bundle's export has a folder of its own (two bundles of one device do not
    replace each other's); an export of the same bundle again replaces its own."""
    monkeypatch.chdir(tmp_path)
    paths = {}
    for tarball, manifest in (built, second):
        for target in ("buildroot", "ansible"):
            code, out, err = run_cli("export", target, str(tarball), "--json")
            assert code == 0, err
            paths[manifest["name"], target] = Path(json.loads(out)["path"])
    assert paths == {(n, t): Path("dist") / f"{'br2' if t == 'buildroot' else t}-{n}"
                     for n in ("tinycnn", "det") for t in ("buildroot", "ansible")}
    assert all((tmp_path / p).is_dir() for p in paths.values())
    code, out, err = run_cli("export", "ansible", str(second[0]), "--json")
    assert code == 0 and Path(json.loads(out)["path"]) == paths["det", "ansible"]


def test_json_output_is_only_json(run_cli, built, tmp_path, monkeypatch):
    """What an image build parses: stdout of --json holds one JSON document and nothing else."""
    tarball, manifest = built
    code, out, err = run_cli("boards", "--json")
    assert code == 0 and "x86_64" in {b["board"] for b in json.loads(out)}
    code, out, err = run_cli("doctor", "x86_64", "--json")
    doc = json.loads(out)
    assert code == (0 if doc["ok"] else 2) and doc["board"] == "x86_64" and doc["findings"]
    code, out, err = run_cli("cache", "list", "--json")
    assert code == 0 and {"root", "entries", "total"} <= set(json.loads(out))
    code, out, err = run_cli("verify", str(tarball), "--no-run", "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    monkeypatch.setenv("SOURCE_DATE_EPOCH", EPOCH)
    code, out, err = run_cli("make", "x86_64", "--model", str(REPO / "examples" / "tinycnn.onnx"),
                             "--out", str(tmp_path / "dist"), "--no-verify", "--json")
    assert code == 0, err
    made = json.loads(out)
    assert made["bundle_id"] == manifest["bundle_id"] and made["rebuilt"] == []
