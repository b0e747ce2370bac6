"""Sweeps: Optuna studies over ``scripts/train.py``'s settings (``scripts/sweep.py``; docs/sweep.md).

space.py: the space file; storage.py: where a study lives (SQLite, a database URL, a journal file) with
heartbeats; trial.py: one trial, an ordinary run scored on the validation split; pruning.py: the per-epoch
validation number Optuna's pruner sees; study.py: the study and its workers; summary.py: the table, plots and
the best trial's command; cli.py: the command line.
"""
