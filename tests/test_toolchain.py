"""Toolchains beyond Debian's cross packages: a Yocto SDK's environment script, a compiler by path.

No Yocto SDK can be installed here (it is built by bitbake for a machine), so the tests write an
environment-setup script of the form poky's toolchain-scripts class writes, over an SDK folder
whose compiler is Debian's aarch64 cross g++ under the SDK's tool names and whose target sysroot
holds Debian's aarch64 libraries. Everything after the script is real: the compiler, the build,
the bundle, and its selftest under qemu-aarch64 against that sysroot.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from bundler.build import toolchain
from bundler.config import recipe
from bundler.errors import RecipeError
from tests import models

DEBIAN = Path("/usr/aarch64-linux-gnu")

SCRIPT = """\
# Check for LD_LIBRARY_PATH being set, which can break SDK and generally is a bad practice
if [ ! -z "${{LD_LIBRARY_PATH:-}}" ]; then
    echo "Your environment is misconfigured, you probably need to 'unset LD_LIBRARY_PATH'"
fi
export SDKTARGETSYSROOT={sdk}/sysroots/cortexa72-poky-linux
export PATH={sdk}/sysroots/x86_64-pokysdk-linux/usr/bin:{sdk}/sysroots/x86_64-pokysdk-linux/usr/bin/aarch64-poky-linux:$PATH
export PKG_CONFIG_SYSROOT_DIR=$SDKTARGETSYSROOT
export CC="aarch64-poky-linux-gcc  -mcpu=cortex-a72 -march=armv8-a+crc -fstack-protector-strong  -O2 -D_FORTIFY_SOURCE=2 -Wformat -Wformat-security -Werror=format-security --sysroot=$SDKTARGETSYSROOT"
export CXX="aarch64-poky-linux-g++  -mcpu=cortex-a72 -march=armv8-a+crc -fstack-protector-strong  -O2 -D_FORTIFY_SOURCE=2 -Wformat -Wformat-security -Werror=format-security --sysroot=$SDKTARGETSYSROOT"
export CPP="aarch64-poky-linux-gcc -E  -mcpu=cortex-a72 -march=armv8-a+crc --sysroot=$SDKTARGETSYSROOT"
export LD="aarch64-poky-linux-ld  --sysroot=$SDKTARGETSYSROOT"
export STRIP=aarch64-poky-linux-strip
export CFLAGS=" -O2 -pipe -g -feliminate-unused-debug-types "
export CXXFLAGS=" -O2 -pipe -g -feliminate-unused-debug-types "
export LDFLAGS="-Wl,-O1 -Wl,--hash-style=gnu -Wl,--as-needed  -Wl,-z,relro,-z,now"
export TARGET_PREFIX=aarch64-poky-linux-
export OECORE_TARGET_ARCH="aarch64"
export OECORE_TARGET_OS="linux"
export OECORE_TARGET_SYSROOT="$SDKTARGETSYSROOT"
export OECORE_NATIVE_SYSROOT="{sdk}/sysroots/x86_64-pokysdk-linux"
"""


@pytest.fixture(scope="module")
def sdk(tmp_path_factory) -> Path:
    if not shutil.which("aarch64-linux-gnu-g++") or not DEBIAN.is_dir():
        pytest.skip("needs g++-aarch64-linux-gnu (scripts/setup installs it)")
    root = tmp_path_factory.mktemp("poky")
    bindir = root / "sysroots/x86_64-pokysdk-linux/usr/bin/aarch64-poky-linux"
    bindir.mkdir(parents=True)
    for tool in ("gcc", "g++", "ld", "strip", "ar", "gcc-ar", "gcc-nm", "gcc-ranlib", "nm", "objcopy", "readelf"):
        (bindir / f"aarch64-poky-linux-{tool}").symlink_to(f"/usr/bin/aarch64-linux-gnu-{tool}")
    # A target sysroot laid out as Yocto's: usr/include, usr/lib, lib (Debian's files underneath;
    # usr/aarch64-linux-gnu too, because Debian's libc.so linker script names absolute paths).
    sysroot = root / "sysroots/cortexa72-poky-linux"
    (sysroot / "usr").mkdir(parents=True)
    (sysroot / "usr/include").symlink_to(DEBIAN / "include")
    (sysroot / "usr/lib").symlink_to(DEBIAN / "lib")
    (sysroot / "lib").symlink_to(DEBIAN / "lib")
    (sysroot / "usr/aarch64-linux-gnu").symlink_to(DEBIAN)
    script = root / "environment-setup-cortexa72-poky-linux"
    script.write_text(SCRIPT.format(sdk=root))
    return script


def sdk_board(tmp_path: Path, script: Path, extra: str = "") -> Path:
    p = tmp_path / "yoctoboard.toml"
    p.write_text(f'format = 1\nextends = "rpi4"\n[board]\nname = "rpi4 with a Yocto SDK"\n'
                 f'[toolchain]\nyocto_sdk = "{script}"\n{extra}')
    return p


def test_the_sdk_script_gives_compiler_flags_and_sysroot(tmp_path, sdk):
    tc = toolchain.resolve(recipe.load(str(sdk_board(tmp_path, sdk))))
    assert tc.cxx.name == "aarch64-poky-linux-g++" and tc.cc.name == "aarch64-poky-linux-gcc"
    assert tc.machine == "aarch64-linux-gnu"
    assert tc.sysroot == sdk.parent / "sysroots/cortexa72-poky-linux"
    assert "-mcpu=cortex-a72" in tc.cflags and "-march=armv8-a+crc" in tc.cflags
    assert not any(f.startswith("--sysroot") for f in tc.cflags)     # passed once, as the sysroot
    assert tc.strip is not None and tc.strip.name == "aarch64-poky-linux-strip"
    assert "-Wl,--hash-style=gnu" in tc.ldflags
    # qemu runs the board's programs against the SDK's target sysroot.
    from bundler.package.verifier import BoardFacts

    assert BoardFacts.from_recipe(recipe.load(str(sdk_board(tmp_path, sdk)))).sysroot == str(tc.sysroot)


@pytest.mark.slow
def test_make_with_a_yocto_sdk_builds_and_verifies_against_its_sysroot(tmp_path, sdk, run_cli):
    models.conv_net(tmp_path / "convnet.onnx")
    board = sdk_board(tmp_path, sdk)
    code, out, err = run_cli("make", str(board), "--model", str(tmp_path / "convnet.onnx"),
                             "--out", str(tmp_path / "dist"), "--json")
    assert code == 0, err
    steps = [s["name"] for s in json.loads(out)["steps"]]
    assert "run the selftest under qemu-aarch64" in steps

    # The board's glibc is checked against what the SDK's compiler produced, not assumed.
    old = sdk_board(tmp_path, sdk, '[host_machine]\nglibc = "2.31"\nglibcxx = "3.4.28"\n')
    code, out, err = run_cli("make", str(old), "--model", str(tmp_path / "convnet.onnx"),
                             "--out", str(tmp_path / "dist2"))
    assert code == 2
    assert "the board has glibc 2.31" in err and "GLIBC_2.3" in err, err


def test_a_missing_sdk_script_names_the_key_and_what_is_expected(tmp_path):
    board = sdk_board(tmp_path, tmp_path / "nope" / "environment-setup-x")
    with pytest.raises(RecipeError) as e:
        toolchain.resolve(recipe.load(str(board)))
    msg = str(e.value)
    assert "yoctoboard.toml: toolchain.yocto_sdk:" in msg and "environment-setup" in msg


def test_a_compiler_for_another_architecture_is_refused(tmp_path):
    if not shutil.which("riscv64-linux-gnu-g++"):
        pytest.skip("needs g++-riscv64-linux-gnu")
    p = tmp_path / "b.toml"
    p.write_text('format = 1\nextends = "rpi3-armhf"\n[board]\nname = "x"\n'
                 '[toolchain]\ncc = "/usr/bin/riscv64-linux-gnu-gcc"\ncxx = "/usr/bin/riscv64-linux-gnu-g++"\n')
    with pytest.raises(RecipeError) as e:
        toolchain.resolve(recipe.load(str(p)))
    assert "b.toml: toolchain.cxx:" in str(e.value) and "riscv64-linux-gnu" in str(e.value)
