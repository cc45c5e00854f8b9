"""Bare lookup: can a from-scratch transformers LLaMA of tiny_lisa's LLM sizes learn to say where the
<colour> blob is, from 256 grid tokens (a colour embedding at unit RMS + the 2-D sine-cosine code of
`model.image_position=sincos`) followed by a colour word and a query token?

    python scripts/probe_lookup.py [--lr 2e-3] [--steps 1500] [--text-only N] [--attend LAYER] [--no-query]

The skill the embedded model's LLM must learn (issue 5), with nothing of cspexp's pipeline around it:
no CLIP, no splice, no pruning engine, no SAM. Prints every 100 steps how often the predicted row of
the blob's centre is within ±1 of the truth (chance ≈ 0.19). Measured on 2 CPU cores (rows within
±1, recent 100 steps):

* plain: 0.26 / 0.36 / 0.37 / 0.36 at steps 200 / 600 / 1 000 / 1 500 (lr 2e-3; lr 5e-4: 0.38 at
  600; `--init-std 0.1`: 0.35 at 600);
* `--no-query` (the colour word is itself the last token: one hop, a bilinear match): 0.60 / 0.96 at
  steps 200 / 300 — the match is easy;
* `--attend 2` or `--attend 1` (head 0's attention of the query token supervised onto the blob):
  0.37 / 0.34 at step 600 / 400, the attention CE stuck at 3.5–3.8 — the query token never gathers
  the colour word (hop 1) while 256 image tokens share its attention;
* `--text-only 200` (200 steps without image tokens, naming the colour: CE 0.015 at step 50) then
  plain: 0.31 at step 600;
* `--text-only 200 --attend 1`: 0.41 / 0.90 at steps 400 / 500 (attention CE 1.8–2.2) — both hops.

Hence cspexp.lit.attend: a text-only warm-up and the `attend` loss.
"""
import argparse
import time

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaModel

from cspexp.models.lisa import grid_sincos


G = 16  # the grid side: 16 × 16 image tokens, as LISA's
N_COLOURS = 6  # colour words 0..5; image-token colour 6 is the background
SYSTEM_IDS = range(7, 12)  # five "system prompt" tokens before the image
QUERY_ID = 12  # the token after the colour word whose final state answers


def make_batch(batch_size: int = 16):
    """Grids with 3–6 square blobs of distinct colours (side 2–4 cells, a cell apart); one blob is the
    target. Returns (grid colours [B, 256], target colour [B], target centre (row, col) [B, 2])."""
    grid = torch.full((batch_size, G, G), N_COLOURS)
    target = torch.zeros(batch_size, dtype=torch.long)
    centre = torch.zeros(batch_size, 2, dtype=torch.long)
    for b in range(batch_size):
        placed = []  # (row, col, side, colour)
        for colour in torch.randperm(N_COLOURS)[: int(torch.randint(3, N_COLOURS + 1, ()))].tolist():
            for _ in range(50):
                side = int(torch.randint(2, 5, ()))
                r0, c0 = int(torch.randint(0, G - side + 1, ())), int(torch.randint(0, G - side + 1, ()))
                apart = all(r0 + side + 1 <= pr or pr + ps + 1 <= r0 or c0 + side + 1 <= pc or pc + ps + 1 <= c0
                            for pr, pc, ps, _ in placed)
                if apart:
                    placed.append((r0, c0, side, colour))
                    grid[b, r0:r0 + side, c0:c0 + side] = colour
                    break
        r0, c0, side, colour = placed[int(torch.randint(len(placed), ()))]
        target[b] = colour
        centre[b] = torch.tensor([r0 + side // 2, c0 + side // 2])
    return grid.flatten(1), target, centre


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--emb-std", type=float, default=1.0, help="std of the word embeddings' init")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--init-std", type=float, default=0.02, help="LlamaConfig.initializer_range (transformers: 0.02)")
    parser.add_argument("--attend", type=int, default=-1,
                        help="supervise head 0's attention of this layer (last token → the blob's cells)")
    parser.add_argument("--attend-weight", type=float, default=1.0)
    parser.add_argument("--no-query", action="store_true", help="no query token: the colour word is the last token")
    parser.add_argument("--text-only", type=int, default=0,
                        help="the first N steps without image tokens, naming the colour from the last token")
    args = parser.parse_args()
    torch.manual_seed(0)
    d = 96
    cfg = LlamaConfig(vocab_size=32, hidden_size=d, intermediate_size=256, num_hidden_layers=8, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512,
                      initializer_range=args.init_std)
    cfg._attn_implementation = "eager" if args.attend >= 0 else "sdpa"
    llm = LlamaModel(cfg)
    words = torch.nn.Embedding(32, d)
    torch.nn.init.normal_(words.weight, 0, args.emb_std)
    pixels = torch.nn.Embedding(N_COLOURS + 1, d)  # image-token content by colour
    head = torch.nn.Linear(d, 2 * G)  # row and column logits
    colour_head = torch.nn.Linear(d, N_COLOURS)
    code = grid_sincos(G, G, d)
    params = [*llm.parameters(), *words.parameters(), *pixels.parameters(), *head.parameters(), *colour_head.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / 100))  # warm-up as the recipe
    t0, hits = time.time(), []
    for step in range(1, args.steps + 1):
        grid, target, centre = make_batch()
        image = F.rms_norm(pixels(grid), (d,)) + code
        system = words(torch.tensor(list(SYSTEM_IDS)).expand(len(grid), -1))
        text = [words(target)[:, None]] + ([] if args.no_query else [words(torch.full((len(grid), 1), QUERY_ID))])
        if step <= args.text_only:  # no image tokens: learn to read the colour word (hop 1)
            o = llm(inputs_embeds=torch.cat([system, *text], 1))
            loss = F.cross_entropy(colour_head(o.last_hidden_state[:, -1]), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                print(f"text-only step {step} colour CE {loss.item():.3f}", flush=True)
            continue
        x = torch.cat([system, image, *text], 1)
        o = llm(inputs_embeds=x, output_attentions=args.attend >= 0)
        logits = head(o.last_hidden_state[:, -1])
        loss = F.cross_entropy(logits[:, :G], centre[:, 0]) + F.cross_entropy(logits[:, G:], centre[:, 1])
        if args.attend >= 0:
            att = o.attentions[args.attend][:, 0, -1, 5:5 + G * G]  # head 0, query token → image tokens
            blob = (grid == target[:, None]).float()
            blob = blob / blob.sum(1, keepdim=True)
            att_loss = -(blob * att.clamp_min(1e-9).log()).sum(1).mean()
            loss = loss + args.attend_weight * att_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hits.append(((logits[:, :G].argmax(1) - centre[:, 0]).abs() <= 1).float().mean().item())
        if step % 100 == 0 or step == args.steps:
            recent = hits[-100:]
            print(f"step {step} loss {loss.item():.3f} row within ±1: {sum(recent) / len(recent):.2f} "
                  f"(chance ≈ 0.19) {time.time() - t0:.0f}s" + (f" attention CE {att_loss.item():.2f}" if args.attend >= 0 else ""),
                  flush=True)


if __name__ == "__main__":
    main()
