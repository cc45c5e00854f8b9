"""`python -m cspexp.prompt`: print LISA's prompt for a query and the token ids the model sees.

    python -m cspexp.prompt model=<name> [model.path=DIR] query="…" [sentence=true|false] [answer=true|false]

Prints one JSON object: ``prompt`` (the llava_v1 text), ``input_ids`` (with ``image_token_id`` — LISA's
-200 — where the image features go), ``seg_token_id``, ``image_token_id`` and ``tokens`` (the token of
each id). Only the tokenizer is read, never the weights: a LISA checkpoint's tokenizer files through
`cspexp.models.lisa_tokenizer`, a cspexp model directory's word-level ``tokenizer.json``, or — for a
random model without a path — the word-level tokenizer built over the dataset's vocabulary, exactly
as an evaluation run builds it.

The other arguments are Hydra overrides of ``conf/prompt.yaml`` (model and dataset groups). ``query=``
is taken verbatim from the command line instead, so free text needs no Hydra escaping.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cspexp.utils.errors import ConfigError, CspexpError, MissingPathError

USAGE = __doc__.split("\n\n")[1].strip()


def load_prompt_tokenizer(cfg: DictConfig) -> tuple[object, str]:
    """The tokenizer an evaluation run with this model (and dataset) config would use, and its kind
    (`cspexp.models.processor.TokenizerKind`)."""
    from cspexp.models.lisa_tokenizer import load_lisa_tokenizer

    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is required for this model: the checkpoint directory whose tokenizer files "
                          "to read, e.g. model.path=/ckpt/LISA-7B-v1")
    path = cfg.model.get("path")
    if path:
        directory = Path(path)
        if not directory.is_dir():
            raise MissingPathError(f"model.path={str(path)!r} does not exist or is not a directory")
        kind = _cspexp_tokenizer_kind(directory)
        if kind == "word_level":
            from cspexp.models.tokenizer import load_word_tokenizer

            return load_word_tokenizer(directory / "tokenizer.json"), "word_level"
        if kind is not None and (directory / "tokenizer").is_dir():
            return load_lisa_tokenizer(directory / "tokenizer"), "lisa"  # a converted LISA model (cspexp.models.saved)
        return load_lisa_tokenizer(directory), "lisa"  # an original LISA checkpoint
    from cspexp.data import build_dataset, vocabulary
    from cspexp.models.tokenizer import build_word_tokenizer

    return build_word_tokenizer(vocabulary(build_dataset(cfg.dataset))), "word_level"


def _cspexp_tokenizer_kind(directory: Path) -> str | None:
    """The ``tokenizer`` entry of a cspexp model directory's config.json (``word_level`` when absent: the
    tiny models' ``tokenizer.json``; ``lisa``: LISA's files in ``tokenizer/``); None for other directories."""
    from cspexp.models.saved import FORMAT

    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("tokenizer", "word_level") if isinstance(config, dict) and config.get("format") == FORMAT else None


def _flag(cfg: DictConfig, key: str) -> bool:
    value = cfg.get(key)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value} is not allowed; use {key}=true or {key}=false")
    return value


def prompt_report(cfg: DictConfig, query: str) -> dict:
    """The JSON object the CLI prints."""
    from cspexp.models import prompt as lisa_prompt
    from cspexp.models.processor import encode_lisa_prompt

    is_sentence, answer = _flag(cfg, "sentence"), _flag(cfg, "answer")
    tokenizer, kind = load_prompt_tokenizer(cfg)
    ids = encode_lisa_prompt(tokenizer, kind, query, is_sentence, answer=answer)
    return {
        "prompt": lisa_prompt.lisa_prompt(query, is_sentence, answer=lisa_prompt.ANSWER if answer else None),
        "input_ids": ids,
        "seg_token_id": tokenizer.convert_tokens_to_ids(lisa_prompt.SEG_TOKEN),
        "image_token_id": tokenizer.convert_tokens_to_ids(lisa_prompt.IMAGE_TOKEN),
        "tokens": tokenizer.convert_ids_to_tokens(ids),
    }


def split_query(argv: list[str]) -> tuple[str | None, list[str]]:
    """(the text after the last ``query=``, the other arguments)."""
    query, rest = None, []
    for arg in argv:
        if arg.startswith("query="):
            query = arg[len("query="):]
        else:
            rest.append(arg)
    return query, rest


def main(argv: list[str] | None = None) -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cspexp.utils.conf_dir import conf_dir
    from cspexp.utils.failures import fail, tolerate_closed_stdout
    from cspexp.utils.preflight import preflight

    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    query, overrides = split_query(argv)
    if query is None or not query.strip():
        fail('query="…" is required, e.g. python -m cspexp.prompt model=tiny_random query="the red circle"')
    preflight(conf_dir(), "prompt", overrides)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="prompt", overrides=overrides)
    GlobalHydra.instance().clear()
    try:
        report = prompt_report(cfg, query)
    except CspexpError as exc:
        fail(str(exc))
    with tolerate_closed_stdout():  # `… | head -c 10` is not an error
        print(json.dumps(report, ensure_ascii=False))


if __name__ == "__main__":
    main()
