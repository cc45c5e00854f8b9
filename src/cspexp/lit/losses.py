"""The training loss as a list of terms, each `weight × term(model, out, batch, ctx)`.

LISA's own loss (``model/LISA.py``) is `LisaLoss`: next-token cross-entropy on the answer, plus
per-mask sigmoid BCE and Dice on the predicted mask logits at the original image size. The other
terms are aids for training a small model from scratch (README, "Training and fine-tuning"); those
of the lookup (`Recall`, `Attend`) live in `cspexp.lit.attend`.

A term is a `LossTerm` configured under `train.terms` in `conf/train.yaml` (`_target_`, its weight,
its own options); `build_terms` builds them in that order and leaves out those weighted 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cspexp.pruning.engine import Observer
from cspexp.utils.errors import require
from cspexp.utils.instantiate import build

IGNORE = 255
ANSWER_TOKENS = 3  # "[SEG]", ".", "</s>"
# The prompt's last words before the answer: "… Please output segmentation mask. ASSISTANT:" (both of
# LISA's templates end so; word-level: 7 tokens, all after the query, the last the query token).
SUFFIX_TOKENS = 7


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
        # numpy's boolean index copies the pixels (dataset images may be shared read-only arrays)
        colour = torch.from_numpy(np.asarray(image)[inside.cpu().numpy()]).double().mean(0) / 127.5 - 1
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


# ------------------------------------------------------------------ terms


@dataclass
class StepContext:
    """What a term may need besides the model, the forward pass's output and the batch."""

    text_only: bool  # the forward pass had no image token (the warm-up of `train.text_only_steps`)
    observers: dict = field(default_factory=dict)  # term → the Observer it asked for (`LossTerm.observer`)


class LossTerm(torch.nn.Module):
    """One term of the training loss; the training step adds `weight × term(model, out, batch, ctx)`.

    `forward(model, out, batch, ctx)` returns (the unweighted loss, a dict of values to log under
    ``train/``). `setup(model)` runs once before training: a term sizes its read-out heads there
    (their parameters train with the model, and are not saved with it) and checks its options
    against the model. A term that needs more of the forward pass than its output returns an
    `Observer` of the decoder loop from `observer(ctx)`; the step runs it and hands it back in
    ``ctx.observers[term]``."""

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    def setup(self, model) -> None:
        pass

    def observer(self, ctx: StepContext) -> Observer | None:
        return None

    def forward(self, model, out, batch, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def weights(self) -> dict[str, float]:
        """Every weight the term applies, by option name (checked by `build_terms`)."""
        return {"weight": self.weight}


class LisaLoss(LossTerm):
    """LISA's loss: `ce` × the answer's next-token CE + `bce` × mask BCE + `dice` × mask Dice."""

    def __init__(self, ce: float = 1.0, bce: float = 2.0, dice: float = 0.5) -> None:
        super().__init__(weight=1.0)  # the three parts carry the weights
        self.ce, self.bce, self.dice = ce, bce, dice

    def weights(self) -> dict[str, float]:
        return {"ce": self.ce, "bce": self.bce, "dice": self.dice}

    def forward(self, model, out, batch, ctx):
        ce = answer_ce(model, out, batch)
        bce, dice = mask_losses(out.logits, batch["gt_masks"])
        return self.ce * ce + self.bce * bce + self.dice * dice, {"ce": ce, "bce": bce, "dice": dice}


class PromptLM(LossTerm):
    """Next-token CE on the user's turn (`prompt_lm_ce`): makes a from-scratch LLM read the query."""

    def forward(self, model, out, batch, ctx):
        lm = prompt_lm_ce(model, out, batch)
        return lm, {"lm": lm}


class PointPrompt(LossTerm):
    """SAM's click task on the same images (`point_prompt_losses`), its masks weighted as LISA's
    (`bce`, `dice`): keeps a from-scratch mask decoder selective."""

    def __init__(self, weight: float = 1.0, bce: float = 2.0, dice: float = 0.5) -> None:
        super().__init__(weight)
        self.bce, self.dice = bce, dice

    def weights(self) -> dict[str, float]:
        return {"weight": self.weight, "bce": self.bce, "dice": self.dice}

    def forward(self, model, out, batch, ctx):
        bce, dice = point_prompt_losses(model, out.image_embeddings, batch)
        return self.bce * bce + self.dice * dice, {"point_dice": dice}


class PromptMatch(LossTerm):
    """[SEG] embedding regressed onto SAM's embedding of a click at the target's centre (`prompt_match_loss`)."""

    def forward(self, model, out, batch, ctx):
        match = prompt_match_loss(model, out.seg_embeds, batch)
        return match, {"match": match}


class Describe(LossTerm):
    """A linear read-out of the target's centroid and colour from the prompt's last words (`describe_loss`)."""

    def setup(self, model) -> None:
        self.head = torch.nn.Linear(model.llm.config.hidden_size, DESCRIPTOR_DIMS)

    def forward(self, model, out, batch, ctx):
        describe, constant = describe_loss(self.head, suffix_states(out.state), batch)
        return describe, {"describe": describe, "describe_const": constant}


def build_terms(cfg) -> dict[str, LossTerm]:
    """The terms of `train.terms` (name → a LossTerm's config), in order, less those weighted 0."""
    terms = {}
    for name, node in cfg.items():
        term = build(node)
        require(isinstance(term, LossTerm),
                f"train.terms.{name} builds {type(term).__name__}, not a cspexp.lit.losses.LossTerm")
        for key, w in term.weights().items():
            # conf/train.yaml sets a term's `weight` from train.loss.<term>, its other weights from train.loss.<key>
            source = f"train.loss.{name if key == 'weight' else key}"
            require(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0,
                    f"train.terms.{name}.{key}={w!r} must be a number >= 0 (in conf/train.yaml: {source})")
        if term.weight:
            terms[name] = term
    return terms
