"""Shared fixtures for the foundation suite: real sample data, tiny recipes, one short real training run.

Offline switches are set before anything imports gradio/huggingface/albumentations. Torch runs on one
thread: results are then bit-for-bit reproducible between processes (the resume tests compare weights
exactly), and on a small shared CPU one thread is much faster than several competing for two cores.
"""

from __future__ import annotations

import os

from tlkit.paths import set_offline_env

set_offline_env()
# tlkit follows the user's hub settings; the tests never download (a published `--init` reads a tmp cache).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import shutil  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from tlkit.paths import REPO_DIR, data_root  # noqa: E402

torch.set_num_threads(1)

TINY = "tiny_imagenet_200"

# The tiny subset most tests train on: 5 classes, 32 px, one CPU thread, no loader workers.
TINY_CLASSES = 5
TINY_SETS = [
    f"data.max_classes={TINY_CLASSES}",
    "data.max_per_class=20",
    "data.num_workers=0",
    "data.img_size=32",
    "train.batch_size=10",
    "train.epochs=1",
    "optim.warmup_epochs=0",
]


def set_args(sets: list[str]) -> list[str]:
    """`["a=1", "b=2"]` -> `["--set", "a=1", "--set", "b=2"]`."""
    return [arg for s in sets for arg in ("--set", s)]


def subprocess_env(runs: Path) -> dict[str, str]:
    """Environment for `python -m tlkit` / torchrun children: offline, one thread, runs under `runs`."""
    env = dict(os.environ)
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "TLKIT_RUNS": str(runs),
            # the children import this checkout's tlkit, whatever the venv has installed
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_DIR), env.get("PYTHONPATH", "")) if p),
        }
    )
    return env


PYTHON = sys.executable

# `python -c WARM_TLKIT GO ARGS...`: a child that pays its interpreter start-up (the imports of a tlkit run:
# seconds on a small CPU) while the test does other work, then runs `tlkit ARGS` (tlkit.cli.main, as
# `python -m tlkit ARGS` does) once the file GO exists. It exits (code 3) without running anything if the test
# process goes away first.
WARM_TLKIT = """
import os, sys, time
from pathlib import Path
go, parent, args = Path(sys.argv[1]), os.getppid(), sys.argv[2:]
from tlkit.paths import set_offline_env
set_offline_env()
import tlkit.cli, tlkit.engine, tlkit.tasks.classification.train  # what a run imports before it trains
while not go.exists():
    if os.getppid() != parent:
        sys.exit(3)
    time.sleep(0.01)
sys.argv = ["tlkit", *args]
tlkit.cli.main()
"""


def warm_tlkit_cmd(go: Path, args: list[str]) -> list[str]:
    """The command line of a warm `tlkit ARGS` child that starts its run once `go` exists (see WARM_TLKIT)."""
    return [PYTHON, "-c", WARM_TLKIT, str(go), *args]


# ---- CI: a skipped data or browser test is a failure, not a quiet pass ---------------------------------------

# Skips whose reason starts with this are expected off-GPU (the CUDA tests); every other skip means missing
# data, a missing browser or a missing tool, which in CI (CI=true) must fail the run instead of going green.
GPU_SKIP_PREFIX = "needs a CUDA GPU"
_skips: list[str] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        if not reason.startswith(GPU_SKIP_PREFIX):
            _skips.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if in_ci() and _skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if in_ci() and _skips:
        terminalreporter.write_sep("=", f"CI: {len(_skips)} test(s) skipped for missing data/tools", red=True)
        for line in _skips:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def cli_sets():
    """`cli_sets(["a=1"])` -> `["--set", "a=1"]`."""
    return set_args


@pytest.fixture(scope="session")
def child_env():
    """`child_env(runs_dir)`: the environment for `python -m tlkit` / torchrun child processes."""
    return subprocess_env


@pytest.fixture(autouse=True)
def _runs_in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own runs folder, so nothing lands in the checkout's runs/."""
    runs = tmp_path / "runs"
    monkeypatch.setenv("TLKIT_RUNS", str(runs))
    return runs


@pytest.fixture(scope="session")
def data_dir() -> Path:
    root = data_root()
    if not root.is_dir():
        pytest.skip(f"sample data not found at {root} (set TLKIT_DATA to the shared data folder)")
    return root


@pytest.fixture(scope="session")
def imagenet_weights(data_dir: Path) -> Path:
    """Real ImageNet-1k weights (EfficientNet-Lite0, timm key names): the stand-in for published weights."""
    path = data_dir.parent / "weights" / "tf_efficientnet_lite0_in1k.pth"
    if not path.is_file():
        pytest.skip(f"ImageNet weights not found at {path}")
    return path


@pytest.fixture(scope="session")
def tiny_root(data_dir: Path) -> Path:
    root = data_dir / TINY
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        pytest.skip(f"{TINY} sample not found under {data_dir}")
    return root


@pytest.fixture(scope="session")
def tiny_wnids(tiny_root: Path) -> list[str]:
    return sorted(p.name for p in (tiny_root / "train").iterdir() if p.is_dir())


@pytest.fixture
def tiny_sets() -> list[str]:
    """`--set` assignments for the tiny subset (a fresh copy each test)."""
    return list(TINY_SETS)


def tiny_overrides(**sections: dict) -> dict:
    """Nested overrides for the tiny subset, updated per section: `tiny_overrides(train={"epochs": 2})`."""
    from tlkit.config import deep_merge, parse_set

    return deep_merge(parse_set(TINY_SETS), sections)


@pytest.fixture
def make_tiny_overrides():
    return tiny_overrides


def copy_images(src_dir: Path, dst_dir: Path, n: int, *, start: int = 0, link: bool = False) -> list[Path]:
    """Copy (or symlink) the first `n` images of `src_dir` (sorted, after `start`) into `dst_dir`."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sorted(src_dir.iterdir())[start : start + n]:
        dst = dst_dir / src.name
        if link:
            dst.symlink_to(src)
        else:
            shutil.copyfile(src, dst)
        out.append(dst)
    return out


@pytest.fixture
def copy_tiny_images():
    return copy_images


# ---- one short real run shared by the engine, config and CLI tests ----------------------------------------

# Five visually distinct tiny_imagenet classes (goldfish, African elephant, school bus, lemon, cliff): the
# first five wnids are four amphibians/reptiles and a goldfish, too close to tell apart in a 4-epoch run.
TRAINED_WNIDS = ["n01443537", "n02504458", "n04146614", "n07749582", "n09246464"]
# resnet10t at 32 px on 5 classes x 40 train images (10 val each), 4 epochs: ~10 s an epoch on one core.
TRAINED_SETS = ["data.max_per_class=40", "data.num_workers=0", "data.img_size=32", "optim.warmup_epochs=0.5"]
TRAINED_ARGS = ["--arch", "resnet10t", "--epochs", "4", "--batch-size", "16", "--lr", "0.4", "--seed", "0"]


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    data: Path  # the 5-class dataset root it trained on
    output: str  # what `tlkit pretrain` printed
    exit_code: int
    args: list[str]
    class_ids: list[str]

    @property
    def best(self) -> Path:
        return self.run_dir / "best.pt"


def link_subset(tiny: Path, dst: Path, wnids: list[str]) -> Path:
    """An ILSVRC-layout dataset of some tiny_imagenet classes: symlinked class folders + the synset names."""
    for split in ("train", "val"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for wnid in wnids:
            (dst / split / wnid).symlink_to(tiny / split / wnid, target_is_directory=True)
    shutil.copyfile(tiny / "LOC_synset_mapping.txt", dst / "LOC_synset_mapping.txt")
    return dst


@pytest.fixture(scope="session")
def trained_run(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    """`tlkit pretrain` through the CLI (CliRunner, in process) on 5 tiny_imagenet classes."""
    from typer.testing import CliRunner

    from tlkit.cli import app

    base = tmp_path_factory.mktemp("trained")
    data = link_subset(tiny_root, base / "tiny5", TRAINED_WNIDS)
    run_dir = base / "run"
    args = ["pretrain", "--quiet", "--data", str(data), "--out", str(run_dir), *TRAINED_ARGS, *set_args(TRAINED_SETS)]
    old = os.environ.get("TLKIT_RUNS")
    os.environ["TLKIT_RUNS"] = str(base / "runs")
    try:
        result = CliRunner().invoke(app, args, catch_exceptions=False)
    finally:
        if old is None:
            os.environ.pop("TLKIT_RUNS", None)
        else:
            os.environ["TLKIT_RUNS"] = old
    assert result.exit_code == 0, result.output
    return TrainedRun(run_dir, data, result.output, result.exit_code, args, list(TRAINED_WNIDS))
