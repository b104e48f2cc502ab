"""Transfer strategies freeze exactly what they say; heads are replaced, bodies really come from the init."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tlkit.config import FinetuneConfig
from tlkit.engine import fit
from tlkit.models import build_model, create_model, head_parameter_names
from tlkit.transfer import Strategy
from tlkit.workflows import run_training


def _tiny_overrides(tmp_path, name: str, **sections) -> dict:
    over = {
        "data": {"name": "gtsrb", "max_classes": 4, "max_per_class": 12, "img_size": 32, "num_workers": 0},
        "train": {"epochs": 1, "batch_size": 16, "out": str(tmp_path / name)},
        "optim": {"warmup_epochs": 0},
    }
    for key, value in sections.items():
        over.setdefault(key, {}).update(value)
    return over


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, data_dir):
    """A real tlkit checkpoint with 6 classes (gtsrb subset), to fine-tune from."""
    tmp = tmp_path_factory.mktemp("pre")
    over = _tiny_overrides(tmp, "pre", data={"max_classes": 6})
    run_dir = run_training("imagenet", over, kind="pretrain", quiet=True)
    return run_dir / "best.pt"


@pytest.fixture
def watch(monkeypatch):
    """Spies on a real `fit` (both call through): `watch["before"]`, the model's state as built, before any
    training (init weights and the new head); `watch["last"][epoch]`, last.pt as read back after each epoch."""
    import importlib
    import importlib.util

    seen: dict = {"before": None, "last": {}}

    def model_for_recipe(build):
        def spy(*args, **kwargs):
            model, info = build(*args, **kwargs)
            seen["before"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return model, info

        return spy

    def save_checkpoint(save):
        def spy(state, path):
            out = save(state, path)
            if Path(path).name == "last.pt" and state["step_in_epoch"] == 0:
                seen["last"][state["epoch"]] = torch.load(path, map_location="cpu", weights_only=True)["model"]
            return out

        return spy

    # wherever the training loop looks these names up (tlkit.engine, or tlkit.run once the loop lives there);
    # a spy that is never called leaves `before` None / `last` empty, and the tests using it fail
    for name in ("tlkit.engine", "tlkit.run"):
        module = importlib.import_module(name) if importlib.util.find_spec(name) else None
        for attr, wrap in (("model_for_recipe", model_for_recipe), ("save_checkpoint", save_checkpoint)):
            if module is not None and hasattr(module, attr):
                monkeypatch.setattr(module, attr, wrap(getattr(module, attr)))
    return seen


def _trainable(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_linear_probe_trains_only_the_head_with_frozen_batchnorm():
    model = create_model("resnet18", 3)
    strategy = Strategy(model, FinetuneConfig(strategy="linear-probe"))
    strategy.on_epoch_start(1)
    assert _trainable(model) == head_parameter_names(model) == {"fc.weight", "fc.bias"}
    model.train()
    strategy.freeze_norm_stats()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)


def test_freeze_unfreeze_switches_after_freeze_epochs():
    model = create_model("resnet18", 3)
    strategy = Strategy(model, FinetuneConfig(strategy="freeze-unfreeze", freeze_epochs=2))
    everything = {n for n, _ in model.named_parameters()}
    for epoch, expected in ((1, head_parameter_names(model)), (2, head_parameter_names(model)), (3, everything)):
        strategy.on_epoch_start(epoch)
        assert _trainable(model) == expected, epoch
    model.train()
    strategy.freeze_norm_stats()  # unfrozen: BatchNorm keeps training
    assert all(m.training for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_full_strategy_discriminative_learning_rates():
    model = create_model("resnet18", 3)
    cfg = FinetuneConfig(strategy="full", head_lr_mult=10.0, layer_decay=0.5)
    strategy = Strategy(model, cfg)
    strategy.on_epoch_start(1)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}
    mults = strategy.lr_multipliers()
    assert mults["fc.weight"] == 10.0
    assert mults["layer4.1.conv2.weight"] == 1.0  # deepest body stage: the recipe LR
    assert mults["conv1.weight"] < mults["layer1.0.conv1.weight"] < mults["layer4.0.conv1.weight"]
    assert mults["conv1.weight"] == pytest.approx(0.5 ** (len(strategy.stages) - 1))


def test_unknown_strategy_is_a_clear_error():
    # the recipe's own check (config validation) names the key, the value and what is allowed
    with pytest.raises(ValueError, match="finetune.strategy='partial' is not allowed: use one of linear-probe"):
        Strategy(create_model("resnet18", 3), FinetuneConfig(strategy="partial"))


def test_head_replaced_on_class_mismatch_and_body_is_the_inits(pretrained):
    init = torch.load(pretrained, weights_only=True)
    assert len(init["classes"]) == 6
    model, info = build_model("resnet18", 4, init=str(pretrained))
    assert info["dropped_head"] is True
    state = model.state_dict()
    assert state["fc.weight"].shape == (4, 512)
    body = [k for k in state if not k.startswith("fc.")]
    assert body and all(torch.equal(state[k], init["model"][k]) for k in body)


def test_linear_probe_run_leaves_the_body_untouched(pretrained, tmp_path, watch):
    """A real fine-tune with a frozen body: conv weights and BatchNorm statistics stay the init's, the head trains."""
    over = _tiny_overrides(tmp_path, "probe", model={"init": str(pretrained)}, finetune={"strategy": "linear-probe"})
    from tlkit.config import load_recipe

    result = fit(load_recipe("imagenet", over), kind="finetune", quiet=True)
    init = torch.load(pretrained, weights_only=True)["model"]
    tuned = torch.load(result.last_path, weights_only=True)["model"]
    body = [k for k in tuned if not k.startswith("fc.")]
    assert all(torch.equal(tuned[k], init[k]) for k in body), "frozen body changed"
    before = watch["before"]  # the model fit built: the init's body and a new 4-class head
    assert all(torch.equal(before[k], init[k]) for k in body) and before["fc.weight"].shape == (4, 512)
    for key in ("fc.weight", "fc.bias"):
        assert not torch.equal(tuned[key], before[key]), f"{key} did not train"


def test_freeze_unfreeze_body_moves_only_after_unfreeze(pretrained, tmp_path, watch):
    """freeze_epochs=1 of 2: after epoch 1 the whole body (BatchNorm statistics included) is still the init's
    while the head has trained; in epoch 2 every body layer trains and BatchNorm statistics update again."""
    over = _tiny_overrides(
        tmp_path,
        "fu",
        model={"init": str(pretrained)},
        train={"epochs": 2},
        finetune={"strategy": "freeze-unfreeze", "freeze_epochs": 1},
    )
    from tlkit.config import load_recipe

    fit(load_recipe("imagenet", over), kind="finetune", quiet=True)
    init = torch.load(pretrained, weights_only=True)["model"]
    before, e1, e2 = watch["before"], watch["last"][1], watch["last"][2]
    body = [k for k in e2 if not k.startswith("fc.")]
    assert all(torch.equal(e1[k], init[k]) for k in body), "body changed while frozen"
    for key in ("fc.weight", "fc.bias"):
        assert not torch.equal(e1[key], before[key]), f"{key} did not train in epoch 1"
        assert not torch.equal(e2[key], e1[key]), f"{key} did not train in epoch 2"
    convs = [k for k in body if e2[k].ndim == 4]
    assert convs and [k for k in convs if torch.equal(e2[k], e1[k])] == [], "body layers that did not train"
    stats = [k for k in body if k.endswith(("running_mean", "running_var"))]
    assert stats and [k for k in stats if torch.equal(e2[k], e1[k])] == [], "BatchNorm statistics still frozen"
    steps = 46 // 16  # gtsrb classes 00-03: 10 + 3 x 12 train images, full batches of 16
    counters = [k for k in body if k.endswith("num_batches_tracked")]
    assert counters and all(int(e2[k]) == int(init[k]) + steps for k in counters)


def test_reinit_stages_starts_the_deepest_stage_afresh_from_the_seed(pretrained, tmp_path, watch):
    """`finetune.reinit_stages: 1`: the model fit builds has the init's stem..layer3 (BatchNorm statistics too) and a
    layer4 that is timm's fresh init drawn from the run's seed; two runs with one seed train to the same weights."""
    from tlkit.config import load_recipe

    init = torch.load(pretrained, weights_only=True)["model"]
    built = []
    for name in ("a", "b"):
        over = _tiny_overrides(tmp_path, name, model={"init": str(pretrained)}, finetune={"reinit_stages": 1})
        fit(load_recipe("imagenet", over), kind="finetune", quiet=True)
        built.append(watch["before"])
    torch.manual_seed(0)  # the run's seed (train.seed default)
    fresh = create_model("resnet18", 4).state_dict()
    deep = [k for k in init if k.startswith("layer4.")]
    kept = [k for k in init if not k.startswith(("layer4.", "fc."))]
    assert deep and kept and any(k.endswith("running_var") for k in deep)
    convs = [k for k in deep if built[0][k].ndim == 4]
    assert convs and not any(torch.equal(built[0][k], init[k]) for k in convs), "layer4 convs are still the init's"
    assert all(torch.equal(built[0][k], fresh[k]) for k in deep), "layer4 (weights + BatchNorm stats) not reset"
    assert all(torch.equal(built[0][k], init[k]) for k in kept), "stem..layer3 must stay the init's"
    assert all(torch.equal(built[0][k], built[1][k]) for k in built[0]), "two runs, one seed: one model"
    tuned_a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    tuned_b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(tuned_a[k], tuned_b[k]) for k in tuned_a), "not reproducible"


def test_reinit_of_every_stage_is_a_clear_error(pretrained, tmp_path):
    from tlkit.config import load_recipe

    over = _tiny_overrides(tmp_path, "all", model={"init": str(pretrained)}, finetune={"reinit_stages": 5})
    with pytest.raises(ValueError, match="reinit_stages 5 leaves no pretrained layer: this model has 5 body stages"):
        fit(load_recipe("imagenet", over), kind="finetune", quiet=True)


def test_progressive_resizing_ramps_up_and_ends_at_full_size():
    from tlkit.config import load_recipe
    from tlkit.engine import progressive_size

    recipe = load_recipe(
        "imagenet",
        {"data": {"img_size": 64}, "train": {"epochs": 6, "progressive_min_size": 32, "progressive_end_epoch": 4}},
    )
    sizes = [progressive_size(recipe, e) for e in range(1, 7)]
    assert sizes[0] == 32 and sizes[3:] == [64, 64, 64]
    assert sizes == sorted(sizes) and len(set(sizes)) >= 3


# ---- any timm architecture: fixed-size models at the recipe's size, their own no-decay list ----------------------


def test_vit_trains_at_another_image_size_with_position_embeddings_undecayed(tmp_path, data_dir):
    """vit_tiny_patch16_224 at 32 px (timm builds a 2x2 patch grid): one epoch on real traffic signs, evaluated and
    reloaded at that size; pos_embed and cls_token (the model's `no_weight_decay()`) get no weight decay."""
    from tlkit.optim import param_groups

    vit = {"arch": "vit_tiny_patch16_224", "init": "scratch"}
    over = _tiny_overrides(tmp_path, "vit", model=vit, optim={"name": "adamw", "lr": 1e-3})
    run_dir = run_training("traffic-signs", over, kind="finetune", quiet=True)
    ckpt = torch.load(run_dir / "best.pt", weights_only=True)
    assert ckpt["preprocessing"]["img_size"] == 32
    assert ckpt["model"]["pos_embed"].shape == (1, 1 + 2 * 2, 192)  # cls token + 2x2 patches of 16 px
    assert (run_dir / "report" / "metrics.json").is_file()  # the post-training pass rebuilt it at 32 px

    model = create_model("vit_tiny_patch16_224", 4, img_size=32)
    groups = param_groups(model, weight_decay=0.05)
    undecayed = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decayed = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert {"pos_embed", "cls_token"} <= undecayed
    assert "blocks.0.attn.qkv.weight" in decayed and not any(n.endswith(".bias") for n in decayed)


def test_vit_weights_file_at_another_size_resamples_position_embeddings(tmp_path):
    """A 224 px ViT weights file into a 32 px model: pos_embed resampled with timm's helper, the rest exact."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(0)
    state = create_model("vit_tiny_patch16_224", 10).state_dict()
    torch.save(state, tmp_path / "vit224.pth")
    model, info = build_model("vit_tiny_patch16_224", 4, init=str(tmp_path / "vit224.pth"), img_size=32)
    own = model.state_dict()
    expected = resample_abs_pos_embed(state["pos_embed"], new_size=(2, 2), num_prefix_tokens=1)
    assert torch.equal(own["pos_embed"], expected) and own["pos_embed"].shape == (1, 5, 192)
    body = [k for k in state if k != "pos_embed" and not k.startswith("head.")]
    assert all(torch.equal(own[k], state[k]) for k in body) and info["dropped_head"]
