"""The wheel carries the recipes and paper tables: installed outside the repository, `longtail configs`,
`longtail reproduce --list` and `longtail train RECIPE` work; and pyproject names every package."""
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

from tiny import TINY_MLP

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_names_every_package_and_ships_configs_as_recipes():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "longtail").rglob("__init__.py")}
    assert set(setuptools["packages"]) == found | {"longtail.recipes"}
    assert setuptools["package-dir"] == {"longtail.recipes": "configs"}
    assert setuptools["package-data"]["longtail.recipes"] == ["*/*.yaml"]
    assert not (REPO / "longtail" / "recipes").exists()  # in a checkout the recipes are configs/ itself


@pytest.mark.e2e
def test_the_wheel_installed_elsewhere_lists_reproduces_and_trains_by_recipe_name(tmp_path, data_root):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the checkout
    for name in ("longtail", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    # Without PYTHONPATH (which points the suite at a checkout): pip must see neither that copy nor its metadata.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"LONGTAIL_DATA": str(data_root)}
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(wheels),
                    str(source)], check=True, capture_output=True, env=env)
    (wheel,) = wheels.glob("longtail-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, capture_output=True, env=env)
    # --system-site-packages reaches the base interpreter's packages, not this environment's: point the new
    # one at the site-packages that hold torch and the other dependencies (lines of a .pth join sys.path).
    # Written after the install, so that pip does not take this environment's editable longtail for it.
    site = next((venv / "lib").glob("python*/site-packages"))
    (site / "longtail-deps.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def longtail(*args: str) -> str:
        done = subprocess.run([str(venv / "bin" / "longtail"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([str(python), "-c", "import longtail.cli, longtail.config.recipes as r; "
                            "print(longtail.cli.__file__); print(r.recipes_dir())"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's copy, not the checkout's
    assert "cifar10_lt/ldam_drw" in longtail("configs")
    assert "ldam_drw" in longtail("reproduce", "--list") and "rows" in longtail("reproduce", "--list")
    longtail("train", "fashion_mnist_lt/ce", *TINY_MLP, "train.epochs=1", "--quiet")
    assert (elsewhere / "runs" / "fashion_mnist_lt" / "ce" / "results.json").is_file()
