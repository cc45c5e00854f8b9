"""LISA's prompt token ids, reproduced exactly without transformers 4.31.

LISA tokenized with transformers 4.31's slow `LlamaTokenizer` (``use_fast=False``, sentencepiece,
``legacy=True`` unless the checkpoint's tokenizer_config.json says otherwise) through LLaVA's
``tokenizer_image_token``: the prompt is cut at ``<image>``, each chunk is encoded on its own (BOS
first; later chunks lose their BOS) and the chunks are joined with ``IMAGE_TOKEN_INDEX = -200``.
transformers 5 has only the fast Llama tokenizer, whose ids differ from those around added tokens
and at chunk starts, so this module re-implements the slow tokenizer's rules on sentencepiece itself
(docs/pitfalls.md, "transformers: no slow LLaMA tokenizer in version 5"):

1. The text is split at the no-split tokens: every added token (``added_tokens.json``: ``<im_start>``,
   ``<im_end>``, ``[SEG]``, …) and every special token (``<s>``, ``</s>``, ``<unk>``, additional
   special tokens), longest match first.
2. Whitespace next to a no-split token is stripped: a special token loaded as an ``AddedToken`` strips
   only on the sides its ``lstrip``/``rstrip`` flags say (LLaMA's ``</s>``: neither); any other no-split
   token — LISA's ``<im_start>``, ``<im_end>`` and ``[SEG]``, added as plain strings — strips BOTH
   sides (4.31 ``tokenization_utils.PreTrainedTokenizer.tokenize``, "We strip left and right by
   default"). So ``<im_end>\\n What is…`` continues with ``▁What`` (the ``\\n`` and the space are gone)
   and ``ASSISTANT: [SEG]`` has no ``▁`` before ``[SEG]``.
3. Each remaining text piece is encoded by sentencepiece on its own, which puts its dummy prefix
   ``▁`` before every piece (legacy): the ``.`` after ``[SEG]`` is ``▁.``. With ``legacy: false`` 4.31
   instead prefixes only the start of the text and removes the ``▁`` that sentencepiece puts at the
   start of every later piece; when the rest of the first piece is not in the vocabulary, its id
   is ``<unk>`` (0).

That last rule explains JIA-Lab-research/LISA#193: ``… 29901, 32001, -200, 32002, 0, 29879, 505 …`` for
"Birds have…" (``▁Bird`` lost its ``▁``; ``Bird`` is evidently no LLaMA piece → 0, then ``s``, ``▁have``)
and ``32000, 29889, 2`` (a bare ``.``, not ``▁.`` = 869, after ``[SEG]``) are the ids of a ``legacy: false``
tokenizer with the 13B-llama2 layout ([SEG] = 32000). With ``legacy`` true — 4.31's default when the key
is absent, and what LISA-7B-v1's files should hold (saved by 4.31 from a LLaVA checkpoint older than the
flag) — the reproduced ids have no ``<unk>`` after ``<im_end>``: the stripped text starts with a whole
``▁word`` piece, and ``[SEG].`` ends with ``▁.``. Both modes are reproduced, chosen by the checkpoint's
``legacy`` key as 4.31 chose (tests/fixtures/lisa_tokenizer has one layout of each).

Without ``tokenizer.model`` the pieces come from ``tokenizer.json``'s BPE model instead, run with
sentencepiece's dummy prefix; the rules above are the same, but identity with sentencepiece's
segmentation is then not guaranteed (merge order of a converted file), and a warning says so.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from cspexp.models import prompt as lisa_prompt
from cspexp.outputs.files import write_bytes_atomic, write_json_atomic, write_text_atomic
from cspexp.utils.errors import ConfigError, MissingPathError

log = logging.getLogger("cspexp")

IMAGE_TOKEN_INDEX = -200  # LLaVA's id for the <image> placeholder (model/llava/constants.py)
SPIECE_UNDERLINE = "▁"
# The tokens LISA's prompt needs as single ids (mm_use_im_start_end=True, [SEG] added by train_ds.py).
REQUIRED_ADDED = (lisa_prompt.IM_START, lisa_prompt.IM_END, lisa_prompt.SEG_TOKEN)
# 4.31's SpecialTokensMixin.SPECIAL_TOKENS_ATTRIBUTES, in its order (it decides which AddedToken's
# flags win when two attributes hold the same text).
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# LlamaTokenizer.__init__ defaults (4.31).
LLAMA_DEFAULTS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


@dataclass(frozen=True)
class SpecialToken:
    """A special token as 4.31 held it: ``added`` is True for an ``AddedToken`` (whose strip flags
    apply), False for a plain string (stripped on both sides like any added token)."""

    content: str
    added: bool
    lstrip: bool = False
    rstrip: bool = False

    @classmethod
    def parse(cls, value, where: str) -> SpecialToken:
        """A value of tokenizer_config.json / special_tokens_map.json: a string or an AddedToken dict."""
        if isinstance(value, str):
            return cls(value, added=False)
        if isinstance(value, dict) and isinstance(value.get("content"), str):
            return cls(value["content"], added=True, lstrip=bool(value.get("lstrip")), rstrip=bool(value.get("rstrip")))
        raise ConfigError(f"{where}: a special token must be a string or an AddedToken object with 'content', got {value!r}")


class SentencePieces:
    """Pieces from LISA's sentencepiece model (``tokenizer.model``): what 4.31's slow tokenizer used."""

    file_name = "tokenizer.model"

    def __init__(self, model_bytes: bytes, where: str):
        import sentencepiece as spm

        self.model_bytes = model_bytes
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(model_bytes)
        except (RuntimeError, OSError) as exc:
            raise ConfigError(f"{where} is not a sentencepiece model ({exc})") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def piece_to_id(self, piece: str) -> int:
        return self.sp.piece_to_id(piece)

    def id_to_piece(self, index: int) -> str:
        return self.sp.id_to_piece(index)

    def file_bytes(self) -> bytes:
        return self.model_bytes


class TokenizerJsonPieces:
    """Fallback when there is no ``tokenizer.model``: the BPE model of ``tokenizer.json`` with
    sentencepiece's normalisation (dummy prefix ``▁``, spaces → ``▁``), no pre-tokenizer and no added
    tokens, so that it encodes one text piece the way sentencepiece would."""

    file_name = "tokenizer.json"

    def __init__(self, json_text: str, where: str):
        from tokenizers import Tokenizer, normalizers

        self.json_text = json_text
        try:
            full = Tokenizer.from_str(json_text)
        except Exception as exc:  # tokenizers raises its own exception type for malformed files
            raise ConfigError(f"{where} is not a tokenizers JSON file ({exc})") from None
        if type(full.model).__name__ != "BPE":
            raise ConfigError(f"{where} holds a {type(full.model).__name__} model; LLaMA's tokenizer is BPE")
        self.vocab = full.get_vocab(with_added_tokens=False)
        self.bare = Tokenizer(full.model)
        self.bare.normalizer = normalizers.Sequence([normalizers.Prepend(SPIECE_UNDERLINE), normalizers.Replace(" ", SPIECE_UNDERLINE)])
        self.by_id = {i: p for p, i in self.vocab.items()}
        self.unk_id = self.vocab.get("<unk>", 0)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[str]:
        return self.bare.encode(text, add_special_tokens=False).tokens if text else []

    def piece_to_id(self, piece: str) -> int:
        return self.vocab.get(piece, self.unk_id)

    def id_to_piece(self, index: int) -> str:
        return self.by_id[index]

    def file_bytes(self) -> bytes:
        return self.json_text.encode("utf-8")


class LisaTokenizer:
    """LISA's slow-tokenizer ids (see the module docstring). Build it with :func:`load_lisa_tokenizer`."""

    image_token_id = IMAGE_TOKEN_INDEX

    def __init__(
        self,
        pieces: SentencePieces | TokenizerJsonPieces,
        added_tokens: dict[str, int],
        specials: dict[str, SpecialToken],
        additional_special: list[SpecialToken],
        *,
        legacy: bool = True,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        tokenizer_config: dict | None = None,
        special_tokens_map: dict | None = None,
    ):
        self.pieces = pieces
        self.added_tokens = dict(added_tokens)
        self.specials = dict(specials)
        self.additional_special = list(additional_special)
        self.legacy = legacy
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self._tokenizer_config = tokenizer_config
        self._special_tokens_map = special_tokens_map

        # Strip rules per no-split token: (strip the text on its left, strip the text on its right).
        special_values = [self.specials[k] for k in SPECIAL_KEYS if k in self.specials] + self.additional_special
        as_added = {t.content: t for t in special_values if t.added}  # later attributes win, as in 4.31's dict
        no_split = set(self.added_tokens) | {t.content for t in special_values}
        self._strip = {tok: ((as_added[tok].lstrip, as_added[tok].rstrip) if tok in as_added else (True, True)) for tok in no_split}
        # Leftmost, longest match first: the order in which 4.31's Trie cut the text.
        ordered = sorted(no_split, key=len, reverse=True)
        self._splitter = re.compile("(" + "|".join(re.escape(t) for t in ordered) + ")") if ordered else None

        self.unk_token_id = self.convert_tokens_to_ids(self.specials["unk_token"].content)
        self.bos_token_id = self.convert_tokens_to_ids(self.specials["bos_token"].content)
        self.eos_token_id = self.convert_tokens_to_ids(self.specials["eos_token"].content)
        # LISA sets `tokenizer.pad_token = tokenizer.unk_token` (train_ds.py, chat.py) whatever the files say.
        self.pad_token_id = self.unk_token_id
        self.seg_token_id = self.added_tokens[lisa_prompt.SEG_TOKEN]

    # ------------------------------------------------------------------ vocabulary
    def __len__(self) -> int:
        """Sentencepiece pieces + added tokens (the LLM's embedding rows: 32004 for LISA-7B-v1)."""
        return self.pieces.vocab_size + len(self.added_tokens)

    def convert_tokens_to_ids(self, token: str) -> int:
        """An added token's id, else its piece id (``<unk>``'s id for text that is no piece);
        ``<image>`` is LLaVA's placeholder ``-200``."""
        if token == lisa_prompt.IMAGE_TOKEN:
            return IMAGE_TOKEN_INDEX
        if token in self.added_tokens:
            return self.added_tokens[token]
        return self.pieces.piece_to_id(token)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str]:
        by_id = {i: t for t, i in self.added_tokens.items()}
        return [lisa_prompt.IMAGE_TOKEN if i == IMAGE_TOKEN_INDEX else by_id.get(i) or self.pieces.id_to_piece(i) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """`ids` as text, for display (generated answers): each run of pieces joined as sentencepiece
        does (``▁`` → space), added and special tokens (``[SEG]``, ``</s>``) kept verbatim unless
        `skip_special_tokens`, parts set apart by one space (4.31's slow decode with its default
        ``spaces_between_special_tokens``; the spacing next to a special token may differ from it)."""
        specials = {t.content for t in self.specials.values()} | set(self.added_tokens) | {lisa_prompt.IMAGE_TOKEN}
        parts, run = [], []
        for token in self.convert_ids_to_tokens([int(i) for i in ids]):
            if token in specials:
                parts.append("".join(run).replace(SPIECE_UNDERLINE, " ").strip())
                run = []
                if not skip_special_tokens:
                    parts.append(token)
            else:
                run.append(token)
        parts.append("".join(run).replace(SPIECE_UNDERLINE, " ").strip())
        return " ".join(p for p in parts if p)

    # ------------------------------------------------------------------ encoding
    def tokenize(self, text: str) -> list[str]:
        """The token strings of `text` (4.31 ``LlamaTokenizer.tokenize``)."""
        if not self.legacy:  # 4.31 non-legacy: one ▁ for the whole text, user ▁ become spaces
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = [p for p in self._splitter.split(text) if p] if self._splitter else [text]
        for i, part in enumerate(parts):
            if part not in self._strip:
                continue
            strip_left, strip_right = self._strip[part]
            if strip_right and i + 1 < len(parts):
                parts[i + 1] = parts[i + 1].lstrip()
            if strip_left and i > 0:
                parts[i - 1] = parts[i - 1].rstrip()
        tokens: list[str] = []
        for part in parts:
            if not part:  # fully stripped
                continue
            tokens.extend([part] if part in self._strip else self._encode_piece(part))
        return tokens

    def _encode_piece(self, text: str) -> list[str]:
        if self.legacy:
            return self.pieces.encode(text)  # sentencepiece adds its dummy ▁ to every piece
        starts_text = text.startswith(SPIECE_UNDERLINE)  # only the first piece carries tokenize's ▁
        if starts_text:
            text = text[1:]
        tokens = self.pieces.encode(text)
        if not starts_text and not text.startswith(" ") and tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            # The dummy ▁ of a piece after an added token is removed; the rest may be no piece (→ <unk>).
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def encode(self, text: str) -> list[int]:
        """``tokenizer(text).input_ids`` of the slow tokenizer: BOS (and EOS if configured) around the ids."""
        ids = [self.convert_tokens_to_ids(t) for t in self.tokenize(text)]
        return ([self.bos_token_id] if self.add_bos_token else []) + ids + ([self.eos_token_id] if self.add_eos_token else [])

    def encode_with_image(self, prompt_text: str) -> list[int]:
        """LLaVA's ``tokenizer_image_token``: chunks around ``<image>`` encoded one by one, joined by -200;
        when the first chunk starts with BOS, BOS is kept once and every chunk's first id is dropped."""
        chunks = [self.encode(chunk) for chunk in prompt_text.split(lisa_prompt.IMAGE_TOKEN)]
        offset = 1 if chunks and chunks[0] and chunks[0][0] == self.bos_token_id else 0
        ids = chunks[0][:1] if offset else []
        for i, chunk in enumerate(chunks):
            if i > 0:
                ids.append(IMAGE_TOKEN_INDEX)
            ids.extend(chunk[offset:])
        return ids

    def encode_prompt(self, query: str, is_sentence: bool, answer: bool = True) -> list[int]:
        """LISA's ids for its evaluation prompt (-200 for ``<image>``); ``answer=False`` ends at ``ASSISTANT:``."""
        text = lisa_prompt.lisa_prompt(query, is_sentence, answer=lisa_prompt.ANSWER if answer else None)
        return self.encode_with_image(text)

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path) -> None:
        """Write the files :func:`load_lisa_tokenizer` reads (the original JSON content where there was
        one, so that 4.31 would read them the same way)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = self._tokenizer_config if self._tokenizer_config is not None else self._default_config()
        special_map = self._special_tokens_map if self._special_tokens_map is not None else self._default_special_map()
        write_bytes_atomic(directory / self.pieces.file_name, self.pieces.file_bytes())
        write_json_atomic(directory / "tokenizer_config.json", config)
        write_json_atomic(directory / "special_tokens_map.json", special_map)
        write_text_atomic(directory / "added_tokens.json",
                          json.dumps(dict(sorted(self.added_tokens.items())), indent=2, ensure_ascii=False) + "\n")

    def _default_config(self) -> dict:
        return {"tokenizer_class": "LlamaTokenizer", "legacy": self.legacy,
                "add_bos_token": self.add_bos_token, "add_eos_token": self.add_eos_token}

    def _default_special_map(self) -> dict:
        def dump(t: SpecialToken):
            return {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": True,
                    "single_word": False} if t.added else t.content

        out = {k: dump(v) for k, v in self.specials.items()}
        if self.additional_special:
            out["additional_special_tokens"] = [dump(t) for t in self.additional_special]
        return out


# ---------------------------------------------------------------------- loading
def _read_json(path: Path, default=None):
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})") from None


def _special_tokens(directory: Path, config: dict, special_map: dict) -> tuple[dict[str, SpecialToken], list[SpecialToken]]:
    """bos/eos/unk/… and additional special tokens as 4.31's from_pretrained left them: the
    tokenizer_config.json values (LlamaTokenizer wraps plain strings into AddedTokens), then every
    key of special_tokens_map.json set over them as it is (a plain string stays a plain string)."""
    specials: dict[str, SpecialToken] = {}
    for key in SPECIAL_KEYS:
        value = config.get(key) or LLAMA_DEFAULTS.get(key)
        if value is None:
            continue
        token = SpecialToken.parse(value, str(directory / "tokenizer_config.json"))
        if key in ("bos_token", "eos_token", "unk_token", "pad_token") and not token.added:
            token = SpecialToken(token.content, added=True)  # LlamaTokenizer.__init__: AddedToken(lstrip=False, rstrip=False)
        specials[key] = token
    additional = [SpecialToken.parse(v, str(directory / "tokenizer_config.json"))
                  for v in config.get("additional_special_tokens") or []]
    for key, value in special_map.items():
        where = str(directory / "special_tokens_map.json")
        if key in SPECIAL_KEYS and value is not None:
            specials[key] = SpecialToken.parse(value, where)
        elif key in SPECIAL_KEYS and key not in LLAMA_DEFAULTS:  # null unsets it (bos/eos/unk must stay)
            specials.pop(key, None)
        elif key == "additional_special_tokens":
            additional = [SpecialToken.parse(v, where) for v in value or []]
    return specials, additional


def _added_tokens(directory: Path, config: dict, pieces, special_texts: list[str], unk: str) -> dict[str, int]:
    """``added_tokens.json`` (what 4.31 read); a newer save without it lists them in tokenizer_config.json's
    ``added_tokens_decoder`` or tokenizer.json's ``added_tokens`` (ids past the piece vocabulary). Special
    tokens that are neither pieces nor added tokens get the next ids (4.31's ``sanitize_special_tokens``)."""
    added = _read_json(directory / "added_tokens.json")
    source = directory / "added_tokens.json"
    if added is None and isinstance(config.get("added_tokens_decoder"), dict):
        added = {v["content"]: int(k) for k, v in config["added_tokens_decoder"].items() if int(k) >= pieces.vocab_size}
        source = directory / "tokenizer_config.json"
    if added is None and (directory / "tokenizer.json").is_file():
        entries = (_read_json(directory / "tokenizer.json") or {}).get("added_tokens", [])
        added = {e["content"]: int(e["id"]) for e in entries if int(e["id"]) >= pieces.vocab_size}
        source = directory / "tokenizer.json"
    added = added or {}
    if not isinstance(added, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in added.items()):
        raise ConfigError(f"{source} must map token strings to integer ids")
    # 4.31 appends added tokens after the pieces in id order and refuses gaps ("Non-consecutive added token").
    for expected, (token, index) in enumerate(sorted(added.items(), key=lambda kv: kv[1]), start=pieces.vocab_size):
        if index != expected:
            raise ConfigError(f"{source}: added token {token!r} has id {index}, but added tokens must follow the "
                              f"{pieces.vocab_size} pieces of {pieces.file_name} without gaps (expected {expected})")
    for text in special_texts:
        if text != unk and text not in added and pieces.piece_to_id(text) == pieces.piece_to_id(unk):
            added[text] = pieces.vocab_size + len(added)
    missing = [t for t in REQUIRED_ADDED if t not in added]
    if missing:
        where = f"{source} lacks" if source.is_file() else f"{directory} has no added_tokens.json with"
        raise ConfigError(f"{where} {', '.join(missing)}: LISA's prompt needs {', '.join(REQUIRED_ADDED)} as added "
                          f"tokens (use the tokenizer files saved with the LISA checkpoint)")
    return added


def load_lisa_tokenizer(path: str | Path) -> LisaTokenizer:
    """The tokenizer of a LISA checkpoint directory: ``tokenizer.model`` (or, with a warning,
    ``tokenizer.json``), ``tokenizer_config.json``, ``special_tokens_map.json``, ``added_tokens.json``."""
    directory = Path(path)
    if not directory.is_dir():
        raise MissingPathError(f"tokenizer directory {str(directory)!r} does not exist or is not a directory")
    if (directory / "tokenizer.model").is_file():
        pieces = SentencePieces((directory / "tokenizer.model").read_bytes(), str(directory / "tokenizer.model"))
    elif (directory / "tokenizer.json").is_file():
        pieces = TokenizerJsonPieces((directory / "tokenizer.json").read_text(encoding="utf-8"), str(directory / "tokenizer.json"))
        log.warning("%s has no tokenizer.model: LISA's ids are emulated on tokenizer.json's BPE model; they match "
                    "LISA's sentencepiece ids only if that file is a faithful conversion of its tokenizer.model", directory)
    else:
        raise MissingPathError(f"{directory} has neither tokenizer.model (LISA's sentencepiece model) nor tokenizer.json")
    config = _read_json(directory / "tokenizer_config.json")
    special_map = _read_json(directory / "special_tokens_map.json")
    for name, value in (("tokenizer_config.json", config), ("special_tokens_map.json", special_map)):
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"{directory / name} must hold a JSON object")
    specials, additional = _special_tokens(directory, config or {}, special_map or {})
    special_texts = [specials[k].content for k in SPECIAL_KEYS if k in specials] + [t.content for t in additional]
    added = _added_tokens(directory, config or {}, pieces, special_texts, specials["unk_token"].content)
    legacy = (config or {}).get("legacy")
    return LisaTokenizer(
        pieces,
        added,
        specials,
        additional,
        legacy=True if legacy is None else bool(legacy),  # 4.31's LlamaTokenizer default
        add_bos_token=bool((config or {}).get("add_bos_token", True)),
        add_eos_token=bool((config or {}).get("add_eos_token", False)),
        tokenizer_config=config,
        special_tokens_map=special_map,
    )
