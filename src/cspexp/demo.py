"""`python -m cspexp.demo`: an interactive page that segments an image dense and under a pruning
method, side by side (Gradio; ``pip install -e ".[demo]"``).

    python -m cspexp.demo [model=…] [prune=…] [demo.port=7860] [demo.host=127.0.0.1] [demo.share=false]

The user picks an image (an upload, or a `shapes` example), a query, a method (every prune/ option)
and a keep ratio; the page shows the mask overlays of the dense model and of the method, the kept
image tokens of every stage of the method's pass, and the image-token FLOPs and latency of both. The
model is loaded once, when the demo starts; each request is `cspexp.inference.infer.infer`, the pass
`python -m cspexp.predict` runs, once dense and once under the method. It serves on 127.0.0.1 only
unless ``demo.host`` says otherwise, and opens no public link unless ``demo.share=true``.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from cspexp.utils.conf_dir import conf_dir
from cspexp.utils.errors import CspexpError
from cspexp.utils.failures import fail, survive_closed_stdout

log = logging.getLogger(__name__)

CONF_DIR = conf_dir()
USAGE = __doc__.split("\n\n")[1].strip()
API_NAME = "segment"  # the endpoint a client calls: /segment


def compose_demo(overrides: list[str]) -> tuple[DictConfig, dict[str, DictConfig]]:
    """conf/demo.yaml composed with `overrides`, and every prune/ option's node: at its defaults, except
    the option the command line chose, which keeps its ``prune.…`` settings."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="demo", overrides=overrides)
            options = GlobalHydra.instance().config_loader().get_group_options("prune")
            chosen = cfg.prune
            others = [o for o in overrides if not o.startswith("prune")]
            nodes = {}
            for name in options:
                try:
                    nodes[name] = compose(config_name="demo", overrides=[*others, f"prune={name}"]).prune
                except Exception as exc:  # noqa: BLE001 — one option that does not compose must not stop the demo
                    log.warning("prune=%s is left out of the demo: its config does not compose (%s)", name,
                                str(exc).splitlines()[0])
    finally:
        GlobalHydra.instance().clear()
    nodes[method_option(cfg, nodes)] = chosen
    return cfg, nodes


def method_option(cfg: DictConfig, nodes: dict[str, DictConfig]) -> str:
    """The prune/ option the composed config selected (the one with its `_target_`)."""
    target = cfg.prune.get("_target_")
    return next((name for name, node in nodes.items() if node.get("_target_") == target), next(iter(nodes)))


def human_flops(x: float) -> str:
    for unit, scale in (("TFLOPs", 1e12), ("GFLOPs", 1e9), ("MFLOPs", 1e6)):
        if abs(x) >= scale:
            return f"{x / scale:.3g} {unit}"
    return f"{x:.3g} FLOPs"


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def compare_table(dense, pruned, label: str) -> str:
    """The Markdown table under the pictures: dense and pruned, FLOPs, tokens and latency."""
    fd, fp = dense.flops, pruned.flops
    rd, rp = dense.latency_ms, pruned.latency_ms
    n_layers = len(pruned.image_per_layer)
    avg_d = sum(dense.image_per_layer) / n_layers
    avg_p = sum(pruned.image_per_layer) / n_layers
    md, mp = dense.mask.numpy(), pruned.mask.numpy()
    rows = [
        ("image-token FLOPs (LLM prefill)", human_flops(fd["image"]),
         f"{human_flops(fp['image'])} (**{-100 * fp['reduction_image']:+.1f} %**)"),
        ("LLM prefill FLOPs", human_flops(fd["llm"]), f"{human_flops(fp['llm'])} ({-100 * fp['reduction_llm']:+.1f} %)"),
        ("method's own work", "—", human_flops(fp["overhead"])),
        ("image tokens per layer (mean)", f"{avg_d:.1f}", f"{avg_p:.1f}"),
        ("latency, LLM prefill", f"{rd['llm_prefill']:.1f} ms", f"{rp['llm_prefill']:.1f} ms"),
        ("latency, end to end", f"{rd['end_to_end']:.1f} ms", f"**{rp['end_to_end']:.1f} ms**"),
        ("mask", f"{int(md.sum())} px", f"{int(mp.sum())} px (IoU with dense {mask_iou(md, mp):.2f})"),
    ]
    if "decode" in rp:  # generate: the answer's tokens after the prefill
        rows.insert(5, ("latency, decoding", f"{rd['decode']:.1f} ms", f"{rp['decode']:.1f} ms"))
    if pruned.answer_source == "generated":
        rows.append(("answer (generated)", _cell(dense.answer), _cell(pruned.answer)))
        note = "Answers written by the model (evaluate.mode=generate)"
    else:
        note = f"Answer `{pruned.answer}` in the prompt (teacher-forced)"
    lines = [f"| | dense | {label} |", "|---|---:|---:|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + f"\n\n{note}; FLOPs from the token trace (`cspexp.flops.analytic`), " \
                              "latency of one timed pass."


def _cell(text: str) -> str:
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


class DemoApp:
    """The loaded model and the methods a request can choose; `segment` serves one request."""

    def __init__(self, cfg: DictConfig, nodes: dict[str, DictConfig]) -> None:
        from cspexp.data.shapes import ShapesDataset
        from cspexp.inference.infer import mode_function, mode_settings, pick_device
        from cspexp.models.loaders import model_shape
        from cspexp.pruning.methods import NoPruning
        from cspexp.run import bind_method, load_model
        from cspexp.utils.instantiate import build

        self.mode = str(cfg.evaluate.mode)
        mode_function(self.mode)
        self.settings = mode_settings(self.mode, cfg)
        self.sentence = cfg.sentence
        self.nodes = nodes
        self.default_method = method_option(cfg, nodes)
        shape = model_shape(cfg.model)
        if shape is not None:  # the configured method's schedule checked before the model loads
            bind_method(build(cfg.prune), shape)
        device = pick_device(str(cfg.device))
        # The tiny models' word-level tokenizers are built over the shapes task's words, its examples'.
        self.loaded, _ = load_model(cfg.model, ShapesDataset.vocabulary())
        self.loaded.model.to(device)
        self.dense = NoPruning().bind(*self.loaded.shape)
        self.default_keep = float(cfg.prune.get("keep", 1.0))

    def method(self, name: str, keep: float):
        """The prune/ option `name` with ``keep``, bound to the model (ConfigError for a bad setting)."""
        from cspexp.run import bind_method
        from cspexp.utils.errors import ConfigError
        from cspexp.utils.instantiate import build

        if name not in self.nodes:
            raise ConfigError(f"method {name!r} is not a prune/ option; choose one of {sorted(self.nodes)}")
        node = OmegaConf.merge(self.nodes[name], {"keep": float(keep)})
        return bind_method(build(node), self.loaded.shape)

    def warm_up(self, item: dict, warmup: int) -> None:
        from cspexp.inference.infer import infer

        if warmup > 0:
            infer(self.loaded, self.dense, item, self.mode, warmup=warmup - 1, **self.settings)

    def segment(self, image, query: str, method_name: str, keep: float):
        """One request: (dense overlay, pruned overlay, kept-token stages, the table, the pruned mask)."""
        import gradio as gr
        from PIL import Image

        from cspexp.inference.infer import infer
        from cspexp.inference.inputs import as_item, is_sentence_of
        from cspexp.inference.record import overlay_lines
        from cspexp.report.overlay import draw_overlay, mask_png
        from cspexp.report.pictures import render_stages

        if image is None:
            raise gr.Error("Choose an image: upload one or click an example.")
        query = (query or "").strip()
        if not query:
            raise gr.Error("Type a query, e.g. “the red circle”.")
        image = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., :3])
        try:
            method = self.method(method_name, keep)
            item = as_item(image, query, is_sentence_of(query, self.sentence))
            dense = infer(self.loaded, self.dense, item, self.mode, **self.settings)
            pruned = infer(self.loaded, method, item, self.mode, **self.settings)
        except CspexpError as exc:
            raise gr.Error(str(exc)) from None
        label = method_label(method)
        overlays = [draw_overlay(image, [m.numpy() for m in p.masks], [*overlay_lines(query, p), title])
                    for p, title in ((dense, "dense"), (pruned, label))]
        stages_png = render_stages(image, pruned.stages, pruned.grid, pruned.merges,
                                   title=f"{label}: the image tokens each stage of the "
                                         f"{len(pruned.kept)}-layer LLM sees")
        return (overlays[0], overlays[1], Image.open(io.BytesIO(stages_png)), compare_table(dense, pruned, label),
                mask_png(pruned.mask.numpy()))


def method_label(method) -> str:
    info = method.describe()
    return info["name"] if info["name"] == "none" or "keep" not in info else f"{info['name']}, keep {info['keep']:g}"


def write_examples(folder: Path, n: int) -> list[list]:
    """The first `n` shapes val items as PNG files in `folder`, as Gradio examples [image path, query]."""
    from PIL import Image

    from cspexp.data.shapes import ShapesDataset

    out = []
    for item in (ShapesDataset(split="val", n=n)[i] for i in range(n)):
        path = folder / f"shapes_val_{item['idx']}.png"
        Image.fromarray(item["image"]).save(path)
        out.append([str(path), item["query"]])
    return out


def build_blocks(app: DemoApp, examples: list[list]):
    """The page (Gradio Blocks): inputs on the left; dense and pruned overlays, the kept-token stages,
    the FLOPs and latency table and the mask on the right."""
    import gradio as gr

    name = app.loaded.name
    with gr.Blocks(title=f"cspexp demo · {name}", analytics_enabled=False) as blocks:
        gr.Markdown(f"## cspexp · visual-token pruning inside a LISA model\nModel **{name}** "
                    f"({app.loaded.model.num_layers} LLM layers, {app.loaded.model.n_image_tokens} image tokens), "
                    f"{app.mode.replace('_', '-')} [SEG] pass. Pick an image, a query, a method and how many "
                    "image tokens it keeps; the dense model runs next to it.")
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                image = gr.Image(type="numpy", label="Image", sources=["upload", "clipboard"], height=260)
                query = gr.Textbox(label="Query", placeholder="the red circle / Which shape could roll down a hill?")
                method = gr.Dropdown(choices=sorted(app.nodes), value=app.default_method, label="Method (prune=)")
                keep = gr.Slider(0.01, 1.0, value=app.default_keep, step=0.01, label="Keep ratio (prune.keep)")
                run = gr.Button("Segment", variant="primary")
                if examples:
                    gr.Examples(examples=examples, inputs=[image, query], label="shapes examples")
            with gr.Column(scale=2):
                # no labels over these three: each picture carries its own title, which a label would cover
                with gr.Row():
                    dense_overlay = gr.Image(label="dense (prune=none)", show_label=False, type="pil", format="png",
                                             interactive=False)
                    pruned_overlay = gr.Image(label="pruned", show_label=False, type="pil", format="png",
                                              interactive=False)
                stages = gr.Image(label="kept image tokens per stage (pruned)", show_label=False, type="pil",
                                  format="png", interactive=False)
                table = gr.Markdown()
                mask = gr.Image(label="mask (pruned): 255 target, 0 background", type="pil", format="png",
                                image_mode="L", interactive=False, height=160)
        run.click(app.segment, inputs=[image, query, method, keep],
                  outputs=[dense_overlay, pruned_overlay, stages, table, mask], api_name=API_NAME)
    return blocks


def main(argv: list[str] | None = None) -> None:
    from cspexp.inference.inputs import as_item
    from cspexp.utils.preflight import preflight

    survive_closed_stdout()
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        return
    preflight(CONF_DIR, "demo", argv)
    cfg, nodes = compose_demo(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail('the demo needs Gradio: pip install -e ".[demo]" (or pip install "gradio>=6,<7")')
    try:
        app = DemoApp(cfg, nodes)
    except CspexpError as exc:
        fail(str(exc))
    host, port = str(cfg.demo.host), int(cfg.demo.port)
    with tempfile.TemporaryDirectory(prefix="cspexp-demo-") as folder:
        examples = write_examples(Path(folder), int(cfg.demo.examples))
        if examples:
            from PIL import Image

            first = np.asarray(Image.open(examples[0][0]).convert("RGB"))
            app.warm_up(as_item(first, examples[0][1], False), int(cfg.latency.warmup))
        blocks = build_blocks(app, examples)
        try:
            _, local_url, share_url = blocks.launch(server_name=host, server_port=port, share=bool(cfg.demo.share),
                                                    allowed_paths=[folder], ssr_mode=False, show_error=True,
                                                    quiet=True, prevent_thread_lock=True)
        except OSError as exc:
            fail(f"demo.port={port} cannot be served on {host} ({exc}); choose a free port with demo.port=…")
        print(f"cspexp demo: {app.loaded.name} on {local_url}" + (f" and {share_url}" if share_url else "")
              + " (Ctrl+C stops it)", flush=True)
        try:
            blocks.block_thread()  # until Ctrl+C or SIGTERM
        finally:
            blocks.close()


if __name__ == "__main__":
    main()
