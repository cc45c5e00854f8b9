"""Word-level tokenizer for the small models, built with the `tokenizers` library.

The tiny models only ever read LISA's prompt around `shapes` queries, so a closed word vocabulary is
enough and keeps the embedding table small. Special tokens: ``<pad>`` ``<unk>`` ``<s>`` ``</s>`` and the
multimodal markers ``<image>`` (placeholder, expanded into the image tokens), ``<im_start>``,
``<im_end>`` and ``[SEG]``. Saved as a standard ``tokenizer.json``; wrapped in transformers'
`PreTrainedTokenizerFast` so the rest of the code sees the usual API.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from cspexp.models import prompt

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS, prompt.IMAGE_TOKEN, prompt.IM_START, prompt.IM_END, prompt.SEG_TOKEN]


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    # Whitespace() splits into \w+ and runs of punctuation; each punctuation mark becomes its own word.
    return pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])


def split_words(text: str) -> list[str]:
    """The words the tokenizer sees in `text` (lower-cased), for building vocabularies."""
    pieces = _pre_tokenizer().pre_tokenize_str(text.lower())
    return [p for p, _ in pieces]


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is the special tokens, LISA's template and `words`.

    `words` may be whole sentences: they are split the way the tokenizer splits its input.
    """
    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for text in [*prompt.template_words(), *words]:
        for word in split_words(text):
            vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = _pre_tokenizer()
    # Special tokens are matched on the raw text, before lower-casing and splitting.
    tok.add_special_tokens(SPECIAL_TOKENS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return wrap(tok)


def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        additional_special_tokens=[prompt.IMAGE_TOKEN, prompt.IM_START, prompt.IM_END, prompt.SEG_TOKEN],
        padding_side="right",
    )


def load_word_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """Load a ``tokenizer.json`` written by :func:`save_word_tokenizer`."""
    return wrap(Tokenizer.from_file(str(path)))


def save_word_tokenizer(tokenizer: PreTrainedTokenizerFast, path: str | Path) -> None:
    tokenizer.backend_tokenizer.save(str(path))
