"""A regular install must carry the bundled data: pyproject's package data covers every file under data/."""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

from headscope.resources import data_dir

ROOT = Path(__file__).resolve().parents[1]


def test_checkout_data_dir_is_the_repository_data_folder():
    assert data_dir() == ROOT / "data"
    assert (data_dir() / "haystack" / "essay.txt").is_file()


def test_package_data_ships_the_haystack_and_the_demo_model():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, package_dirs, package_data = config["packages"], config["package-dir"], config["package-data"]
    assert package_dirs["headscope._data"] == "data"
    shipped = []
    for package, patterns in package_data.items():
        if not package.startswith("headscope._data"):
            continue
        assert package in packages, f"{package} has package data but is not in packages"
        folder = ROOT / "data" / Path(*package.split(".")[2:])
        shipped += [p for p in folder.rglob("*") if p.is_file() and any(fnmatch.fnmatch(str(p.relative_to(folder)), pat) for pat in patterns)]
    wanted = list((ROOT / "data" / "haystack").glob("*.txt"))
    model = ROOT / "data" / "models" / "headscope-demo"
    wanted += [model / name for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")]
    missing = [str(p.relative_to(ROOT)) for p in wanted if p not in shipped]
    assert not missing, f"not shipped by pyproject package-data: {missing}"
    assert "example.yaml" in package_data["headscope.transfer"]


def test_every_python_package_in_the_checkout_is_installed():
    """A folder with an __init__.py under headscope/ or kernels/ that pyproject does not list is missing from a regular install."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages, package_dirs = set(config["packages"]), config["package-dir"]
    found = {".".join(("headscope",) + init.parent.relative_to(ROOT / "headscope").parts) for init in (ROOT / "headscope").rglob("__init__.py")}
    found |= {".".join(("headscope", "kernels") + init.parent.relative_to(ROOT / "kernels").parts) for init in (ROOT / "kernels").rglob("__init__.py")}
    assert found - packages == set(), f"not in pyproject's packages: {sorted(found - packages)}"
    kernel_packages = {name for name in found if name.startswith("headscope.kernels")}
    wrong = {name: package_dirs.get(name) for name in kernel_packages if package_dirs.get(name) != "/".join(["kernels", *name.split(".")[2:]])}
    assert not wrong, f"package-dir does not map these to their kernels/ folder: {wrong}"
