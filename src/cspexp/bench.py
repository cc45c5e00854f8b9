"""`python -m cspexp.bench`: does time follow FLOPs?

For one LLM shape (random weights; LISA's token layout: system prompt, a 16×16 block of image
tokens, the query text), the LLM prefill of the dense model and of each pruning variant is timed in
one process — variants interleaved inside every round, the order rotated between rounds, medians
over rounds — so that drift of the machine (turbo, other load) hits every variant alike. Reported
per variant: image-token FLOPs reduction, ideal speed-up (dense FLOPs / the variant's FLOPs,
overhead included), measured speed-up, and their ratio, the *efficiency*. Our dense loop is also
timed against transformers' own ``LlamaModel.forward`` on the same inputs: the cost of owning the
loop. Writes ``bench.json`` and ``bench.md`` to the run directory.

``mode=generate``: the same shape prefilled with each variant of ``generate.methods`` into a KV cache
(`cspexp.pruning.generate`), then ``generate.max_new_tokens`` greedy tokens decoded on that cache
(random weights never say ``</s>``: every variant decodes them all); reported per variant: prefill and
decode medians, decode tokens/s, the KV cache in MiB and the ratios to dense; our dense prefill +
decoding is timed against transformers' ``LlamaForCausalLM.generate`` of as many tokens.
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


def build_llm(shape: DictConfig, dtype: torch.dtype, device: str, attn: str, causal: bool = False):
    """The shape's LlamaModel (random weights); `causal`: a LlamaForCausalLM (with its lm_head, for decoding)."""
    from transformers import LlamaForCausalLM, LlamaModel

    cfg = llm_config(OmegaConf.to_container(shape), vocab_size=32, pad_token_id=0, attn_implementation=attn)
    bytes_needed = _param_count(cfg) * torch.finfo(dtype).bits // 8
    available = _available_bytes(device)
    if available is not None and bytes_needed > 0.9 * available:
        raise CspexpError(
            f"model_shape={shape.name} needs ~{bytes_needed / 2**30:.1f} GiB of weights in {dtype}, more than the "
            f"{available / 2**30:.1f} GiB available on {device}; use a smaller shape, dtype=bfloat16 or device=cuda"
        )
    with torch.device(device):
        model = (LlamaForCausalLM if causal else LlamaModel)(cfg).to(dtype).eval()
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


def _setup(cfg: DictConfig, methods: DictConfig, key: str, generation: bool = False):
    """What both modes start from: the dtype (the seed set) and every variant, dense first, as a method
    bound to the shape. Refuses a CUDA device that is not there and methods the synthetic
    layout cannot feed, naming them under `key`."""
    shape = cfg.model_shape
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={cfg.device!r} but no CUDA device is available; use device=cpu")
    dtype = resolve_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    rows, cols = shape.grid
    specs = {DENSE: NoPruning(), **{label: build(mcfg) for label, mcfg in methods.items()}}
    variants = {}
    for label, spec in specs.items():
        if spec.needs_images:
            raise ConfigError(f"{key}.{label} (prune={spec.name}) reads the image (CLIP's attention or the pixels); "
                              "the benchmark feeds embeddings only")
        if generation and getattr(spec, "query", None) == "seg_token":
            raise ConfigError(f"{key}.{label}: query=seg_token needs [SEG] in the prompt, which a generation "
                              "prompt has none of; use seg or last")
        variants[label] = bind_method(spec, ModelShape(shape.num_hidden_layers, rows * cols))
    return dtype, variants


def run_bench(cfg: DictConfig) -> dict:
    shape = cfg.model_shape
    if cfg.repeats < 1 or cfg.warmup < 0:
        raise ConfigError(f"repeats={cfg.repeats} must be ≥ 1 and warmup={cfg.warmup} ≥ 0")
    dtype, variants = _setup(cfg, cfg.methods, "methods")
    rows, cols = shape.grid
    n_image = rows * cols

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


def run_generate_bench(cfg: DictConfig) -> dict:
    """``mode=generate`` (see the module docstring)."""
    from transformers import DynamicCache

    from cspexp.flops.analytic import decode_flops
    from cspexp.pruning.generate import CacheLayout, KVDecoder, greedy_decode, kv_bytes_per_token

    shape = cfg.model_shape
    gen = cfg.generate
    dtype, variants = _setup(cfg, gen.methods, "generate.methods", generation=True)
    rows, cols = shape.grid
    n_image = rows * cols
    steps = int(gen.max_new_tokens)

    model = build_llm(shape, dtype, cfg.device, cfg.attn_implementation, causal=True)
    decoder, lm_head = model.model, model.lm_head
    prompt = lisa_layout(shape, cfg.batch_size, dtype, cfg.device, cfg.seed)
    n = prompt.embeds.shape[1]
    # a generation prompt ends at "ASSISTANT:": its last token is the query and emits the first answer token
    last = torch.full_like(prompt.query_pos, n - 1)
    prompt = PromptEmbeds(embeds=prompt.embeds, pos=prompt.pos, kind=prompt.kind, grid=prompt.grid, query_pos=last,
                          seg_pos=last + 1)
    loop = DecoderLoop(decoder)
    ctx = PruningContext(layers=decoder.layers, rotary_emb=decoder.rotary_emb, grid_size=(rows, cols),
                         final_norm=decoder.norm)
    dims = LlmDims.from_config(model.config)
    per_token = kv_bytes_per_token(model.config, dtype)

    def run_ours(method):
        """(prefill ms, decode ms, the trace, cached tokens per layer) of one prefill + decoding."""
        watch = Stopwatch(cfg.device)
        cache, layout = DynamicCache(config=model.config), CacheLayout()
        with watch.section("prefill"):
            state = loop.run(TokenState.from_prompt(prompt, loop.num_layers), method, ctx, [layout], cache=cache)
            first = lm_head(state.hidden[:, -1]).argmax(-1)
        with watch.section("decode"):
            greedy_decode(KVDecoder(decoder, cache, layout), lm_head, state.hidden[:, -1], first, steps, None)
        ms = watch.collect()
        return ms["prefill"], ms["decode"], state.trace, [layer.keys.shape[-2] for layer in cache.layers]

    def run_hf():
        return model.generate(inputs_embeds=prompt.embeds, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              num_beams=1, eos_token_id=None, pad_token_id=0)

    labels = [HF, *variants]
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in labels}
    facts: dict[str, dict] = {}
    with torch.inference_mode():
        for label, method in variants.items():  # FLOPs and cache sizes from each variant's own run
            _, _, trace, cached = run_ours(method)
            tokens = trace.tokens_per_layer[0].tolist()
            flops = sample_flops(tokens, trace.image_per_layer[0].tolist(), n_image, dims, trace.sample_overhead(0))
            facts[label] = {"flops": flops, "cached": cached, "tokens": tokens,
                            "decode_flops": decode_flops(tokens, steps - 1, dims, model.config.vocab_size)}
        for rnd in range(cfg.warmup + cfg.repeats):
            order = labels[rnd % len(labels):] + labels[: rnd % len(labels)]  # rotate: no fixed neighbour
            for label in order:
                if label == HF:
                    watch = Stopwatch(cfg.device)
                    with watch.section("t"):
                        run_hf()
                    sample = (watch.collect()["t"], 0.0)
                else:
                    sample = run_ours(variants[label])[:2]
                if rnd >= cfg.warmup:
                    times[label].append(sample)
            log.info("round %d/%d done", rnd + 1, cfg.warmup + cfg.repeats)

    def median(label, k):
        return statistics.median(t[k] for t in times[label])

    dense_kv = sum(facts[DENSE]["cached"]) * per_token * cfg.batch_size / 2**20
    decoded = (steps - 1) * cfg.batch_size  # the first token comes from the prefill
    rows_out = []
    for label in variants:
        f = facts[label]
        kv = sum(f["cached"]) * per_token * cfg.batch_size / 2**20
        prefill_ms, decode_ms = median(label, 0), median(label, 1)
        rows_out.append({
            "variant": label,
            "method": variants[label].describe(),
            "image_flops_reduction": 1 - f["flops"]["image"] / f["flops"]["image_dense"],
            "cached_tokens_per_layer": f["cached"],
            "kv_cache_mb": kv,
            "kv_cache_reduction": 1 - kv / dense_kv,
            "prefill_median_ms": prefill_ms,
            "decode_median_ms": decode_ms,
            "decode_tokens_per_s": decoded / (decode_ms / 1000.0) if decode_ms > 0 else None,
            "decode_speedup": median(DENSE, 1) / decode_ms if decode_ms > 0 else None,
            "prefill_speedup": median(DENSE, 0) / prefill_ms,
            "flops_decode_per_token": f["decode_flops"],
            "ideal_decode_speedup": facts[DENSE]["decode_flops"] / f["decode_flops"] if f["decode_flops"] else None,
            "times_ms": [list(t) for t in times[label]],
        })
    ours_total = median(DENSE, 0) + median(DENSE, 1)
    hf_total = statistics.median(t[0] for t in times[HF])
    return {
        "mode": "generate",
        "model_shape": OmegaConf.to_container(shape),
        "device": _device_name(cfg.device),
        "dtype": cfg.dtype,
        "attn_implementation": cfg.attn_implementation,
        "batch_size": cfg.batch_size,
        "tokens": {"n_image": n_image, "n_total": int(n)},
        "max_new_tokens": steps,
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
        "flops_unit": "FLOPs",
        "transformers_generate_ms": hf_total,
        "transformers_generate_times_ms": [t[0] for t in times[HF]],
        "loop_overhead_vs_transformers_generate": ours_total / hf_total - 1,
        "variants": rows_out,
        "command": " ".join(["python -m cspexp.bench", *sys.argv[1:]]),
        "versions": versions(),
        "git": git_info(),
    }


def markdown_generate(result: dict) -> str:
    s = result["model_shape"]
    lines = [
        f"**{s['name']}** (d={s['hidden_size']}, m={s['intermediate_size']}, L={s['num_hidden_layers']}, "
        f"{result['tokens']['n_image']} image / {result['tokens']['n_total']} prompt tokens, "
        f"{result['max_new_tokens']} generated) · {result['device']} · {result['dtype']} · "
        f"{result['attn_implementation']} · batch {result['batch_size']} · median of {result['repeats']} interleaved rounds",
        "",
        "| variant | image-token FLOPs red. (prefill) | KV cache MiB | KV cache red. | prefill ms | prefill speed-up "
        "| decode tok/s | decode speed-up | ideal decode speed-up (FLOPs) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    def f(x, spec):  # max_new_tokens=1 decodes nothing: no rate, no speed-up
        return "—" if x is None else format(x, spec)

    for r in result["variants"]:
        lines.append(
            f"| {r['variant']} | {100 * r['image_flops_reduction']:.1f} % | {r['kv_cache_mb']:.1f} | "
            f"{100 * r['kv_cache_reduction']:.1f} % | {r['prefill_median_ms']:.1f} | {r['prefill_speedup']:.2f}× | "
            f"{f(r['decode_tokens_per_s'], '.1f')} | {f(r['decode_speedup'], '.2f')}× | "
            f"{f(r['ideal_decode_speedup'], '.2f')}× |"
        )
    lines += [
        "",
        f"Our dense prefill + decoding vs transformers' `generate` of as many tokens: "
        f"{100 * result['loop_overhead_vs_transformers_generate']:+.1f} % "
        f"({result['transformers_generate_ms']:.1f} ms for transformers).",
        "",
    ]
    return "\n".join(lines)


def bench_task(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    generating = cfg.get("mode", "prefill") == "generate"
    result = run_generate_bench(cfg) if generating else run_bench(cfg)
    write_json_atomic(out_dir / "bench.json", result)
    text = markdown_generate(result) if generating else markdown(result)
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
