"""Lightning training of a LisaModel, optionally under a pruning schedule.

The forward pass is exactly the evaluation pass (`cspexp.pruning.pipeline.segment`, teacher-forced
prompt ending in ``[SEG].</s>``) with gradients on: with a pruning method active the model learns to
work with the tokens the schedule leaves it (scores and selections are constants). The loss is the
weighted sum of the configured terms (`cspexp.lit.losses`; LISA's own: answer CE + mask BCE + Dice).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch

from cspexp.lit.losses import LossTerm, StepContext, build_terms
from cspexp.metrics.seg_iou import SegIoU
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.methods.vtw import VisualTokenWithdrawal
from cspexp.pruning.pipeline import SegmentOutput, segment
from cspexp.utils.errors import require


@dataclass(frozen=True)
class OptimSettings:
    """AdamW (betas 0.9, 0.95; no decay on biases and norms), linear warm-up then cosine to 5 %."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100


class TrainModule(L.LightningModule):
    """Trains `model` under `method` on the weighted sum of `terms` (name → LossTerm, in order).

    `text_only_steps`: the first steps withdraw every image token before layer 0 (the `vtw` schedule
    at layer 0) instead of running `method` — the warm-up of `cspexp.lit.attend`. Validation runs
    under `method`."""

    def __init__(self, model, method: PruningMethod, terms: dict[str, LossTerm],
                 optim: OptimSettings = OptimSettings(), text_only_steps: int = 0) -> None:
        super().__init__()
        require(bool(terms), "train.terms: no term is configured with a weight > 0; the loss needs one")
        self.model = model
        self.method = method
        self.optim = optim
        # After the model: the terms' read-out heads are drawn from the RNG and registered in this order.
        self.terms = torch.nn.ModuleDict(terms)
        for term in self.terms.values():
            term.setup(model)
        self.text_only_steps = int(text_only_steps)
        self.text_only = VisualTokenWithdrawal(layer=0).bind(model.num_layers, model.n_image_tokens)
        self.val_metric = SegIoU()

    @classmethod
    def from_config(cls, model, method: PruningMethod, cfg, terms: dict[str, LossTerm] | None = None) -> TrainModule:
        """From the `train` node of `conf/train.yaml` (`terms`: already built from ``cfg.terms``)."""
        optim = OptimSettings(lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)
        terms = build_terms(cfg.terms) if terms is None else terms
        return cls(model, method, terms, optim, text_only_steps=cfg.text_only_steps)

    def forward_pass(self, batch: dict) -> tuple[SegmentOutput, StepContext]:
        """This step's forward pass — during the text-only warm-up without image tokens, else under
        the training schedule — with the observers the terms ask for."""
        ctx = StepContext(text_only=self.global_step < self.text_only_steps)
        for term in self.terms.values():
            observer = term.observer(ctx)
            if observer is not None:
                ctx.observers[term] = observer
        method = self.text_only if ctx.text_only else self.method
        return segment(self.model, batch, method, observers=list(ctx.observers.values())), ctx

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out, ctx = self.forward_pass(batch)
        loss, logs = None, {}
        for term in self.terms.values():
            value, term_logs = term(self.model, out, batch, ctx)
            # Added one by one in the terms' order: the sum is the same float, step after step.
            loss = term.weight * value if loss is None else loss + term.weight * value
            logs.update({f"train/{k}": v for k, v in term_logs.items()})
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=True, batch_size=len(batch["gt_masks"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self.val_metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = segment(self.model, batch, self.method)
        self.val_metric.update(out.masks, batch["gt_masks"])

    def on_validation_epoch_end(self) -> None:
        values = self.val_metric.compute()
        self.log_dict({"val/giou": values["giou"], "val/ciou": values["ciou"]}, prog_bar=True, batch_size=1)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.optim.lr, betas=(0.9, 0.95),
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(self.optim.warmup_steps, total // 10 + 1)

        def schedule(step: int) -> float:  # linear warm-up, then cosine to 5 % (LISA: WarmupDecayLR)
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(1, total - warmup)
            return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
