"""Training: the loss goes down, the loss is the configured terms' weighted sum, LoRA touches only
the named modules, a fine-tune under a csp schedule saves a model that evaluation loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset
from cspexp.lit.attend import AttentionTap, attend_loss, query_words, recall_loss, target_cells
from cspexp.lit.losses import (
    LisaLoss,
    answer_ce,
    build_terms,
    describe_loss,
    dice_loss,
    mask_losses,
    point_prompt_losses,
    prompt_lm_ce,
    prompt_match_loss,
    suffix_states,
)
from cspexp.lit.train_module import TrainModule
from cspexp.models.lora import apply_lora, merge_lora
from cspexp.models.saved import save_model
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR


def tiny(seed: int = 0):
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.seed = seed
    return build(cfg, words=ShapesDataset.vocabulary())


def dense(model):
    return NoPruning().bind(model.num_layers, model.n_image_tokens)


def test_dice_and_bce_on_hand_worked_masks():
    logits = torch.tensor([[10.0, -10.0], [10.0, -10.0]])  # predicts the left column
    target = torch.tensor([[1, 0], [1, 255]], dtype=torch.uint8)
    bce, dice = mask_losses([logits], [target])
    assert bce.item() == pytest.approx(float(torch.nn.functional.softplus(torch.tensor(-10.0))), rel=1e-2)
    # p ≈ (1, 0, 1, ·), t = (1, 0, 1, ·) with the ignored pixel out: dice ≈ 1 − 4/4
    assert dice.item() == pytest.approx(0.0, abs=1e-3)
    ones = torch.ones(4)
    assert dice_loss(torch.full((4,), -20.0), ones, ones).item() == pytest.approx(1.0, abs=1e-3)


def test_a_few_steps_lower_the_loss():
    """LISA's loss alone (CE + 2 BCE + 0.5 Dice), as the training step computes it, halves on a
    batch of four within 15 steps."""
    torch.manual_seed(0)
    loaded = tiny()
    module = TrainModule(loaded.model, dense(loaded.model), {"lisa": LisaLoss(ce=1.0, bce=2.0, dice=0.5)})
    module.log_dict = lambda *args, **kwargs: None  # no Trainer to log to
    batch = loaded.processor.collate([ShapesDataset(split="train", n=4)[i] for i in range(4)])
    opt = torch.optim.AdamW(loaded.model.parameters(), lr=2e-3)
    loaded.model.train()
    losses = []
    for _ in range(15):
        loss = module.training_step(batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


def test_the_step_loss_is_each_term_times_its_weight(compose_cfg):
    """Every term on, each with its own weight (set through the `train.loss.*` and `train.attend.*`
    keys): the training step's loss and logs are the sum worked out here from the loss functions,
    with the attention rows taken by a tap of our own."""
    loaded = tiny()
    model = loaded.model
    w = {"ce": 1.1, "bce": 0.9, "dice": 0.3, "lm": 0.5, "point": 0.25, "match": 2.0, "describe": 3.0, "recall": 0.7,
         "attend": 1.5}
    cfg = compose_cfg(*[f"train.loss.{k}={v}" for k, v in w.items()], "train.attend.layers=[1,3]", "train.attend.head=2",
                      config_name="train")
    module = TrainModule.from_config(model, dense(model), cfg.train)
    logged = {}
    module.log_dict = lambda logs, **kwargs: logged.update(logs)
    batch = loaded.processor.collate([ShapesDataset(split="train", n=3)[i] for i in range(3)])
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)

    torch.manual_seed(0)  # the same random clicks for the point task
    tap = AttentionTap([1, 3], head=2)
    out = segment(model, batch, dense(model), observers=[tap])
    ce = answer_ce(model, out, batch)
    bce, dice = mask_losses(out.logits, batch["gt_masks"])
    lm = prompt_lm_ce(model, out, batch)
    p_bce, p_dice = point_prompt_losses(model, out.image_embeddings, batch)
    match = prompt_match_loss(model, out.seg_embeds, batch)
    describe, _ = describe_loss(module.terms["describe"].head, suffix_states(out.state), batch)
    words = query_words(batch, model.image_token_id, model.seg_token_id, model.llm.config.vocab_size)
    recall = recall_loss(module.terms["recall"].head, suffix_states(out.state), words)
    assert len(tap.records) == 2
    attend, _ = attend_loss(tap.records, target_cells(batch, model.grid_size))
    expected = (1.1 * ce + 0.9 * bce + 0.3 * dice + 0.5 * lm + 0.25 * (0.9 * p_bce + 0.3 * p_dice) + 2.0 * match
                + 3.0 * describe + 0.7 * recall + 1.5 * attend)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    names = ["loss", "ce", "bce", "dice", "lm", "point_dice", "match", "describe", "describe_const", "recall", "attend",
             "attend_mass"]
    assert set(logged) == {f"train/{name}" for name in names}
    for name, value in [("loss", expected), ("ce", ce), ("dice", dice), ("point_dice", p_dice), ("recall", recall),
                        ("attend", attend)]:
        assert logged[f"train/{name}"].item() == pytest.approx(value.item(), rel=1e-6), name


def test_terms_follow_the_config_and_its_overrides(compose_cfg):
    """`conf/train.yaml` alone is LISA's loss; the recipe turns every aid on, in the config's order;
    the `train.loss.*` / `train.attend.*` overrides reach the terms (bce and dice also the point task's)."""
    lisa = build_terms(compose_cfg(config_name="train").train.terms)
    assert list(lisa) == ["lisa"] and (lisa["lisa"].ce, lisa["lisa"].bce, lisa["lisa"].dice) == (1.0, 2.0, 0.5)
    recipe = build_terms(compose_cfg("experiment=train_tiny_lisa", config_name="train").train.terms)
    assert list(recipe) == ["lisa", "lm", "point", "match", "describe", "recall", "attend"]
    assert recipe["attend"].layers == [3, 6] and recipe["attend"].head == 0
    some = build_terms(compose_cfg("train.loss.point=1", "train.loss.bce=0.7", "train.loss.attend=0.5",
                                   "train.attend.layers=[1,2]", "train.attend.head=3", config_name="train").train.terms)
    assert list(some) == ["lisa", "point", "attend"]
    assert (some["point"].weight, some["point"].bce, some["point"].dice, some["lisa"].bce) == (1, 0.7, 0.5, 0.7)
    assert (some["attend"].weight, some["attend"].layers, some["attend"].head) == (0.5, [1, 2], 3)


@pytest.mark.parametrize(("terms", "message"), [
    ({"point": {"_target_": "cspexp.lit.losses.PointPrompt", "weight": -1}},
     "train.terms.point.weight=-1 must be a number >= 0 (in conf/train.yaml: train.loss.point)"),
    ({"lm": {"_target_": "cspexp.lit.losses.PromptLM", "weight": "high"}},
     "train.terms.lm.weight='high' must be a number >= 0 (in conf/train.yaml: train.loss.lm)"),
    ({"lisa": {"_target_": "cspexp.lit.losses.LisaLoss", "dice": float("nan")}},
     "train.terms.lisa.dice=nan must be a number >= 0 (in conf/train.yaml: train.loss.dice)"),
    ({"point": {"_target_": "cspexp.lit.losses.PointPrompt", "weight": 1, "bce": True}},
     "train.terms.point.bce=True must be a number >= 0 (in conf/train.yaml: train.loss.bce)"),
    ({"mine": {"_target_": "torch.nn.Identity"}}, "train.terms.mine builds Identity, not a cspexp.lit.losses.LossTerm"),
])
def test_bad_terms_are_one_clear_error(terms, message):
    with pytest.raises(ConfigError) as err:
        build_terms(OmegaConf.create(terms))
    assert str(err.value) == message


def test_a_loss_without_terms_is_one_clear_error():
    model = tiny().model
    lm_off = build_terms(OmegaConf.create({"lm": {"_target_": "cspexp.lit.losses.PromptLM", "weight": 0}}))
    with pytest.raises(ConfigError, match="^train.terms: no term is configured with a weight > 0; the loss needs one$"):
        TrainModule(model, dense(model), lm_off)


def test_answer_ce_predicts_the_answer_tokens():
    """The CE targets are [SEG], '.', '</s>' — checked against the tokenizer, not the code's indices."""
    loaded = tiny()
    batch = loaded.processor.collate([ShapesDataset(split="train", n=2)[i] for i in range(2)])
    with torch.no_grad():
        out = segment(loaded.model, batch, NoPruning().bind(loaded.model.num_layers, loaded.model.n_image_tokens))
        ce = answer_ce(loaded.model, out, batch)
        # independent: full logits from transformers' own forward on the spliced sequence
        image_tokens, _ = loaded.model.encode_image(batch["clip_pixels"])
        prompt = loaded.model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        logits = loaded.model.llm(inputs_embeds=prompt.embeds, attention_mask=(prompt.kind != 3).long()).logits
    tok = loaded.processor.tokenizer
    answer = tok.convert_tokens_to_ids(["[SEG]", ".", "</s>"])
    total, n = 0.0, 0
    for b in range(2):
        seg = int(prompt.seg_pos[b])
        for k, token in enumerate(answer):
            total += torch.nn.functional.cross_entropy(logits[b, seg - 1 + k][None], torch.tensor([token])).item()
            n += 1
    assert ce.item() == pytest.approx(total / n, rel=1e-4)


def test_prompt_lm_ce_is_next_token_ce_over_the_user_turn():
    """Independent: transformers' own forward on the spliced sequence, targets read from the text by hand
    (every token after <im_end> up to "ASSISTANT:" included; a padded batch of two)."""
    loaded = tiny()
    items = [ShapesDataset(split="train", n=4)[i] for i in (0, 3)]
    batch = loaded.processor.collate(items)
    assert batch["attention_mask"].sum(1).unique().numel() == 2  # rows of different lengths: padding
    with torch.no_grad():
        dense = NoPruning().bind(loaded.model.num_layers, loaded.model.n_image_tokens)
        lm = prompt_lm_ce(loaded.model, segment(loaded.model, batch, dense), batch)
        image_tokens, _ = loaded.model.encode_image(batch["clip_pixels"])
        prompt = loaded.model.splice(batch["input_ids"], batch["attention_mask"], image_tokens)
        logits = loaded.model.llm(inputs_embeds=prompt.embeds, attention_mask=(prompt.kind != 3).long()).logits
    tok = loaded.processor.tokenizer
    n_image = loaded.model.n_image_tokens
    losses = []
    for b in range(2):
        words = tok.convert_ids_to_tokens(batch["input_ids"][b].tolist())
        first, last = words.index("<im_end>") + 1, words.index("[SEG]") - 1  # user turn .. "ASSISTANT:"
        assert "please" in [w.lower() for w in words[first:last + 1]]
        for t in range(first, last + 1):
            row = logits[b, t - 1 + n_image - 1]  # the token before t, in the spliced sequence
            losses.append(torch.nn.functional.cross_entropy(row[None], batch["input_ids"][b, t][None]))
    assert lm.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-4)


def _one_image_batch(loaded, pixels: list[tuple[int, int]], h: int = 40, w: int = 60):
    item = dict(ShapesDataset(split="train", n=1)[0])
    item["image"] = item["image"][:h, :w].copy()
    mask = torch.zeros((h, w), dtype=torch.uint8).numpy()
    for y, x in pixels:
        mask[y, x] = 1
    item["mask"] = mask
    return loaded.processor.collate([item])


@pytest.mark.parametrize("where, pixels, centre", [
    ("random", [(10, 20)], (10.5, 20.5)),  # one pixel: the click is its centre
    ("centre", [(10, 20), (10, 22), (12, 21)], (32 / 3 + 0.5, 21.5)),  # the centroid, hand-worked
])
def test_clicks_are_sams_point_embedding_at_the_target_in_its_frame(where, pixels, centre):
    """The click token equals the first token of SAM's public prompt-encoder forward at the hand-mapped
    coordinates (original image → SAM's resized frame, SAM's own +0.5 undone)."""
    from cspexp.lit.losses import click_embeddings

    loaded = tiny()
    batch = _one_image_batch(loaded, pixels)
    h, w = 40, 60
    size = loaded.model.sam.config.vision_config.image_size
    rh, rw = int(h * size / w + 0.5), size  # ResizeLongestSide
    assert batch["resized_hw"][0].tolist() == [rh, rw]
    y, x = centre
    expected_xy = torch.tensor([[[[x * rw / w - 0.5, y * rh / h - 0.5]]]])
    with torch.no_grad():
        ours = click_embeddings(loaded.model, batch, where)
        sparse, _ = loaded.model.sam.prompt_encoder(input_points=expected_xy, input_labels=torch.ones(1, 1, 1, dtype=torch.long),
                                                    input_boxes=None, input_masks=None)
    assert ours.shape == (1, sparse.shape[-1])
    assert torch.allclose(ours[0], sparse[0, 0, 0], atol=1e-5)


def test_click_and_match_losses_train_what_they_should():
    """The click task trains SAM (decoder, image encoder) and not the LLM; the match term trains the
    LLM side ([SEG] embedding) and not SAM, and is zero when [SEG] equals the centre click."""
    from cspexp.lit.losses import click_embeddings

    loaded = tiny()
    model = loaded.model
    batch = _one_image_batch(loaded, [(10, 20), (11, 20)])
    out = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
    bce, dice = point_prompt_losses(model, out.image_embeddings, batch)
    model.zero_grad()
    (bce + dice).backward()
    grad = lambda prefix: sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                              if n.startswith(prefix) and p.grad is not None)
    assert grad("sam.mask_decoder") > 0 and grad("sam.vision_encoder") > 0
    assert grad("llm.") == 0 and grad("text_hidden_fcs.") == 0
    model.zero_grad()
    out = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
    prompt_match_loss(model, out.seg_embeds, batch).backward()
    assert grad("text_hidden_fcs.") > 0 and grad("llm.") > 0 and grad("sam.") == 0
    with torch.no_grad():
        target = click_embeddings(model, batch, "centre")
        assert prompt_match_loss(model, target.clone(), batch).item() == pytest.approx(0.0, abs=1e-12)
        assert prompt_match_loss(model, target + 1.0, batch).item() == pytest.approx(1.0, rel=1e-5)


def test_from_scratch_sam_follows_its_prompt():
    """transformers' N(0, 0.02) init left the from-scratch mask decoder deaf to its prompt; with
    PyTorch's default init (Meta's SAM code) two clicks far apart give different masks at once."""
    model = tiny().model
    decoder = model.sam.mask_decoder
    w = decoder.output_hypernetworks_mlps[0].proj_in.weight
    fan_in = w.shape[1]
    assert w.std().item() == pytest.approx((1 / (3 * fan_in)) ** 0.5, rel=0.25)  # kaiming-uniform(a=√5)
    assert decoder.mask_tokens.weight.std().item() == pytest.approx(1.0, rel=0.3)  # nn.Embedding: N(0, 1)
    # words arrive at the scale of the image tokens (with transformers' 0.02 they were 15–40× smaller)
    words = model.llm.get_input_embeddings().weight
    assert words.std().item() == pytest.approx(1.0, rel=0.1)
    batch = tiny().processor.collate([ShapesDataset(split="val", n=2)[i] for i in range(2)])
    with torch.no_grad():
        emb = model.image_embeddings(batch["sam_pixels"])
        masks = []
        for xy in ([10.0, 10.0], [100.0, 100.0]):
            pts = torch.tensor(xy).expand(2, 2)[:, None, None, :]
            sparse, _ = model.sam.prompt_encoder(input_points=pts, input_labels=torch.ones(2, 1, 1, dtype=torch.long),
                                                 input_boxes=None, input_masks=None)
            masks.append(model.decode_masks(emb, sparse[:, 0]))
    assert ((masks[0] > 0) != (masks[1] > 0)).float().mean() > 0.01


def test_lora_adapts_only_the_named_modules():
    loaded = tiny()
    model = loaded.model
    batch = loaded.processor.collate([ShapesDataset(split="val", n=1)[0]])
    adapted = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"],
                         train_also=["text_hidden_fcs"])
    assert len(adapted) == 2 * model.num_layers
    assert all(name.endswith(("self_attn.q_proj", "self_attn.v_proj")) for name in adapted)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("text_hidden_fcs.") for n in trainable)
    assert not any("k_proj.lora" in n or "o_proj.lora" in n or "vision_tower" in n for n in trainable)
    # make the adapters non-trivial, then merging must keep the function and restore the plain layout
    for n, p in model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.05)
    with torch.no_grad():
        before = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens)).seg_embeds
        merge_lora(model)
        after = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens)).seg_embeds
    assert torch.allclose(before, after, atol=1e-5)
    assert set(model.state_dict()) == set(tiny().model.state_dict())
    with pytest.raises(Exception, match="not modules of the LLM"):
        apply_lora(tiny().model, r=4, alpha=8, dropout=0.0, target_modules=["qkv"], train_also=[])


def test_finetune_under_csp_saves_a_model_that_evaluation_loads(tmp_path):
    start = save_model(tiny(), tmp_path / "start")
    env = {**os.environ, "WANDB_MODE": "disabled"}
    run = tmp_path / "ft"
    proc = subprocess.run(
        [sys.executable, "-m", "cspexp.train", "model=converted", f"model.path={start}", "prune=csp", "prune.keep=0.1",
         f"train.init_from={start}", "train.data.n=8", "train.batch_size=4", "dataset.n=4", "trainer.max_epochs=1",
         "logger=none", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run / "train_results.json").read_text())
    assert results["steps"] == 2 and results["method"]["name"] == "csp"
    assert list((run / "checkpoints").glob("*.ckpt"))
    # the fine-tuned weights differ from the start, and evaluation loads them
    from safetensors.torch import load_file

    a, b = load_file(str(start / "model.safetensors")), load_file(str(run / "model" / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)
    ev = subprocess.run([sys.executable, "-m", "cspexp", "model=converted", f"model.path={run / 'model'}", "prune=csp",
                         "prune.keep=0.1", "dataset.n=4", "logger=none", f"hydra.run.dir={tmp_path / 'ev'}"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["n_samples"] == 4


def test_target_descriptors_and_describe_loss_by_hand():
    """Centroid and mean colour of a three-pixel target worked by hand; the loss is 0 for a read-out
    that outputs the targets and the constant reference is their variance about the batch mean."""
    from cspexp.lit.losses import target_descriptors

    loaded = tiny()
    pixels = [(10, 20), (10, 22), (12, 21)]
    batch = _one_image_batch(loaded, pixels)  # 40 × 60 image
    image = batch["images"][0].astype(float)
    colour = sum(image[y, x] for y, x in pixels) / 3 / 127.5 - 1
    centre_x, centre_y = (21 + 0.5) / 60 * 2 - 1, (32 / 3 + 0.5) / 40 * 2 - 1
    got = target_descriptors(batch)[0]
    assert torch.allclose(got, torch.tensor([centre_x, centre_y, *colour], dtype=torch.float32), atol=1e-6)

    two = {**batch, "gt_masks": [batch["gt_masks"][0], torch.zeros_like(batch["gt_masks"][0])],
           "images": batch["images"] * 2}
    targets = torch.stack([got, torch.zeros(5)])  # an empty mask: image centre, grey
    head = torch.nn.Linear(3, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(got)
    hidden = torch.zeros(2, 1, 3)
    loss, constant = describe_loss(head, hidden, two)
    assert loss.item() == pytest.approx(float((targets[1] - got).pow(2).sum() / 10), rel=1e-5)  # row 0 exact
    assert constant.item() == pytest.approx(float(((targets - targets.mean(0)) ** 2).mean()), rel=1e-5)
    with torch.no_grad():
        head.weight.copy_(torch.cat([torch.eye(3), torch.zeros(2, 3)]))
        head.bias.zero_()
    hidden = targets[:, None, :3]
    loss, _ = describe_loss(head, hidden, two)
    assert loss.item() == pytest.approx(float(((targets[:, 3:]) ** 2).mean() * 2 / 5), rel=1e-5)


def test_suffix_states_are_the_template_words_after_the_query():
    """The states `describe` reads are those of "please output segmentation mask . assistant :" (found
    through the prompt ids, by hand), the last being the query token's, in both templates."""
    loaded = tiny()
    data = ShapesDataset(split="val", n=6)
    batch = loaded.processor.collate([data[i] for i in range(6)])
    assert len(set(batch["query_kinds"])) > 1  # phrase and sentence templates both present
    dense = NoPruning().bind(loaded.model.num_layers, loaded.model.n_image_tokens)
    state, query_hidden = run_llm(loaded.model, batch, dense)
    got = suffix_states(state)
    assert torch.equal(got[:, -1], query_hidden)
    words = "please output segmentation mask . assistant :".split()
    n_image = loaded.model.n_image_tokens
    for b in range(6):
        ids = batch["input_ids"][b].tolist()
        seg = ids.index(loaded.model.seg_token_id)
        assert loaded.processor.tokenizer.convert_ids_to_tokens(ids[seg - 7: seg]) == words
        for k in range(7):  # text index t sits at spliced position t + n_image − 1
            col = int((state.pos[b] == seg - 7 + k + n_image - 1).nonzero())
            assert torch.equal(got[b, k], state.hidden[b, col])


def test_describe_trains_the_llm_side_only():
    """`describe` reads the LLM's final states: its gradient reaches the LLM, the projector and CLIP,
    never SAM or text_hidden_fcs (it says nothing about masks)."""
    loaded = tiny()
    model = loaded.model
    batch = loaded.processor.collate([ShapesDataset(split="val", n=2)[i] for i in range(2)])
    out = segment(model, batch, NoPruning().bind(model.num_layers, model.n_image_tokens))
    head = torch.nn.Linear(model.llm.config.hidden_size, 5)
    loss, _ = describe_loss(head, suffix_states(out.state), batch)
    loss.backward()
    grad = lambda prefix: sum(float(p.grad.abs().sum()) for n, p in model.named_parameters()
                              if n.startswith(prefix) and p.grad is not None)
    assert grad("llm.model.layers") > 0 and grad("mm_projector.") > 0 and grad("vision_tower.") > 0
    assert grad("sam.") == 0 and grad("text_hidden_fcs.") == 0


@pytest.mark.parametrize(("override", "message"), [
    # Evaluation caps dataset.n at the split's size; training must not silently train on less.
    ("train.data.n=20001", "train.data.n=20001 is more than the train split holds (20000 items); lower it, "
                           "or enlarge the split (shapes: train.data.split_sizes)"),
    # Lightning would train, save the model, then fail on an empty validation result (IndexError).
    ("+trainer.limit_val_batches=0", "trainer.limit_val_batches=0 turns validation off, but training reports "
                                     "val gIoU/cIoU and keeps the best checkpoint by it; validate on fewer samples "
                                     "with dataset.n=N instead"),
])
def test_bad_training_settings_are_one_clear_error(tmp_path, override, message):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cspexp.train", override, "logger=none",
                           f"hydra.run.dir={run}"], cwd=tmp_path, env={**os.environ, "WANDB_MODE": "disabled"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert lines[-1].endswith(message), proc.stderr
    assert not (run / "train_results.json").exists() and not (run / "model").exists()
