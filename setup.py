"""What goes into the wheel; the rest of the packaging is in pyproject.toml.

The recipes and the demo apps stay at the top of the repository (`recipes/`, `apps/`) and ship inside the package as
`tlkit/_recipes` and `tlkit/_apps/<app>/`, so a non-editable install has `tlkit recipes` and `tlkit demo`;
tlkit.paths reads them from either place. Checked by .ci/check_wheel.py (and tests/test_packaging.py).
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
APPS = sorted(p.parent.name for p in (HERE / "apps").glob("*/app.py"))

setup(
    packages=[
        *find_packages(include=["tlkit", "tlkit.*"]),
        "tlkit._recipes",
        "tlkit._apps",
        *(f"tlkit._apps.{app}" for app in APPS),  # data folders, listed so setuptools ships them as they are
    ],
    package_dir={"tlkit._recipes": "recipes", "tlkit._apps": "apps"},
    package_data={"tlkit._recipes": ["*.yaml"], **{f"tlkit._apps.{app}": ["README.md"] for app in APPS}},
)
