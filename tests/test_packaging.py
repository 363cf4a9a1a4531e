"""The package as users get it: a wheel built from this tree works in a fresh virtual environment,
and the sdist carries everything a wheel is built from."""

import os
import pathlib
import subprocess
import sys
import tarfile
import venv
import zipfile

import pytest

from vblock.hostio import _binding
from vblock.virtio import _binding as _vring_binding

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_wheel_installs_and_imports_in_fresh_venv(tmp_path):
    wheelhouse = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheelhouse), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    wheels = list(wheelhouse.glob("vblock-*.whl"))
    assert len(wheels) == 1
    assert "vblock/py.typed" in zipfile.ZipFile(wheels[0]).namelist()  # PEP 561: typed package
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [str(py), "-m", "pip", "install", "-q", str(wheels[0])], check=True, cwd=tmp_path
    )
    probe = (
        "import vblock._vbio as m, vblock.drivers as d, vblock.hostio as h, vblock.virtio._vring as v;"
        "print(m.ffi.string(m.lib.vbio_version()).decode(), d.__name__, h.HostFile.__name__,"
        " v.ffi.string(v.lib.vring_version()).decode())"
    )
    out = subprocess.run(
        [str(py), "-c", probe],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ""},
    ).stdout.split()
    assert out == [
        _binding.EXPECTED_VERSION,
        "vblock.drivers",
        "HostFile",
        _vring_binding.EXPECTED_VERSION,
    ]
    # The installed copy is the wheel's, not this source tree.
    where = subprocess.run(
        [str(py), "-c", "import vblock; print(vblock.__file__)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    assert str(env_dir) in where


@pytest.mark.timeout(600)
def test_sdist_carries_the_build_and_builds_a_wheel(tmp_path):
    """The sdist holds native/ whole (the backend and build scripts as well as the C files), and
    pip builds a wheel with both compiled modules from it alone."""
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "-o", str(dist), str(ROOT)],
        check=True,
        cwd=tmp_path,
        capture_output=True,
    )
    sdists = list(dist.glob("vblock-*.tar.gz"))
    assert len(sdists) == 1
    with tarfile.open(sdists[0]) as tar:
        native = {pathlib.PurePosixPath(n).name for n in tar.getnames() if "/native/" in n}
    in_tree = {
        p.name
        for p in (ROOT / "native").iterdir()
        if p.suffix in (".py", ".c", ".h") and not p.name.startswith("_")
    }
    assert native == in_tree
    wheels = tmp_path / "wheels"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(wheels),
            str(sdists[0]),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("vblock-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    compiled = sorted(n.split(".")[0] for n in names if n.endswith(".so"))
    assert compiled == ["vblock/_vbio", "vblock/virtio/_vring"]
    assert "vblock/drivers/qed/driver.py" in names
    assert "vblock/py.typed" in names
