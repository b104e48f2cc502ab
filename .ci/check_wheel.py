"""Build tlkit's wheel from this checkout and check it ships what a non-editable install needs.

    python .ci/check_wheel.py             # build, check the contents
    python .ci/check_wheel.py --install   # and install it into a fresh venv: tlkit recipes / --show / demo apps

The wheel is built offline (`pip wheel --no-deps --no-build-isolation`) from a copy of the sources, so the checkout
gets no build/ or egg-info. The fresh venv borrows this interpreter's packages (torch, typer, gradio, ...) through
a .pth line and gets tlkit only from the wheel; it runs outside the checkout, so nothing is read from the repo.
tests/test_packaging.py runs the same checks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import site
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "setup.py", "README.md", "tlkit", "recipes", "apps")


def build_wheel(out: Path, repo: Path = REPO) -> Path:
    src = out / "src"
    src.mkdir(parents=True)
    for name in SOURCES:
        if (repo / name).is_dir():
            shutil.copytree(repo / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(repo / name, src / name)
    dist = out / "dist"
    # Offline with this interpreter's setuptools; a venv without one (Python >= 3.12) builds in isolation (online).
    isolation = ["--no-build-isolation"] if _has_setuptools(77) else []
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", str(dist), str(src)]
    subprocess.run(cmd, check=True, cwd=out)
    (wheel,) = dist.glob("tlkit-*.whl")
    return wheel


def _has_setuptools(major: int) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return int(version("setuptools").split(".")[0]) >= major
    except (PackageNotFoundError, ValueError):
        return False


def expected_files(repo: Path = REPO) -> set[str]:
    """Every module, every recipe, every app and its README, as they must appear in the wheel."""
    files = {p.relative_to(repo).as_posix() for p in (repo / "tlkit").rglob("*.py") if "__pycache__" not in p.parts}
    files |= {f"tlkit/_recipes/{p.name}" for p in (repo / "recipes").glob("*.yaml")}
    for app in (repo / "apps").glob("*/app.py"):
        files |= {f"tlkit/_apps/{app.parent.name}/{name}" for name in ("app.py", "README.md")}
    return files


def missing_from(wheel: Path, repo: Path = REPO) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    return sorted(expected_files(repo) - names)


def install(wheel: Path, where: Path) -> Path:
    """A fresh venv holding only the wheel's tlkit (dependencies borrowed from this interpreter); its bin folder."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # Appended after the venv's own site-packages: the wheel's tlkit wins; .pth files there (e.g. an editable
    # install of this checkout) are not processed, so the checkout stays out of reach.
    Path(purelib, "_borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(cmd, check=True)
    return venv / "bin"


def run_installed(bin_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        args,
        cwd=cwd,
        env={**env, "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def check_installed(
    bin_dir: Path, cwd: Path, *, every: bool = True, load_apps: bool = False, repo: Path = REPO
) -> list[str]:
    """Problems found running the installed `tlkit` (an empty list: none); `every=False`: --show and demo for
    one recipe and one app only (each run imports torch: seconds)."""
    problems = []
    recipes = sorted(p.stem for p in (repo / "recipes").glob("*.yaml"))
    apps = sorted(p.parent.name for p in (repo / "apps").glob("*/app.py"))
    if not (recipes and apps):
        return [f"no recipes or apps in {repo}"]
    where = run_installed(
        bin_dir, "python", "-c", "import tlkit.paths as p; print(p.RECIPES_DIR); print(p.APPS_DIR)", cwd=cwd
    )
    if where.returncode or any(str(repo) in line for line in where.stdout.splitlines()):
        problems.append(f"installed tlkit reads the checkout or fails: {where.stdout.strip()} {where.stderr[-300:]}")
    listing = run_installed(bin_dir, "tlkit", "recipes", cwd=cwd)
    listed = sorted(line.split()[0] for line in listing.stdout.splitlines() if line.strip())
    if listing.returncode or listed != recipes:
        problems.append(f"`tlkit recipes` lists {listed}, expected {recipes}: {listing.stderr[-300:]}")
    for name in recipes if every else recipes[-1:]:
        shown = run_installed(bin_dir, "tlkit", "recipes", "--show", name, "--cpu", cwd=cwd)
        if shown.returncode or f"name: {name}\n" not in shown.stdout:
            problems.append(f"`tlkit recipes --show {name}` failed: {shown.stderr[-300:]}")
    for app in apps if every else apps[-1:]:
        # No checkpoint yet: the demo finds its app file, then stops at the checkpoint with a one-line error.
        demo = run_installed(bin_dir, "tlkit", "demo", app, "--checkpoint", "missing.pt", cwd=cwd)
        if demo.returncode != 2 or "no demo for" in demo.stderr or "missing.pt" not in demo.stderr:
            problems.append(f"`tlkit demo {app}` did not find its app: {demo.stderr[-300:]}")
    if load_apps:
        code = "from tlkit.demo import available_apps, load_app\nfor a in available_apps(): load_app(a).demo\n"
        loaded = run_installed(bin_dir, "python", "-c", code, cwd=cwd)
        if loaded.returncode:
            problems.append(f"demo apps do not import from the installed package: {loaded.stderr[-500:]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="also install into a fresh venv and run tlkit there")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="tlkit-wheel-") as tmp:
        wheel = build_wheel(Path(tmp))
        missing = missing_from(wheel)
        problems = [f"not in {wheel.name}: {', '.join(missing)}"] if missing else []
        if args.install and not problems:
            problems += check_installed(install(wheel, Path(tmp)), Path(tmp), load_apps=True)
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        if not problems:
            print(
                f"{wheel.name}: {len(expected_files())} files checked" + (", installed and run" if args.install else "")
            )
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
