"""Sweep reports: the accuracy-versus-FLOPs Pareto frontier of many runs (pareto.py), its files
(write.py: pareto.csv, pareto.json, pareto.png, report.md), the W&B summary run (wandb_summary.py),
the Hydra callback that writes it at multirun end (callback.py), and per-sample pictures of which
image tokens a method kept (pictures.py)."""
