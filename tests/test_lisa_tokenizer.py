"""LISA's prompt ids: golden ids of transformers 4.31's slow tokenizer, checkpoint layouts, files, the CLI.

The fixture (tests/fixtures/lisa_tokenizer, made by scripts/make_lisa_tokenizer_golden.py) holds a tiny
LLaMA-style sentencepiece model, three checkpoint tokenizer layouts and the prompt ids LISA's pipeline
gives with them, computed by a separate restatement of 4.31's code path and checked against 4.31.0.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm

from cspexp.models.loaders import build_model
from cspexp.models import prompt as lisa_prompt
from cspexp.models.lisa_tokenizer import IMAGE_TOKEN_INDEX, load_lisa_tokenizer
from cspexp.models.processor import LisaProcessor
from cspexp.utils.errors import ConfigError, MissingPathError

from conftest import REPO

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "lisa_tokenizer"
GOLDEN = json.loads((FIXTURE / "golden.json").read_text(encoding="utf-8"))
LAYOUTS = sorted(GOLDEN["layouts"])
CASES = [(name, i) for name in LAYOUTS for i in range(len(GOLDEN["layouts"][name]["cases"]))]
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def case(name: str, i: int) -> dict:
    return GOLDEN["layouts"][name]["cases"][i]


def copy_layout(name: str, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_FILES:
        if f not in skip:
            shutil.copy(FIXTURE / name / f, dst / f)
    return dst


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=str(FIXTURE / "v1" / "tokenizer.model"))


# ---------------------------------------------------------------------------------------------- golden ids
def test_fixture_was_checked_against_transformers_431():
    assert GOLDEN["checked_with_transformers_4_31"] is True
    assert {len(GOLDEN["layouts"][n]["cases"]) for n in LAYOUTS} == {12}


@pytest.mark.parametrize("name,i", CASES, ids=[f"{n}-{i}" for n, i in CASES])
def test_prompt_ids_equal_lisa_slow_tokenizer_ids(name, i):
    c = case(name, i)
    tok = load_lisa_tokenizer(FIXTURE / name)
    assert tok.encode_prompt(c["query"], c["is_sentence"], answer=c["answer"]) == c["input_ids"]


@pytest.mark.parametrize("i", range(len(GOLDEN["layouts"]["v1"]["cases"])))
def test_prompt_text_is_lisa_template(i):
    """cspexp's template text equals the one the script builds the way LISA's conversation code does."""
    c = case("v1", i)
    answer = lisa_prompt.ANSWER if c["answer"] else None
    assert lisa_prompt.lisa_prompt(c["query"], c["is_sentence"], answer=answer) == c["prompt"]


@pytest.mark.parametrize("name", LAYOUTS)
def test_vocabulary_size_and_seg_id(name):
    tok = load_lisa_tokenizer(FIXTURE / name)
    layout = GOLDEN["layouts"][name]
    assert len(tok) == layout["len"]
    assert tok.seg_token_id == layout["seg_token_id"] == tok.convert_tokens_to_ids("[SEG]")
    assert tok.image_token_id == tok.convert_tokens_to_ids("<image>") == IMAGE_TOKEN_INDEX == -200
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)  # LISA: pad = unk


# ---------------------------------------------------------------------------------------------- rules by hand
def test_legacy_strips_around_added_tokens_and_prefixes_each_piece(sp):
    tok = load_lisa_tokenizer(FIXTURE / "v1")
    # "\n " after <im_end> and " " before [SEG] are stripped; "." after [SEG] gets its own dummy prefix.
    expected = ["<im_end>", *sp.encode("What is it", out_type=str), "[SEG]", "▁.", "</s>"]
    assert sp.encode(".", out_type=str) == ["▁."]
    assert tok.tokenize("<im_end>\n What is it [SEG].</s>") == expected


def test_non_legacy_drops_the_prefix_after_an_added_token(sp):
    """JIA-Lab-research/LISA#193: ``▁What`` without ``▁`` is no piece, so its id is <unk> (0)."""
    tok = load_lisa_tokenizer(FIXTURE / "llama2_nonlegacy")
    assert sp.encode("What is", out_type=str) == ["▁What", "▁is"] and sp.piece_to_id("What") == 0
    assert tok.tokenize("<im_end>\n What is") == ["<im_end>", "What", "▁is"]
    assert tok.encode("<im_end>\n What is") == [1, 702, 0, sp.piece_to_id("▁is")]
    assert tok.tokenize("[SEG].") == ["[SEG]", "."]  # the bare "." (29889 in LLaMA, not 869)


def test_added_token_flags_from_special_tokens_map(sp):
    """An AddedToken with lstrip/rstrip false keeps the whitespace around it; a plain-string special
    token strips both sides."""
    tok = load_lisa_tokenizer(FIXTURE / "special_map")
    assert tok.tokenize("<im_end>\n What") == ["<im_end>", *sp.encode("\n What", out_type=str)]
    assert tok.tokenize("a </s> b") == [*sp.encode("a", out_type=str), "</s>", *sp.encode("b", out_type=str)]


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "tokenizer_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def test_legacy_is_the_default_when_the_config_does_not_say(tmp_path):
    """Older checkpoints have no "legacy" key; 4.31's LlamaTokenizer then defaulted to legacy=True."""
    directory = copy_layout("llama2_nonlegacy", tmp_path)
    edit_config(directory, legacy=None)
    v1 = {c["query"]: c["input_ids"] for c in GOLDEN["layouts"]["v1"]["cases"]}
    to_v1 = {700: 703, 701: 701, 702: 702}  # llama2 layout's [SEG], <im_start>, <im_end> → v1's ids
    c = case("llama2_nonlegacy", 0)
    ids = load_lisa_tokenizer(directory).encode_prompt(c["query"], c["is_sentence"])
    assert [to_v1.get(i, i) for i in ids] == v1[c["query"]]


def test_without_bos_no_chunk_loses_its_first_id(tmp_path):
    """tokenizer_image_token drops each chunk's first id only when the first chunk starts with BOS."""
    directory = copy_layout("v1", tmp_path)
    edit_config(directory, add_bos_token=False)
    c = case("v1", 0)
    assert load_lisa_tokenizer(directory).encode_prompt(c["query"], c["is_sentence"]) == c["input_ids"][1:]


def test_longest_added_token_wins(tmp_path, sp):
    """4.31's Trie cuts at the longest added token that starts at a position (checked with 4.31.0)."""
    directory = copy_layout("v1", tmp_path)
    (directory / "added_tokens.json").write_text(
        json.dumps({"<im_patch>": 700, "<im_start>": 701, "<im_end>": 702, "[SEG]": 703, "[SEG]x": 704}))
    tok = load_lisa_tokenizer(directory)
    assert tok.tokenize("a [SEG]x b [SEG] c") == ["▁a", "[SEG]x", "▁b", "[SEG]", "▁c"]


# ---------------------------------------------------------------------------------------------- layouts at LISA's size
def padded_model(sp_bytes: bytes, size: int) -> bytes:
    """The fixture's model padded with UNUSED pieces to `size` pieces (LLaMA's 32000): same segmentation."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_bytes)
    for i in range(size - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"<unused{i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
    return proto.SerializeToString()


@pytest.mark.parametrize("layout,added,seg,length", [
    ("v1", {"<im_patch>": 32000, "<im_start>": 32001, "<im_end>": 32002, "[SEG]": 32003}, 32003, 32004),
    ("llama2_nonlegacy", {"[SEG]": 32000, "<im_start>": 32001, "<im_end>": 32002}, 32000, 32003),
])
def test_lisa_7b_v1_and_13b_llama2_layouts(tmp_path, layout, added, seg, length):
    directory = copy_layout(layout, tmp_path)
    (directory / "tokenizer.model").write_bytes(padded_model((FIXTURE / layout / "tokenizer.model").read_bytes(), 32000))
    (directory / "added_tokens.json").write_text(json.dumps(added))
    tok = load_lisa_tokenizer(directory)
    assert (tok.seg_token_id, len(tok)) == (seg, length)
    # The same ids as the golden ones, with each added token at its 32000-based id.
    small = GOLDEN["layouts"][layout]
    shift = {small_id: added[t] for t, small_id in json.loads((FIXTURE / layout / "added_tokens.json").read_text()).items()}
    c = small["cases"][1]
    assert tok.encode_prompt(c["query"], c["is_sentence"]) == [shift.get(i, i) for i in c["input_ids"]]


# ---------------------------------------------------------------------------------------------- files
@pytest.mark.parametrize("name", LAYOUTS)
def test_save_round_trip(tmp_path, name):
    tok = load_lisa_tokenizer(FIXTURE / name)
    tok.save(tmp_path / "saved")
    assert sorted(p.name for p in (tmp_path / "saved").iterdir()) == sorted(TOKENIZER_FILES)
    again = load_lisa_tokenizer(tmp_path / "saved")
    for c in GOLDEN["layouts"][name]["cases"]:
        assert again.encode_prompt(c["query"], c["is_sentence"], answer=c["answer"]) == c["input_ids"]
    assert (again.seg_token_id, len(again)) == (tok.seg_token_id, len(tok))


def test_tokenizer_json_fallback_matches_sentencepiece(tmp_path, caplog):
    """Without tokenizer.model the pieces come from tokenizer.json (here transformers 5's conversion of
    the fixture's model); the golden ids still come out, and a warning says they are not guaranteed."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(FIXTURE / "v1")).save_pretrained(str(tmp_path / "fast"))
    directory = copy_layout("v1", tmp_path / "json_only", skip=("tokenizer.model",))
    shutil.copy(tmp_path / "fast" / "tokenizer.json", directory / "tokenizer.json")
    with caplog.at_level(logging.WARNING, logger="cspexp"):
        tok = load_lisa_tokenizer(directory)
    assert "no tokenizer.model" in caplog.text
    for c in GOLDEN["layouts"]["v1"]["cases"]:
        assert tok.encode_prompt(c["query"], c["is_sentence"], answer=c["answer"]) == c["input_ids"]
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "tokenizer.json").is_file() and not (tmp_path / "saved" / "tokenizer.model").exists()


def test_added_tokens_from_tokenizer_config_when_added_tokens_json_is_absent(tmp_path):
    """Newer saves list added tokens in tokenizer_config.json's added_tokens_decoder."""
    directory = copy_layout("v1", tmp_path, skip=("added_tokens.json",))
    config = json.loads((directory / "tokenizer_config.json").read_text())
    added = json.loads((FIXTURE / "v1" / "added_tokens.json").read_text())
    config["added_tokens_decoder"] = {str(i): {"content": t, "special": False} for t, i in added.items()}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    c = case("v1", 0)
    assert load_lisa_tokenizer(directory).encode_prompt(c["query"], c["is_sentence"]) == c["input_ids"]


# ---------------------------------------------------------------------------------------------- errors
def test_missing_directory(tmp_path):
    with pytest.raises(MissingPathError, match="does not exist"):
        load_lisa_tokenizer(tmp_path / "nope")


def test_missing_tokenizer_model(tmp_path):
    directory = copy_layout("v1", tmp_path, skip=("tokenizer.model",))
    with pytest.raises(MissingPathError, match="neither tokenizer.model .* nor tokenizer.json"):
        load_lisa_tokenizer(directory)


def test_missing_seg_token(tmp_path):
    directory = copy_layout("v1", tmp_path)
    (directory / "added_tokens.json").write_text(json.dumps({"<im_patch>": 700, "<im_start>": 701, "<im_end>": 702}))
    with pytest.raises(ConfigError, match=r"added_tokens.json lacks \[SEG\]"):
        load_lisa_tokenizer(directory)


def test_missing_added_tokens_file(tmp_path):
    directory = copy_layout("v1", tmp_path, skip=("added_tokens.json",))
    with pytest.raises(ConfigError, match=r"has no added_tokens.json with <im_start>, <im_end>, \[SEG\]"):
        load_lisa_tokenizer(directory)


def test_added_token_ids_with_a_gap(tmp_path):
    directory = copy_layout("v1", tmp_path)
    (directory / "added_tokens.json").write_text(json.dumps({"<im_start>": 700, "<im_end>": 701, "[SEG]": 705}))
    with pytest.raises(ConfigError, match=r"'\[SEG\]' has id 705.*expected 702"):
        load_lisa_tokenizer(directory)


def test_malformed_json_names_the_file(tmp_path):
    directory = copy_layout("v1", tmp_path)
    (directory / "special_tokens_map.json").write_text("{not json")
    with pytest.raises(ConfigError, match="special_tokens_map.json is not valid JSON"):
        load_lisa_tokenizer(directory)


def test_corrupt_tokenizer_model(tmp_path):
    directory = copy_layout("v1", tmp_path)
    (directory / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="tokenizer.model is not a sentencepiece model"):
        load_lisa_tokenizer(directory)


# ---------------------------------------------------------------------------------------------- processor
def test_processor_collates_lisa_ids_with_right_padding():
    tok = load_lisa_tokenizer(FIXTURE / "v1")
    proc = LisaProcessor(tokenizer=tok, tokenizer_kind="lisa", clip_size=28, sam_size=32)
    assert (proc.image_token_id, proc.seg_token_id, proc.pad_token_id) == (-200, 703, 0)
    short, long = case("v1", 1), case("v1", 0)
    image = np.zeros((20, 30, 3), np.uint8)
    items = [{"idx": k, "image": image, "mask": np.zeros((20, 30), np.uint8), "query": c["query"],
              "is_sentence": c["is_sentence"]} for k, c in enumerate((short, long))]
    batch = proc.collate(items)
    n_short, n_long = len(short["input_ids"]), len(long["input_ids"])
    assert batch["input_ids"].shape == (2, n_long)
    assert batch["input_ids"][0, :n_short].tolist() == short["input_ids"]
    assert batch["input_ids"][0, n_short:].tolist() == [0] * (n_long - n_short)
    assert batch["input_ids"][1].tolist() == long["input_ids"]
    assert batch["attention_mask"].sum(1).tolist() == [n_short, n_long]


# ---------------------------------------------------------------------------------------------- CLI
def run_prompt(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "cspexp.prompt", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_prints_lisa_ids_from_the_tokenizer_files_alone():
    """A checkpoint directory with tokenizer files only (no config.json, no weights): nothing else is read."""
    c = case("v1", 4)
    proc = run_prompt("model=converted", f"model.path={FIXTURE / 'v1'}", f"query={c['query']}", "sentence=false")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["prompt"] == c["prompt"] and out["input_ids"] == c["input_ids"]
    assert (out["seg_token_id"], out["image_token_id"]) == (703, -200)
    assert out["tokens"][out["input_ids"].index(-200)] == "<image>"


def test_cli_tiny_model_prints_its_word_ids(capsys):
    from cspexp.prompt import main

    main(["model=tiny_random", "query=the red circle", "sentence=false", "answer=false"])
    out = json.loads(capsys.readouterr().out)
    # The word-level tokenizer: lower-cased words and punctuation of the prompt, <image> as its own token.
    words = out["tokens"][out["tokens"].index("<im_end>") + 1:]
    assert words == "what is the red circle in this image ? please output segmentation mask . assistant :".split()
    assert out["tokens"][0] == "<s>" and out["input_ids"][out["tokens"].index("<image>")] == out["image_token_id"]
    assert "[SEG]" not in out["tokens"] and out["prompt"].endswith("ASSISTANT:")


def test_cli_reads_a_converted_lisa_directory(tmp_path, capsys):
    """A cspexp model directory holding LISA's tokenizer (config.json "tokenizer": "lisa", files in tokenizer/)."""
    from cspexp.models.saved import FORMAT
    from cspexp.prompt import main

    (tmp_path / "config.json").write_text(json.dumps({"format": FORMAT, "tokenizer": "lisa"}))
    copy_layout("llama2_nonlegacy", tmp_path / "tokenizer")
    c = case("llama2_nonlegacy", 2)
    main(["model=converted", f"model.path={tmp_path}", f"query={c['query']}"])
    out = json.loads(capsys.readouterr().out)
    assert out["input_ids"] == c["input_ids"] and out["seg_token_id"] == 700


def test_cli_reads_a_saved_word_level_model(tmp_path, capsys):
    """A tiny model directory: its own tokenizer.json decides the ids (a word outside it is <unk>)."""
    from omegaconf import OmegaConf

    from cspexp.models.saved import save_model
    from cspexp.prompt import main
    from cspexp.utils.instantiate import build

    from conftest import CONF_DIR

    save_model(build_model(OmegaConf.load(CONF_DIR / "model" / "tiny_random.yaml"), ["zebra"]), tmp_path)
    main(["model=converted", f"model.path={tmp_path}", "query=the zebra circle", "sentence=true"])
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    start = tokens.index("<im_end>") + 1
    assert tokens[start:start + 3] == ["the", "zebra", "<unk>"]  # "circle" is a shapes word, not in this model


@pytest.mark.parametrize("args,message", [
    (["model=converted", "model.path={empty}", "query=x"], "neither tokenizer.model"),
    (["model=converted", "query=x"], "model.path is required"),
    (["model=tiny_random"], 'query="…" is required'),
    (["model=tiny_random", "query=x", "sentence=maybe"], "sentence='maybe' is not allowed"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, args, message):
    from cspexp.prompt import main

    args = [a.format(empty=tmp_path) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(args)
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err
