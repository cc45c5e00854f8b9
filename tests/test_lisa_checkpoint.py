"""Original LISA checkpoints → LisaModel: strict key mapping, layouts, dtypes, clear errors.

The checkpoints are tiny ones in LISA's layout written by tests/lisa_fixtures.py; loaded weights are
compared with the modules they were written from, not with anything the loader computes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cspexp.models.loaders import model_shape
from cspexp.models.lisa_checkpoint import load_lisa
from cspexp.pruning.methods import NoPruning
from cspexp.pruning.pipeline import segment
from cspexp.utils.errors import ConfigError, MissingPathError
from lisa_fixtures import LLM, TOKENIZER_FILES, write_tiny_clip, write_tiny_lisa


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_lisa(tmp_path_factory.mktemp("tiny"))


def load(tiny, **kwargs):
    return load_lisa(path=str(tiny.path), vision_tower=str(tiny.clip_path), **{"dtype": "float32", "progress": False, **kwargs})


def assert_weights_are_the_sources(loaded, tiny, dtype=torch.float32):
    """Every LisaModel tensor equals the tensor of the module it was written from (LISA's names map
    onto transformers' LLaMA names one to one; SAM and CLIP are compared with their source modules)."""
    state = loaded.model.state_dict()
    written = tiny.state
    n_llm = 0
    for key, value in written.items():
        if key.endswith("rotary_emb.inv_freq") or key.startswith("model.visual_model."):
            continue
        if key.startswith("model.mm_projector."):
            target = "mm_projector." + key.removeprefix("model.mm_projector.")
        elif key.startswith("model.text_hidden_fcs."):
            target = "text_hidden_fcs." + key.removeprefix("model.text_hidden_fcs.")
        else:
            target, n_llm = "llm." + key, n_llm + 1
        assert state[target].dtype == dtype, target
        assert torch.equal(state[target], value.to(dtype)), target
    assert n_llm == len(tiny.llm.state_dict())  # every LLaMA tensor was checked
    for key, value in tiny.sam.state_dict().items():  # fp32 in the file
        assert torch.equal(state[f"sam.{key}"], value.to(dtype)), key
    for key, value in tiny.clip.state_dict().items():
        assert torch.equal(state[f"vision_tower.{key}"], value.to(dtype)), key


def test_loads_strictly_and_every_weight_equals_its_source(tiny):
    loaded = load(tiny)
    assert_weights_are_the_sources(loaded, tiny)
    model = loaded.model
    # architecture from config.json and the CLIP directory; SAM's from the weight shapes
    cfg = model.llm.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.vocab_size) == (
        LLM["hidden_size"], LLM["intermediate_size"], LLM["num_hidden_layers"], LLM["num_attention_heads"], 704)
    assert model.n_image_tokens == (56 // 14) ** 2
    assert model.sam.config.vision_config.image_size == 64 and model.sam.config.vision_config.window_size == 4
    assert model.vision_select_layer == -2
    # ids from the checkpoint's added_tokens.json; LLaVA's -200 placeholder
    added = json.loads((TOKENIZER_FILES / "added_tokens.json").read_text())
    assert model.seg_token_id == added["[SEG]"] == loaded.processor.seg_token_id
    assert model.image_token_id == -200
    # RoPE frequencies are recomputed (the checkpoint's inv_freq buffers were dropped): the same values
    head_dim = LLM["hidden_size"] // LLM["num_attention_heads"]
    expected = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    assert torch.allclose(model.llm.model.rotary_emb.inv_freq, expected)
    assert not any(t.device.type == "meta" for t in [*model.parameters(), *model.buffers()])
    assert loaded.name == "lisa"


def test_runs_a_sample_end_to_end(tiny):
    loaded = load(tiny)
    rng = np.random.default_rng(0)
    items = [{"idx": 0, "image": rng.integers(0, 255, (40, 50, 3), dtype=np.uint8), "mask": np.zeros((40, 50), np.uint8),
              "query": "the red circle", "is_sentence": False}]
    batch = loaded.processor.collate(items)
    assert (batch["input_ids"] == -200).sum() == 1
    with torch.no_grad():
        out = segment(loaded.model, batch, NoPruning().bind(loaded.model.num_layers, loaded.model.n_image_tokens))
    assert out.logits[0].shape == (40, 50) and torch.isfinite(out.logits[0]).all()


def test_bfloat16_converts_every_tensor(tiny):
    loaded = load(tiny, dtype="bfloat16")
    assert {t.dtype for t in loaded.model.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
    # the LLM was written in bf16: bit-identical; SAM was fp32: rounded once
    assert torch.equal(loaded.model.llm.model.layers[0].self_attn.q_proj.weight,
                       tiny.state["model.layers.0.self_attn.q_proj.weight"])
    src = tiny.sam.mask_decoder.iou_token.weight
    assert torch.equal(loaded.model.sam.mask_decoder.iou_token.weight, src.to(torch.bfloat16))


@pytest.mark.parametrize("layout", ["bin", "safetensors", "safetensors_sharded"])
def test_other_weight_layouts_load_the_same(tmp_path, layout):
    tiny = write_tiny_lisa(tmp_path, layout=layout, clip="vision")
    assert_weights_are_the_sources(load(tiny), tiny)


def test_shards_are_memory_mapped(tiny, monkeypatch):
    """.bin shards are opened with mmap (tensors stay in the page cache; only the converted copy is kept)."""
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    load(tiny)
    assert len(calls) == 2 and all(c.get("mmap") and c.get("weights_only") for c in calls)


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("model.mm_projector.bias", "mm_projector.bias"),
        ("model.layers.1.mlp.up_proj.weight", "llm.model.layers.1.mlp.up_proj.weight"),
        ("model.text_hidden_fcs.0.2.weight", "text_hidden_fcs.0.2.weight"),
        ("model.visual_model.image_encoder.blocks.1.mlp.lin2.bias", "sam.vision_encoder.layers.1.mlp.lin2.bias"),
    ],
)
def test_a_missing_key_is_named(tmp_path, key, named):
    tiny = write_tiny_lisa(tmp_path, edit=lambda s: s.pop(key))
    with pytest.raises(ConfigError, match=rf"missing 1 key \['{named}'\]"):
        load(tiny)


@pytest.mark.parametrize("key", ["model.stray.weight", "model.visual_model.mask_decoder.extra_token.weight",
                                 "model.layers.9.mlp.up_proj.weight"])
def test_a_stray_key_is_named(tmp_path, key):
    tiny = write_tiny_lisa(tmp_path, edit=lambda s: s.__setitem__(key, torch.zeros(2)))
    with pytest.raises(ConfigError, match=rf"unexpected 1 key \['{key}'\]") as err:
        load(tiny)
    assert "missing" not in str(err.value)


def test_many_bad_keys_are_listed_with_a_count(tmp_path):
    def edit(state):
        for i in range(25):
            state[f"model.stray{i:02d}"] = torch.zeros(1)

    tiny = write_tiny_lisa(tmp_path, edit=edit)
    with pytest.raises(ConfigError, match=r"unexpected 25 keys \[.*'model.stray19'\] … and 5 more"):
        load(tiny)


def test_a_shape_that_contradicts_config_json_is_named(tmp_path):
    tiny = write_tiny_lisa(tmp_path, config_edit=lambda c: c.update(vocab_size=800))
    with pytest.raises(ConfigError, match=r"wrong shapes .*model.embed_tokens.weight: checkpoint \[704, 32\], model \[800, 32\]"):
        load(tiny)


def test_a_checkpoint_that_kept_its_clip_tower_uses_it(tmp_path):
    other = write_tiny_clip(tmp_path / "other_clip", full=False, seed=7)

    def add_tower(state):
        for k, v in other.state_dict().items():
            state[f"model.vision_tower.vision_tower.vision_model.{k}"] = v.detach().clone()

    tiny = write_tiny_lisa(tmp_path / "ckpt", edit=add_tower)
    tower = load(tiny).model.vision_tower.state_dict()
    assert all(torch.equal(tower[k], v) for k, v in other.state_dict().items())
    assert not torch.equal(tower["embeddings.patch_embedding.weight"], tiny.clip.embeddings.patch_embedding.weight)


def test_a_partial_clip_tower_in_the_checkpoint_is_an_error(tmp_path):
    def add_one(state):
        state["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(24)

    tiny = write_tiny_lisa(tmp_path, edit=add_one)
    with pytest.raises(ConfigError, match=r"missing \d+ keys \['vision_tower.embeddings"):
        load(tiny)


def test_a_named_model_config_checks_the_dimensions(tiny):
    expect = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32}
    with pytest.raises(ConfigError, match=r"model=lisa_7b expects hidden_size 4096, .* but .*config.json has hidden_size 32, "
                                          r"intermediate_size 64, num_hidden_layers 4, num_attention_heads 4"):
        load(tiny, name="lisa_7b", expect=expect)
    assert load(tiny, expect={"hidden_size": 32}).model.llm.config.hidden_size == 32


def test_config_overrides(tiny):
    loaded = load(tiny, vision_select_layer=-1, seg_query="at", name="mine", attn_implementation="eager")
    model = loaded.model
    assert (model.vision_select_layer, model.seg_query, loaded.name) == (-1, "at", "mine")
    assert model.llm.config._attn_implementation == "eager" and model.vision_tower.config._attn_implementation == "eager"


def test_model_shape_reads_configs_without_weights(tiny, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(tiny.path / "config.json", bare / "config.json")  # no weights at all
    assert model_shape({"_target_": "cspexp.models.lisa_checkpoint.load_lisa", "path": str(bare), "vision_tower": str(tiny.clip_path)}) == (4, 16)


def test_missing_and_foreign_paths(tiny, tmp_path):
    with pytest.raises(MissingPathError, match="model.path='/nonexistent' does not exist"):
        load_lisa(path="/nonexistent", vision_tower=str(tiny.clip_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MissingPathError, match="has no config.json"):
        load_lisa(path=str(empty), vision_tower=str(tiny.clip_path))
    shutil.copy(tiny.path / "config.json", empty / "config.json")
    with pytest.raises(MissingPathError, match="has no weights: expected pytorch_model.bin.index.json"):
        load_lisa(path=str(empty), vision_tower=str(tiny.clip_path))
    with pytest.raises(MissingPathError, match="model.vision_tower='/nonexistent' does not exist"):
        load_lisa(path=str(tiny.path), vision_tower="/nonexistent")
    with pytest.raises(ConfigError, match="holds a 'llava' model, not CLIP"):
        load_lisa(path=str(tiny.path), vision_tower=str(tiny.path))
    (empty / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        load_lisa(path=str(empty), vision_tower=str(tiny.clip_path))


def test_a_missing_shard_is_named(tmp_path):
    tiny = write_tiny_lisa(tmp_path)
    (tiny.path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(MissingPathError, match="lists shard.* pytorch_model-00002-of-00002.bin that are not in"):
        load(tiny)


def test_a_corrupt_shard_is_named(tmp_path):
    tiny = write_tiny_lisa(tmp_path)
    (tiny.path / "pytorch_model-00001-of-00002.bin").write_bytes(b"not a pickle")
    with pytest.raises(ConfigError, match="cannot read the weight shard .*pytorch_model-00001-of-00002.bin"):
        load(tiny)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(mm_hidden_size=1024), "has width 24, but the checkpoint's projector expects mm_hidden_size 1024"),
        (lambda c: c.update(mm_projector_type="mlp2x_gelu"), "mm_projector_type='mlp2x_gelu' is not supported"),
        (lambda c: c.update(mm_vision_select_feature="cls_patch"), "mm_vision_select_feature='cls_patch' is not supported"),
        (lambda c: c.update(out_dim=256), "out_dim 256 differs from the SAM prompt width 32"),
        (lambda c: c.pop("hidden_size"), "lacks the LLaMA dimension.* hidden_size"),
        (lambda c: c.update(mm_use_im_start_end=False), "mm_use_im_start_end=False is not supported"),
        (lambda c: c.update(mm_vision_select_layer=-5), "vision select layer -5 is outside the CLIP tower's hidden states -4..3"),
    ],
)
def test_config_json_contradictions(tmp_path, edit, message):
    tiny = write_tiny_lisa(tmp_path, config_edit=edit)
    with pytest.raises(ConfigError, match=message):
        load(tiny)


def test_bad_dtype_and_device(tiny):
    with pytest.raises(ConfigError, match="model.dtype='int8' is not allowed"):
        load(tiny, dtype="int8")
    with pytest.raises(ConfigError, match="model.device='gpu0' is not a device"):
        load(tiny, device="gpu0")


MEASURE_PEAK = """
import sys, threading, time
from cspexp.models.lisa_checkpoint import load_lisa

def rss_anon_mib():  # process-owned memory; the memory-mapped checkpoint pages are file-backed, not counted
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024

base, peak, done = rss_anon_mib(), [0.0], threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], rss_anon_mib())
        time.sleep(0.001)
thread = threading.Thread(target=sample)
thread.start()
loaded = load_lisa(path=sys.argv[1], vision_tower=sys.argv[2], dtype="bfloat16", progress=False)
done.set()
thread.join()
model = sum(p.numel() * p.element_size() for p in loaded.model.parameters()) / 2**20
print(model, max(peak[0], rss_anon_mib()) - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads RssAnon from /proc")
def test_loading_holds_one_copy_of_the_weights(tmp_path, monkeypatch):
    """The process memory a load adds is the model itself, not the model plus a shard: here the whole
    LLM is one 60 MB .bin file, so a loader that read it into memory before converting would need
    about twice the model."""
    import lisa_fixtures

    monkeypatch.setitem(lisa_fixtures.LLM, "hidden_size", 512)
    monkeypatch.setitem(lisa_fixtures.LLM, "intermediate_size", 1536)
    monkeypatch.setitem(lisa_fixtures.LLM, "num_hidden_layers", 8)
    tiny = write_tiny_lisa(tmp_path, layout="bin")
    proc = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tiny.path), str(tiny.clip_path)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    model_mib, added_mib = map(float, proc.stdout.split()[-2:])
    assert model_mib > 50
    assert added_mib < 1.3 * model_mib + 10, (model_mib, added_mib)
