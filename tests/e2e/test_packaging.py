"""The distribution and its one import name.

- The wheel ships every module and every Hydra config under ``encoder_fusion``, and ``fusion-bench``
  composes its config from an installed copy with no checkout in sight.
- No name this distribution installs is installed by another distribution, and the wheel holds no
  top-level name but ``encoder_fusion``.
- From the root of the checkout (the working directory of ``python -m pytest``, ``python -c``, a REPL
  or a notebook started there, all of which put it first on ``sys.path``) no folder of the checkout
  shadows an installed package: ``import kernels`` is Hugging Face's, which transformers needs.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DISTRIBUTION = "encoder-fusion"
IMPORT_NAME = "encoder_fusion"
# each folder of the project card -> where its package lands in the wheel
FOLDERS = {
    "fusion/src": "encoder_fusion",
    "kernels/src": "encoder_fusion/kernels",
    "benchmarks/src": "encoder_fusion/benchmarks",
}


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


@pytest.mark.slow
def test_wheel_ships_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        f"{target}/{path.relative_to(REPO / folder)}"
        for folder, target in FOLDERS.items()
        for path in (REPO / folder).rglob("*.py")
    }
    configs = {
        f"encoder_fusion/benchmarks/conf/{path.relative_to(REPO / 'conf')}"
        for path in (REPO / "conf").rglob("*.yaml")
    }
    assert modules and configs, "no modules or no configs found in the checkout"
    assert modules - names == set(), "modules missing from the wheel (add their package to pyproject.toml)"
    assert configs - names == set(), "configs missing from the wheel (add their folder to pyproject.toml)"


@pytest.mark.slow
def test_wheel_installs_one_top_level_name(wheel):
    tops = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {top for top in tops if not top.endswith(".dist-info")} == {IMPORT_NAME}


@pytest.mark.slow
def test_installed_copy_composes_the_config(wheel, tmp_path):
    """Unpacked (a pure-Python wheel installs by unpacking) and imported from outside the checkout,
    ``encoder_fusion.benchmarks.cli`` finds the shipped configs: ``--cfg job`` prints the composed
    smoke config."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import encoder_fusion.benchmarks.cli as cli; print(cli.__file__); print(cli.CONF_DIR)"
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert where.returncode == 0, where.stderr
    module_file, conf = where.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(conf) == site / "encoder_fusion" / "benchmarks" / "conf"
    composed = subprocess.run(
        [sys.executable, "-m", "encoder_fusion.benchmarks.cli", "--cfg", "job", "experiment=smoke"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert composed.returncode == 0, composed.stderr
    assert "encoders:" in composed.stdout and "weights: random" in composed.stdout


def test_no_installed_name_is_shared_with_another_distribution():
    """Every top-level module name this distribution installs belongs to it alone: another
    distribution providing it (as Hugging Face's ``kernels`` provides ``kernels``) would shadow it, or
    be shadowed by it, depending on the order of ``sys.path``."""
    owners = importlib.metadata.packages_distributions()
    ours = {name for name, dists in owners.items() if DISTRIBUTION in dists}
    assert IMPORT_NAME in ours, f"{DISTRIBUTION} is not installed, or does not install {IMPORT_NAME}"
    shared = {name: sorted(set(owners[name]) - {DISTRIBUTION}) for name in ours}
    assert {name: others for name, others in shared.items() if others} == {}


def test_no_folder_of_the_checkout_is_an_importable_package():
    """A folder at the root holding an ``__init__.py`` (or a module file there) would be imported
    under its own name whenever the root is the working directory; the card's folders keep their
    packages one level down, in ``src/``."""
    importable = sorted(
        path.name
        for path in REPO.iterdir()
        if (path.is_dir() and (path / "__init__.py").exists()) or path.suffix == ".py"
    )
    assert importable == []


def test_from_the_checkout_root_installed_packages_win():
    """Run from the root of the checkout: ``kernels`` is Hugging Face's, transformers' hub kernels
    import, the card's folder names are not this project's packages, and ``encoder_fusion`` is the
    installed distribution."""
    probe = """
import importlib, json, kernels, sys
import transformers.integrations.hub_kernels
import encoder_fusion, encoder_fusion.kernels
found = {}
for name in ("fusion", "benchmarks", "conf"):
    try:
        module = importlib.import_module(name)
    except ImportError:
        continue
    found[name] = getattr(module, "__file__", None)
print(json.dumps({
    "kernels": kernels.__file__, "folders": found, "grid_fuse": callable(encoder_fusion.kernels.grid_fuse)
}))
"""
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.splitlines()[-1])
    hub_kernels = importlib.metadata.distribution("kernels")
    assert Path(seen["kernels"]).resolve().is_relative_to(Path(hub_kernels.locate_file("")).resolve())
    assert not Path(seen["kernels"]).resolve().is_relative_to(REPO)
    # a namespace portion has no __file__; a regular package of the checkout would have one here
    assert {name: path for name, path in seen["folders"].items() if path is not None} == {}
    assert seen["grid_fuse"]
