"""The config keys that no `_target_` declares — a primary config's own settings and the data
loader's keys of a dataset node — with their types and ranges, checked when the config is composed
(`check_settings`, with the checks of `cspexp.utils.choices`). Keys a `_target_` consumes are declared by its annotations
instead (pruning specs, model loaders, datasets, the Lightning Trainer)."""

from __future__ import annotations

from typing import Annotated, Literal, TypedDict

from cspexp.utils.choices import Fraction, NonNegativeInt, PositiveInt, Range, check_value

NonNegativeFloat = Annotated[float, Range(0.0)]


class Latency(TypedDict):
    warmup: NonNegativeInt


class FlopsSettings(TypedDict):
    report: bool


class Viz(TypedDict):
    n_samples: NonNegativeInt


class Objective(TypedDict):
    target_reduction: Fraction
    penalty: NonNegativeFloat


class Cache(TypedDict):
    model: bool
    features: bool | Literal["auto"]
    dir: str | None
    max_memory_gb: NonNegativeFloat
    points: bool


#: `evaluate.mode`: LISA's teacher-forced validation pass, or its chat path (generation with a pruned
#: KV cache, `cspexp.pruning.generate`).
EvalMode = Literal["teacher_forced", "generate"]


class EvaluateNode(TypedDict):
    mode: EvalMode


class GenerateNode(TypedDict):
    max_new_tokens: PositiveInt


class EvalSettings(TypedDict, total=False):
    """conf/eval.yaml (`python -m cspexp`)."""

    task_name: str
    seed: int
    print_table: bool
    latency: Latency
    flops: FlopsSettings
    compare_dense: bool | Literal["auto"]
    force: bool | None
    viz: Viz
    cache: Cache
    objective: Objective
    optimized_metrics: list[str] | None
    evaluate: EvaluateNode
    generate: GenerateNode


class Lora(TypedDict):
    r: NonNegativeInt
    alpha: NonNegativeFloat
    dropout: Fraction
    target_modules: list[str]
    train_also: list[str]


class Attend(TypedDict):
    layers: list[NonNegativeInt]
    head: NonNegativeInt


class LossWeights(TypedDict, total=False):
    """`train.loss`: each term's weight (the terms of `train.terms` read them by interpolation)."""

    ce: NonNegativeFloat
    bce: NonNegativeFloat
    dice: NonNegativeFloat
    lm: NonNegativeFloat
    point: NonNegativeFloat
    match: NonNegativeFloat
    describe: NonNegativeFloat
    recall: NonNegativeFloat
    attend: NonNegativeFloat


class TrainNode(TypedDict, total=False):
    batch_size: PositiveInt
    num_workers: NonNegativeInt
    lr: Annotated[float, Range(0.0)]
    weight_decay: NonNegativeFloat
    warmup_steps: NonNegativeInt
    text_only_steps: NonNegativeInt
    loss: LossWeights
    attend: Attend
    init_from: str | None
    resume: str | None
    save_dir: str
    lora: Lora


class TrainSettings(TypedDict, total=False):
    """conf/train.yaml (`python -m cspexp.train`)."""

    task_name: str
    seed: int
    train: TrainNode


class BenchShape(TypedDict, total=False):
    """conf/model_shape/*.yaml: the LLM the benchmark builds (random weights) and its prompt layout."""

    name: str
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt
    grid: list[PositiveInt]
    n_system: NonNegativeInt
    n_text: PositiveInt


class BenchGenerate(TypedDict, total=False):
    """conf/bench.yaml → generate (`mode=generate`); its `methods` are `_target_` nodes, checked as such."""

    max_new_tokens: PositiveInt


class BenchSettings(TypedDict, total=False):
    """conf/bench.yaml (`python -m cspexp.bench`)."""

    task_name: str
    device: str
    dtype: Literal["float32", "fp32", "bfloat16", "bf16", "float16", "fp16"]
    attn_implementation: Literal["sdpa", "eager"]
    batch_size: PositiveInt
    warmup: NonNegativeInt
    repeats: PositiveInt
    seed: int
    model_shape: BenchShape
    mode: Literal["prefill", "generate"]
    generate: BenchGenerate


class PromptSettings(TypedDict, total=False):
    """conf/prompt.yaml (`python -m cspexp.prompt`)."""

    sentence: bool
    answer: bool


#: `device` of predict and the demo
Device = Literal["auto", "cpu", "cuda"]


class PredictSettings(TypedDict, total=False):
    """conf/predict.yaml (`python -m cspexp.predict`)."""

    task_name: str
    seed: int
    image: str | None
    query: str | None
    queries: str | None
    sentence: bool | Literal["auto"]
    out_dir: str
    device: Device
    max_pixels: PositiveInt
    latency: Latency
    evaluate: EvaluateNode
    generate: GenerateNode


class DemoServer(TypedDict):
    host: str
    port: Annotated[int, Range(1, 65535)]
    share: bool
    examples: NonNegativeInt


class DemoSettings(TypedDict, total=False):
    """conf/demo.yaml (`python -m cspexp.demo`)."""

    seed: int
    sentence: bool | Literal["auto"]
    device: Device
    latency: Latency
    evaluate: EvaluateNode
    generate: GenerateNode
    demo: DemoServer


class LoaderSettings(TypedDict, total=False):
    """The DataLoader keys of a dataset node (`cspexp.data.LOADER_KEYS`)."""

    name: str | None
    batch_size: PositiveInt
    num_workers: NonNegativeInt


#: primary config name → (the schema of its own keys, the dataset nodes whose loader keys it has)
SETTINGS: dict[str, tuple[type, tuple[str, ...]]] = {
    "eval": (EvalSettings, ("dataset",)),
    "train": (TrainSettings, ("dataset", "train.data")),
    "bench": (BenchSettings, ()),
    "prompt": (PromptSettings, ("dataset",)),
    "predict": (PredictSettings, ()),
    "demo": (DemoSettings, ()),
}


def check_settings(cfg, config_name: str) -> None:
    """Check the keys of the composed `cfg` that no `_target_` declares (see `SETTINGS`); raise a
    one-line ConfigError naming the first bad key. A value that does not resolve before the app runs
    (``${hydra:…}``) is left out."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    schema, dataset_nodes = SETTINGS.get(config_name, (None, ()))

    def plain(node, keys) -> dict:
        """The values at `keys`, resolved leaf by leaf; a leaf that cannot be resolved yet (``???``,
        or ``${hydra:…}`` before the app runs) is left out, so the rest is still checked."""
        out = {}
        for key in keys:
            try:
                value = node[key]
            except Exception:  # noqa: BLE001 — missing or needs the running app: checked where it is used
                continue
            out[key] = plain(value, list(value.keys())) if isinstance(value, DictConfig) else \
                OmegaConf.to_container(value, resolve=True) if isinstance(value, ListConfig) else value
        return out

    if schema is not None:
        check_value(plain(cfg, [k for k in schema.__annotations__ if k in cfg]), schema, "")
    for path in dataset_nodes:
        node = OmegaConf.select(cfg, path)
        if isinstance(node, DictConfig):
            check_value(plain(node, [k for k in LoaderSettings.__annotations__ if k in node]), LoaderSettings, path)
