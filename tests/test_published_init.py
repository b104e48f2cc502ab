"""`--init timm:<model>.<tag>`, `hf-hub:<org>/<repo>` and `torchvision:<Weights>` from a local cache, offline.

The caches are built in tmp in the layouts the libraries read (Hugging Face hub: models--org--repo/snapshots/<rev>/
+ refs/main; torch hub: hub/checkpoints/<file name of the URL>), holding the real EfficientNet-Lite0 ImageNet
weights (timm key names) or seeded ResNet-18 weights. Nothing is downloaded: HF_HUB_OFFLINE is on, and a cache miss
must be one error line naming the cache and how to go online.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tlkit.checkpoint import CheckpointError
from tlkit.cli import app
from tlkit.models import build_model, head_parameter_names, resolve_published

runner = CliRunner()
REVISION = "0123456789abcdef0123456789abcdef01234567"
LITE0 = "tf_efficientnet_lite0"


def add_to_hub_cache(cache: Path, repo: str, files: dict[str, Path | str]) -> Path:
    """`repo` (org/name) at revision REVISION in a Hugging Face hub cache, as `hf_hub_download` leaves it."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        target = snapshot / name
        if isinstance(content, Path):
            target.symlink_to(content)
        else:
            target.write_text(content)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, imagenet_weights):
    """An offline hub cache in tmp with the ImageNet EfficientNet-Lite0 weights as timm's own repo for the
    `in1k` tag and as a user repo `acme/lite0-in1k` with its config.json."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: point the already imported module at tmp too
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolve_published.cache_clear()
    state = torch.load(imagenet_weights, weights_only=True)
    weights = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(weights))
    add_to_hub_cache(cache, f"timm/{LITE0}.in1k", {"model.safetensors": weights})
    config = {
        "architecture": LITE0,
        "num_classes": 1000,
        "pretrained_cfg": {"input_size": [3, 224, 224], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875},
    }
    add_to_hub_cache(cache, "acme/lite0-in1k", {"model.safetensors": weights, "config.json": json.dumps(config)})
    yield cache, state
    resolve_published.cache_clear()


def assert_body_is(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    head = head_parameter_names(model)
    body = [k for k in state if k not in head]
    assert set(body) == set(own) - head  # every body tensor of the model came from the weights, bit for bit
    assert all(torch.equal(own[k], state[k]) for k in body)


def test_timm_tag_loads_the_body_exactly_and_replaces_the_head(hub_cache):
    _, state = hub_cache
    model, info = build_model(LITE0, 5, init=f"timm:{LITE0}.in1k")
    assert_body_is(model, state)
    assert model.classifier.weight.shape == (5, 1280) and info["dropped_head"]
    assert info["init"] == f"timm:{LITE0}.in1k"


def test_hf_hub_linear_probe_through_the_cli(hub_cache, tmp_path, data_dir, cli_sets):
    """hf-hub:org/repo: architecture and preprocessing from its config.json; a linear probe on real traffic signs
    keeps the ImageNet body bit for bit and trains a 4-class head; the checkpoint carries the weights' mean/std."""
    _, state = hub_cache
    out = tmp_path / "probe"
    sets = ["data.max_classes=4", "data.max_per_class=8", "data.num_workers=0", "data.img_size=32"]
    args = ["finetune", "--recipe", "traffic-signs", "--init", "hf-hub:acme/lite0-in1k", "--arch", LITE0]
    args += ["--strategy", "linear-probe", "--epochs", "1", "--batch-size", "16", "--out", str(out), "--quiet"]
    result = runner.invoke(app, args + cli_sets(sets))
    assert result.exit_code == 0, result.output
    ckpt = torch.load(out / "best.pt", weights_only=True)
    assert ckpt["init"] == "hf-hub:acme/lite0-in1k" and ckpt["arch"] == LITE0
    assert ckpt["preprocessing"]["mean"] == pytest.approx([0.5] * 3)
    body = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    assert all(torch.equal(ckpt["model"][k], v) for k, v in body.items())
    assert ckpt["model"]["classifier.weight"].shape == (4, 1280)


@pytest.mark.parametrize("init", ["timm:resnet18.a1_in1k", "hf-hub:acme/not-cached"])
def test_cache_miss_offline_is_one_line_naming_the_cache(hub_cache, tmp_path, init):
    cache, _ = hub_cache
    out = tmp_path / "run"
    args = ["finetune", "--recipe", "traffic-signs", "--init", init, "--arch", "resnet18", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {init} is not in the cache ({cache})"), lines
    assert "unset HF_HUB_OFFLINE" in lines[0]  # how to go online
    assert not out.exists()


def test_published_weights_for_another_architecture_name_it(hub_cache):
    with pytest.raises(CheckpointError, match=f"pass --arch {LITE0}"):
        build_model("resnet18", 5, init=f"timm:{LITE0}.in1k")
    with pytest.raises(CheckpointError, match="published tags"):
        build_model("resnet18", 5, init="timm:resnet18.no_such_tag")


def test_torchvision_weights_from_the_torch_hub_cache(tmp_path, monkeypatch):
    """torchvision:ResNet18_Weights.IMAGENET1K_V1 reads TORCH_HOME/hub/checkpoints/resnet18-f37072fd.pth (the file
    name of its URL) and maps it onto timm's resnet18; preprocessing from torchvision's transforms."""
    from huggingface_hub import constants

    from tlkit.config import DataConfig
    from tlkit.data.transforms import preprocessing_for

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    resolve_published.cache_clear()
    init = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    with pytest.raises(CheckpointError, match=f"not in the cache \\({tmp_path / 'torch' / 'hub' / 'checkpoints'}\\)"):
        build_model("resnet18", 3, init=init)
    torch.manual_seed(1)
    state = build_model("resnet18", 1000)[0].state_dict()  # torchvision's ResNet key names are timm's
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(state, checkpoints / "resnet18-f37072fd.pth")
    model, info = build_model("resnet18", 3, init=init)
    assert_body_is(model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    assert model.fc.weight.shape == (3, 512) and info["dropped_head"]
    pre = preprocessing_for("resnet18", DataConfig(img_size=48), init=init)
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.img_size == 48
    assert resolve_published(init).preprocessing["crop_pct"] == pytest.approx(224 / 256)


# ---- every recipe starts from the real ImageNet weights (a local file, `--init <file>`) ---------------------------


def ucsd_slice(data_dir: Path, dst: Path, *, supervised: bool) -> Path:
    """A small UCSD Ped2 in the recipes' clips layout: frames 1-40 of Train001 (normal) and frames 1-120 of Test007
    (abnormal from frame 46: a cart among walkers), with their labels; for the supervised recipe also frames 31-90
    of Test001 (a cyclist from frame 61), a labelled clip that trains while Test007 validates."""
    src = data_dir / "ucsd_ped2"
    clips = [("train", "Train001", 1, 40), ("val", "Test007", 1, 120)]
    for split, clip, first, last in clips + ([("val", "Test001", 31, 90)] if supervised else []):
        folder = dst / split / clip
        folder.mkdir(parents=True)
        for n in range(first, last + 1):
            (folder / f"{n:03d}.jpg").symlink_to(src / split / clip / f"{n:03d}.jpg")
        if split == "val":
            rows = (src / split / clip / "labels.csv").read_text().splitlines()
            (folder / "labels.csv").write_text("\n".join([rows[0], *rows[first : last + 1]]) + "\n")
    return dst


RECIPE_SLICES = {
    # recipe: (kind, overrides for a slice of its data, the report metric that must beat chance or None, chance).
    # Measured (seed 0, one thread, 2-core CPU): imagenet top-1 0.68 (5 classes), medical AUROC 0.904, surveillance
    # frame AUROC 0.853. The supervised frame classifier's slice (60 labelled frames of one other clip) is too small
    # for its AUROC to mean anything: as a linear probe it must keep the ImageNet body bit for bit instead.
    "imagenet": ("pretrain", {"data": {"max_per_class": 10, "img_size": 64}, "train": {"epochs": 2}}, "top1", 0.4),
    "medical": ("finetune", {"data": {"max_per_class": 16, "img_size": 64}, "train": {"epochs": 2}}, "auroc", 0.75),
    "surveillance-supervised": (  # 2 epochs, not the recipe's 4: past its freeze_epochs (1), a probe stays frozen
        "finetune",
        {
            "data": {"img_size": 64, "val_clips": ["Test007"]},
            "train": {"epochs": 2},
            "finetune": {"strategy": "linear-probe"},
        },
        None,
        0.0,
    ),
    "surveillance": ("finetune", {"data": {"img_size": 64}, "anomaly": {"max_bank": 1000}}, "frame_auroc", 0.7),
}


@pytest.mark.parametrize("recipe", list(RECIPE_SLICES))
def test_every_recipe_starts_from_the_imagenet_weights(recipe, tmp_path, data_dir, imagenet_weights, monkeypatch):
    """`--arch tf_efficientnet_lite0 --init <file>` for each recipe on a slice of its real data (traffic-signs has
    its own test in test_recipes.py): the model is built with the weights' body, and the run beats chance where that
    means something. The anomaly recipe takes its patch features from the stride-8 and stride-16 stages of the
    model's timm `feature_info`."""
    from tlkit.config import deep_merge
    from tlkit.workflows import run_training

    kind, over, metric, chance = RECIPE_SLICES[recipe]
    base = {
        "model": {"init": str(imagenet_weights), "arch": LITE0},
        "data": {"num_workers": 0},
        "train": {"batch_size": 16, "out": str(tmp_path / "run")},
        "optim": {"warmup_epochs": 0},
    }
    if recipe == "imagenet":  # five visually distinct classes (the first five are four lizards and a goldfish)
        from conftest import TRAINED_WNIDS, link_subset

        base["data"]["name"] = str(link_subset(data_dir / "tiny_imagenet_200", tmp_path / "tiny5", TRAINED_WNIDS))
    if recipe.startswith("surveillance"):
        slice_ = ucsd_slice(data_dir, tmp_path / "ucsd", supervised=recipe == "surveillance-supervised")
        base["data"]["name"] = str(slice_)
    import tlkit.run

    built = {}

    def model_for_recipe(*args, **kwargs):  # the real one, remembering the weights the run starts from
        model, info = real_model_for_recipe(*args, **kwargs)
        built.update({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model, info

    real_model_for_recipe = tlkit.run.model_for_recipe
    monkeypatch.setattr(tlkit.run, "model_for_recipe", model_for_recipe)
    run_dir = run_training(recipe, deep_merge(base, over), kind=kind, quiet=True)
    metrics = json.loads((run_dir / "report" / "metrics.json").read_text())
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert ckpt["arch"] == LITE0 and ckpt["init"] == str(imagenet_weights)
    assert ckpt["preprocessing"]["mean"] == pytest.approx([0.5] * 3)  # the weights' own normalisation
    weights = torch.load(imagenet_weights, weights_only=True)
    body_kept = all(torch.equal(ckpt["model"][k], v) for k, v in weights.items() if not k.startswith("classifier."))
    if recipe == "surveillance":  # no gradient step: the scorer's backbone is the ImageNet body exactly
        assert body_kept
        assert ckpt["anomaly"]["config"]["feature_layers"] == [2, 3]  # reductions 8 and 16 of [2, 4, 8, 16, 32]
    elif recipe == "surveillance-supervised":  # linear probe: body frozen (BatchNorm statistics too), head trained
        assert body_kept and ckpt["classes"] == ["normal", "abnormal"]
        assert ckpt["model"]["classifier.weight"].shape == (2, 1280) and 0 < ckpt["threshold"] < 1
    else:  # a gradient-trained run: it was built with the ImageNet body
        assert all(torch.equal(built[k], v) for k, v in weights.items() if not k.startswith("classifier."))
    if metric is not None:
        assert metrics[metric] > chance, (metric, metrics[metric])


def test_tlkit_leaves_the_hub_setting_to_the_user(monkeypatch):
    """Telemetry off, but HF_HUB_OFFLINE is the user's: tlkit no longer forces it (so `--init timm:...` can download
    once when online)."""
    import os

    from tlkit.paths import set_offline_env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_TELEMETRY", raising=False)
    set_offline_env()
    assert "HF_HUB_OFFLINE" not in os.environ and os.environ["HF_HUB_DISABLE_TELEMETRY"] == "1"
