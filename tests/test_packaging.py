"""The wheel: every module and every Hydra config ships, and ``fusion-bench`` composes its config from
an installed copy with no checkout in sight."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fusion", "kernels", "benchmarks")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel of the checkout, built from a copy (the build writes build/ beside its sources) in an
    isolated environment, as pip installs it."""
    source = tmp_path_factory.mktemp("source") / "encoder-fusion"
    skip = shutil.ignore_patterns(".*", "build", "outputs", "multirun", "*.egg-info", "__pycache__")
    shutil.copytree(REPO, source, ignore=skip)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("encoder_fusion-*.whl")
    return built


def test_wheel_ships_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*.py")}
    configs = {
        "benchmarks/conf/" + str(p.relative_to(REPO / "conf")) for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs, "no configs found under conf/"
    assert modules - names == set(), "modules missing from the wheel (add their package to pyproject.toml)"
    assert configs - names == set(), "configs missing from the wheel (add their folder to pyproject.toml)"


def test_installed_copy_composes_the_config(wheel, tmp_path):
    """Unpacked (a pure-Python wheel installs by unpacking) and imported from outside the checkout,
    ``benchmarks.cli`` finds the shipped configs: ``--cfg job`` prints the composed smoke config."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import benchmarks.cli as cli; print(cli.__file__); print(cli.CONF_DIR)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(conf) == site / "benchmarks" / "conf"
    composed = subprocess.run(
        [sys.executable, "-m", "benchmarks.cli", "--cfg", "job", "experiment=smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert composed.returncode == 0, composed.stderr
    assert "encoders:" in composed.stdout and "weights: random" in composed.stdout
