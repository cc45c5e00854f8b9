"""Generation with a pruned KV cache (`cspexp.pruning.generate`, ``evaluate.mode=generate``).

Oracles: transformers' own ``LlamaForCausalLM.generate`` (greedy, the same input embeddings) for the
dense model; a recomputation without cache — prompt + generated ids through the pruned decoder loop —
for the pruned cache; LISA's own [SEG] rule written out over the full sequence
(``output_ids[:, 1:] == seg_token_idx`` with the image's columns in front, model/LISA.py L367-375 of
github.com/dvlab-research/LISA) for the [SEG] states; hand-worked ids for the offset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from omegaconf import OmegaConf
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from transformers import DynamicCache

from cspexp.data.shapes import ShapesDataset
from cspexp.evaluate import max_new_tokens as configured_max_new_tokens
from cspexp.flops.analytic import LlmDims, decode_flops, decode_macs
from cspexp.models.loaders import build_model
from cspexp.outputs.files import read_jsonl
from cspexp.pruning.engine import DecoderLoop, TokenState
from cspexp.pruning.generate import CacheLayout, KVDecoder, generate, kv_bytes_per_token, seg_positions
from cspexp.pruning.methods import ClusterScatterPrune, FastV, NoPruning, PruningContext, PyramidDrop
from cspexp.pruning.pipeline import run_llm, segment
from cspexp.utils.errors import ConfigError
from cspexp.utils.instantiate import build
from helpers import tiny_random_and_items
from test_cli import cspexp

METHODS = {
    "fastv": FastV(keep=0.3),
    "pdrop": PyramidDrop(keep=0.5),
    "pdrop_renumber": PyramidDrop(keep=0.5, positions="renumber"),
    "csp": ClusterScatterPrune(keep=0.2),
}


@pytest.fixture(scope="module")
def tiny():
    loaded, items = tiny_random_and_items(3)
    loaded.model.eval()
    return loaded, items


def bound(spec, model):
    return spec.bind(model.num_layers, model.n_image_tokens)


def vision(model, batch):
    with torch.no_grad():
        return model.encode_image(batch["clip_pixels"])[0]


# --------------------------------------------------------------------------- the [SEG] offset
def test_seg_positions_follow_lisas_offset_by_hand():
    SEG = 7
    ids = torch.tensor([-1, 5, SEG, 9, SEG, 2])  # the last prompt token, then "a [SEG] b [SEG] </s>"
    # before (LISA): the token before each [SEG] — positions 1 ("a") and 3 ("b")
    assert seg_positions(ids, SEG).tolist() == [1, 3]
    assert seg_positions(ids, SEG, "at").tolist() == [2, 4]
    assert seg_positions(torch.tensor([-1, SEG]), SEG).tolist() == [0]  # [SEG] first: the prompt's last token
    assert seg_positions(torch.tensor([-1, 5, 2]), SEG).tolist() == []
    with pytest.raises(ConfigError):
        seg_positions(ids, SEG, "after")


# --------------------------------------------------------------------------- dense = transformers
def hf_generate(model, batch, max_new, eos):
    """transformers' greedy generate from the same spliced embeddings (one unpadded sample)."""
    with torch.no_grad():
        prompt = model.splice(batch["input_ids"], batch["attention_mask"], vision(model, batch))
        out = model.llm.generate(inputs_embeds=prompt.embeds, attention_mask=torch.ones(prompt.embeds.shape[:2], dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos, pad_token_id=0)
    return out[0].tolist()


def test_dense_generation_equals_transformers_generate(tiny):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    for item in items:
        batch = proc.collate([item], answer=False)
        out = generate(model, batch, bound(NoPruning(), model), max_new_tokens=8, eos_token_id=None,
                       tokenizer=proc.tokenizer)
        sample = out.samples[0]
        assert sample.ids == hf_generate(model, batch, 8, None)
        assert len(sample.ids) == 8 and sample.text == proc.tokenizer.decode(sample.ids, skip_special_tokens=False)
        assert not sample.finished and sample.decode_tokens == 7 and out.decode_tokens == 7


def test_dense_generation_on_a_converted_lisa_checkpoint_equals_transformers_generate(tmp_path, compose_cfg):
    from cspexp.convert import convert
    from cspexp.models.loaders import build_model
    from lisa_fixtures import write_tiny_lisa

    tiny = write_tiny_lisa(tmp_path / "tiny")
    dst = convert(tiny.path, tmp_path / "converted", vision_tower=tiny.clip_path, dtype="float32", progress=False)
    loaded = build_model(compose_cfg("model=converted", f"model.path={dst}").model, [])
    model, proc = loaded.model.eval(), loaded.processor
    rng = np.random.default_rng(0)
    eos = proc.tokenizer.eos_token_id
    for q, sentence in [("the red circle", False), ("What can roll down a slope?", True)]:
        items = [{"idx": 0, "image": rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "mask": np.zeros((40, 50), np.uint8),
                  "query": q, "is_sentence": sentence}]
        batch = proc.collate(items, answer=False)
        ids = batch["input_ids"][0].tolist()
        # LISA's generation prompt: LISA's ids up to "ASSISTANT:", the image as -200, no answer
        assert ids == proc.tokenizer.encode_prompt(q, sentence, answer=False) and model.seg_token_id not in ids
        out = generate(model, batch, bound(NoPruning(), model), max_new_tokens=10, eos_token_id=eos,
                       tokenizer=proc.tokenizer)
        sample = out.samples[0]
        assert sample.ids == hf_generate(model, batch, 10, eos)
        assert isinstance(sample.text, str) and sample.finished == (sample.ids[-1] == eos)


# --------------------------------------------------------------------------- the pruned cache is exact
def recompute(model, batch, image_tokens, method, ids: list[int], query_pos: torch.Tensor):
    """Prompt + `ids` through the pruned decoder loop without any cache (one sample): the final
    states of every column and the state (whose trace says what each layer ran)."""
    input_ids = torch.cat([batch["input_ids"], torch.tensor([ids], dtype=torch.long)], dim=1)
    with torch.no_grad():
        prompt = model.splice(input_ids, torch.ones_like(input_ids), image_tokens)
        # the query that ranks image tokens is the prompt's last token, as in the generation run (the
        # generated ids may hold a [SEG] the splice would take instead)
        prompt.query_pos, prompt.seg_pos = query_pos.clone(), query_pos + 1
        loop = DecoderLoop(model.decoder)
        ctx = PruningContext(layers=model.decoder.layers, rotary_emb=model.decoder.rotary_emb,
                             final_norm=model.decoder.norm, grid_size=model.grid_size, images=batch["images"],
                             sample_ids=batch["idx"].tolist())
        return loop.run(TokenState.from_prompt(prompt, loop.num_layers), method, ctx)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_pruned_cache_holds_each_layers_tokens_and_decodes_as_a_recomputation(tiny, name):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    method = bound(METHODS[name], model)
    batch = proc.collate(items[:1], answer=False)
    # the cache after the prefill: each layer holds exactly the tokens the trace says entered it
    first = generate(model, batch, method, max_new_tokens=1, eos_token_id=None)
    assert [layer.keys.shape[-2] for layer in first.cache.layers] == first.trace.tokens_per_layer[0].tolist()
    assert len(set(first.trace.tokens_per_layer[0].tolist())) > 1  # the method did prune: lengths differ
    assert first.samples[0].cached_tokens == first.trace.tokens_per_layer[0].tolist()

    steps = 5
    out = generate(model, batch, method, max_new_tokens=steps, eos_token_id=None)
    sample = out.samples[0]
    tokens = out.trace.tokens_per_layer[0]
    # each decoded token is appended to every layer's cache: prompt tokens present + fed tokens
    assert [layer.keys.shape[-2] for layer in out.cache.layers] == (tokens + steps - 1).tolist() == sample.cached_tokens
    assert sample.fed_tokens == steps - 1 and sample.hidden.shape[0] == steps
    # KV size from the cached lengths; dense: every prompt token in every layer
    per_token = kv_bytes_per_token(model.llm.config, torch.float32)
    assert per_token == 2 * 4 * 16 * 4  # K and V, 4 kv heads × head_dim 16, fp32
    assert sample.kv_cache_mb == pytest.approx(sum(sample.cached_tokens) * per_token / 2**20)
    n_text = int(tokens[0] - out.trace.image_per_layer[0, 0])
    assert sample.cached_tokens_dense == [n_text + 256 + steps - 1] * 8 and sample.kv_cache_mb < sample.kv_cache_dense_mb
    # decoding on the pruned cache = recomputing prompt + generated ids through the pruned loop
    image_tokens = vision(model, batch)
    for k in range(1, steps):
        state = recompute(model, batch, image_tokens, method, sample.ids[:k], out.state.query_pos)
        assert torch.equal(state.trace.image_per_layer, out.trace.image_per_layer)  # the same tokens kept
        assert torch.equal(state.trace.tokens_per_layer - k, out.trace.tokens_per_layer)
        last = state.hidden[0, -1]  # the state of generated token k − 1
        torch.testing.assert_close(last, sample.hidden[k], atol=2e-5, rtol=1e-4)
        assert int(model.llm.lm_head(last).argmax()) == sample.ids[k]


def test_renumbered_positions_continue_each_layers_numbering(tiny):
    """pdrop positions=renumber: the decoded token's RoPE position at a layer is the count of prompt
    tokens present there (PyramidDrop's decoding rule); original positions would differ."""
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    batch = proc.collate(items[:1], answer=False)
    layout = CacheLayout()
    out = generate(model, batch, bound(METHODS["pdrop_renumber"], model), max_new_tokens=1, eos_token_id=None,
                   observers=[layout])
    assert [int(p) for p in torch.stack(layout.next_rope)[:, 0]] == out.trace.tokens_per_layer[0].tolist()
    keep = CacheLayout()
    out = generate(model, batch, bound(METHODS["pdrop"], model), max_new_tokens=1, eos_token_id=None, observers=[keep])
    assert {int(p) for p in torch.stack(keep.next_rope)[:, 0]} == {int(out.trace.tokens_per_layer[0, 0])}


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("name", ["none", "fastv", "pdrop_renumber", "csp"])
def test_a_batch_generates_what_its_samples_generate_one_by_one(tiny, name):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    method = bound(METHODS.get(name, NoPruning()), model)
    batch = proc.collate(items, answer=False)
    assert len(set(batch["attention_mask"].sum(1).tolist())) > 1  # prompts of different lengths: padding
    eos = proc.tokenizer.eos_token_id
    together = generate(model, batch, method, max_new_tokens=6, eos_token_id=eos).samples
    for item, joint in zip(items, together, strict=True):
        alone = generate(model, proc.collate([item], answer=False), method, max_new_tokens=6, eos_token_id=eos).samples[0]
        assert joint.ids == alone.ids
        assert joint.cached_tokens == alone.cached_tokens and joint.kv_cache_mb == alone.kv_cache_mb
        torch.testing.assert_close(joint.hidden, alone.hidden, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF_DIR / "prune").glob("*.yaml")))
def test_every_configured_method_generates_and_batches(tiny, option):
    """Every `prune=` option prefills a generation prompt (no [SEG]: its query is the last prompt token)
    and decodes on its cache; a batch gives its samples' own ids and cache sizes — unless the method's
    count adapts to the sample, where a batch keeps its samples' largest count (sparsevlm, mustdrop:
    docs/method.md) and so runs another schedule than a sample alone."""
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    method = bound(build(OmegaConf.load(CONF_DIR / "prune" / f"{option}.yaml")), model)
    together = generate(model, proc.collate(items[:2], answer=False), method, max_new_tokens=3, eos_token_id=None)
    for i, (item, joint) in enumerate(zip(items[:2], together.samples, strict=True)):
        alone = generate(model, proc.collate([item], answer=False), method, max_new_tokens=3, eos_token_id=None)
        assert len(joint.ids) == 3 and joint.kv_cache_mb <= joint.kv_cache_dense_mb
        if torch.equal(together.trace.tokens_per_layer[i], alone.trace.tokens_per_layer[0]):  # the same schedule
            assert joint.ids == alone.samples[0].ids and joint.kv_cache_mb == alone.samples[0].kv_cache_mb
        else:
            assert option in ("sparsevlm", "mustdrop")


# --------------------------------------------------------------------------- [SEG] → masks
@pytest.mark.parametrize("spec", [NoPruning(), ClusterScatterPrune(keep=0.1)], ids=["none", "csp"])
def test_a_first_seg_gives_the_teacher_forced_mask_on_the_embedded_model(compose_cfg, spec):
    """The embedded model answers "[SEG] . </s>": its first [SEG]'s state is that of the prompt's last
    token, the very token teacher forcing reads (the answer after it cannot change it, causally, and
    the pruning query is that token in both) — so generation's mask is the teacher-forced one."""
    loaded = build_model(compose_cfg("model=tiny_lisa").model, ShapesDataset.vocabulary())
    model, proc = loaded.model.eval(), loaded.processor
    items = [ShapesDataset(split="val", n=3)[i] for i in range(3)]
    method = bound(spec, model)
    out = generate(model, proc.collate(items, answer=False), method, max_new_tokens=8,
                   eos_token_id=proc.tokenizer.eos_token_id, tokenizer=proc.tokenizer)
    with torch.no_grad():
        forced = segment(model, proc.collate(items), method)
    for i, sample in enumerate(out.samples):
        assert sample.text == "[SEG] . </s>" and sample.finished and sample.n_seg == 1
        assert torch.equal(out.trace.image_per_layer[i], forced.trace.image_per_layer[i])  # the same tokens kept
        torch.testing.assert_close(sample.logits[0], forced.logits[i], atol=1e-3, rtol=1e-4)


class Scripted(nn.Module):
    """An lm_head that emits a fixed script, one token per call, whatever the state."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.calls = script, vocab, 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.zeros(h.shape[0], self.vocab)
        logits[:, token] = 1.0
        return logits


def test_each_generated_seg_gives_a_mask_by_lisas_rule(tiny, monkeypatch):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    SEG, eos = model.seg_token_id, proc.tokenizer.eos_token_id
    a, b = proc.tokenizer.convert_tokens_to_ids("red"), proc.tokenizer.convert_tokens_to_ids("circle")
    monkeypatch.setattr(model.llm, "lm_head", Scripted([a, SEG, b, SEG, eos], model.llm.config.vocab_size))
    batch = proc.collate(items[:1], answer=False)
    out = generate(model, batch, bound(NoPruning(), model), max_new_tokens=16, eos_token_id=eos)
    sample = out.samples[0]
    assert sample.ids == [a, SEG, b, SEG, eos] and sample.finished and sample.n_seg == 2
    H, W = items[0]["image"].shape[:2]
    assert sample.logits.shape == (2, H, W) and sample.masks.dtype == torch.bool
    torch.testing.assert_close(sample.mask, sample.masks[0], rtol=0, atol=0)

    # LISA's rule written out over the whole output: output_ids = prompt ids + generated ids (the image
    # a single placeholder id), mask = output_ids[:, 1:] == [SEG] with N − 1 columns of the spliced image
    # in front (LISA writes 255 for its 256 tokens), applied to the last layer's states of the full
    # sequence — here recomputed without cache
    output_ids = torch.cat([batch["input_ids"][0], torch.tensor(sample.ids)])
    N = model.n_image_tokens
    lisa_mask = torch.cat([torch.zeros(N - 1, dtype=torch.bool), output_ids[1:] == SEG])
    image_tokens = vision(model, batch)
    state = recompute(model, batch, image_tokens, bound(NoPruning(), model), sample.ids[:-1], out.state.query_pos)
    states = state.hidden[0][lisa_mask[: state.hidden.shape[1]]]
    assert states.shape[0] == 2
    with torch.no_grad():
        expected = model.seg_embedding(states)
        torch.testing.assert_close(sample.seg_embeds, expected, atol=2e-5, rtol=1e-4)
        low = model.decode_masks(out.image_embeddings[[0, 0]], expected)
        for j in range(2):
            ref = model.postprocess_masks(low[j], batch["resized_hw"][0], batch["original_hw"][0])
            torch.testing.assert_close(sample.logits[j], ref, atol=1e-4, rtol=1e-4)


def test_no_seg_gives_no_mask_and_an_empty_first_mask(tiny, monkeypatch):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    eos = proc.tokenizer.eos_token_id
    a = proc.tokenizer.convert_tokens_to_ids("red")
    monkeypatch.setattr(model.llm, "lm_head", Scripted([a, a, eos], model.llm.config.vocab_size))
    out = generate(model, proc.collate(items[:2], answer=False), bound(NoPruning(), model), max_new_tokens=8,
                   eos_token_id=eos)
    for sample, item in zip(out.samples, items[:2], strict=True):
        H, W = item["image"].shape[:2]
        assert sample.ids == [a, a, eos] and sample.n_seg == 0
        assert sample.logits.shape == (0, H, W) and sample.seg_embeds.shape[0] == 0  # LISA's zero masks
        assert sample.mask.shape == (H, W) and not sample.mask.any()  # what evaluation scores


def test_seg_query_at_takes_the_seg_tokens_own_state(tiny, monkeypatch):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    SEG = model.seg_token_id
    a = proc.tokenizer.convert_tokens_to_ids("red")
    monkeypatch.setattr(model.llm, "lm_head", Scripted([a, SEG], model.llm.config.vocab_size))
    monkeypatch.setattr(model, "seg_query", "at")
    batch = proc.collate(items[:1], answer=False)
    out = generate(model, batch, bound(NoPruning(), model), max_new_tokens=2, eos_token_id=None)
    sample = out.samples[0]
    # [SEG] is the last token: it is fed once more so that its own state exists
    assert sample.ids == [a, SEG] and sample.fed_tokens == 2 and sample.hidden.shape[0] == 3
    with torch.no_grad():
        torch.testing.assert_close(sample.seg_embeds, model.seg_embedding(sample.hidden[2:3]))


# --------------------------------------------------------------------------- FLOPs of decoding
def test_decode_flops_by_hand():
    dims = LlmDims(hidden_size=8, intermediate_size=16, num_layers=2, kv_size=4)
    # one step against prompts of 10 and 6 tokens: contexts 11 and 7; lm_head 8·5
    per_layer = lambda c: 2 * 64 + 2 * 32 + 2 * c * 8 + 3 * 8 * 16  # noqa: E731
    assert decode_macs(11, dims) == per_layer(11)
    assert decode_flops([10, 6], 1, dims, vocab_size=5) == 2 * (per_layer(11) + per_layer(7) + 40)
    # two steps: contexts 11, 12 and 7, 8, averaged per step
    two = (per_layer(11) + per_layer(12) + per_layer(7) + per_layer(8)) / 2
    assert decode_flops([10, 6], 2, dims) == pytest.approx(2 * two)
    assert decode_flops([10, 6], 0, dims) is None


@pytest.mark.parametrize("spec", [NoPruning(), FastV(keep=0.3), ClusterScatterPrune(keep=0.2)], ids=["none", "fastv", "csp"])
def test_decode_flops_equal_flop_counter(spec):
    """One decoding step (every layer against its pruned cache, then the lm_head) counted by
    torch's FlopCounterMode equals the analytic decode FLOPs (eager attention: SDPA counts as zero on
    CPU; grouped-query attention so that d_kv ≠ d)."""
    cfg = OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml")
    cfg.attn_implementation, cfg.llm.num_key_value_heads = "eager", 2
    loaded = build_model(cfg, ShapesDataset.vocabulary())
    model, proc = loaded.model.eval(), loaded.processor
    batch = proc.collate([ShapesDataset(split="val", n=1)[0]], answer=False)
    out = generate(model, batch, bound(spec, model), max_new_tokens=2, eos_token_id=None)  # one decoding step
    layout, cache = CacheLayout(), DynamicCache(config=model.llm.config)
    with torch.no_grad():
        state, last = run_llm(model, batch, bound(spec, model), observers=[layout], cache=cache)
        kv = KVDecoder(model.decoder, cache, layout)
        counter = FlopCounterMode(display=False)
        with counter:
            model.llm.lm_head(kv.step(torch.tensor(out.samples[0].ids[:1])))
    dims = LlmDims.from_config(model.llm.config)
    assert dims.kv_size != dims.hidden_size
    tokens = state.trace.tokens_per_layer[0].tolist()
    assert counter.get_total_flops() == decode_flops(tokens, 1, dims, model.llm.config.vocab_size)
    assert out.samples[0].cached_tokens == [t + 1 for t in tokens]


# --------------------------------------------------------------------------- settings and the CLI
def test_bad_settings_are_one_line_errors(tiny, compose_cfg):
    loaded, items = tiny
    model, proc = loaded.model, loaded.processor
    batch = proc.collate(items[:1], answer=False)
    with pytest.raises(ConfigError, match=r"generate.max_new_tokens=0 must be an int ≥ 1"):
        generate(model, batch, bound(NoPruning(), model), max_new_tokens=0, eos_token_id=None)
    with pytest.raises(ConfigError, match="prune.query=seg_token"):
        generate(model, batch, bound(FastV(query="seg_token"), model), max_new_tokens=2, eos_token_id=None)
    with pytest.raises(ValueError, match=r"answer=False"):  # a teacher-forced prompt already holds the answer
        generate(model, proc.collate(items[:1]), bound(NoPruning(), model), max_new_tokens=2, eos_token_id=None)
    assert configured_max_new_tokens(compose_cfg()) is None
    assert configured_max_new_tokens(compose_cfg("evaluate.mode=generate", "generate.max_new_tokens=5")) == 5
    with pytest.raises(ConfigError, match="prune.query=seg_token"):
        configured_max_new_tokens(compose_cfg("evaluate.mode=generate", "prune=fastv", "prune.query=seg_token"))


@pytest.mark.parametrize(("args", "expected"), [
    (["evaluate.mode=chat"], "evaluate.mode='chat' is not allowed"),
    (["evaluate.mode=generate", "generate.max_new_tokens=0"], "generate.max_new_tokens=0"),
    (["evaluate.mode=generate", "generate.max_new_tokens=abc"], "generate.max_new_tokens"),
    (["evaluate.mode=generate", "prune=fastv", "prune.query=seg_token"], "prune.query=seg_token needs [SEG]"),
])
def test_bad_generation_settings_from_the_cli(tmp_path, args, expected):
    run_dir = tmp_path / "run"
    proc = cspexp(*args, "logger=none", "dataset.n=2", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr
    assert not (run_dir / "results.json").exists()


def test_generate_mode_from_the_cli_on_the_embedded_model(tmp_path):
    run_dir = tmp_path / "run"
    proc = cspexp("evaluate.mode=generate", "logger=none", "dataset.n=8", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    rows = read_jsonl(run_dir / "samples.jsonl")
    assert results["evaluate_mode"] == "generate" and results["method"] == "csp" and len(rows) == 8
    gen = results["generate"]
    assert gen["max_new_tokens"] == 32 and 0.0 <= gen["with_seg"] <= 1.0
    for row in rows:
        assert row["generated_text"] is not None and 1 <= len(row["generated_ids"]) <= 32
        assert row["decode_tokens"] == len(row["generated_ids"]) - 1 and row["n_seg"] >= 0
        assert row["kv_cache_mb"] < row["kv_cache_dense_mb"]  # csp at keep 0.1 caches fewer image tokens
        assert set(row["latency_ms"]) == {"vision", "llm_prefill", "decode", "mask_decoder", "end_to_end"}
    # the run's numbers from the rows
    assert gen["kv_cache_mb"] == pytest.approx(sum(r["kv_cache_mb"] for r in rows) / 8)
    assert gen["decode_tokens"] == sum(r["decode_tokens"] for r in rows)
    assert gen["seg_per_sample"] == pytest.approx(sum(r["n_seg"] for r in rows) / 8)
    giou = sum(r["intersection"] / (r["union"] + 1e-5) if r["union"] else 1.0 for r in rows) / 8
    assert results["metrics"]["giou"] == pytest.approx(giou, abs=1e-6)
    assert results["dense"]["generate"]["kv_cache_mb"] == pytest.approx(results["dense"]["generate"]["kv_cache_mb_dense"])
    assert "KV cache" in proc.stdout and "gIoU" in proc.stdout  # the summary table and its caption


def test_bench_generate_mode_writes_every_field(tmp_path):
    """`python -m cspexp.bench mode=generate` on the tiny shape: fields and the cache sizes the schedules
    imply (no timing thresholds: timings are benchmark results, docs/benchmarks.md)."""
    out = tmp_path / "bench"
    proc = subprocess.run([sys.executable, "-m", "cspexp.bench", "mode=generate", "model_shape=tiny", "repeats=1",
                           "warmup=0", "generate.max_new_tokens=4", f"hydra.run.dir={out}"], cwd=tmp_path,
                          env={**os.environ, "WANDB_MODE": "disabled"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "bench.json").read_text())
    assert result["mode"] == "generate" and result["max_new_tokens"] == 4
    rows = {r["variant"]: r for r in result["variants"]}
    assert list(rows) == ["dense (ours)", "csp_k0.1", "fastv_k0.1"]
    # 35 + 60 text tokens + 256 image tokens, 3 decoded tokens cached; fastv keeps ⌈0.1·256⌉ = 26 from layer 2
    assert rows["dense (ours)"]["cached_tokens_per_layer"] == [351 + 3] * 8
    assert rows["fastv_k0.1"]["cached_tokens_per_layer"] == [351 + 3] * 2 + [95 + 26 + 3] * 6
    assert rows["csp_k0.1"]["cached_tokens_per_layer"] == [95 + 64 + 3] * 2 + [351 + 3] * 2 + [95 + 26 + 3] * 4
    per_token = 2 * 64 * 4  # K and V, d_kv = 64, fp32
    for r in rows.values():
        assert r["kv_cache_mb"] == pytest.approx(sum(r["cached_tokens_per_layer"]) * per_token / 2**20)
        assert isinstance(r["decode_tokens_per_s"], float) and len(r["times_ms"]) == 1
    assert rows["fastv_k0.1"]["kv_cache_reduction"] == pytest.approx(1 - (2 * 354 + 6 * 124) / (8 * 354))
    assert "decode tok/s" in (out / "bench.md").read_text()
