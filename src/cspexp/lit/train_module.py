"""Lightning training of a LisaModel with LISA's losses, optionally under a pruning schedule.

The forward pass is exactly the evaluation pass (`cspexp.pruning.pipeline.segment`, teacher-forced
prompt ending in ``[SEG].</s>``) with gradients on: with a pruning method active the model learns to
work with the tokens the schedule leaves it (scores and selections are constants). Losses as in
LISA: cross-entropy of the answer tokens (``[SEG]``, ``.``, ``</s>``, each predicted from the token
before it) + BCE and Dice of the mask logits at the original image size, weighted by ``loss.*``.
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from cspexp.lit.losses import mask_losses
from cspexp.metrics.seg_iou import SegIoU
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.pipeline import segment

ANSWER_TOKENS = 3  # "[SEG]", ".", "</s>"


def answer_ce(model, out, batch) -> torch.Tensor:
    """Next-token cross-entropy on the answer: logits at the tokens before each answer token."""
    state = out.state
    input_ids = batch["input_ids"]
    n_image = model.n_image_tokens
    losses, n_supervised = [], 0
    for k in range(ANSWER_TOKENS):
        target_pos = state.seg_pos + k
        text_idx = target_pos - (n_image - 1)  # the token's index in the un-spliced prompt
        ok = text_idx < input_ids.shape[1]
        text_idx = text_idx.clamp(max=input_ids.shape[1] - 1)
        labels = torch.gather(input_ids, 1, text_idx[:, None])[:, 0]
        ok &= torch.gather(batch["attention_mask"], 1, text_idx[:, None])[:, 0].bool()
        cols = state.columns_of(target_pos - 1)
        hidden = state.hidden[torch.arange(state.batch_size, device=cols.device), cols]
        logits = model.llm.lm_head(hidden).float()
        losses.append(F.cross_entropy(logits, labels.masked_fill(~ok, -100), ignore_index=-100, reduction="sum"))
        n_supervised += int(ok.sum())
    return torch.stack(losses).sum() / max(n_supervised, 1)


class TrainModule(L.LightningModule):
    def __init__(
        self,
        loaded,
        method: PruningMethod,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_steps: int = 100,
        loss_weights: dict | None = None,
        val_method: PruningMethod | None = None,
    ) -> None:
        super().__init__()
        self.model = loaded.model
        self.method = method
        self.val_method = val_method or method
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.weights = {"ce": 1.0, "bce": 2.0, "dice": 0.5, **(loss_weights or {})}  # LISA's defaults
        self.val_metric = SegIoU()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = segment(self.model, batch, self.method)
        ce = answer_ce(self.model, out, batch)
        bce, dice = mask_losses(out.logits, batch["gt_masks"])
        w = self.weights
        loss = w["ce"] * ce + w["bce"] * bce + w["dice"] * dice
        bs = len(batch["gt_masks"])
        self.log_dict({"train/loss": loss, "train/ce": ce, "train/bce": bce, "train/dice": dice}, prog_bar=True,
                      batch_size=bs)
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = segment(self.model, batch, self.val_method)
        self.val_metric.update(out.masks, batch["gt_masks"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metric.compute()
        self.log_dict({"val/giou": values["giou"], "val/ciou": values["ciou"]}, prog_bar=True, batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 5 % (LISA: WarmupDecayLR)
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
