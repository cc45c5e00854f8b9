"""Is the LLM telling the mask decoder anything? A few-second probe of a training checkpoint.

    python scripts/probe_seg_query.py <run>/checkpoints/last.ckpt [--kinds referring] [--n 64] [overrides...]

Prints, for `n` val samples of `shapes`:
- per LLM layer, the residual stream of the query token (the one whose final state becomes the [SEG]
  embedding): mean norm, mean distance to the batch mean ("spread") and the largest mean |dimension|
  (a massive activation shows up there). A state that no longer depends on the input has spread ≈ 0;
- the [SEG] embedding's spread, and its mean squared distance to SAM's embedding of a click at the
  target's centre next to the level of a constant predictor (what `train.loss.match` can reach
  without locating anything);
- R² of a linear probe from the query token's final state to the target's centroid and mean colour
  (what `train.loss.describe` asks for);
- how many of text_hidden_fcs' ReLU units are active for every / no sample;
- what the image tokens carry: R² of a linear probe (least squares on two thirds of the images,
  scored on the rest) from the projected CLIP tokens to each patch's mean colour and to its row and
  column — the LLM can only locate what the tokens' content says (RoPE acts on attention scores).

Overrides are Hydra overrides of `conf/train.yaml` (default: `experiment=train_tiny_lisa`), so the
architecture matches the checkpoint's. Used to diagnose the embedded model's training (issue 5).
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from cspexp.cli import CONF_DIR
from cspexp.data import vocabulary
from cspexp.data.shapes import ShapesDataset
from cspexp.lit.losses import SUFFIX_TOKENS, click_embeddings, target_descriptors
from cspexp.pruning.methods.base import NoPruning
from cspexp.pruning.pipeline import run_llm
from cspexp.train import load_initial_weights
from cspexp.utils.instantiate import build


def spread(x: torch.Tensor) -> float:
    return float((x - x.mean(0)).norm(dim=-1).mean())


def linear_probe_r2(features: torch.Tensor, targets: torch.Tensor) -> list[float]:
    """R² per target column of a least-squares fit on the first 2/3 of the images, scored on the rest.
    features [B, N, d], targets [B, N, k]."""
    x = torch.cat([features, torch.ones(*features.shape[:-1], 1)], -1).double()
    y = targets.double()
    n_fit = max(1, 2 * x.shape[0] // 3)
    fit = torch.linalg.lstsq(x[:n_fit].flatten(0, 1), y[:n_fit].flatten(0, 1), driver="gelsd").solution
    pred, held = x[n_fit:].flatten(0, 1) @ fit, y[n_fit:].flatten(0, 1)
    return (1 - ((pred - held) ** 2).sum(0) / ((held - held.mean(0)) ** 2).sum(0)).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a Lightning .ckpt of cspexp.train or a cspexp model directory")
    parser.add_argument("--n", type=int, default=64, help="val samples")
    parser.add_argument("--kinds", nargs="+", default=list(ShapesDataset.QUERY_KINDS), choices=ShapesDataset.QUERY_KINDS)
    parser.add_argument("overrides", nargs="*", default=["experiment=train_tiny_lisa"])
    # intermixed: overrides after the options, as the usage line shows (parse_args stops at the first option)
    args = parser.parse_intermixed_args()

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=args.overrides)
    loaded = build(cfg.model, words=vocabulary(ShapesDataset("train", n=1)))
    load_initial_weights(loaded.model, args.checkpoint)
    model = loaded.model.eval()
    data = ShapesDataset("val", n=args.n, kinds=args.kinds)
    batch = loaded.processor.collate([data[i] for i in range(len(data))])
    with torch.no_grad():
        image_tokens, _ = model.encode_image(batch["clip_pixels"])
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        out = model.llm.model(inputs_embeds=prompt.embeds, attention_mask=(prompt.kind != 3).long(), output_hidden_states=True)
        rows = torch.arange(len(data))
        print("layer  norm    spread  max|dim|   (query token's residual; the last row is after the final norm)")
        for layer, hidden in enumerate(out.hidden_states):
            q = hidden[rows, prompt.query_pos]
            print(f"{layer:5d}  {q.norm(dim=-1).mean():6.2f}  {spread(q):6.3f}  {q.abs().mean(0).max():7.2f}")
        print(f"image tokens: norm {image_tokens.norm(dim=-1).mean():.2f}, text embeddings: norm "
              f"{prompt.embeds[prompt.kind == 2].norm(dim=-1).mean():.2f}")
        _, query_hidden = run_llm(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
        seg = model.seg_embedding(query_hidden)
        target = click_embeddings(model, batch, "centre")
        print(f"[SEG] embedding: norm {seg.norm(dim=-1).mean():.3f}, spread {spread(seg):.2e}")
        print(f"match MSE {((seg - target) ** 2).mean():.4f} (a constant predictor: {((target - target.mean(0)) ** 2).mean():.4f})")
        state, _ = run_llm(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
        descriptors = target_descriptors(batch)[:, None]
        # the query's last token: before "in this image ?" (phrases) or right before the template (sentences)
        seg_at = (batch["input_ids"] == model.seg_token_id).float().argmax(1)
        last_word = seg_at - SUFFIX_TOKENS - 1 - torch.tensor([0 if k == "implicit" else 4 for k in batch["query_kinds"]])
        word_hidden = state.hidden[torch.arange(len(data)), state.columns_of(last_word + model.n_image_tokens - 1)]
        for name, states in (("query token", query_hidden), ("last query word", word_hidden)):
            r2 = linear_probe_r2(states[:, None], descriptors)
            print(f"{name}: linear-probe R² of the target's centroid (x, y) and colour (r, g, b): "
                  + " ".join(f"{v:.2f}" for v in r2))
        pre = model.text_hidden_fcs[0][0](query_hidden) > 0
        print(f"text_hidden_fcs ReLU units: {int(pre.all(0).sum())} active for every sample, "
              f"{int((~pre).all(0).sum())} for none, of {pre.shape[1]}")
        rows, cols = model.grid_size
        patch = model.vision_tower.config.patch_size
        colour = torch.nn.functional.avg_pool2d(batch["clip_pixels"], patch).flatten(2).transpose(1, 2)
        grid = torch.arange(rows * cols)
        where = torch.stack([grid // cols, grid % cols], -1).float().expand(len(data), -1, -1)
        r2_colour, r2_where = linear_probe_r2(image_tokens, colour), linear_probe_r2(image_tokens, where)
        print("image tokens, linear-probe R²: colour (r, g, b) " + " ".join(f"{v:.2f}" for v in r2_colour)
              + " | row, column " + " ".join(f"{v:.2f}" for v in r2_where))


if __name__ == "__main__":
    main()
