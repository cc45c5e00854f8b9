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

from cspexp.lit.attend import SUFFIX_TOKENS, AttentionTap, attend_loss, query_words, recall_loss, target_cells
from cspexp.lit.losses import mask_losses
from cspexp.metrics.seg_iou import SegIoU
from cspexp.pruning.methods.base import PruningMethod
from cspexp.pruning.methods.vtw import VisualTokenWithdrawal
from cspexp.pruning.pipeline import segment
from cspexp.utils.errors import require

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


def prompt_lm_ce(model, out, batch) -> torch.Tensor:
    """Next-token cross-entropy on the user's turn: every text token after ``<im_end>`` up to the
    answer, predicted from the token before it (LLaVA-style language modelling on the prompt).

    Why: trained from scratch, the answer CE is constant ("[SEG]", ".", "</s>") and says nothing about
    the query, so the LLM has no reason to read it before the mask decoder can use it, and the [SEG]
    embedding collapses to a constant. Predicting the query words makes the LLM attend to the text
    and ground words ("red", "circle", "left") in the image tokens it sees.
    """
    state = out.state
    input_ids, attention = batch["input_ids"], batch["attention_mask"].bool()
    n_image = model.n_image_tokens
    B, L = input_ids.shape
    img_at = (input_ids == model.image_token_id).float().argmax(1)  # [B]
    seg_at = (input_ids == model.seg_token_id).float().argmax(1)
    idx = torch.arange(L, device=input_ids.device).expand(B, L)
    # Targets: text index t with img_at + 2 <= t < seg_at (after <im_end>, before the answer).
    supervised = (idx >= img_at[:, None] + 2) & (idx < seg_at[:, None]) & attention
    rows, t = supervised.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return state.hidden.new_zeros(())
    prev_pos = t - 1 + n_image - 1  # position in the spliced sequence of the token before t
    hit = state.pos[rows] == prev_pos[:, None]  # text tokens are never pruned, so each row has one hit
    hidden = state.hidden[rows, hit.float().argmax(1)]
    logits = model.llm.lm_head(hidden).float()
    return F.cross_entropy(logits, input_ids[rows, t])


def click_embeddings(model, batch, where: str = "random", generator=None) -> torch.Tensor:
    """SAM's prompt-encoder embedding of one positive click per target, as ONE sparse token [B, C]
    (no padding token: the decoder then sees a prompt shaped like LISA's single [SEG] embedding).

    `where`: ``random`` — the centre of a target pixel drawn uniformly; ``centre`` — the target's
    centroid. The click is mapped from the original image to SAM's resized input frame.
    """
    points = []
    for gt, resized, original in zip(batch["gt_masks"], batch["resized_hw"], batch["original_hw"], strict=True):
        ys, xs = torch.nonzero(gt == 1, as_tuple=True)
        if ys.numel() == 0:  # nothing to click: the image centre (its mask loss then teaches "empty")
            y, x = float(original[0]) / 2, float(original[1]) / 2
        elif where == "centre":
            y, x = ys.float().mean().item() + 0.5, xs.float().mean().item() + 0.5
        else:
            k = int(torch.randint(ys.numel(), (1,), generator=generator))
            y, x = ys[k].item() + 0.5, xs[k].item() + 0.5
        # SAM's encoder adds 0.5 to a coordinate itself, hence the − 0.5
        points.append([x * float(resized[1]) / float(original[1]) - 0.5, y * float(resized[0]) / float(original[0]) - 0.5])
    encoder = model.sam.prompt_encoder
    pts = torch.tensor(points, device=encoder.point_embed[1].weight.device)[:, None, None, :]  # [B, 1, 1, 2]
    labels = torch.ones(pts.shape[:3], dtype=torch.long, device=pts.device)
    # transformers' own point embedding (random-Fourier PE + the "positive click" embedding); the
    # public forward always appends a padding point when there is no box.
    return encoder._embed_points(pts, labels, pad=False)[:, 0, 0]


def point_prompt_losses(model, image_embeddings, batch, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's own training task on the same images: a random positive click inside each target →
    mask decoder → (BCE, Dice) against the target.

    Why: LISA starts from a SAM already trained to segment *one* object given a prompt token. From
    scratch, the decoder first finds the "every shape" solution, after which any prompt is noise to it
    (measured: the [SEG] embedding collapsed to a constant within 150 steps). Clicks keep it selective.
    """
    low_res = model.decode_masks(image_embeddings, click_embeddings(model, batch, "random", generator))
    logits = [model.postprocess_masks(low_res[i], batch["resized_hw"][i], batch["original_hw"][i])
              for i in range(low_res.shape[0])]
    return mask_losses(logits, batch["gt_masks"])


def prompt_match_loss(model, seg_embeds, batch) -> torch.Tensor:
    """Mean squared distance between the [SEG] embedding and SAM's embedding of a click at the target's
    centre (a constant target). Why: a decoder that follows clicks gives the LLM little gradient
    through the mask loss while its [SEG] embedding is still far from any click (measured: [SEG] dice
    stayed at the "every shape" level for 800 steps while click dice fell to 0.06); this term tells
    the LLM directly *where* the target is, in the decoder's own prompt language."""
    with torch.no_grad():
        target = click_embeddings(model, batch, "centre")
    return F.mse_loss(seg_embeds.float(), target.float())


DESCRIPTOR_DIMS = 5  # centroid (x, y) and mean colour (r, g, b)


def suffix_states(state) -> torch.Tensor:
    """Final states of the SUFFIX_TOKENS text tokens before [SEG], [B, SUFFIX_TOKENS, d] (the query
    token last). Text tokens are never pruned, so each has a column in the state."""
    rows = torch.arange(state.batch_size, device=state.hidden.device)
    steps = [state.hidden[rows, state.columns_of(state.seg_pos - SUFFIX_TOKENS + k)] for k in range(SUFFIX_TOKENS)]
    return torch.stack(steps, 1)


def target_descriptors(batch) -> torch.Tensor:
    """What and where each target is, as smooth numbers in [−1, 1]: its centroid (x, y) in the image
    and its mean colour (r, g, b). [B, 5]; an empty mask gives the image centre and grey (zeros)."""
    rows = []
    for gt, image in zip(batch["gt_masks"], batch["images"], strict=True):
        inside = gt == 1
        ys, xs = torch.nonzero(inside, as_tuple=True)
        if ys.numel() == 0:
            rows.append(torch.zeros(DESCRIPTOR_DIMS, dtype=torch.float64))
            continue
        h, w = inside.shape
        centre = torch.stack([(xs.double().mean() + 0.5) / w, (ys.double().mean() + 0.5) / h]) * 2 - 1
        colour = torch.as_tensor(image)[inside.cpu()].double().mean(0) / 127.5 - 1
        rows.append(torch.cat([centre, colour]))
    return torch.stack(rows).float()


def describe_loss(head: torch.nn.Module, states: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared error of a linear read-out of final states [B, k, d] (each of the k tokens on its
    own; `suffix_states`: the prompt's words after the query) against `target_descriptors`, and the
    error of the best constant (the batch mean) for reference.

    Why: the [SEG] embedding must say which shape the mask decoder is to cut out, but SAM's prompt
    embedding of a location is a high-frequency function of it (random Fourier features), which
    the LLM cannot regress before it knows roughly where the target is: regressing it directly
    (`match`) stayed at the constant predictor's level. Centroid and colour are smooth and linear in
    what the image tokens carry (with `model.image_position`), so the query token can be asked to find
    the target first. The words between the query and the answer see all the query token sees, so
    each of them is asked. Measured on `shapes` (issue 5): it learns the colour the query names
    (linear-probe R² 0.3–0.4 from the query token), not yet where the target is."""
    target = target_descriptors(batch).to(states.device)
    pred = head(states.float())
    return F.mse_loss(pred, target[:, None].expand_as(pred)), ((target - target.mean(0)) ** 2).mean()


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
        text_only_steps: int = 0,
        attend_layers: list[int] | tuple[int, ...] = (),
        attend_head: int = 0,
        anchor_layers: list[int] | tuple[int, ...] = (),
        anchor_head: int = 1,
    ) -> None:
        super().__init__()
        self.model = loaded.model
        self.method = method
        self.val_method = val_method or method
        self.lr, self.weight_decay, self.warmup_steps = lr, weight_decay, warmup_steps
        self.weights = {"ce": 1.0, "bce": 2.0, "dice": 0.5, "lm": 0.0, "point": 0.0, "match": 0.0, "describe": 0.0,
                        "recall": 0.0, "attend": 0.0, "anchor": 0.0, **(loss_weights or {})}  # LISA's defaults
        d = self.model.llm.config.hidden_size
        # Training aids, not part of the model: the linear read-outs of `describe_loss` and `recall_loss`.
        self.describe_head = torch.nn.Linear(d, DESCRIPTOR_DIMS) if self.weights["describe"] else None
        self.recall_head = torch.nn.Linear(d, self.model.llm.config.vocab_size) if self.weights["recall"] else None
        # cspexp.lit.attend: the first `text_only_steps` steps withdraw every image token before layer 0.
        self.text_only_steps = int(text_only_steps)
        self.text_only = VisualTokenWithdrawal(layer=0).bind(self.model.num_layers, self.model.n_image_tokens)
        self.attend_layers, self.attend_head = [int(x) for x in attend_layers], int(attend_head)
        self.anchor_layers, self.anchor_head = [int(x) for x in anchor_layers], int(anchor_head)
        n_layers, n_heads = self.model.num_layers, self.model.llm.config.num_attention_heads
        if self.weights["attend"]:
            require(bool(self.attend_layers) and all(0 <= x < n_layers for x in self.attend_layers),
                    f"train.attend.layers={self.attend_layers} must list layers in [0, {n_layers - 1}] when loss.attend > 0")
            require(0 <= self.attend_head < n_heads, f"train.attend.head={self.attend_head} is outside [0, {n_heads - 1}]")
        if self.weights["anchor"]:
            require(bool(self.anchor_layers) and all(0 <= x < n_layers for x in self.anchor_layers),
                    f"train.attend.anchor.layers={self.anchor_layers} must list layers in [0, {n_layers - 1}] "
                    "when loss.anchor > 0")
            require(0 <= self.anchor_head < n_heads,
                    f"train.attend.anchor.head={self.anchor_head} is outside [0, {n_heads - 1}]")
        self.val_metric = SegIoU()

    def forward_method(self) -> tuple[PruningMethod, AttentionTap | None]:
        """The method this step's forward pass runs — during the text-only warm-up every image token
        withdrawn before layer 0, else the training schedule — and, when `attend` is on and the image
        tokens are there, the AttentionTap wrapping it (then it is the method too)."""
        if self.global_step < self.text_only_steps:
            return self.text_only, None
        if self.weights["attend"] or self.weights["anchor"]:
            tap = AttentionTap(self.method, self.attend_layers if self.weights["attend"] else [], self.attend_head,
                               self.anchor_layers if self.weights["anchor"] else [], self.anchor_head)
            return tap, tap
        return self.method, None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        w = self.weights
        method, tap = self.forward_method()
        out = segment(self.model, batch, method)
        ce = answer_ce(self.model, out, batch)
        bce, dice = mask_losses(out.logits, batch["gt_masks"])
        loss = w["ce"] * ce + w["bce"] * bce + w["dice"] * dice
        logs = {"train/loss": loss, "train/ce": ce, "train/bce": bce, "train/dice": dice}
        if w["lm"]:
            lm = prompt_lm_ce(self.model, out, batch)
            loss = loss + w["lm"] * lm
            logs.update({"train/loss": loss, "train/lm": lm})
        if w["point"]:
            p_bce, p_dice = point_prompt_losses(self.model, out.image_embeddings, batch)
            loss = loss + w["point"] * (w["bce"] * p_bce + w["dice"] * p_dice)
            logs.update({"train/loss": loss, "train/point_dice": p_dice})
        if w["match"]:
            match = prompt_match_loss(self.model, out.seg_embeds, batch)
            loss = loss + w["match"] * match
            logs.update({"train/loss": loss, "train/match": match})
        if w["describe"]:
            describe, constant = describe_loss(self.describe_head, suffix_states(out.state), batch)
            loss = loss + w["describe"] * describe
            logs.update({"train/loss": loss, "train/describe": describe, "train/describe_const": constant})
        if w["recall"]:
            words = query_words(batch, self.model.image_token_id, self.model.seg_token_id, self.recall_head.out_features)
            recall = recall_loss(self.recall_head, suffix_states(out.state), words)
            loss = loss + w["recall"] * recall
            logs.update({"train/loss": loss, "train/recall": recall})
        if tap is not None and w["attend"]:
            attend, mass = attend_loss(tap.records, target_cells(batch, self.model.grid_size))
            loss = loss + w["attend"] * attend
            logs.update({"train/loss": loss, "train/attend": attend, "train/attend_mass": mass})
        if tap is not None and w["anchor"]:
            require("anchor_masks" in batch, "train.loss.anchor > 0 needs training data whose items carry an "
                    "'anchor_mask' (the shapes dataset); set train.loss.anchor=0 for other data")
            anchor, mass = attend_loss(tap.anchor_records, target_cells(batch, self.model.grid_size, "anchor_masks"))
            loss = loss + w["anchor"] * anchor
            logs.update({"train/loss": loss, "train/anchor": anchor, "train/anchor_mass": mass})
        bs = len(batch["gt_masks"])
        self.log_dict(logs, prog_bar=True, batch_size=bs)
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
        params = [p for p in self.parameters() if p.requires_grad]
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
