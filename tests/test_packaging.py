"""The wheel: built offline from this checkout, it holds every module, recipe and demo app, and installed on its own
(no editable checkout on the path) `tlkit recipes`, `tlkit recipes --show` and `tlkit demo` find them."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest

from tlkit.paths import REPO_DIR


def _check_wheel():
    """.ci/check_wheel.py, the CI step's own checks (one copy)."""
    spec = importlib.util.spec_from_file_location("check_wheel", REPO_DIR / ".ci" / "check_wheel.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _check_wheel().build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_ships_recipes_and_apps(wheel: Path) -> None:
    check = _check_wheel()
    assert check.missing_from(wheel) == []
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        recipe = z.read("tlkit/_recipes/traffic-signs.yaml").decode()
    assert recipe == (REPO_DIR / "recipes" / "traffic-signs.yaml").read_text()  # the file itself, not a copy of it
    assert {"tlkit/_apps/traffic-signs/app.py", "tlkit/_apps/medical/app.py", "tlkit/cli.py"} <= names
    assert not [n for n in names if n.startswith(("tests/", "recipes/", "apps/", "benchmarks/"))]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    with zipfile.ZipFile(wheel) as z:
        import tlkit

        assert f"Version: {tlkit.__version__}" in z.read(metadata).decode()


def test_installed_wheel_runs_recipes_and_demo(wheel: Path, tmp_path: Path) -> None:
    check = _check_wheel()
    bin_dir = check.install(wheel, tmp_path)
    assert check.check_installed(bin_dir, tmp_path, every=False) == []
    version = check.run_installed(bin_dir, "tlkit", "--version", cwd=tmp_path)
    import tlkit

    assert version.returncode == 0 and version.stdout.strip() == f"tlkit {tlkit.__version__}"
