"""The experiments behind ``scripts/reproduce.py``: one registry, one entry point.

``paper`` holds the paper's experiments, ``compare`` the SAE users' comparison with the usual baselines,
``frontier`` the same at matched target L0s (``budgets`` its token budgets and their curve), ``patches`` the CIFAR-10 patch dictionaries against k-means. ``runs``
launches their training runs (``configs/experiment/*.yaml`` through the path of ``scripts/train.py``, each handed
back as the fit made it), ``rows`` holds the rows compare and frontier judge and their one evaluation, ``tables``
sums results up over seeds and writes them (JSON and markdown), ``plots`` draws. A new experiment is a function
``(Settings, Runs) -> Path`` registered in :data:`EXPERIMENTS` (as ``"module:function"`` of this package, imported
when the experiment runs: naming the experiments, as ``scripts/reproduce.py``'s argument check and the results
notebook do, imports neither Lightning nor the experiments) that writes through
:func:`~implicit_em.experiments.tables.write_results`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from pathlib import Path

from implicit_em.experiments.runs import Runs, Settings

#: experiment name -> its runner, ``"module:function"`` in this package; register a new experiment here
EXPERIMENTS: dict[str, str] = {
    "theorem": "paper:run_theorem",
    "ablation": "paper:run_ablation",
    "benchmark": "paper:run_benchmark",
    "components": "paper:run_components",
    "dynamics": "paper:run_dynamics",
    "compare": "compare:run_compare_experiment",
    "frontier": "frontier:run_frontier_experiment",
    "patches": "patches:run_patches_experiment",
}
#: the experiments ``all`` runs
PAPER = ("theorem", "ablation", "benchmark", "components", "dynamics")
DATASETS = ("mnist", "fashion_mnist", "digits", "cifar10", "synthetic", "activations")


def expand_experiments(names: Sequence[str]) -> list[str]:
    """The experiments to run, in the registry's order, ``all`` expanded to the paper's, duplicates dropped."""
    wanted = set(PAPER) | (set(names) - {"all"}) if "all" in names else set(names)
    return [e for e in EXPERIMENTS if e in wanted]


def runner(name: str) -> Callable[[Settings, Runs], Path]:
    """The function :data:`EXPERIMENTS` registers under ``name``, its module imported now."""
    module, function = EXPERIMENTS[name].split(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), function)


def reproduce(s: Settings, experiments: Sequence[str], log: Callable[[str], None] = print) -> list[Path]:
    """Run the named experiments (``all`` for the paper's); returns the JSON paths written."""
    runs = Runs(s, log)
    written = []
    for name in expand_experiments(experiments):
        path = runner(name)(s, runs)
        log(f"[{name}] wrote {path}")
        written.append(path)
    return written


__all__ = ["DATASETS", "EXPERIMENTS", "Runs", "Settings", "expand_experiments", "reproduce", "runner"]
