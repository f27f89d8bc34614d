"""Signed releases on this machine: tvmbundle sign, make --sign and verify --trust, with real
ssh-keygen keys. What a device does with a signature is tested in tests/test_release.py."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bundler.package import bundle
from tests import bundletools, models
from tests.bundletools import perturb_expected, repack

pytestmark = pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="needs ssh-keygen (openssh-client)")


def keypair(d: Path, name: str) -> Path:
    key = d / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(key)], check=True)
    return key


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keys")
    return {n: keypair(d, n) for n in ("release", "other", "old")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    return bundletools.built(tmp_path_factory, "x86_64", models.conv_net, "convnet")


def signed_copy(built: Path, key: Path, dest: Path, run_cli) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    code, out, err = run_cli("sign", str(built), "--key", str(key), "--out", str(dest))
    assert code == 0, err
    assert Path(out.strip()) == dest
    return dest


def verify(run_cli, path: Path, *trusted: Path) -> tuple[int, str]:
    argv = ["verify", str(path), "--no-run"]
    for k in trusted:
        argv += ["--trust", f"{k}.pub"]
    code, _, err = run_cli(*argv)
    return code, err


def test_a_signed_bundle_verifies_and_names_its_signer(built, keys, tmp_path, run_cli):
    signed = signed_copy(built, keys["release"], tmp_path / "s" / built.name, run_cli)
    code, err = verify(run_cli, signed, keys["release"])
    assert code == 0, err
    fp = subprocess.run(["ssh-keygen", "-l", "-f", f"{keys['release']}.pub"], capture_output=True,
                        text=True).stdout.split()[1]
    assert f"signature: ok: signed by {fp}" in err
    # signing changes neither the bundle's id nor its files
    a, b = bundle.extract(built, tmp_path / "a"), bundle.extract(signed, tmp_path / "b")
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()
    assert (b / "manifest.json.sig").is_file() and not (a / "manifest.json.sig").exists()


def test_signing_is_reproducible(built, keys, tmp_path, run_cli):
    one = signed_copy(built, keys["release"], tmp_path / "1" / built.name, run_cli)
    two = signed_copy(built, keys["release"], tmp_path / "2" / built.name, run_cli)
    assert one.read_bytes() == two.read_bytes()       # ed25519 signatures are deterministic


def test_rotation_any_trusted_key_will_do(built, keys, tmp_path, run_cli):
    signed = signed_copy(built, keys["release"], tmp_path / "s" / built.name, run_cli)
    assert verify(run_cli, signed, keys["old"], keys["release"])[0] == 0


@pytest.mark.parametrize("case", ["unsigned", "other key", "revoked key", "tampered manifest",
                                  "tampered file, re-hashed manifest"])
def test_refused(built, keys, tmp_path, run_cli, case):
    if case == "unsigned":
        path, trusted, problem = built, [keys["release"]], "unsigned: no manifest.json.sig"
    elif case == "other key":
        path = signed_copy(built, keys["other"], tmp_path / "s" / built.name, run_cli)
        trusted, problem = [keys["release"]], "is not a valid signature of manifest.json by any of the 1 trusted"
    elif case == "revoked key":
        # 'old' signed it; the device's trust list no longer has 'old' (removing a key revokes it)
        path = signed_copy(built, keys["old"], tmp_path / "s" / built.name, run_cli)
        trusted, problem = [keys["release"], keys["other"]], "by any of the 2 trusted key(s)"
    else:
        signed = signed_copy(built, keys["release"], tmp_path / "s" / built.name, run_cli)

        def tamper(top: Path) -> None:
            if case == "tampered manifest":
                m = json.loads((top / "manifest.json").read_text())
                m["service"]["threads"] = 1
                (top / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
            else:
                perturb_expected(top)
        path = repack(signed, tmp_path / "t", tamper, fix_manifest=(case != "tampered manifest"))
        assert (bundle.extract(path, tmp_path / "peek") / "manifest.json.sig").is_file()
        trusted, problem = [keys["release"]], "the manifest was changed after signing"
    code, err = verify(run_cli, path, *trusted)
    assert code == 2 and problem in err, err
    assert "Traceback" not in err


def test_make_sign_signs_and_checks_with_the_public_key(keys, tmp_path, run_cli):
    models.conv_net(tmp_path / "convnet.onnx")
    code, out, err = run_cli("make", "x86_64", "--model", str(tmp_path / "convnet.onnx"), "--out",
                             str(tmp_path / "dist"), "--sign", str(keys["release"]))
    assert code == 0, err
    assert verify(run_cli, Path(out.strip()), keys["release"])[0] == 0


def test_sign_with_a_missing_key_is_a_user_error(built, tmp_path, run_cli):
    code, _, err = run_cli("sign", str(built), "--key", str(tmp_path / "nope"))
    assert code == 2 and "--key:" in err and "no such private key file" in err
