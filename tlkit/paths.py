"""Where things live: the data root, the runs folder, the recipes folder, the git sha."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_DIR = PACKAGE_DIR.parent


def _shipped(folder: str) -> Path:
    """The repo's top-level `recipes/` or `apps/`: inside the package when installed from a wheel (setup.py maps
    them to tlkit/_recipes, tlkit/_apps), beside it in a checkout or an editable install."""
    packaged = PACKAGE_DIR / f"_{folder}"
    return packaged if packaged.is_dir() else REPO_DIR / folder


RECIPES_DIR = _shipped("recipes")
APPS_DIR = _shipped("apps")

# Telemetry and update checks off: set before gradio/huggingface/albumentations are imported so nothing phones
# home. Hub access itself (HF_HUB_OFFLINE, HF_HUB_CACHE, TORCH_HOME) is the user's setting: `--init timm:...`
# downloads once when online, and reads the cache when offline.
OFFLINE_ENV = {
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "MPLBACKEND": "Agg",
}


def set_offline_env() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def data_root() -> Path:
    """`$TLKIT_DATA`, else the `shared/data` folder beside the checkout (`../shared/data`)."""
    env = os.environ.get("TLKIT_DATA")
    if env:
        return Path(env).expanduser()
    return REPO_DIR.parent / "shared" / "data"


def resolve_data(path_or_name: str | os.PathLike) -> Path:
    """A path as given if it exists, else a dataset name under the data root (e.g. `gtsrb`)."""
    p = Path(path_or_name).expanduser()
    if p.exists() or p.is_absolute():
        return p
    return data_root() / p


def runs_dir() -> Path:
    return Path(os.environ.get("TLKIT_RUNS", "runs"))


def git_sha() -> str | None:
    if not (REPO_DIR / ".git").exists():  # installed: site-packages may sit inside some other repository
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_DIR, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None
