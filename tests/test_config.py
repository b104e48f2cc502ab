"""Recipes: loading, typed `--set` overrides, one-line errors, the gpu block, and the run folder's config.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tlkit.config import (
    Recipe,
    RecipeError,
    available_recipes,
    load_recipe,
    parse_set,
    recipe_from_dict,
    replace,
    to_dict,
    to_yaml,
)


def test_imagenet_recipe_loads() -> None:
    assert "imagenet" in available_recipes()
    r = load_recipe("imagenet")
    assert isinstance(r, Recipe)
    assert r.name == "imagenet" and r.task == "classify"
    assert r.data.name == "tiny_imagenet_200" and r.data.img_size == 40 and r.data.crop_pct == 1.0
    assert r.train.epochs == 2 and r.train.batch_size == 64
    assert r.optim.lr == 0.4 and r.optim.warmup_epochs == 0.5
    assert r.model.arch == "resnet18" and r.model.compile is False
    assert r.finetune is None and r.anomaly is None


def test_recipe_by_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("description: x\ntrain:\n  epochs: 2\noptim:\n  lr: 1e-3\n")  # PyYAML reads 1e-3 as a string
    r = load_recipe(str(path))
    assert r.name == "mine" and r.train.epochs == 2
    assert r.optim.lr == pytest.approx(1e-3) and isinstance(r.optim.lr, float)


def test_set_overrides_are_nested_and_typed() -> None:
    sets = [
        "optim.lr=0.1",
        "train.epochs=3",
        "data.hflip=0",  # int for a float field
        "model.channels_last=false",
        "data.name=some/folder",
        "optim.weight_decay=1e-4",
        "data.max_classes=7",
    ]
    overrides = parse_set(sets)
    assert overrides["optim"] == {"lr": 0.1, "weight_decay": "1e-4"}  # YAML 1.1: no dot, no float
    r = load_recipe("imagenet", overrides)
    assert r.optim.lr == 0.1 and isinstance(r.optim.lr, float)
    assert r.train.epochs == 3 and isinstance(r.train.epochs, int)
    assert r.data.hflip == 0.0 and isinstance(r.data.hflip, float)
    assert r.model.channels_last is False
    assert r.data.name == "some/folder"
    assert r.optim.weight_decay == pytest.approx(1e-4)
    assert r.data.max_classes == 7
    # untouched fields keep the recipe's values
    assert r.data.img_size == 40 and r.optim.warmup_epochs == 0.5


def test_later_set_wins_and_empty_value() -> None:
    assert parse_set(["train.epochs=2", "train.epochs=4"]) == {"train": {"epochs": 4}}
    assert parse_set(["model.init="]) == {"model": {"init": ""}}
    assert parse_set(["description=a = b"]) == {"description": "a = b"}


@pytest.mark.parametrize(
    ("sets", "needle"),
    [
        (["optim.lrr=0.1"], "lrr"),
        (["nosuch.key=1"], "nosuch"),
        (["train.epochs=abc"], "train.epochs must be int"),
        (["train.epochs=2.5"], "train.epochs must be int"),
        (["model.channels_last=3"], "true or false"),
        (["optim.lr=fast"], "optim.lr must be float"),
        (["data=3"], "needs a section"),
        (["lr=0.1"], "needs a section"),
        (["optim.lr"], "key=value"),
    ],
)
def test_bad_overrides_are_one_line_recipe_errors(sets: list[str], needle: str) -> None:
    with pytest.raises(RecipeError) as err:
        load_recipe("imagenet", parse_set(sets))
    message = str(err.value)
    assert needle in message
    assert "\n" not in message


def test_unknown_recipe_is_a_recipe_error() -> None:
    with pytest.raises(RecipeError, match="unknown recipe 'nope'.*imagenet"):
        load_recipe("nope")


def test_broken_recipe_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML") as err:
        load_recipe(str(bad))
    assert "\n" not in str(err.value)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(str(listing))
    section = tmp_path / "section.yaml"
    section.write_text("train: 3\n")
    with pytest.raises(RecipeError, match="'train' must be a mapping"):
        load_recipe(str(section))


def test_gpu_block_only_with_cuda() -> None:
    cpu = load_recipe("imagenet", cuda=False)
    gpu = load_recipe("imagenet", cuda=True)
    assert (cpu.train.epochs, cpu.train.batch_size, cpu.model.compile, cpu.data.num_workers) == (2, 64, False, -1)
    assert (gpu.train.epochs, gpu.train.batch_size, gpu.model.compile, gpu.data.num_workers) == (30, 256, True, 8)
    assert (cpu.data.img_size, gpu.data.img_size) == (40, 64)
    assert gpu.data.name == cpu.data.name and gpu.optim == cpu.optim  # the rest of the recipe is shared


def test_user_options_beat_the_gpu_block() -> None:
    """defaults <- recipe <- gpu block <- CLI options / --set: `--epochs 2` on a GPU machine means 2."""
    r = load_recipe("imagenet", {"train": {"epochs": 2}, "data": {"num_workers": 1}}, cuda=True)
    assert r.train.epochs == 2 and r.data.num_workers == 1
    assert r.train.batch_size == 256  # gpu value where the user said nothing


def test_dict_yaml_round_trip_and_replace() -> None:
    r = load_recipe("imagenet", parse_set(["train.epochs=2", "optim.mixup=0.2"]))
    assert recipe_from_dict(to_dict(r)) == r
    assert recipe_from_dict(yaml.safe_load(to_yaml(r))) == r
    r2 = replace(r, train={"epochs": 9}, finetune={"strategy": "linear-probe"})
    assert r2.train.epochs == 9 and r2.train.batch_size == r.train.batch_size
    assert r2.finetune is not None and r2.finetune.strategy == "linear-probe"
    assert recipe_from_dict(yaml.safe_load(to_yaml(r2))) == r2


def test_run_config_yaml_round_trips(trained_run) -> None:
    text = (trained_run.run_dir / "config.yaml").read_text()
    assert text.startswith("# tlkit ")  # provenance header: version, git sha, seed
    from_file = recipe_from_dict(yaml.safe_load(text))
    ckpt = torch.load(trained_run.run_dir / "last.pt", map_location="cpu", weights_only=True)
    assert from_file == recipe_from_dict(ckpt["recipe"])
    assert from_file.model.arch == "resnet10t" and from_file.data.img_size == 32 and from_file.train.epochs == 4
    assert from_file.data.max_per_class == 40 and from_file.optim.lr == 0.4
    assert from_file.data.name == str(trained_run.data) and from_file.train.out == str(trained_run.run_dir)
