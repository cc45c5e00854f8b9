"""`python -m cspexp.bench`: does time follow FLOPs?

For one LLM shape (random weights; LISA's token layout: system prompt, a 16×16 block of image
tokens, the query text), the LLM prefill of the dense model and of each pruning variant is timed in
one process — variants interleaved inside every round, the order rotated between rounds, medians
over rounds — so that drift of the machine (turbo, other load) hits every variant alike. Reported
per variant: image-token FLOPs reduction, ideal speed-up (dense FLOPs / the variant's FLOPs,
overhead included), measured speed-up, and their ratio, the *efficiency*. Our dense loop is also
timed against transformers' own ``LlamaModel.forward`` on the same inputs: the cost of owning the
loop. Writes ``bench.json`` and ``bench.md`` to the run directory.
"""

from __future__ import annotations

import logging
import platform
import statistics
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from cspexp.flops.analytic import LlmDims, sample_flops
from cspexp.models.base import ModelShape, resolve_dtype
from cspexp.models.factory import llm_config
from cspexp.models.lisa import IMAGE, SYSTEM, TEXT, PromptEmbeds
from cspexp.outputs.files import write_json_atomic, write_text_atomic
from cspexp.outputs.results import git_info, versions
from cspexp.pruning.engine import DecoderLoop, TokenState
from cspexp.pruning.methods import NoPruning, PruningContext
from cspexp.run import bind_method
from cspexp.utils.conf_dir import conf_dir
from cspexp.utils.errors import ConfigError, CspexpError
from cspexp.utils.failures import run_task, survive_closed_stdout
from cspexp.utils.instantiate import build
from cspexp.utils.timing import Stopwatch

log = logging.getLogger("cspexp.bench")
CONF_DIR = conf_dir()

DENSE = "dense (ours)"
HF = "dense (transformers)"


def build_llm(shape: DictConfig, dtype: torch.dtype, device: str, attn: str):
    from transformers import LlamaModel

    cfg = llm_config(OmegaConf.to_container(shape), vocab_size=32, pad_token_id=0, attn_implementation=attn)
    bytes_needed = _param_count(cfg) * torch.finfo(dtype).bits // 8
    available = _available_bytes(device)
    if available is not None and bytes_needed > 0.9 * available:
        raise CspexpError(
            f"model_shape={shape.name} needs ~{bytes_needed / 2**30:.1f} GiB of weights in {dtype}, more than the "
            f"{available / 2**30:.1f} GiB available on {device}; use a smaller shape, dtype=bfloat16 or device=cuda"
        )
    with torch.device(device):
        model = LlamaModel(cfg).to(dtype).eval()
    return model


def _param_count(cfg) -> int:
    d, m, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return L * (2 * d * d + 2 * d * kv + 3 * d * m + 2 * d) + 32 * d + d


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info()
        return free
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info.get("MemAvailable")
    except OSError:
        return None


def lisa_layout(shape: DictConfig, batch_size: int, dtype, device, seed: int) -> PromptEmbeds:
    """Random embeddings laid out like LISA's prompt: system, image grid, text ending in "[SEG] . </s>"."""
    rows, cols = shape.grid
    n_img, n = rows * cols, shape.n_system + rows * cols + shape.n_text
    g = torch.Generator().manual_seed(seed)
    embeds = (torch.randn(batch_size, n, shape.hidden_size, generator=g) * 0.02).to(dtype=dtype, device=device)
    kind = torch.full((batch_size, n), TEXT, device=device)
    kind[:, : shape.n_system] = SYSTEM
    kind[:, shape.n_system : shape.n_system + n_img] = IMAGE
    grid = torch.full((batch_size, n), -1, device=device)
    grid[:, shape.n_system : shape.n_system + n_img] = torch.arange(n_img, device=device)
    seg = torch.full((batch_size,), n - 3, device=device)
    return PromptEmbeds(embeds=embeds, pos=torch.arange(n, device=device).expand(batch_size, n).clone(), kind=kind,
                        grid=grid, query_pos=seg - 1, seg_pos=seg)


def run_bench(cfg: DictConfig) -> dict:
    shape = cfg.model_shape
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA device is available; use device=cpu")
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ConfigError(f"repeats={cfg.repeats} must be ≥ 1 and warmup={cfg.warmup} ≥ 0")
    dtype = resolve_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    rows, cols = shape.grid
    n_image = rows * cols
    specs = {DENSE: NoPruning(), **{label: build(mcfg) for label, mcfg in cfg.methods.items()}}
    variants = {}
    for label, spec in specs.items():
        if spec.needs_images:
            raise ConfigError(f"methods.{label} (prune={spec.name}) reads the image (CLIP's attention or the pixels); "
                              "the benchmark feeds embeddings only")
        variants[label] = bind_method(spec, ModelShape(shape.num_hidden_layers, n_image))

    model = build_llm(shape, dtype, cfg.device, cfg.attn_implementation)
    prompt = lisa_layout(shape, cfg.batch_size, dtype, cfg.device, cfg.seed)
    loop = DecoderLoop(model)
    ctx = PruningContext(layers=model.layers, rotary_emb=model.rotary_emb, grid_size=(rows, cols))
    dims = LlmDims.from_config(model.config)

    def run_ours(method):
        return loop.run(TokenState.from_prompt(prompt, loop.num_layers), method, ctx)

    def run_hf():
        return model(inputs_embeds=prompt.embeds).last_hidden_state

    labels = [HF, *variants]
    times: dict[str, list[float]] = {k: [] for k in labels}
    flops: dict[str, dict] = {}
    with torch.inference_mode():
        for label, method in variants.items():  # FLOPs from each variant's own trace
            t = run_ours(method).trace
            flops[label] = sample_flops(t.tokens_per_layer[0].tolist(), t.image_per_layer[0].tolist(), n_image, dims,
                                        t.sample_overhead(0))
        for rnd in range(cfg.warmup + cfg.repeats):
            order = labels[rnd % len(labels):] + labels[: rnd % len(labels)]  # rotate: no fixed neighbour
            for label in order:
                watch = Stopwatch(cfg.device)
                with watch.section("t"):
                    run_hf() if label == HF else run_ours(variants[label])
                ms = watch.collect()["t"]
                if rnd >= cfg.warmup:
                    times[label].append(ms)
            log.info("round %d/%d done", rnd + 1, cfg.warmup + cfg.repeats)

    med = {k: statistics.median(v) for k, v in times.items()}
    dense_flops = flops[DENSE]["llm"]
    rows_out = []
    for label in variants:
        f = flops[label]
        ideal = dense_flops / (f["llm"] + f["overhead"])
        measured = med[DENSE] / med[label]
        rows_out.append({
            "variant": label,
            "method": variants[label].describe(),
            "image_flops_reduction": 1 - f["image"] / f["image_dense"],
            "llm_flops_reduction": 1 - f["llm"] / f["llm_dense"],
            "flops_llm": f["llm"],
            "flops_overhead": f["overhead"],
            "ideal_speedup": ideal,
            "measured_speedup": measured,
            "efficiency": measured / ideal,
            "median_ms": med[label],
            "times_ms": times[label],
        })
    return {
        "model_shape": OmegaConf.to_container(shape),
        "device": _device_name(cfg.device),
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "batch_size": cfg.batch_size,
        "tokens": {"n_image": n_image, "n_total": int(prompt.embeds.shape[1])},
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "flops_unit": "FLOPs",
        "transformers_ms": med[HF],
        "transformers_times_ms": times[HF],
        "loop_overhead_vs_transformers": med[DENSE] / med[HF] - 1,
        "variants": rows_out,
        "command": " ".join(["python -m cspexp.bench", *sys.argv[1:]]),
        "versions": versions(),
        "git": git_info(),
    }


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(result: dict) -> str:
    s = result["model_shape"]
    lines = [
        f"**{s['name']}** (d={s['hidden_size']}, m={s['intermediate_size']}, L={s['num_hidden_layers']}, "
        f"{result['tokens']['n_image']} image / {result['tokens']['n_total']} tokens) · {result['device']} · "
        f"{result['dtype']} · {result['attn_implementation']} · batch {result['batch_size']} · "
        f"median of {result['repeats']} interleaved rounds",
        "",
        "| variant | image-token FLOPs reduction | ideal speed-up | measured speed-up | efficiency | median ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["variants"]:
        lines.append(
            f"| {r['variant']} | {100 * r['image_flops_reduction']:.1f} % | {r['ideal_speedup']:.2f}× | "
            f"{r['measured_speedup']:.2f}× | {r['efficiency']:.2f} | {r['median_ms']:.1f} |"
        )
    lines += [
        f"| {HF} | — | — | — | — | {result['transformers_ms']:.1f} |",
        "",
        f"Our dense loop vs transformers' `LlamaModel.forward`: {100 * result['loop_overhead_vs_transformers']:+.1f} %.",
        "",
    ]
    return "\n".join(lines)


def bench_task(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    result = run_bench(cfg)
    write_json_atomic(out_dir / "bench.json", result)
    text = markdown(result)
    write_text_atomic(out_dir / "bench.md", text)
    print(text)
    log.info("written %s", out_dir / "bench.json")
    return result


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="bench")
def bench_main(cfg: DictConfig):
    run_task(cfg, bench_task)


def main() -> None:
    from cspexp.utils.preflight import preflight

    survive_closed_stdout()  # a closed stdout (`… | head`) does not fail a run that succeeds
    preflight(CONF_DIR, "bench", sys.argv[1:])
    bench_main()


if __name__ == "__main__":
    main()
