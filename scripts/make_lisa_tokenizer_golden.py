"""Make tests/fixtures/lisa_tokenizer/: a tiny LLaMA-style sentencepiece model, LISA checkpoint tokenizer
files around it, and the golden prompt ids that LISA's pipeline would produce with them.

    python scripts/make_lisa_tokenizer_golden.py [--out DIR] [--check-431 SITE_DIR]

The golden ids are computed here by a plain, step-by-step re-statement of what LISA ran — transformers
4.31.0's slow ``LlamaTokenizer`` (``PreTrainedTokenizer.tokenize`` → ``LlamaTokenizer._tokenize`` →
``build_inputs_with_special_tokens``) behind LLaVA's ``tokenizer_image_token`` — directly on
sentencepiece, and independently of ``cspexp.models.lisa_tokenizer`` (which the test checks against them).
The prompt text is also built here the way LISA builds it (llava_v1 ``Conversation.get_prompt``, then
``<image>`` → ``<im_start><image><im_end>``), not taken from cspexp.

``--check-431 SITE_DIR`` additionally runs the real transformers 4.31.0 slow tokenizer on the same files
(``pip install --no-deps --target SITE_DIR transformers==4.31.0 tokenizers==0.13.3 huggingface_hub==0.16.4``)
in a subprocess and stops if any id differs; the golden file records whether that check was made.

Layouts (each a directory with tokenizer.model, tokenizer_config.json, special_tokens_map.json and
added_tokens.json, written like 4.31's ``save_pretrained`` writes them):

- ``v1``: LISA-7B-v1's layout — ``<im_patch>``, ``<im_start>``, ``<im_end>`` from LLaVA, then ``[SEG]``
  (32000..32003 there); ``legacy`` true (4.31's default).
- ``llama2_nonlegacy``: LISA-13B-llama2's id layout — ``[SEG]`` first, then ``<im_start>``, ``<im_end>``
  (32000..32002 there) — with ``legacy: false``, the tokenizer behind the ids of JIA-Lab-research/LISA#193.
- ``special_map``: v1 with ``<im_start>``/``<im_end>`` listed as AddedToken additional special tokens and a
  plain-string ``</s>``, so the other whitespace rules of 4.31 are exercised.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import sentencepiece as spm

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "tests" / "fixtures" / "lisa_tokenizer"
SPIECE_UNDERLINE = "▁"
IMAGE_TOKEN_INDEX = -200

# ---------------------------------------------------------------------------------------------- corpus
# Template words, ReasonSeg/refCOCO-like queries and a little else. Pieces like "▁What" exist but
# "What" and "Bird" do not, "." and "▁." both exist (LLaMA: 29889 and 869), "\n" and most non-ASCII
# characters are left to byte fallback, as in LLaMA.
CORPUS = """A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the human's questions.
USER: What is the red car in this image? Please output segmentation mask. ASSISTANT: It is [SEG] .
What is the dog on the left in this image? Please output segmentation mask.
Sure , it is the cat . Sure , the segmentation result is [SEG] .
The birds have various ways of searching for food. What part of their body helps them to grab and pick up food from the ground in the picture?
In the room, what object can be used to store and organize various sundries and small personal items?
Sometimes, when a car is parked on the side of the road, the driver may accidentally leave the door open .
Which object in the kitchen would you use to boil water for tea?
Where would a person sit to read a book near the window?
the man wearing a blue shirt . the woman holding an umbrella . the child on the bicycle .
the second person from the right . the tall building behind the trees .
There are 3 apples and 12 oranges on the table in 2021 .
The café serves crème brûlée and naïve pastries .
Please output segmentation mask . Please output segmentation mask .
the white horse , the black dog , the green bottle , the yellow bus .
What can be used to cut paper ? What would keep you warm in winter ?
""".splitlines()

# LLaMA's tokenizer.model trainer/normalizer settings that shape its pieces (vocabulary size aside).
TRAINER = dict(
    model_type="bpe", vocab_size=700, character_coverage=0.99995, byte_fallback=True, split_digits=True,
    add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
    allow_whitespace_only_pieces=True, split_by_unicode_script=True, split_by_whitespace=True, split_by_number=True,
    max_sentencepiece_length=16, hard_vocab_limit=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
    minloglevel=2,
)

# ---------------------------------------------------------------------------------------------- prompts
# (query, is_sentence, answer): answer False ends the prompt at "ASSISTANT:" (chat.py's generation prompt).
CASES = [
    ("What part of their body helps them to grab and pick up food from the ground in the picture?", True, True),
    ("the red car on the left", False, True),
    ("Birds have various ways of searching for food. Which part helps them grab food?", True, True),
    ("In the room, what object can be used to store things?", True, True),
    ("the man's umbrella, (the \"blue\" one) - near the door; ok?!", False, True),
    ("   the dog on the sofa   ", False, True),
    ("the  two  spaces\tand a tab", True, True),
    ("the 3rd bus of 2021, 42 seats", False, True),
    ("the café's crème brûlée next to 小狗 🐶", False, True),
    ("Where would a person sit to read a book near the window?", True, False),
    ("a ▁ literal underline and a [SEG] inside", False, True),
    ("the box with </s> and <unk> written on it", False, True),
]

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def lisa_prompt_text(query: str, is_sentence: bool, answer: bool) -> str:
    """utils/dataset.py ValDataset + llava_v1 Conversation.get_prompt (SeparatorStyle.TWO, sep " ",
    sep2 "</s>") + collate_fn's <image> → <im_start><image><im_end>."""
    text = query.strip()
    if is_sentence:
        user = "<image>" + "\n {} Please output segmentation mask.".format(text)
    else:
        user = "<image>" + "\n What is {} in this image? Please output segmentation mask.".format(text)
    seps = [" ", "</s>"]
    messages = [("USER", user), ("ASSISTANT", "[SEG]." if answer else None)]
    ret = SYSTEM + seps[0]
    for i, (role, message) in enumerate(messages):
        if message:
            ret += role + ": " + message + seps[i % 2]
        else:
            ret += role + ":"
    return ret.replace("<image>", "<im_start><image><im_end>")


# ---------------------------------------------------------------------------------------------- layouts
def added_token_dict(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def tokenizer_config(legacy: bool) -> dict:
    """tokenizer_config.json as 4.31's save_pretrained wrote it for LISA."""
    def typed(content):
        return {"__type": "AddedToken", **added_token_dict(content)}

    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": typed("<s>"),
        "clean_up_tokenization_spaces": False, "eos_token": typed("</s>"), "legacy": legacy,
        "model_max_length": 512, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer", "unk_token": typed("<unk>"), "use_fast": False,
    }


def special_tokens_map() -> dict:
    return {"bos_token": added_token_dict("<s>"), "eos_token": added_token_dict("</s>"), "pad_token": "<unk>",
            "unk_token": added_token_dict("<unk>")}


def layouts(vocab_size: int) -> dict[str, dict]:
    v = vocab_size
    v1_added = {"<im_patch>": v, "<im_start>": v + 1, "<im_end>": v + 2, "[SEG]": v + 3}
    special = special_tokens_map()
    special["eos_token"] = "</s>"
    special["additional_special_tokens"] = [added_token_dict("<im_start>"), added_token_dict("<im_end>")]
    return {
        "v1": {"config": tokenizer_config(legacy=True), "special": special_tokens_map(), "added": v1_added},
        "llama2_nonlegacy": {"config": tokenizer_config(legacy=False), "special": special_tokens_map(),
                             "added": {"[SEG]": v, "<im_start>": v + 1, "<im_end>": v + 2}},
        "special_map": {"config": tokenizer_config(legacy=True), "special": special, "added": v1_added},
    }


# ---------------------------------------------------------------------------------------------- 4.31, restated
class Slow431:
    """transformers 4.31.0 ``LlamaTokenizer.from_pretrained(dir, use_fast=False)`` restated on sentencepiece."""

    def __init__(self, directory: Path):
        self.sp = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
        config = json.loads((directory / "tokenizer_config.json").read_text())
        special_map = json.loads((directory / "special_tokens_map.json").read_text())
        added = json.loads((directory / "added_tokens.json").read_text())
        self.legacy = config.get("legacy", True)
        self.add_bos_token = config.get("add_bos_token", True)
        self.add_eos_token = config.get("add_eos_token", False)

        # Special token attributes: tokenizer_config values (AddedToken dicts carry "__type"), then each
        # special_tokens_map.json entry assigned over them (dict → AddedToken, str stays str).
        def from_config(value):
            if isinstance(value, dict):
                return ("AddedToken", value["content"], value.get("lstrip", False), value.get("rstrip", False))
            return ("AddedToken", value, False, False)  # LlamaTokenizer.__init__ wraps str in AddedToken

        def from_map(value):
            if isinstance(value, dict):
                return ("AddedToken", value["content"], value.get("lstrip", False), value.get("rstrip", False))
            return ("str", value, None, None)

        attrs = {"bos_token": from_config(config.get("bos_token") or "<s>"),
                 "eos_token": from_config(config.get("eos_token") or "</s>"),
                 "unk_token": from_config(config.get("unk_token") or "<unk>")}
        additional = []
        for key, value in special_map.items():
            if key == "additional_special_tokens":
                additional = [from_map(v) for v in value]
            else:
                attrs[key] = from_map(value)
        extended = [attrs[k] for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                                       "mask_token") if k in attrs] + additional
        self.bos_token, self.eos_token, self.unk_token = attrs["bos_token"][1], attrs["eos_token"][1], attrs["unk_token"][1]
        # tokenize(): {str(t): t for t in all_special_tokens_extended if isinstance(t, AddedToken)}
        self.special_added_tokens = {t[1]: t for t in extended if t[0] == "AddedToken"}

        # added_tokens.json, in id order, appended after the pieces; all of them become no-split tokens.
        self.added_tokens_encoder = {}
        for token, index in sorted(added.items(), key=lambda kv: kv[1]):
            assert index == self.sp.get_piece_size() + len(self.added_tokens_encoder), "non-consecutive added token"
            self.added_tokens_encoder[token] = index
        # sanitize_special_tokens(): every special token becomes a no-split token too.
        self.unique_no_split_tokens = set(self.added_tokens_encoder) | {t[1] for t in extended}

    def trie_split(self, text: str) -> list[str]:
        """Trie.split: cut at the earliest no-split match, taking the longest match there."""
        out, start, i = [], 0, 0
        while i < len(text):
            matches = [t for t in self.unique_no_split_tokens if text.startswith(t, i)]
            if matches:
                longest = max(matches, key=len)
                if start < i:
                    out.append(text[start:i])
                out.append(longest)
                i += len(longest)
                start = i
            else:
                i += 1
        if start < len(text):
            out.append(text[start:])
        return out

    def tokenize(self, text: str) -> list[str]:
        if not self.legacy:  # LlamaTokenizer.tokenize
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        tokens = self.trie_split(text)  # PreTrainedTokenizer.tokenize
        for i, token in enumerate(tokens):
            if token in self.unique_no_split_tokens:
                tok_extended = self.special_added_tokens.get(token, None)
                left = tokens[i - 1] if i > 0 else None
                right = tokens[i + 1] if i < len(tokens) - 1 else None
                if tok_extended is not None:
                    if tok_extended[3] and right:  # rstrip
                        tokens[i + 1] = right.lstrip()
                    if tok_extended[2] and left:  # lstrip
                        tokens[i - 1] = left.rstrip()
                else:
                    if right:
                        tokens[i + 1] = right.lstrip()
                    if left:
                        tokens[i - 1] = left.rstrip()
        tokenized_text = []
        for token in tokens:
            if not token:
                continue
            if token in self.unique_no_split_tokens:
                tokenized_text.append(token)
            else:
                tokenized_text.extend(self._tokenize(token))
        return tokenized_text

    def _tokenize(self, text: str) -> list[str]:
        if not self.legacy:
            is_first = text.startswith(SPIECE_UNDERLINE)
            if is_first:
                text = text[1:]
        tokens = self.sp.encode(text, out_type=str)
        if not self.legacy and not is_first and not text.startswith(" ") and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def convert_token_to_id(self, token: str) -> int:
        if token in self.added_tokens_encoder:
            return self.added_tokens_encoder[token]
        return self.sp.piece_to_id(token)

    def __call__(self, text: str) -> list[int]:
        """tokenizer(text).input_ids"""
        ids = [self.convert_token_to_id(t) for t in self.tokenize(text)]
        bos = [self.convert_token_to_id(self.bos_token)] if self.add_bos_token else []
        eos = [self.convert_token_to_id(self.eos_token)] if self.add_eos_token else []
        return bos + ids + eos

    def __len__(self) -> int:
        return self.sp.get_piece_size() + len(self.added_tokens_encoder)


def tokenizer_image_token(prompt: str, tokenizer: Slow431) -> list[int]:
    """LLaVA's model/llava/mm_utils.py, as LISA calls it."""
    prompt_chunks = [tokenizer(chunk) for chunk in prompt.split("<image>")]

    def insert_separator(X, sep):
        return [ele for sublist in zip(X, [sep] * len(X)) for ele in sublist][:-1]

    input_ids = []
    offset = 0
    if len(prompt_chunks) > 0 and len(prompt_chunks[0]) > 0 and prompt_chunks[0][0] == tokenizer.convert_token_to_id(tokenizer.bos_token):
        offset = 1
        input_ids.append(prompt_chunks[0][0])
    for x in insert_separator(prompt_chunks, [IMAGE_TOKEN_INDEX] * (offset + 1)):
        input_ids.extend(x[offset:])
    return input_ids


# ---------------------------------------------------------------------------------------------- the real 4.31
CHECK_431 = r"""
import json, sys
import transformers
from transformers import LlamaTokenizer
assert transformers.__version__ == "4.31.0", transformers.__version__
out = {}
for directory, prompts in json.loads(sys.stdin.read()).items():
    tok = LlamaTokenizer.from_pretrained(directory, use_fast=False, padding_side="right", model_max_length=512)
    tok.pad_token = tok.unk_token
    rows = []
    for prompt in prompts:
        chunks = [tok(c).input_ids for c in prompt.split("<image>")]
        offset = 1 if chunks and chunks[0] and chunks[0][0] == tok.bos_token_id else 0
        ids = chunks[0][:offset]
        for i, c in enumerate(chunks):
            ids += ([-200] if i else []) + c[offset:]
        rows.append(ids)
    out[directory] = {"ids": rows, "len": len(tok), "seg": tok("[SEG]", add_special_tokens=False).input_ids}
print(json.dumps(out))
"""


def check_with_431(site_dir: str, golden: dict, out: Path) -> None:
    request = {str(out / name): [c["prompt"] for c in layout["cases"]] for name, layout in golden["layouts"].items()}
    env = {**os.environ, "PYTHONPATH": site_dir}
    proc = subprocess.run([sys.executable, "-c", CHECK_431], input=json.dumps(request), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"transformers 4.31 check failed to run:\n{proc.stderr}")
    real = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, layout in golden["layouts"].items():
        got = real[str(out / name)]
        assert got["len"] == layout["len"], (name, got["len"], layout["len"])
        assert got["seg"] == [layout["seg_token_id"]], (name, got["seg"])
        for case, ids in zip(layout["cases"], got["ids"]):
            if ids != case["input_ids"]:
                sys.exit(f"{name}: transformers 4.31 gives {ids}\n for {case['prompt']!r}\n, the restatement {case['input_ids']}")
    print("transformers 4.31.0 gives the same ids for every case")


# ---------------------------------------------------------------------------------------------- main
def train_model() -> bytes:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 3), model_writer=buf, **TRAINER)
    return buf.getvalue()


def dump_golden(golden: dict) -> str:
    """Indented JSON with one case per line (readable diffs when the fixture is regenerated)."""
    head = {k: v for k, v in golden.items() if k != "layouts"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "layouts": {']
    for n, (name, layout) in enumerate(golden["layouts"].items()):
        lines.append(f"  {json.dumps(name)}: {{\"len\": {layout['len']}, \"seg_token_id\": {layout['seg_token_id']}, \"cases\": [")
        cases = [json.dumps(c, ensure_ascii=False) for c in layout["cases"]]
        lines += [f"   {c}," for c in cases[:-1]] + [f"   {cases[-1]}"]
        lines.append("  ]}" + ("," if n < len(golden["layouts"]) - 1 else ""))
    return "\n".join(lines + [" }", "}"]) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check-431", metavar="SITE_DIR", help="also compare with transformers 4.31.0 installed in SITE_DIR")
    args = parser.parse_args()

    model = train_model()
    vocab_size = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    golden = {"generated_by": "scripts/make_lisa_tokenizer_golden.py", "sentencepiece": spm.__version__,
              "checked_with_transformers_4_31": bool(args.check_431), "vocab_size": vocab_size, "layouts": {}}
    for name, files in layouts(vocab_size).items():
        directory = args.out / name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "tokenizer.model").write_bytes(model)
        for file, content in (("tokenizer_config.json", files["config"]), ("special_tokens_map.json", files["special"]),
                              ("added_tokens.json", files["added"])):
            (directory / file).write_text(json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        tok = Slow431(directory)
        cases = []
        for query, is_sentence, answer in CASES:
            prompt = lisa_prompt_text(query, is_sentence, answer)
            ids = tokenizer_image_token(prompt, tok)
            cases.append({"query": query, "is_sentence": is_sentence, "answer": answer, "prompt": prompt,
                          "input_ids": ids, "tokens": [tok.sp.id_to_piece(i) if 0 <= i < tok.sp.get_piece_size() else
                                                        {v: k for k, v in tok.added_tokens_encoder.items()}.get(i, "<image>")
                                                        for i in ids]})
        golden["layouts"][name] = {"len": len(tok), "seg_token_id": tok.convert_token_to_id("[SEG]"), "cases": cases}
    if args.check_431:
        check_with_431(args.check_431, golden, args.out.resolve())
    (args.out / "golden.json").write_text(dump_golden(golden))
    print(f"wrote {args.out} ({len(CASES)} prompts × {len(golden['layouts'])} layouts)")


if __name__ == "__main__":
    main()
