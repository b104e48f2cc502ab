"""Transfer strategies (fastai style): which parameters train when, and at what learning rate.

- `linear-probe`: only the head trains; the body is frozen, BatchNorm statistics included.
- `full`: everything trains from epoch 1, with discriminative LRs (deeper body stages higher).
- `freeze-unfreeze`: head only for `freeze_epochs`, then everything with discriminative LRs.

Discriminative LRs: the head gets `head_lr_mult` x the recipe LR; body stage i of n (deepest = n-1)
gets `layer_decay ** (n - 1 - i)` x the recipe LR, so the stem moves least (layer-wise LR decay).
`finetune.reinit_stages` N starts the deepest N body stages afresh (timm's own init) before any of this: the
transferable part of a weak pretrain is its early layers.
Frozen BatchNorm layers are kept in eval mode: their running mean/var stay the pretrained ones,
because a frozen body fed new-domain batch statistics would drift while its weights could not adapt.
"""

from __future__ import annotations

from torch import nn

from tlkit.config import STRATEGIES, FinetuneConfig
from tlkit.models import body_stages, head_parameter_names


class Strategy:
    def __init__(self, model: nn.Module, cfg: FinetuneConfig):
        if cfg.strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {cfg.strategy!r}; use one of {', '.join(STRATEGIES)}")
        self.model, self.cfg = model, cfg
        self.head = head_parameter_names(model)
        self.stages = body_stages(model)
        self.body = {n for stage in self.stages for n in stage}
        self.frozen = False
        self.started = False  # the first epoch of this process (1, or the one a resumed run starts at)

    def lr_multipliers(self) -> dict[str, float]:
        mults = {name: self.cfg.head_lr_mult for name in self.head}
        n = len(self.stages)
        for i, stage in enumerate(self.stages):
            for name in stage:
                mults[name] = self.cfg.layer_decay ** (n - 1 - i)
        return mults

    def body_frozen_at(self, epoch: int) -> bool:
        if self.cfg.strategy == "linear-probe":
            return True
        if self.cfg.strategy == "freeze-unfreeze":
            return epoch <= self.cfg.freeze_epochs
        return False

    def on_epoch_start(self, epoch: int, console=None) -> bool:
        """Set `requires_grad` for this epoch; True when the set of trainable parameters changed (a DDP
        wrapper must then be rebuilt: it only reduces what required grad when it was made)."""
        frozen = self.body_frozen_at(epoch)
        before = self.trainable()
        if frozen != self.frozen or not self.started:
            for name, p in self.model.named_parameters():
                if name in self.body:
                    p.requires_grad_(not frozen)
            if console is not None and self.cfg.strategy != "full":
                console.print(f"epoch {epoch}: body {'frozen (head only)' if frozen else 'unfrozen (all layers)'}")
        self.frozen, self.started = frozen, True
        return self.trainable() != before

    def freeze_norm_stats(self) -> None:
        """After `model.train()`: BatchNorm layers of a frozen body go back to eval (fixed statistics)."""
        if not self.frozen:
            return
        head_prefix = next(iter(self.head)).rsplit(".", 1)[0] if self.head else "\0"
        for name, module in self.model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not name.startswith(head_prefix):
                module.eval()

    def trainable(self) -> set[str]:
        return {n for n, p in self.model.named_parameters() if p.requires_grad}


def reinit_deepest_stages(model: nn.Module, fresh: nn.Module, n: int) -> list[str]:
    """Copy the deepest `n` body stages (weights and BatchNorm statistics) of `fresh`, a newly initialised model of
    the same architecture, into `model`; returns the stages' names. Early layers of a weak pretrain (edges,
    colour blobs) transfer; its deepest stages encode the pretraining task, and starting them afresh generalises
    better (measured in recipes/traffic-signs.yaml)."""
    if n <= 0:
        return []
    stages = body_stages(model)
    if n >= len(stages):
        raise ValueError(
            f"finetune.reinit_stages {n} leaves no pretrained layer: this model has {len(stages)} body stages "
            "(use --init scratch to start everything afresh)"
        )
    modules = {name.rsplit(".", 1)[0] for stage in stages[len(stages) - n :] for name in stage}
    state = {k: v for k, v in fresh.state_dict().items() if k.rsplit(".", 1)[0] in modules}
    model.load_state_dict(state, strict=False)
    return [_stage_label(stage) for stage in stages[len(stages) - n :]]


def _stage_label(names: list[str]) -> str:
    """A stage's name for messages: its parameters' common module path (`layer4`), else their top modules."""
    parts = [name.split(".") for name in names]
    common = []
    for level in zip(*parts, strict=False):  # up to the shortest name
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) if common else ", ".join(dict.fromkeys(p[0] for p in parts))
