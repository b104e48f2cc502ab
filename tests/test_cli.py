"""The `tlkit` command line through typer's CliRunner: listings, a real pretrain, one-line user errors
(exit code 2), help pages, and an evaluate round trip on the images the run validated on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tlkit.cli import app

runner = CliRunner()

COMMANDS = ["pretrain", "finetune", "evaluate", "predict", "explain", "export", "lr-find", "demo", "recipes"]


def _error_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _assert_user_error(result, needle: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = _error_lines(result)
    assert len(lines) == 1, result.stderr  # one line, no traceback
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]


def test_recipes_lists_imagenet() -> None:
    result = runner.invoke(app, ["recipes"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.stdout.splitlines() if line.startswith("imagenet"))
    assert "ResNet pretraining" in line


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.stdout and command in result.stdout


def test_top_level_help() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_pretrain_prints_best_checkpoint(trained_run) -> None:
    assert trained_run.exit_code == 0
    assert "best checkpoint" in trained_run.output
    assert str(trained_run.best) in trained_run.output.replace("\n", "")
    assert "Epoch 4," in trained_run.output and "tlkit evaluate --checkpoint" in trained_run.output


def test_pretrain_tiny_run_in_default_runs_folder(
    tiny_root: Path, tiny_sets: list[str], cli_sets, _runs_in_tmp: Path
) -> None:
    """No --out: the run lands in $TLKIT_RUNS/pretrain-<arch>-<stamp>/."""
    result = runner.invoke(app, ["pretrain", "--quiet", "--arch", "resnet10t", *cli_sets(tiny_sets)])
    assert result.exit_code == 0, result.output
    assert "best checkpoint" in result.stdout
    (run,) = list(_runs_in_tmp.glob("pretrain-resnet10t-*"))
    assert (run / "best.pt").is_file() and (run / "report" / "report.md").is_file()


def test_bad_recipe_name() -> None:
    _assert_user_error(runner.invoke(app, ["pretrain", "--recipe", "no-such-recipe"]), "unknown recipe")


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["optim.lrr=0.1"], "lrr"),
        (["train.epochs=many"], "train.epochs"),
        (["epochs"], "key=value"),
        (["lr=0.1"], "needs a section"),
    ],
)
def test_bad_set(sets: list[str], needle: str, cli_sets) -> None:
    _assert_user_error(runner.invoke(app, ["pretrain", *cli_sets(sets)]), needle)


def test_missing_data_folder(tmp_path: Path) -> None:
    result = runner.invoke(app, ["pretrain", "--quiet", "--data", str(tmp_path / "nowhere")])
    _assert_user_error(result, "data folder not found")
    assert str(tmp_path / "nowhere") in result.stderr


def test_wrong_layout_leaves_no_run_folder(tmp_path: Path) -> None:
    # A folder of loose images is not a class-per-folder layout: the error comes before any run folder.
    data = tmp_path / "loose"
    data.mkdir()
    (data / "a.jpg").write_bytes(b"not really")
    out = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--quiet", "--data", str(data), "--out", str(out)])
    assert result.exit_code == 2 and len(_error_lines(result)) == 1, result.output
    assert not out.exists()


def test_bad_option_value_is_a_usage_error() -> None:
    result = runner.invoke(app, ["pretrain", "--epochs", "0"])
    assert result.exit_code == 2


def test_evaluate_round_trip(trained_run, tiny_root: Path, tmp_path: Path) -> None:
    """`tlkit evaluate` on the run's own val images reproduces the run's val top-1 for best.pt."""
    ckpt = torch.load(trained_run.best, map_location="cpu", weights_only=True)
    per_class = ckpt["recipe"]["data"]["max_per_class"]
    n = 0
    for wnid in ckpt["class_ids"]:  # an ImageFolder split with just the checkpoint's classes
        dst = tmp_path / "subset" / "val" / wnid
        dst.mkdir(parents=True)
        for src in sorted((tiny_root / "val" / wnid).iterdir())[:per_class]:
            (dst / src.name).symlink_to(src)
            n += 1
    out = tmp_path / "eval"
    args = ["--checkpoint", str(trained_run.best), "--data", str(tmp_path / "subset"), "--out", str(out)]
    result = runner.invoke(app, ["evaluate", *args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == n == 50
    best_row = next(r for r in ckpt["history"] if r["epoch"] == ckpt["epoch"])
    assert metrics["top1"] * 100 == pytest.approx(best_row["val_top1"], abs=1e-9)
    assert metrics["skipped_images"] == 0
    printed = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert printed["top1"] == metrics["top1"]
    # a split folder given directly works the same
    result = runner.invoke(app, ["evaluate", *args[:2], "--data", str(tmp_path / "subset" / "val"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["top1"] == metrics["top1"]


def test_evaluate_on_data_with_unknown_classes(trained_run, data_dir: Path) -> None:
    """A 5-class checkpoint on another dataset with more classes: a one-line error, by design."""
    sample = data_dir / "imagenet_sample"
    if not sample.is_dir():
        pytest.skip("imagenet_sample not present")
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(trained_run.best), "--data", str(sample)])
    _assert_user_error(result, "the model does not know")


def test_evaluate_missing_checkpoint(tmp_path: Path, tiny_root: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(tmp_path / "x.pt"), "--data", str(tiny_root)])
    _assert_user_error(result, "not found")
