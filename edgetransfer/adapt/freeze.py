"""Which parameters learn, and how fast, for each transfer mode.

- features: only the head learns; the backbone is frozen and its BatchNorm statistics stay fixed.
- partial:  the last N stages of the backbone and everything after them learn.
- finetune: everything learns, the backbone at a lower learning rate so the pretrained features are
            adjusted rather than overwritten.
"""

from __future__ import annotations

from torch import nn

from ..backbones import Head, stages
from ..errors import UsageError

MODES: tuple[str, ...] = ("features", "partial", "finetune")


def apply_mode(model: nn.Module, head: Head, mode: str, *, unfreeze_stages: int = 2) -> list[nn.Module]:
    """Set `requires_grad` per the mode; return the modules that must stay in eval mode while training.

    Frozen BatchNorm layers must not update running statistics in `model.train()`, or a frozen
    backbone would still drift; the caller re-applies eval() to the returned modules each epoch.
    """
    if mode not in MODES:
        raise UsageError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}", field="mode")
    head_module = model.get_submodule(head.path)
    head_ids = {id(p) for p in head_module.parameters()}
    if mode == "finetune":
        for p in model.parameters():
            p.requires_grad_(True)
        return []
    if mode == "features":
        for p in model.parameters():
            p.requires_grad_(id(p) in head_ids)
    else:
        blocks = stages(model, head)
        if unfreeze_stages < 1 or unfreeze_stages > len(blocks):
            raise UsageError(f"partial mode unfreezes 1..{len(blocks)} stages for this backbone, got {unfreeze_stages}",
                             field="unfreeze_stages")
        first = next(iter(blocks[-unfreeze_stages].parameters()))
        trainable = False
        for p in model.parameters():  # registration order is forward order for torchvision models
            trainable = trainable or p is first
            p.requires_grad_(trainable or id(p) in head_ids)
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and not any(p.requires_grad for p in m.parameters(recurse=False))]


def param_groups(model: nn.Module, head: Head, *, lr: float, backbone_lr: float, weight_decay: float) -> list[dict]:
    """Head and backbone as separate optimizer groups; norms and biases get no weight decay."""
    head_ids = {id(p) for p in model.get_submodule(head.path).parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head_ids, p.ndim <= 1), []).append(p)
    return [{"params": params, "lr": lr if is_head else backbone_lr, "weight_decay": 0.0 if no_decay else weight_decay,
             "name": ("head" if is_head else "backbone") + ("/no_decay" if no_decay else "")}
            for (is_head, no_decay), params in sorted(groups.items())]
