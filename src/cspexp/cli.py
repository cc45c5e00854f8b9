"""`python -m cspexp`: the Hydra entry point of evaluation (`cspexp.evaluate.evaluate`).

User errors end in one line on stderr and a non-zero exit, never a traceback:
- config composition (unknown key, unknown group option, a value outside its allowed set) is checked
  by `preflight` before Hydra starts, so the message can say what *is* allowed;
- bad values and missing paths raise `CspexpError` inside the run, which `cspexp.utils.failures`
  reports the same way, leaving an ``error.json`` (never a ``results.json``) in the run directory.
"""

from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from cspexp.utils.conf_dir import conf_dir
from cspexp.utils.errors import ConfigError
from cspexp.utils.failures import exit_status_of_sweep, run_task, survive_closed_stdout

CONF_DIR = conf_dir()


def objective_values(results: dict, paths) -> float | tuple[float, ...]:
    """The values a sweeper optimises: ``optimized_metrics`` are dotted paths into results.json
    (e.g. ``[metrics.giou, flops.image]`` for Optuna's two directions). One path gives a float."""
    values = []
    for path in paths:
        node = results
        for part in str(path).split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"optimized_metrics: {path!r} is not in results.json (e.g. metrics.giou, flops.image)")
            node = node[part]
        values.append(float(node))
    return values[0] if len(values) == 1 else tuple(values)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="eval")
def eval_main(cfg: DictConfig):
    from cspexp.evaluate import evaluate
    from cspexp.lit.distributed import process_rank
    from cspexp.outputs.table import print_summary

    def evaluate_and_score(cfg: DictConfig):
        results = evaluate(cfg)
        # What a sweeper optimises: gIoU, or the values named by `optimized_metrics` (Optuna's
        # multi-objective sweeper needs one value per direction). Inside run_task, so that a bad
        # path is reported like any other config error.
        metrics = cfg.get("optimized_metrics")
        return results, objective_values(results, metrics) if metrics else results["metrics"]["giou"]

    outcome = run_task(cfg, evaluate_and_score)
    if outcome is None:  # a failed multirun job, listed in the sweep's report
        return None
    results, score = outcome
    if cfg.get("print_table", True) and process_rank() == 0:  # trainer=ddp: once, not once per process
        print_summary(results)
    return score


def main() -> None:
    from cspexp.utils.preflight import preflight

    survive_closed_stdout()  # `python -m cspexp … | head`: a run that succeeds still exits 0
    # Lightning 2.6 on torch 2.13 warns about its own pytree use at every start; not actionable here.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")

    preflight(CONF_DIR, "eval", sys.argv[1:])
    eval_main()
    exit_status_of_sweep()


if __name__ == "__main__":
    main()
