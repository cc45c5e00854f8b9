"""LISA's training losses (``model/LISA.py``): next-token cross-entropy on the answer, plus per-mask
sigmoid BCE and Dice on the predicted mask logits at the original image size."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def dice_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, scale: float = 1000.0,
              eps: float = 1e-6) -> torch.Tensor:
    """LISA's Dice: 1 − (2·Σ p·t + eps) / (Σ p + Σ t + eps), sums scaled by 1/1000 (its numerics)."""
    p = logits.sigmoid().flatten() * valid.flatten()
    t = target.flatten() * valid.flatten()
    numerator = 2 * (p / scale * t).sum()
    denominator = (p / scale).sum() + (t / scale).sum()
    return 1 - (numerator + eps) / (denominator + eps)


def sigmoid_ce_loss(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean binary cross-entropy over the mask's valid pixels."""
    loss = F.binary_cross_entropy_with_logits(logits.flatten(), target.flatten().float(), reduction="none")
    v = valid.flatten().float()
    return (loss * v).sum() / v.sum().clamp(min=1)


def mask_losses(logits: list[torch.Tensor], targets: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(BCE, Dice) averaged over the masks of a batch; pixels labelled 255 do not count."""
    bce, dice = [], []
    for lg, gt in zip(logits, targets, strict=True):
        gt = gt.to(lg.device)
        valid = gt != IGNORE
        t = (gt == 1).float()
        bce.append(sigmoid_ce_loss(lg, t, valid))
        dice.append(dice_loss(lg, t, valid))
    return torch.stack(bce).mean(), torch.stack(dice).mean()
