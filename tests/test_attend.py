"""The lookup aids of cspexp.lit.attend: text-only warm-up, `recall` and `attend` (issue 5)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from cspexp.data.shapes import ShapesDataset, tokenize_query
from cspexp.lit.attend import Attend, AttentionTap, Recall, attend_loss, query_words, recall_loss, target_cells
from cspexp.lit.losses import build_terms
from cspexp.lit.train_module import TrainModule
from cspexp.models.prompt import user_turn
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import segment
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build

from conftest import CONF_DIR


def tiny(seed: int = 0):
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.seed = seed
    return build(cfg, words=ShapesDataset.vocabulary())


def dense(model):
    return NoPruning().bind(model.num_layers, model.n_image_tokens)


def val_batch(loaded, n: int = 3):
    data = ShapesDataset(split="val", n=n)
    return loaded.processor.collate([data[i] for i in range(n)])


def test_target_cells_crop_like_clip_and_pool_by_hand():
    """A 4 × 6 mask: CLIP sees the centred 4 × 4 square (columns 1–4); on a 2 × 2 grid each cell is
    2 × 2 pixels. Target pixels (0,1), (1,2) → cell 0 holds 2/4; (3,4) → cell 3 holds 1/4; (2,0) is
    outside the crop; an ignore pixel (255) is not target."""
    gt = torch.zeros(4, 6, dtype=torch.uint8)
    for y, x in [(0, 1), (1, 2), (3, 4), (2, 0)]:
        gt[y, x] = 1
    gt[0, 2] = 255
    got = target_cells({"gt_masks": [gt]}, (2, 2))
    assert torch.allclose(got, torch.tensor([[0.5, 0.0, 0.0, 0.25]]))


def test_attend_loss_by_hand():
    """Sample 0: attention 0.5 / 0.2 / 0.1 on the image tokens of cells 0, 2, 3 (0.2 went to text);
    the target covers cells 0, 2, 3 with 0.5, 0.25, 0.25 of its present share → CE
    −(0.5 ln 0.5 + 0.25 ln 0.2 + 0.25 ln 0.1), mass 0.8. Sample 1's target lies in a pruned cell
    (1), so it does not count."""
    probs = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.3, 0.3]])
    grid = torch.tensor([[0, 2, 3], [0, 2, 3]])
    cells = torch.tensor([[0.4, 0.0, 0.2, 0.2], [0.0, 0.7, 0.0, 0.0]])
    loss, mass = attend_loss([(probs, grid)], cells)
    expected = -(0.5 * math.log(0.5) + 0.25 * math.log(0.2) + 0.25 * math.log(0.1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert mass.item() == pytest.approx(0.8, rel=1e-6)
    # two layers recorded: their mean; a uniform row over 4 cells scores ln 4 against a one-cell target
    uniform = (torch.full((1, 4), 0.25), torch.arange(4)[None])
    loss2, _ = attend_loss([(probs[:1], grid[:1]), (probs[:1], grid[:1])], cells[:1])
    assert loss2.item() == pytest.approx(expected, rel=1e-6)
    one = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    assert attend_loss([uniform], one)[0].item() == pytest.approx(math.log(4), rel=1e-6)
    assert attend_loss([(probs[1:], grid[1:])], cells[1:])[0].item() == 0.0  # nothing to supervise


def test_tap_leaves_the_pass_unchanged_and_trains_only_up_to_its_layer():
    """The tap records without changing the forward pass (same masks as without it), one row per
    tapped layer over the image tokens present; `attend`'s gradient reaches the tapped layer's
    q/k projections and every layer before it, never a layer after it (nor SAM)."""
    loaded = tiny()
    model = loaded.model
    batch = val_batch(loaded)
    tap = AttentionTap(layers=[1], head=1)
    out = segment(model, batch, dense(model), observers=[tap])
    with torch.no_grad():
        ref = segment(model, batch, dense(model))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out.logits, ref.logits, strict=True))
    (probs, grid), = tap.records
    assert probs.shape == (3, model.n_image_tokens) and torch.equal(grid[0], torch.arange(model.n_image_tokens))
    total = probs.detach().sum(1)
    assert 0 < float(total.min()) and float(total.max()) < 1  # text tokens took the rest
    loss, _ = attend_loss(tap.records, target_cells(batch, model.grid_size))
    loss.backward()
    layers = model.decoder.layers
    grad = lambda mod: sum(float(p.grad.abs().sum()) for p in mod.parameters() if p.grad is not None)
    assert grad(layers[1].self_attn.q_proj) > 0 and grad(layers[1].self_attn.k_proj) > 0 and grad(layers[0]) > 0
    assert grad(layers[1].self_attn.v_proj) == 0  # the attention row does not depend on the values
    assert all(grad(layer) == 0 for layer in layers[2:]) and grad(model.sam) == 0


def test_tap_under_pruning_records_only_the_tokens_left():
    """Watching csp at keep 0.1: at layer 6 only its 26 tokens are left, and the row covers them, by
    their grid cells."""
    loaded = tiny()  # 8 layers: csp's default stages are 0–1 / 2–3 / 4–7
    method = build(OmegaConf.merge(OmegaConf.load(CONF_DIR / "prune" / "csp.yaml"), {"keep": 0.1}))
    method = method.bind(8, loaded.model.n_image_tokens)
    tap = AttentionTap(layers=[3, 6])
    out = segment(loaded.model, val_batch(loaded, 2), method, observers=[tap])
    (p3, g3), (p6, g6) = tap.records
    assert p3.shape[1] == int(out.trace.image_per_layer[0, 3]) == 256
    assert p6.shape[1] == int(out.trace.image_per_layer[0, 6]) == 26
    assert all(len(set(row.tolist())) == 26 for row in g6) and int(g6.max()) < 256


def test_a_few_attend_steps_move_the_attention_onto_the_target():
    """Trained on `attend` alone, the tapped head's attention mass on the target cells grows from
    the initial spread (≈ the target's share of the sequence) several-fold."""
    torch.manual_seed(0)
    loaded = tiny()
    model = loaded.model
    batch = val_batch(loaded, 2)
    cells = target_cells(batch, model.grid_size)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    masses = []
    for _ in range(25):
        tap = AttentionTap(layers=[1])
        segment(model, batch, dense(model), observers=[tap])
        loss, mass = attend_loss(tap.records, cells)
        opt.zero_grad()
        loss.backward()
        opt.step()
        masses.append(mass.item())
    assert masses[-1] > 4 * masses[0] and masses[-1] > 0.3, masses


def test_query_words_are_the_user_turn_before_the_template_suffix():
    """Worked from the text: the words of LISA's user turn ("what is … in this image ?" or the
    sentence) without "please output segmentation mask ." — tokenised independently of the prompt."""
    loaded = tiny()
    batch = val_batch(loaded, 6)
    model, tok = loaded.model, loaded.processor.tokenizer
    vocab = model.llm.config.vocab_size
    got = query_words(batch, model.image_token_id, model.seg_token_id, vocab)
    data = ShapesDataset(split="val", n=6)
    for b in range(6):
        item = data[b]
        words = tokenize_query(user_turn(item["query"], item["is_sentence"]))
        assert words[-5:] == ["please", "output", "segmentation", "mask", "."]
        expected = torch.zeros(vocab)
        expected[tok.convert_tokens_to_ids(words[:-5])] = 1
        assert torch.equal(got[b], expected), (item["query"], words)


def test_recall_loss_by_hand():
    head = torch.nn.Linear(2, 3)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]))
        head.bias.zero_()
    states = torch.tensor([[[2.0, -1.0]]])  # logits (2, −1, 0)
    words = torch.tensor([[1.0, 0.0, 1.0]])
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1)) + math.log(2)) / 3
    assert recall_loss(head, states, words).item() == pytest.approx(expected, rel=1e-6)


def test_warm_up_withdraws_the_image_then_attend_watches_the_schedule():
    """Before `text_only_steps` the step's forward pass has no image token and `attend` asks for no
    tap (it adds 0 and logs nothing); after it, the schedule runs with every image token and the tap
    records the attend layer."""
    loaded = tiny()
    model = loaded.model
    terms = {"recall": Recall(1.0), "attend": Attend(1.0, layers=[1], head=0)}
    module = TrainModule(model, dense(model), terms, text_only_steps=3)
    batch = val_batch(loaded, 2)
    out, ctx = module.forward_pass(batch)  # global step 0 < 3
    assert ctx.text_only and not ctx.observers
    assert int(out.trace.image_per_layer.sum()) == 0
    loss, logs = terms["attend"](model, out, batch, ctx)
    assert loss.item() == 0 and logs == {}
    # recall reads the suffix states whatever the image: its head sizes the vocabulary
    assert terms["recall"].head.out_features == model.llm.config.vocab_size
    assert terms["recall"](model, out, batch, ctx)[0].item() > 0
    module.text_only_steps = 0
    out, ctx = module.forward_pass(batch)
    assert not ctx.text_only and list(ctx.observers) == [terms["attend"]]
    assert int(out.trace.image_per_layer.min()) == model.n_image_tokens and len(ctx.observers[terms["attend"]].records) == 1
    assert set(terms["attend"](model, out, batch, ctx)[1]) == {"attend", "attend_mass"}


@pytest.mark.parametrize(("options", "message"), [
    ({"layers": []}, "train.attend.layers=[] must list layers in [0, 7]"),
    ({"layers": [8]}, "train.attend.layers=[8] must list layers in [0, 7]"),
    ({"layers": [1], "head": 9}, "train.attend.head=9 is outside [0, 3]"),
])
def test_bad_attend_settings_are_one_clear_error(options, message):
    model = tiny().model
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainModule(model, dense(model), {"attend": Attend(1.0, **options)})
    # unused while attend is off: weighted 0, the term is left out before it checks its settings
    node = {"_target_": "cspexp.lit.attend.Attend", "weight": 0.0, **options}
    assert build_terms(OmegaConf.create({"attend": node})) == {}


def test_train_config_defaults_keep_lisa_and_the_recipe_turns_the_aids_on():
    base = OmegaConf.load(CONF_DIR / "train.yaml").train
    assert base.loss.attend == 0 and base.loss.recall == 0 and base.text_only_steps == 0
    recipe = OmegaConf.load(CONF_DIR / "experiment" / "train_tiny_lisa.yaml").train
    assert recipe.loss.attend > 0 and recipe.loss.recall > 0 and recipe.text_only_steps > 0
    assert np.all(np.asarray(recipe.attend.layers) < OmegaConf.load(CONF_DIR / "model" / "tiny_lisa_scratch.yaml").llm.num_hidden_layers)


def test_relational_scenes_name_their_anchor_and_the_others_have_none():
    """A relational scene's anchor is a shape other than the target whose colour or kind ends the
    query ("… left of the red square"); referring and implicit scenes have no anchor."""
    data = ShapesDataset(split="val", n=60)
    seen = {"relational": 0, "other": 0}
    for i in range(len(data)):
        scene = data.scene(i)
        if scene.query_kind != "relational":
            assert scene.anchor is None
            seen["other"] += 1
            continue
        seen["relational"] += 1
        a = scene.shapes[scene.anchor]
        assert scene.anchor != scene.target
        last = tokenize_query(scene.query)[-2:]
        assert a.colour in last or a.kind in last, (scene.query, a)
    assert seen["relational"] >= 10 and seen["other"] >= 10
