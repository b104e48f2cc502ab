"""Models: timm's registry, weights from local files only, head replacement, body/head split.

`init` may be `scratch`, a tlkit checkpoint (`best.pt`/`last.pt`), or a timm/torchvision weights file
(`.pth`, `.pt`, `.bin`, `.safetensors`). timm ResNets use torchvision's parameter names, so torchvision
ResNet weights load into them directly.
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from torch import nn

from tlkit.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger("tlkit.models")


def create_model(
    arch: str, num_classes: int, *, drop_rate: float = 0.0, drop_path_rate: float = 0.0, **kwargs
) -> nn.Module:
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch}*")[:5]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown architecture {arch!r} (any timm model name works){hint}")
    extra = {"drop_path_rate": drop_path_rate} if drop_path_rate else {}
    return timm.create_model(arch, pretrained=False, num_classes=num_classes, drop_rate=drop_rate, **extra, **kwargs)


def head_name(model: nn.Module) -> str:
    """The classifier module's name (`fc` for ResNets), from timm's pretrained config."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
    name = cfg.get("classifier", "fc")
    return name if isinstance(name, str) else name[0]


def head_parameter_names(model: nn.Module) -> set[str]:
    prefix = head_name(model) + "."
    return {n for n, _ in model.named_parameters() if n.startswith(prefix)}


def read_weights_file(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict, tlkit metadata or {}) from a tlkit checkpoint or a plain weights file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path)), {}
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and obj.get("format") == "tlkit":
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


def load_body(
    model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "weights", arch: str | None = None
) -> dict:
    """Load every weight that fits; a head with another class count is dropped and stays freshly
    initialised. Anything else missing or misshapen means another architecture: a clear error."""
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


def build_model(arch: str, num_classes: int, init: str = "scratch", **kwargs) -> tuple[nn.Module, dict]:
    """The model for a run, and what was loaded into it (for the report)."""
    model = create_model(arch, num_classes, **kwargs)
    if init in ("", "scratch", "none"):
        return model, {"init": "scratch"}
    state, meta = read_weights_file(Path(init))
    info = load_body(model, state, source=Path(init).name, arch=meta.get("arch"))
    info["init"] = str(init)
    info["init_arch"] = meta.get("arch", arch)
    return model, info


def model_from_checkpoint(ckpt: dict, *, use_ema: bool = True) -> nn.Module:
    """An eval-mode model rebuilt from a tlkit checkpoint dict (architecture and classes inside)."""
    model = create_model(ckpt["arch"], len(ckpt["classes"]))
    state = ckpt.get("ema") if use_ema and ckpt.get("ema") else ckpt["model"]
    model.load_state_dict(state)
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
