"""Packaging: the server's wheel carries `prefd` itself and depends on no prefd-* name an index could serve."""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

import prefd
from tests.helpers.processes import ROOT

# What the Dockerfile's build stage copies to build the server's wheel.
BUILD_INPUTS = ("pyproject.toml", "README.md", "prefd_server", "clients/python")
# Where each shipped import package lives in the repository.
PACKAGE_SOURCES = {"prefd_server": ROOT / "prefd_server", "prefd": ROOT / "clients" / "python" / "prefd"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's wheel, built from a copy of the build inputs with this environment's setuptools."""
    tmp = tmp_path_factory.mktemp("packaging")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = ["wheel", "--quiet", "--no-deps", "--no-build-isolation", "--wheel-dir", str(tmp / "dist"), str(source)]
    subprocess.run(
        [sys.executable, "-m", "pip", *build],
        check=True,
        capture_output=True,
    )
    (built,) = (tmp / "dist").glob("prefd_server-*.whl")
    return built


# The kinds of file the import packages are made of: modules, type stubs and markers, migrations, data.
SHIPPED_SUFFIXES = {".py", ".pyi", ".typed", ".sql", ".json"}


def source_files(package: str) -> set[str]:
    """Every module, stub, marker, migration and data file of `package` in the repository, as a wheel path."""
    root = PACKAGE_SOURCES[package]
    return {
        f"{package}/{path.relative_to(root).as_posix()}"
        for path in root.rglob("*")
        if path.is_file() and path.suffix in SHIPPED_SUFFIXES and "__pycache__" not in path.parts
    }


def test_the_wheel_ships_every_file_of_prefd_server_and_prefd(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in PACKAGE_SOURCES:
        missing = source_files(package) - names
        assert not missing, f"not in the wheel: {sorted(missing)}"
    assert {
        "prefd/py.typed",
        "prefd/v1/preferences_pb2.py",
        "prefd/v1/preferences_pb2.pyi",
        "prefd/v1/preferences_pb2_grpc.py",
        "prefd/client/__init__.py",
        "prefd_server/py.typed",
        "prefd_server/app.py",
        "prefd_server/migrations/0001_foundation.sql",
        "prefd_server/preferences/data/definitions.json",
    } <= names
    assert all(name.split("/")[0] in {"prefd_server", "prefd"} or ".dist-info/" in name for name in names), names


def test_the_wheel_requires_no_prefd_distribution(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    (metadata_name,) = (n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
    metadata = Parser().parsestr(archive.read(metadata_name).decode())
    assert metadata["Name"] == "prefd-server"
    requires = metadata.get_all("Requires-Dist") or []
    # A requirement's name ends where its extras, version, marker or URL begin.
    names = {re.split(r"[\s\[<>=!~;@(]", line, maxsplit=1)[0].lower().replace("_", "-") for line in requires}
    assert "grpcio" in names
    assert not {name for name in names if name.startswith("prefd")}, requires
    (entry_points_name,) = (n for n in archive.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "prefd = prefd_server.cli:main" in archive.read(entry_points_name).decode()


def test_the_unpacked_wheel_imports_without_the_repository(wheel: Path, tmp_path: Path) -> None:
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = (
        "import prefd.v1.preferences_pb2, prefd.client, prefd_server.app, prefd_server.cli, prefd_server.kernel.db\n"
        "from importlib import resources\n"
        "print(prefd.__file__); print(prefd_server.__file__)\n"
        "migrations = resources.files('prefd_server.migrations').iterdir()\n"
        "print(sorted(p.name for p in migrations if p.name.endswith('.sql'))[0])\n"
    )
    # Run outside the repository, the unpacked wheel first on the path: its copies win over the editable ones.
    result = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(site)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    prefd_file, server_file, first_migration = result.stdout.split()
    assert Path(prefd_file).is_relative_to(site) and Path(server_file).is_relative_to(site)
    assert first_migration == "0001_foundation.sql"


def test_the_development_install_imports_prefd_from_clients_python() -> None:
    # Editable: an edit under clients/python is what the next import sees.
    assert Path(prefd.__file__).resolve() == ROOT / "clients" / "python" / "prefd" / "__init__.py"
    # One distribution provides `prefd` here; a second would claim the same files.
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("prefd-client")
