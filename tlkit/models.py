"""Models: timm's registry, init weights (local files or published weights), head replacement, body/head split.

`init` may be `scratch`, a tlkit checkpoint (`best.pt`/`last.pt`), a timm/torchvision weights file
(`.pth`, `.pt`, `.bin`, `.safetensors`), or published weights:
- `timm:<model>[.<tag>]` and `hf-hub:<org>/<repo>`: through timm's own pretrained loading (head dropped on a
  class-count mismatch, input channels adapted, each model's checkpoint filter, e.g. ViT position embeddings
  resampled to the recipe's image size);
- `torchvision:<WeightsEnum>` (e.g. `ResNet18_Weights.IMAGENET1K_V1`): torchvision's state dict, loaded like a
  weights file (timm ResNets use torchvision's parameter names, so torchvision ResNet weights load directly).
Downloads follow the user's hub settings: the cache first (`HF_HUB_CACHE`, `TORCH_HOME`); with
`HF_HUB_OFFLINE=1` a cache miss is one clear error naming the cache folder.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import timm
import torch
from torch import nn

from tlkit.checkpoint import FORMAT, CheckpointError, load_checkpoint

log = logging.getLogger("tlkit.models")

PUBLISHED_PREFIXES = ("timm:", "hf-hub:", "torchvision:")
SCRATCH_INITS = ("", "scratch", "none")


def _fixed_size_kwargs(arch: str, img_size: int | None) -> dict:
    """`img_size` for models built for one input size (ViT, DeiT, Swin: `fixed_input_size` in timm's config)
    when the recipe's size differs; other models take any size and do not accept the argument."""
    if not img_size:
        return {}
    try:
        cfg = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # an unknown tag: timm.create_model reports it
        cfg = None
    if cfg is None or not cfg.fixed_input_size or cfg.input_size[-1] == img_size:
        return {}
    return {"img_size": img_size}


def create_model(
    arch: str,
    num_classes: int,
    *,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    img_size: int | None = None,
    pretrained: str | None = None,
    **kwargs,
) -> nn.Module:
    """A timm model; `img_size` is passed where the model has a fixed input size; `pretrained` (a timm model
    name with tag, or `hf-hub:org/repo`) loads published weights through timm."""
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown architecture {arch!r} (any timm model name works){hint}")
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    extra.update(_fixed_size_kwargs(arch, img_size))
    return timm.create_model(
        pretrained or arch,
        pretrained=bool(pretrained),
        num_classes=num_classes,
        drop_rate=drop_rate,
        **extra,
        **kwargs,
    )


def head_name(model: nn.Module) -> str:
    """The classifier module's name (`fc` for ResNets), from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    name = cfg.get("classifier", "fc")
    return name if isinstance(name, str) else name[0]


def head_parameter_names(model: nn.Module) -> set[str]:
    prefix = head_name(model) + "."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def is_tlkit_checkpoint(path: Path) -> bool:
    """A checkpoint written by tlkit (its own pretrain or fine-tune), as opposed to a plain weights file; read
    memory-mapped, so only the small metadata is touched. An unreadable file is not one (loading says why later)."""
    if Path(path).suffix == ".safetensors":
        return False
    try:
        obj = load_checkpoint(path, mmap=True)
    except CheckpointError:
        return False
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, tlkit metadata or {}) from a tlkit checkpoint or a plain weights file."""
    path = Path(path)
    if not path.is_file():
        published = ", ".join(p + "..." for p in PUBLISHED_PREFIXES)
        raise CheckpointError(f"weights file not found: {path} (published weights are named {published})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        state = obj.get("ema") or obj["model"]
        return state, obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path.name} does not hold a state dict of tensors")
    # Strip wrappers added by DDP ("module.") and torch.compile ("_orig_mod.").
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in obj.items()}, {}


def _resample_pos_embed(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ViT-style `pos_embed` from weights trained at another image size, resampled to the model's grid
    (timm's own resampling, as its pretrained loading does)."""
    own = model.state_dict().get("pos_embed")
    theirs = state.get("pos_embed")
    if own is None or theirs is None or own.shape == theirs.shape or not hasattr(model, "patch_embed"):
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    resampled = resample_abs_pos_embed(theirs, new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix)
    return {**state, "pos_embed": resampled}


def load_body(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights", arch: str | None = None
) -> dict:
    """Load every weight that fits; a head with another class count is dropped and stays freshly
    initialised. Anything else missing or misshapen means another architecture: a clear error."""
    state = _resample_pos_embed(model, state)
    own = model.state_dict()
    head = head_name(model) + "."
    dropped = [k for k, v in state.items() if k.startswith(head) and k in own and own[k].shape != v.shape]
    filtered = {k: v for k, v in state.items() if k not in dropped}
    body_missing = [k for k in own if k not in filtered and not k.startswith(head)]
    mismatched = [k for k, v in filtered.items() if k in own and own[k].shape != v.shape]
    # Extra body tensors mean a deeper model of the same family (resnet34 weights into a resnet18):
    # loading the shared prefix would silently drop most of the pretrained network.
    body_extra = [k for k in filtered if k not in own and not k.startswith(head)]
    model_arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    too_many = max(len(body_missing), len(body_extra)) > 0.1 * len(own)
    if mismatched or too_many or not (set(filtered) & set(own)):
        from_arch = f" (a {arch} checkpoint)" if arch else ""
        raise CheckpointError(
            f"{source}{from_arch} does not fit {model_arch}: {len(body_missing)} missing, "
            f"{len(body_extra)} unexpected and {len(mismatched)} mismatched tensors; "
            f"use --arch {arch or '<the checkpoint architecture>'}"
        )
    result = model.load_state_dict(filtered, strict=False)
    if dropped:
        log.info("replaced the classifier head (%s): checkpoint classes differ", ", ".join(dropped))
    return {
        "dropped_head": bool(dropped),
        "missing": list(result.missing_keys),
        "unexpected": list(result.unexpected_keys),
    }


# ---- published weights (timm, Hugging Face hub, torchvision) ----------------------------------------------


def is_published(init: str) -> bool:
    return str(init).startswith(PUBLISHED_PREFIXES)


def is_scratch(init: str) -> bool:
    """`model.init` values that mean random weights."""
    return init in SCRATCH_INITS


@dataclass(frozen=True)
class PublishedWeights:
    """What `--init timm:...`, `hf-hub:...` or `torchvision:...` names, resolved without downloading weights."""

    init: str  # as the user wrote it
    source: str  # timm | hf-hub | torchvision
    name: str  # model.tag, org/repo or the WeightsEnum member
    arch: str  # the timm architecture the weights are for
    num_classes: int  # of the published head
    preprocessing: dict = field(default_factory=dict)  # mean, std, interpolation, crop_pct, img_size
    overlay: dict = field(default_factory=dict)  # pretrained_cfg keys a hub config lacks (timm needs `classifier`)


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _hf_cache() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


@contextlib.contextmanager
def _hub_errors(init: str, cache: str, env: str = "HF_HUB_CACHE") -> Iterator[None]:
    """Hub and download failures -> one line: which cache was looked in and how to go online."""
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        yield
    except (RepositoryNotFoundError, GatedRepoError) as e:
        what = type(e).__name__
        raise CheckpointError(f"{init}: no such model on the Hugging Face hub, or it needs a login ({what})") from None
    except (LocalEntryNotFoundError, OSError) as e:
        if _offline():
            raise CheckpointError(_offline_miss(init, cache, env)) from None
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"could not download {init} into {cache}: {reason}") from None


def _offline_miss(init: str, cache: str | Path, env: str) -> str:
    return (
        f"{init} is not in the cache ({cache}) and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to download it "
        f"once, or set {env} to a cache that holds it"
    )


def _preprocessing_of(cfg: dict) -> dict:
    keys = {"mean": "mean", "std": "std", "interpolation": "interpolation", "crop_pct": "crop_pct"}
    out = {ours: cfg[theirs] for ours, theirs in keys.items() if cfg.get(theirs) is not None}
    out.update({k: [float(x) for x in out[k]] for k in ("mean", "std") if k in out})
    if cfg.get("input_size"):
        out["img_size"] = int(cfg["input_size"][-1])
    return out


def _timm_weights(init: str, name: str) -> PublishedWeights:
    arch = name.split(".", 1)[0]
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*", pretrained=True)[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise CheckpointError(f"{init}: unknown timm model {arch!r}{hint}")
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:
        tags = timm.list_pretrained(f"{arch}.*")[:6]
        shown = ", ".join(tags) or "none"
        raise CheckpointError(f"{init}: timm has no such weights; published tags: {shown}") from None
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        raise CheckpointError(f"{init}: timm publishes no weights for {name}")
    pub = PublishedWeights(init, "timm", name, arch, cfg.num_classes, _preprocessing_of(cfg.to_dict()))
    if _offline():  # a cache miss is known now, before any data is scanned
        if cfg.hf_hub_id:
            _hf_cached_or_fail(pub, cfg.hf_hub_id, cfg.hf_hub_filename)
        else:
            _torch_hub_file(pub, cfg.url)
    return pub


def _hf_cached_or_fail(pub: PublishedWeights, repo: str, filename: str | None) -> None:
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = repo.partition("@")
    names = [filename] if filename else ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    found = [try_to_load_from_cache(repo_id, n, revision=revision or None) for n in names]
    if not any(isinstance(f, str) for f in found):
        raise CheckpointError(_offline_miss(pub.init, _hf_cache(), "HF_HUB_CACHE"))


def _hf_weights(init: str, repo: str) -> PublishedWeights:
    from timm.models import load_model_config_from_hf

    with _hub_errors(init, _hf_cache()):
        cfg, arch, _ = load_model_config_from_hf(repo)
    if not timm.is_model(arch):
        raise CheckpointError(f"{init}: its config.json names architecture {arch!r}, which this timm does not have")
    # timm drops a mismatched head by the config's `classifier` name; a hand-written config may not give it
    overlay = {} if cfg.get("classifier") else {"classifier": timm.models.get_pretrained_cfg(arch).classifier}
    pub = PublishedWeights(init, "hf-hub", repo, arch, cfg.get("num_classes", 0), _preprocessing_of(cfg), overlay)
    if _offline():
        _hf_cached_or_fail(pub, repo, cfg.get("hf_hub_filename"))
    return pub


def _torchvision_weights(init: str, name: str) -> PublishedWeights:
    import torchvision.models as tvm

    try:
        weights = tvm.get_weight(name)
    except (ValueError, KeyError, AttributeError):
        raise CheckpointError(
            f"{init}: not a torchvision weights name; use <Enum>.<member>, e.g. ResNet18_Weights.IMAGENET1K_V1"
        ) from None
    arch = next((n for n in tvm.list_models() if tvm.get_model_weights(n) is type(weights)), name)
    t = weights.transforms()
    pre = {
        "mean": list(t.mean),
        "std": list(t.std),
        "interpolation": t.interpolation.value,
        "crop_pct": t.crop_size[0] / t.resize_size[0],
        "img_size": t.crop_size[0],
    }
    return PublishedWeights(init, "torchvision", name, arch, len(weights.meta.get("categories") or ()), pre)


@lru_cache(maxsize=16)
def resolve_published(init: str) -> PublishedWeights:
    """The architecture, head size and preprocessing of published weights; reads only configs (from the cache
    first), never the weights."""
    source, _, name = str(init).partition(":")
    if not name:
        raise CheckpointError(f"--init {init}: name the weights after the colon, e.g. timm:resnet50.a1_in1k")
    if source == "timm":
        return _timm_weights(init, name)
    if source == "hf-hub":
        return _hf_weights(init, name)
    return _torchvision_weights(init, name)


def _torch_hub_file(pub: PublishedWeights, url: str) -> None:
    """Offline and not in the torch hub cache: the clear error, before torch tries the network."""
    cached = _torch_cache() / Path(url).name
    if _offline() and not cached.is_file():
        raise CheckpointError(_offline_miss(pub.init, cached.parent, "TORCH_HOME"))


def load_published(arch: str, num_classes: int, init: str, **kwargs) -> tuple[nn.Module, dict]:
    """A model with published weights: timm/hf-hub through timm's pretrained loading, torchvision's state dict
    through `load_body`. The weights must be for `arch` (the checkpoint records `arch`)."""
    pub = resolve_published(init)
    if pub.arch != arch:
        raise CheckpointError(f"{init} holds {pub.arch} weights, not {arch}: pass --arch {pub.arch}")
    if pub.source == "torchvision":
        import torchvision.models as tvm

        weights = tvm.get_weight(pub.name)
        _torch_hub_file(pub, weights.url)
        model = create_model(arch, num_classes, **kwargs)
        with _hub_errors(init, str(_torch_cache()), "TORCH_HOME"):
            state = weights.get_state_dict(progress=False)
        info = load_body(model, state, source=init, arch=pub.arch)
    else:
        cfg = timm.models.get_pretrained_cfg(pub.name) if pub.source == "timm" else None
        if cfg is not None and not cfg.hf_hub_id:
            _torch_hub_file(pub, cfg.url)
        name = pub.name if pub.source == "timm" else f"hf-hub:{pub.name}"
        hub = cfg is None or bool(cfg.hf_hub_id)
        cache, env = (_hf_cache(), "HF_HUB_CACHE") if hub else (str(_torch_cache()), "TORCH_HOME")
        with _hub_errors(init, cache, env):
            model = create_model(arch, num_classes, pretrained=name, pretrained_cfg_overlay=pub.overlay, **kwargs)
        info = {"dropped_head": num_classes != pub.num_classes, "missing": [], "unexpected": []}
    return model, {**info, "init": init, "init_arch": pub.arch, "init_preprocessing": pub.preprocessing}


def reset_head(model: nn.Module) -> bool:
    """A classifier made fresh on a pretrained body starts near zero (truncated normal, std 0.01; bias 0), as in
    the MAE/BEiT fine-tuning recipes: timm's own init is for training from scratch, and for some families (the
    EfficientNets' fan-out rule: U(+-1/sqrt(classes))) it gives a 5-class head logits of +-10 on ImageNet features,
    a loss of 5-25 that a short fine-tune spends its first epochs undoing. True when a linear head was reset."""
    try:
        head = model.get_submodule(head_name(model))
    except AttributeError:
        return False
    if not isinstance(head, nn.Linear):
        return False
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.01)
        if head.bias is not None:
            head.bias.zero_()
    return True


def build_model(arch: str, num_classes: int, init: str = "scratch", **kwargs) -> tuple[nn.Module, dict]:
    """The model for a run, and what was loaded into it (for the report)."""
    if is_published(init):
        model, info = load_published(arch, num_classes, init, **kwargs)
    else:
        model = create_model(arch, num_classes, **kwargs)
        if is_scratch(init):
            return model, {"init": "scratch"}
        state, meta = read_weights_file(Path(init))
        info = load_body(model, state, source=Path(init).name, arch=meta.get("arch"))
        info["init"] = str(init)
        info["init_arch"] = meta.get("arch", arch)
    fresh_head = info["dropped_head"] or bool(head_parameter_names(model) & set(info["missing"]))
    info["head_reset"] = fresh_head and reset_head(model)
    return model, info


def model_from_checkpoint(ckpt: dict, *, use_ema: bool = True) -> nn.Module:
    """An eval-mode model rebuilt from a tlkit checkpoint dict (architecture, classes and image size inside)."""
    from tlkit.checkpoint import non_finite_weights

    bad = non_finite_weights(ckpt)
    if bad:  # a diverged run's weights: every prediction would be NaN
        raise CheckpointError(f"refusing a checkpoint whose {bad} (a diverged run); use an earlier checkpoint")
    img_size = (ckpt.get("preprocessing") or {}).get("img_size")
    model = create_model(ckpt["arch"], len(ckpt["classes"]), img_size=img_size)
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") else ckpt["model"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:  # hand-edited arch / classes vs the weights
        lines = str(e).strip().splitlines()
        detail = next((ln.strip() for ln in lines[1:] if ln.strip()), lines[0] if lines else type(e).__name__)
        if len(detail) > 200:  # a long list of key names: the first few say enough
            detail = detail[:200].rsplit(",", 1)[0] + ", ..."
        raise CheckpointError(
            f"the checkpoint's weights do not fit its own metadata (arch {ckpt['arch']}, "
            f"{len(ckpt['classes'])} classes): {detail}"
        ) from None
    return model.eval()


# ---- body/head split for transfer strategies ------------------------------------------------------------


def body_stages(model: nn.Module) -> list[list[str]]:
    """Parameter names of the body grouped by depth, shallow first, via timm's `group_matcher`
    (stem, stage 1, ...); the head is excluded. Used for freezing and layer-wise LR decay."""
    from timm.models import group_parameters

    head = head_parameter_names(model)
    try:
        groups = group_parameters(model, model.group_matcher(coarse=True))
        stages = [[n for n in names if n not in head] for _, names in sorted(groups.items())]
    except (AttributeError, NotImplementedError):
        stages = [[n for n, _ in model.named_parameters() if n not in head]]
    return [s for s in stages if s]
