"""LISA's evaluation prompt (llava_v1 template, teacher-forced answer ``[SEG].``).

LISA's validation puts the answer in the prompt and runs one prefill; the [SEG] embedding is then read
from the final hidden state of the token before ``[SEG]`` (LISA's one-token offset). The same text is
used for every tokenizer; only the way it becomes ids differs (word-level for the tiny models, LISA's
sentencepiece rules for real checkpoints).
"""

from __future__ import annotations

SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
IMAGE_TOKEN = "<image>"
IM_START = "<im_start>"
IM_END = "<im_end>"
SEG_TOKEN = "[SEG]"
ANSWER = f"{SEG_TOKEN}."
EOS = "</s>"

# Query templates of LISA's ValDataset: full sentences (ReasonSeg) are used as they are, noun phrases
# (refCOCO) are wrapped in a question.
SENTENCE_TEMPLATE = "{query} Please output segmentation mask."
PHRASE_TEMPLATE = "What is {query} in this image? Please output segmentation mask."


def user_turn(query: str, is_sentence: bool) -> str:
    """The human's turn after the image, exactly as LISA writes it (note the space after the newline)."""
    template = SENTENCE_TEMPLATE if is_sentence else PHRASE_TEMPLATE
    return template.format(query=query.strip())


def lisa_prompt(query: str, is_sentence: bool, answer: str | None = ANSWER) -> str:
    """The full llava_v1 conversation: ``SYSTEM USER: <im_start><image><im_end>\\n {turn} ASSISTANT: [SEG].</s>``.

    ``answer=None`` ends the prompt at ``ASSISTANT:`` (generation mode).
    """
    text = f"{SYSTEM} USER: {IM_START}{IMAGE_TOKEN}{IM_END}\n {user_turn(query, is_sentence)} ASSISTANT:"
    if answer is not None:
        text += f" {answer}{EOS}"
    return text


def template_words() -> list[str]:
    """Every text piece of the template (for building a word-level vocabulary)."""
    return [SYSTEM, "USER:", "ASSISTANT:", SENTENCE_TEMPLATE, PHRASE_TEMPLATE, ANSWER]
