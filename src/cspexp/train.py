"""`python -m cspexp.train`: train or fine-tune a LisaModel in Lightning (config `conf/train.yaml`).

    python -m cspexp.train experiment=train_tiny_lisa                  # the embedded model's recipe
    python -m cspexp.train model=converted model.path=<dir> prune=csp prune.keep=0.1 train.init_from=<dir or ckpt>

Seeded; checkpoints (best val gIoU and last) in ``<run>/checkpoints``; ``train.resume=<ckpt>``
continues a run; W&B (offline by default) and CSV logs; the final weights are written as a cspexp
model directory (``train.save_dir``) that ``model=converted model.path=…`` evaluates. With a
pruning method configured, training *and* validation run under that schedule.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from cspexp.lit.losses import build_terms
from cspexp.lit.train_module import TrainModule
from cspexp.models.lora import apply_lora, merge_lora
from cspexp.models.saved import read_config, save_model
from cspexp.outputs.files import write_json_atomic
from cspexp.run import build_logger, build_run
from cspexp.utils.conf_dir import conf_dir
from cspexp.utils.errors import ConfigError, MissingPathError, require
from cspexp.utils.failures import run_task, survive_closed_stdout
from cspexp.utils.instantiate import build

log = logging.getLogger("cspexp.train")
CONF_DIR = conf_dir()


def load_initial_weights(model, path: str) -> None:
    """Weights from a cspexp model directory or a Lightning checkpoint of `TrainModule` (strict)."""
    p = Path(path)
    if p.is_dir():
        from safetensors.torch import load_file

        read_config(p)
        state = load_file(str(p / "model.safetensors"))
    elif p.is_file():
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
        state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    else:
        raise MissingPathError(f"train.init_from={path!r} does not exist")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ConfigError(f"train.init_from={path!r} does not fit the model: missing {missing[:10]}, "
                          f"unexpected {unexpected[:10]}")


def train(cfg: DictConfig) -> dict:
    out_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    def check_data(datasets: dict) -> None:
        asked = cfg.train.data.get("n")
        # Evaluation reads dataset.n as "at most n"; for training a silently smaller set is a wrong recipe.
        require(asked is None or len(datasets["train"]) >= int(asked),
                f"train.data.n={asked} is more than the {cfg.train.data.get('split', 'train')} split holds "
                f"({len(datasets['train'])} items); lower it, or enlarge the split (shapes: train.data.split_sizes)")
        limit = cfg.trainer.get("limit_val_batches")
        # The run reports val gIoU / cIoU and keeps the best checkpoint by it: refuse before anything is written.
        require(limit is None or float(limit) > 0,
                f"trainer.limit_val_batches={limit} turns validation off, but training reports val gIoU/cIoU and keeps "
                "the best checkpoint by it; validate on fewer samples with dataset.n=N instead")

    # The loss terms before anything slow: a bad weight is one error line before data, model and logs
    # (terms hold no parameters until TrainModule sets them up after the model, so the RNG is untouched).
    terms = build_terms(cfg.train.terms)
    run = build_run(cfg, datasets={"train": cfg.train.data, "val": cfg.dataset}, vocabulary_from="train",
                    check_data=check_data)
    method, loaded = run.method, run.loaded
    train_data, val_data = run.datasets["train"], run.datasets["val"]
    if cfg.train.resume and not Path(cfg.train.resume).is_file():
        raise MissingPathError(f"train.resume={cfg.train.resume!r} does not exist")
    if cfg.train.init_from:
        load_initial_weights(loaded.model, cfg.train.init_from)
    lora = cfg.train.lora
    if lora.r > 0:
        apply_lora(loaded.model, r=lora.r, alpha=lora.alpha, dropout=lora.dropout,
                   target_modules=list(lora.target_modules), train_also=list(lora.train_also))

    collate = loaded.processor.collate
    # Workers (train.num_workers > 0) are kept across epochs: respawning them costs seconds each time.
    train_loader = DataLoader(train_data, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate,
                              num_workers=cfg.train.num_workers, persistent_workers=cfg.train.num_workers > 0,
                              generator=torch.Generator().manual_seed(cfg.seed))
    val_loader = DataLoader(val_data, batch_size=cfg.dataset.batch_size, shuffle=False, collate_fn=collate,
                            num_workers=cfg.dataset.num_workers)
    loggers = [CSVLogger(save_dir=str(out_dir), name="csv", version="", flush_logs_every_n_steps=cfg.trainer.log_every_n_steps)]
    wandb_logger = build_logger(cfg)
    if wandb_logger is not None:
        loggers.append(wandb_logger)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    checkpoint = ModelCheckpoint(dirpath=str(out_dir / "checkpoints"), filename="best-{step}", monitor="val/giou",
                                 mode="max", save_top_k=1, save_last=True)
    trainer = build(cfg.trainer, logger=loggers, callbacks=[checkpoint, LearningRateMonitor("step")])
    module = TrainModule.from_config(loaded.model, method, cfg.train, terms)
    loaded.model.train()  # builders return eval mode; Lightning keeps the mode it finds
    started = time.perf_counter()
    trainer.fit(module, train_loader, val_loader, ckpt_path=cfg.train.resume)
    minutes = (time.perf_counter() - started) / 60

    if lora.r > 0:
        merge_lora(loaded.model)
    loaded.model.eval()
    save_model(loaded, cfg.train.save_dir)
    final = trainer.validate(module, val_loader, verbose=False)[0]
    results = {
        "model": loaded.name,
        "method": method.describe(),
        "val": {"giou": final["val/giou"], "ciou": final["val/ciou"], "n": len(val_data)},
        "steps": trainer.global_step,
        "minutes": minutes,
        "model_dir": str(cfg.train.save_dir),
        "best_checkpoint": checkpoint.best_model_path,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    write_json_atomic(out_dir / "train_results.json", results)
    log.info("val gIoU %.4f cIoU %.4f after %d steps (%.1f min); model in %s", results["val"]["giou"],
             results["val"]["ciou"], results["steps"], minutes, cfg.train.save_dir)
    return results


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def train_main(cfg: DictConfig):
    return run_task(cfg, train)["val"]["giou"]


def main() -> None:
    from cspexp.utils.preflight import preflight

    survive_closed_stdout()  # a closed stdout (`… | head`) does not fail a run that succeeds
    preflight(CONF_DIR, "train", sys.argv[1:])
    train_main()


if __name__ == "__main__":
    main()
