"""Experiment trackers beside TensorBoard: MLflow and Weights & Biases, chosen by `train.loggers`.

Each gets the resolved recipe as params, one row of metrics per epoch (the rows of metrics.jsonl, step = epoch),
and at the end the run's report folder (report.md, metrics.json, plots) with the report's scalar metrics. Both
are optional installs (`pip install 'tlkit[mlflow]'`, `'tlkit[wandb]'`); a listed one that is missing is one
error line before any run folder is made. They follow their own settings: `MLFLOW_TRACKING_URI`,
`MLFLOW_EXPERIMENT_NAME`; `WANDB_PROJECT`, `WANDB_MODE=offline`. Rank 0 only, like every file of a run.

The trackers of a run stay open from its first epoch until `finish_trackers`, which `workflows.run_training`
calls once the task has written the report (after the post-training pass), so the report is part of the run.
A resumed run continues the same tracker runs (their ids are kept in the run folder's `trackers.json`).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from tlkit.config import Recipe, RecipeError, to_dict

log = logging.getLogger("tlkit.trackers")

EXTERNAL = ("mlflow", "wandb")  # the loggers that are separate installs (extras of the same name)
IDS_FILE = "trackers.json"


def external_loggers(recipe: Recipe) -> list[str]:
    return [name for name in recipe.train.loggers if name in EXTERNAL]


def check_loggers(recipe: Recipe) -> None:
    """Before anything is made: each listed tracker is installed, and MLflow's tracking store opens."""
    for name in external_loggers(recipe):
        if importlib.util.find_spec(name) is None:
            raise RecipeError(f"train.loggers lists {name}, which is not installed: pip install 'tlkit[{name}]'")
    if "mlflow" in recipe.train.loggers:
        _mlflow_client()


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"data": {"img_size": 64}} -> {"data.img_size": 64}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _scalars(row: dict) -> dict[str, float]:
    return {
        k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool)
    }


# ---- MLflow ------------------------------------------------------------------------------------------------


def _mlflow_client():
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient()
    except MlflowException as e:
        first = str(e).strip().split(". ")[0]
        raise RecipeError(f"train.loggers mlflow: {first} (set MLFLOW_TRACKING_URI)") from None


class MlflowTracker:
    def __init__(self, run_dir: Path, recipe: Recipe, run_id: str | None) -> None:
        from mlflow.entities import Param

        self.client = _mlflow_client()
        if run_id is None:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or f"tlkit-{recipe.name}"
            experiment = self.client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
            run = self.client.create_run(experiment_id, run_name=run_dir.name, tags={"tlkit.run_dir": str(run_dir)})
            run_id = run.info.run_id
            params = [Param(k, str(v)[:6000]) for k, v in flatten(to_dict(recipe)).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params a batch
                self.client.log_batch(run_id, params=params[i : i + 100])
        self.run_id = run_id

    def log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def files(self, run_dir: Path, paths: list[Path]) -> None:
        for path in paths:
            folder = path.parent.relative_to(run_dir).as_posix()
            self.client.log_artifact(self.run_id, str(path), None if folder == "." else folder)

    def finish(self, ok: bool) -> None:
        self.client.set_terminated(self.run_id, "FINISHED" if ok else "FAILED")


# ---- Weights & Biases -----------------------------------------------------------------------------------------


class WandbTracker:
    def __init__(self, run_dir: Path, recipe: Recipe, run_id: str | None) -> None:
        import wandb

        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "tlkit",
            name=run_dir.name,
            config=to_dict(recipe),
            dir=str(run_dir),
            id=run_id,
            resume="allow" if run_id else None,
            # console="off": tlkit prints its own progress; W&B must not wrap stdout/stderr
            settings=wandb.Settings(console="off", silent=True),
        )
        self.run_id = self.run.id

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def files(self, run_dir: Path, paths: list[Path]) -> None:
        # Files inside the run's own W&B folder are uploaded when it ends (offline: kept there for `wandb sync`).
        for path in paths:
            target = Path(self.run.dir) / path.relative_to(run_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)

    def finish(self, ok: bool) -> None:
        self.run.finish(exit_code=0 if ok else 1)


# ---- the trackers of one run ------------------------------------------------------------------------------


class Trackers:
    """The external trackers `train.loggers` lists, for one run folder."""

    KINDS = {"mlflow": MlflowTracker, "wandb": WandbTracker}

    def __init__(self, run_dir: Path, recipe: Recipe) -> None:
        self.run_dir, self.step = run_dir, 0
        ids_path = run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if ids_path.is_file() else {}
        self.open = {name: self.KINDS[name](run_dir, recipe, ids.get(name)) for name in external_loggers(recipe)}
        if self.open:
            ids_path.write_text(json.dumps({name: t.run_id for name, t in self.open.items()}, indent=2))

    def _each(self, what: str, *args) -> None:
        # A tracker that fails (a server gone) costs its log line, never the training run.
        for name, tracker in self.open.items():
            try:
                getattr(tracker, what)(*args)
            except Exception as e:  # noqa: BLE001 - any tracker/network error
                log.warning("%s: could not %s (%s)", name, what, str(e).splitlines()[0] if str(e) else type(e).__name__)

    def epoch(self, row: dict) -> None:
        self.step = int(row.get("epoch", self.step + 1))
        self._each("log", _scalars(row), self.step)

    def finish(self, *, ok: bool = True) -> None:
        """The report folder and config.yaml as files, the report's scalar metrics, then end the runs."""
        report = self.run_dir / "report"
        files = [p for p in sorted(report.rglob("*")) if p.is_file()] if report.is_dir() else []
        files += [p for p in (self.run_dir / "config.yaml", self.run_dir / "summary.json") if p.is_file()]
        if ok and files:
            self._each("files", self.run_dir, files)
        metrics = report / "metrics.json"
        if ok and metrics.is_file():
            final = _scalars(json.loads(metrics.read_text()))
            self._each("log", {f"report/{k}": v for k, v in final.items()}, self.step)
        self._each("finish", ok)


_OPEN: dict[str, Trackers] = {}


def open_trackers(run_dir: Path, recipe: Recipe) -> Trackers | None:
    """The run's trackers, started now (rank 0 calls this when the run folder is made); None if none listed."""
    if not external_loggers(recipe):
        return None
    key = str(Path(run_dir).resolve())
    if key not in _OPEN:
        _OPEN[key] = Trackers(Path(run_dir), recipe)
    return _OPEN[key]


def finish_trackers(run_dir: Path | None, recipe: Recipe, *, ok: bool = True) -> None:
    """After the task wrote its report: files, final metrics, end. A task without epochs (anomaly) opens its
    trackers here. Only rank 0 logs (`RANK` is set by torchrun)."""
    if run_dir is None:
        for key in list(_OPEN):
            _OPEN.pop(key).finish(ok=False)
        return
    if os.environ.get("RANK", "0") != "0":
        return
    trackers = _OPEN.pop(str(Path(run_dir).resolve()), None) or (
        Trackers(Path(run_dir), recipe) if ok and external_loggers(recipe) else None
    )
    if trackers is not None:
        trackers.finish(ok=ok)
