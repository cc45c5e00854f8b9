"""`python -m cspexp.predict`: segment your own images with a model under a pruning method.

    python -m cspexp.predict [model=…] [prune=… prune.keep=…] [image=<file|glob|folder|shapes:val:<idx>>]
                             [query="…"] [queries=<jsonl>] [out_dir=DIR] [evaluate.mode=teacher_forced|generate]

With no arguments: the embedded `tiny_lisa` under csp on the `shapes` image shapes:val:0 (offline, CPU).
Per image it writes ``<run dir>/<name>/``: ``mask.png``, ``overlay.png``, ``kept_layers_<a>-<b>.png``
per stage, ``record.json`` (answer, FLOPs, latency); then ``predictions.jsonl`` (every record, last);
and it prints one line per image and the totals (the files:
docs/outputs.md, "predict: the files of one image").

The steps, each in its own module: the inputs (`cspexp.inference.inputs`), checked in full before
Hydra starts — a bad path, an empty glob or folder, an unreadable image, a bad queries line is one
error line and exit 2, with no run dir made — → the method bound to the model's shape, then the model
(`cspexp.run`) → per image one pass (`cspexp.inference.infer`) and its files
(`cspexp.inference.record`). ``image=``, ``query=``, ``queries=`` and ``out_dir=`` are taken verbatim
from the command line (free text needs no Hydra quoting); the rest are Hydra overrides of
conf/predict.yaml.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cspexp.utils.conf_dir import conf_dir
from cspexp.utils.failures import run_task, survive_closed_stdout

CONF_DIR = conf_dir()
#: keys whose command-line value is taken as it is (quoted for Hydra by `hydra_quote`)
VERBATIM = ("image", "query", "queries", "out_dir")


def hydra_quote(text: str) -> str:
    """`text` as a single-quoted Hydra override value that composes back to exactly `text`.

    Hydra unescapes backslashes only in runs that precede a quote (or end the string), and OmegaConf
    reads ``${`` as an interpolation unless it is escaped; everything else stands as it is."""
    text = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, text)
    return "'" + text.replace("'", "\\'").replace("${", "\\${") + "'"


def quote_verbatim(argv: list[str]) -> list[str]:
    """The command line with the values of `VERBATIM` keys quoted for Hydra."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        out.append(f"{key}={hydra_quote(value)}" if sep and key in VERBATIM else arg)
    return out


def compose_predict(overrides: list[str]) -> DictConfig:
    """conf/predict.yaml composed with `overrides` (for the checks before Hydra runs the task)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="predict", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def resolve_cfg_inputs(cfg: DictConfig, decode: bool):
    """The run's inputs (`cspexp.inference.inputs.resolve_inputs`), after the mode is checked."""
    from cspexp.inference.infer import mode_function
    from cspexp.inference.inputs import resolve_inputs

    mode_function(str(cfg.evaluate.mode))
    return resolve_inputs(cfg.image, cfg.query, cfg.queries, cfg.sentence, int(cfg.max_pixels), decode=decode)


def predict(cfg: DictConfig) -> list[dict]:
    """Run every input and write its files into ``cfg.paths.output_dir``; ``predictions.jsonl`` last.
    Returns the records."""
    import torch

    from cspexp.inference.infer import infer, mode_settings, pick_device
    from cspexp.inference.inputs import vocabulary
    from cspexp.inference.record import write_prediction
    from cspexp.models.loaders import model_shape
    from cspexp.outputs.files import write_jsonl_atomic
    from cspexp.run import bind_method, load_model, require_values
    from cspexp.utils.failures import tolerate_closed_stdout
    from cspexp.utils.instantiate import build

    require_values(cfg)
    out_dir = Path(cfg.paths.output_dir)
    inputs = resolve_cfg_inputs(cfg, decode=False)  # decoded once by the check before Hydra started
    torch.manual_seed(cfg.seed)
    spec = build(cfg.prune)
    shape = model_shape(cfg.model)
    method = bind_method(spec, shape) if shape is not None else None  # a bad schedule fails before the load
    device = pick_device(str(cfg.device))
    loaded, _ = load_model(cfg.model, vocabulary(inputs))
    loaded.model.to(device)
    method = method or bind_method(spec, loaded.shape)
    mode = str(cfg.evaluate.mode)
    records = []
    for k, inp in enumerate(inputs):
        item = inp.item(int(cfg.max_pixels))
        prediction = infer(loaded, method, item, mode, warmup=int(cfg.latency.warmup) if k == 0 else 0,
                           **mode_settings(mode, cfg))
        record = write_prediction(out_dir, inp, item["image"], prediction, loaded.name, method.describe())
        records.append(record)
        with tolerate_closed_stdout():
            print(summary_line(record))
    write_jsonl_atomic(out_dir / "predictions.jsonl", records)
    with tolerate_closed_stdout():
        print(totals_line(records, out_dir))
    return records


def summary_line(record: dict) -> str:
    """One line per image: where, what was asked, the mask's size, the FLOPs saved, the latency."""
    masks = record["masks"]
    mask = (f"mask {masks[0]['pixels']} px ({100 * masks[0]['fraction']:.1f} %)" if len(masks) == 1
            else f"{len(masks)} masks")
    reduction = record["flops"]["reduction_image"]
    return (f"{record['name']}  “{record['query']}”  {mask}  image-token FLOPs "
            f"{percent(reduction)}  {record['latency_ms']['end_to_end']:.1f} ms")


def totals_line(records: list[dict], out_dir: Path) -> str:
    """The totals: how many images, the method, the mean image-token FLOPs reduction and latency."""
    from cspexp.flops.analytic import summarize

    flops = summarize([r["flops"] for r in records])
    method = records[0]["method"]
    keep = f" keep {method['keep']}" if "keep" in method and method["name"] != "none" else ""
    latency = sum(r["latency_ms"]["end_to_end"] for r in records) / len(records)
    n = len(records)
    return (f"{n} image{'s' if n > 1 else ''} · {records[0]['model']} · {method['name']}{keep} · {records[0]['mode']} · "
            f"image-token FLOPs {percent(flops['reduction_image'])} · mean latency {latency:.1f} ms → {out_dir}")


def percent(reduction: float) -> str:
    """A FLOPs reduction as the change it is: 0.663 → "-66.3 %" (none: "+0.0 %")."""
    return f"{-100 * reduction + 0.0:+.1f} %"


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="predict")
def predict_main(cfg: DictConfig) -> None:
    run_task(cfg, predict)


def main() -> None:
    from cspexp.utils.errors import CspexpError
    from cspexp.utils.failures import fail
    from cspexp.utils.preflight import HYDRA_FLAGS, preflight

    survive_closed_stdout()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    sys.argv[1:] = quote_verbatim(sys.argv[1:])
    preflight(CONF_DIR, "predict", sys.argv[1:])
    if not any(a.split("=")[0] in HYDRA_FLAGS for a in sys.argv[1:]):
        # Every input is checked (and every image decoded) before Hydra makes the run dir: a bad one
        # is one line, and nothing is written.
        try:
            resolve_cfg_inputs(compose_predict([a for a in sys.argv[1:] if a not in ("-m", "--multirun")]), decode=True)
        except CspexpError as exc:
            fail(str(exc))
    predict_main()


if __name__ == "__main__":
    main()
