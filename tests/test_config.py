"""Recipes: loading, typed `--set` overrides, one-line errors, the gpu block, and the run folder's config.yaml."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
    resolved_yaml,
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
        (["train.epochs=abc"], "train.epochs='abc' is not allowed: use an integer >= 1"),
        (["train.epochs=2.5"], "train.epochs=2.5 is not allowed: use an integer >= 1"),
        (["train.epochs=true"], "train.epochs=True is not allowed: use an integer"),
        (["model.channels_last=3"], "model.channels_last=3 is not allowed: use true or false"),
        (["optim.lr=fast"], "optim.lr='fast' is not allowed: use a number > 0"),
        (["optim.lr=.nan"], "optim.lr=nan is not allowed"),
        (["data.hflip=true"], "data.hflip=True is not allowed: use a number from 0 to 1"),
        (["data.name=5"], "data.name=5 is not allowed: use a string"),
        (["anomaly.layers=[1, -2]"], "anomaly.layers=[1, -2] is not allowed: use a list, each an integer >= 0"),
        (["task=detect"], "task='detect' is not allowed: use one of classify, anomaly"),
        (["optim.momentum=0"], "optim.nesterov=True is not allowed with optim.momentum=0"),
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
    with pytest.raises(RecipeError, match="^train=3 is not allowed: use a mapping of train fields"):
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


def _published_variant(tmp_path: Path) -> Path:
    path = tmp_path / "signs.yaml"
    path.write_text(
        "base: traffic-signs\n"
        "train:\n  epochs: 4\n"
        "published:\n  data:\n    img_size: 96\n  train:\n    epochs: 7\n"
        "gpu:\n  train:\n    epochs: 30\n"
    )
    return path


def test_published_block_applies_only_to_published_weights(tmp_path: Path, imagenet_weights: Path, trained_run) -> None:
    """recipe <- published (init = published ImageNet weights) <- gpu <- the user's options."""
    recipe = str(_published_variant(tmp_path))
    plain_size = load_recipe("traffic-signs").data.img_size

    def size_epochs(init: str, **kw) -> tuple[int, int]:
        r = load_recipe(recipe, {"model": {"init": init}}, **kw)
        return r.data.img_size, r.train.epochs

    for published in ("timm:resnet18.a1_in1k", "hf-hub:timm/resnet18.a1_in1k", str(imagenet_weights)):
        assert size_epochs(published) == (96, 7), published
        assert size_epochs(published, cuda=True) == (64, 30)  # the gpu block (traffic-signs: 64 px) lies over it
    for own in ("scratch", "auto", str(trained_run.best), str(trained_run.run_dir)):  # tlkit's own weights
        assert size_epochs(own) == (plain_size, 4), own
    user = load_recipe(recipe, {"model": {"init": str(imagenet_weights)}, "train": {"epochs": 2}})
    assert (user.data.img_size, user.train.epochs) == (96, 2)
    first_line = resolved_yaml(recipe, cuda=False).splitlines()[0]
    added = first_line.split("its published: block adds ")[1].split(", ")
    # the base's block (traffic-signs: 5 epochs, every stage kept) overlaid by the variant's
    assert sorted(added) == ["data.img_size=96", "finetune.reinit_stages=0", "train.epochs=7"], first_line
    # the shipped recipe: the own pretrain's layer4 starts afresh, published ImageNet weights keep every stage
    reinit = {
        init: load_recipe("traffic-signs", {"model": {"init": init}}).finetune.reinit_stages
        for init in (str(trained_run.best), str(imagenet_weights))
    }
    assert reinit == {str(trained_run.best): 1, str(imagenet_weights): 0}


def test_published_block_is_checked_with_any_init(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("published:\n  data:\n    img_size: 8\n")
    with pytest.raises(RecipeError, match=r"^in the published: block of typo.yaml: data.img_size=8 is not allowed"):
        load_recipe(str(recipe), {"model": {"init": "scratch"}})
    recipe.write_text("published: 64\n")
    with pytest.raises(RecipeError, match=r"^published=64 in recipe typo.yaml is not allowed"):
        load_recipe(str(recipe))


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


# ---- validation at load: every field has a type, and choices or a range where it needs one ----------------------

# The issue's examples, each through the CLI: (arguments after `finetune --recipe medical`, what the line must name).
ISSUE_EXAMPLES = [
    (["--set", "optim.schedule=cosin"], ["optim.schedule='cosin'", "one of cosine, step, constant"]),
    (["--set", "optim.name=adam"], ["optim.name='adam'", "one of sgd, adamw"]),
    (["--set", "data.crop_mode=sqush"], ["data.crop_mode='sqush'", "one of center, squash (did you mean squash?)"]),
    (["--set", "data.hflip=7"], ["data.hflip=7", "a number from 0 to 1"]),
    (["--set", "train.epochs=0"], ["train.epochs=0", "an integer >= 1"]),
    (["--set", "data.img_size=0"], ["data.img_size=0", "an integer >= 16"]),
    (["--set", "data.interpolation=cubic"], ["data.interpolation='cubic'", "nearest, bilinear, bicubic, area"]),
    (["--set", "finetune.threshold_method=best"], ["finetune.threshold_method='best'", "youden, f1, sensitivity"]),
    (["--set", "train.device=gpu"], ["train.device='gpu'", "auto, cpu, cuda or cuda:N"]),
    (["--strategy", "foo"], ["'--strategy'", "'foo'", "'linear-probe', 'full', 'freeze-unfreeze'"]),
    (["--device", "gpu"], ["'--device'", "'gpu'", "auto, cpu, cuda or cuda:N"]),
    (["--epochs", "0"], ["'--epochs'", "greater than or equal to 1"]),
    (["--img-size", "8"], ["'--img-size'", "greater than or equal to 16"]),
]


@pytest.mark.parametrize(("args", "needles"), ISSUE_EXAMPLES, ids=[" ".join(a) for a, _ in ISSUE_EXAMPLES])
def test_bad_values_fail_at_load_through_the_cli(args: list[str], needles: list[str], tmp_path: Path) -> None:
    """Exit 2, one `error:` line naming the key, the bad value and what is allowed, before any run folder exists."""
    from typer.testing import CliRunner

    from tlkit.cli import app

    out = tmp_path / "run"
    cli = ["finetune", "--recipe", "medical", "--init", "scratch", "--out", str(out), "--quiet", *args]
    result = CliRunner().invoke(app, cli)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not (tmp_path / "runs").exists()  # $TLKIT_RUNS (conftest) untouched too


def test_section_that_is_not_a_mapping_fails_even_when_options_replace_it(tmp_path: Path, tiny_root: Path) -> None:
    """`data: 5` in a recipe file used to be replaced silently by --data; now the file itself is wrong."""
    from typer.testing import CliRunner

    from tlkit.cli import app

    recipe = tmp_path / "five.yaml"
    recipe.write_text("data: 5\ntrain:\n  epochs: 1\n")
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["pretrain", "--recipe", str(recipe), "--data", str(tiny_root), "--out", str(out)])
    assert result.exit_code == 2, result.output
    expected = "error: data=5 is not allowed: use a mapping of data fields (indented key: value lines)"
    assert result.stderr.strip() == expected
    assert not out.exists()
    with pytest.raises(RecipeError, match=r"^gpu\.train='big' is not allowed"):
        recipe.write_text("gpu:\n  train: big\n")
        load_recipe(str(recipe))


def test_gpu_block_is_checked_on_a_cpu_machine(tmp_path: Path) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("train:\n  epochs: 2\ngpu:\n  data:\n    img_size: 0\n")
    with pytest.raises(RecipeError, match=r"gpu: block of typo.yaml: data.img_size=0 is not allowed"):
        load_recipe(str(recipe), cuda=False)
    recipe.write_text("gpu:\n  optim:\n    lrr: 0.1\n")
    with pytest.raises(RecipeError, match=r"unknown key\(s\) in optim: lrr \(did you mean optim.lr\?\)"):
        load_recipe(str(recipe), cuda=False)


@pytest.mark.parametrize("name", sorted(available_recipes()))
@pytest.mark.parametrize("cuda", [False, True])
def test_every_shipped_recipe_validates(name: str, cuda: bool) -> None:
    recipe = load_recipe(name, cuda=cuda)
    assert recipe.name == name
    assert recipe_from_dict(to_dict(recipe)) == recipe  # what a checkpoint stores loads back, checked again


def test_replace_and_checkpoint_recipes_are_checked_too() -> None:
    r = load_recipe("imagenet")
    with pytest.raises(RecipeError, match=r"^train.epochs=0 is not allowed"):
        replace(r, train={"epochs": 0})
    bad = to_dict(r)
    bad["optim"]["schedule"] = "cosin"  # e.g. a hand-edited config.yaml given back as a recipe
    with pytest.raises(RecipeError, match=r"^optim.schedule='cosin'"):
        recipe_from_dict(bad)


def test_rules_match_what_the_consumers_accept() -> None:
    """The choices the config allows are exactly the values the code that reads them handles."""
    import tlkit.config as config
    from tlkit.data.data_path import LOADERS
    from tlkit.data.datasets import LAYOUTS
    from tlkit.data.transforms import _INTERPOLATIONS
    from tlkit.optim import build_optimizer, lr_factor
    from tlkit.tasks import TASKS
    from tlkit.tasks.anomaly.post import choose_alert_threshold
    from tlkit.tasks.classification.val import fit_operating_point
    from tlkit.transfer import Strategy

    assert tuple(_INTERPOLATIONS) == config.INTERPOLATIONS
    assert config.LAYOUTS == LAYOUTS and config.LOADERS == LOADERS
    assert config.TASKS is TASKS
    import timm

    net = timm.create_model("resnet10t", num_classes=3)
    for strategy in config.STRATEGIES:
        assert Strategy(net, config.FinetuneConfig(strategy=strategy)).lr_multipliers()
    model = torch.nn.Linear(2, 2)
    for name in config.OPTIMIZERS:
        assert build_optimizer(model, config.OptimConfig(name=name), 0.1).param_groups
    for schedule in config.SCHEDULES:
        assert 0 < lr_factor(5, 10, 0, config.OptimConfig(schedule=schedule), 1) <= 1
    scores, labels = [0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]
    logits = np.log(np.array([[1 - p, p] for p in scores]))
    for method in config.THRESHOLD_METHODS:
        ft = {"threshold_method": method, "temperature_scaling": False}
        assert 0 <= fit_operating_point(logits, np.array(labels), 1, ft)[1] <= 1
    for method in config.ALERT_THRESHOLD_METHODS:
        assert 0 <= choose_alert_threshold(scores, labels, method=method) <= 1


def test_every_numeric_field_has_a_range() -> None:
    """A new int/float field needs its `rule(...)`: a number without bounds is how `train.epochs=0` slipped by."""
    from dataclasses import fields

    from tlkit.config import _SECTIONS, _type_hints

    missing = [
        f"{section}.{f.name}"
        for section, cls in _SECTIONS.items()
        for f in fields(cls)
        if _type_hints(cls)[f.name] in (int, float, tuple[int, ...], tuple[float, ...])
        and not {"ge", "gt", "le", "lt"} & set(f.metadata)
    ]
    assert missing == []
