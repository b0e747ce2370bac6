"""The sparsity frontier SAE users read: every model at the same target L0s, judged one way on the same data.

``reproduce.py --experiment frontier --data activations --l0 16 32 64 128`` trains, at each target L0 k:

- ``implicit_em``: the sparse decoder-free model with ``--model.k k`` (``configs/model/implicit_em_sparse.yaml``);
- ``topk_sae``: the TopK SAE with k (``configs/model/topk_sae.yaml``);
- ``batchtopk_sae``: the BatchTopK SAE with the AuxK loss, k on average (``configs/model/batchtopk_sae.yaml``);
- ``sparsify_peer`` (a harvest only): sparsify's SparseCoder with K and k, trained by sparsify's own Trainer on
  the rows the trained rows saw at k, in their order (:func:`implicit_em.lm.peers.train_peer`), judged like a
  saved SAE through its own decoder, its optimiser and learning rate (``peer.json``) in its row;
- ``random_encoder``: this model's net with the same k, untrained (seeded init and data-aware start) -- a random
  frozen encoder with TopK, its readout fitted like ours;

and once, as reference points: ``kmeans`` (one-hot assignments, L0 = 1) and ``pca`` (dense projections); with
``--sae DIR ...``, each saved SAE (SAELens, sparsify, ``scripts/export.py``) as a frozen row named after its folder,
at the target L0 of its k, judged through its own decoder on raw activations.
Same data, width K, training tokens (epochs or ``--tokens``, batch; the header's ``tokens_trained``: the rows of
the optimiser steps a trained row took) and evaluation for every row:
the one evaluation of :mod:`implicit_em.experiments.rows` (ridge readout FVU, ``fvu_decoder`` through a row's own
decoder, L0, dead fraction, k-sparse probing, the full linear probe ``probe_accuracy``, CE loss recovered and KL,
with their intervals where measured, where the data is a causal LM's harvest: ``--lm-tokens`` predicted tokens,
20,480 by default, or ``--lm-windows`` windows; a trained row's are its fit's own
end-of-run numbers), plus ``sparse_probe_mean`` (mean of k-sparse probing at k = 1, 2, 5), ``n_parameters``,
``parameters_code`` (the encoder alone) and ``parameters_reconstruction`` (what CE and FVU need: the encoder and
its decoder, or the ridge readout), ``train_seconds`` (the run's epochs), ``eval_seconds`` (its
evaluation) and ``fit_seconds`` (its whole ``scripts/train.py`` path), ``train_curve`` ([step, training loss] as
logged) and ``train_curve_change`` (its relative change over the last fifth of the steps: whether the SAEs
converged). ``rows`` keeps a subset of the rows (the random encoder needs this model's settings); ``split``
``val`` scores every row on the validation split (and the causal LM's splice on its documents), for choosing
settings without touching the test split. Writes ``<out>/<data>/frontier.json`` (``rows``: mean and ``_std`` over
seeds, each seed's row under ``per_seed``), ``frontier.md`` and one PNG per metric against L0
(``frontier_<metric>.png``) and the SAEs' training curves (``frontier_train_curve.png``); ``reproduce.py --wandb``
logs the table and the PNGs to W&B as well (offline by itself).

``--tokens N [N ...]`` trains by token budget instead of epochs (:mod:`implicit_em.experiments.budgets`: one
frontier per budget in ``<out>/<data>/tokens_<N>/`` and their curve in ``<out>/<data>/frontier_tokens.json``
when there are several). A run goes on row by row: each trained row, the peer and the random encoder keep their
row in ``row.json`` beside their run, taken as it is by a rerun with the same arguments, and a trained row
interrupted mid-run resumes from its newest checkpoint (:func:`frontier_seed`).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from implicit_em.errors import ConfigError
from implicit_em.experiments.budgets import Length, training_length, write_curve
from implicit_em.experiments.plots import draw_against_l0, draw_curves, panels
from implicit_em.experiments.rows import (
    ROW_FILE,
    Data,
    Row,
    evaluate_row,
    fitted_numbers,
    kmeans_row,
    load_saes,
    module_parameters,
    module_row,
    parameter_counts,
    pca_row,
    random_encoder,
    sae_keys,
    sae_row,
    save_row,
    saved_row,
    tokens_trained,
    train_args,
    trained_on,
    training_epoch,
)
from implicit_em.experiments.tables import format_cell, markdown_table, summarize, write_results
from implicit_em.run.rundir import RunDir

#: the target L0s when none are given
DEFAULT_L0S = (16, 32, 64, 128)
#: the models trained at every target L0 (row name, config in configs/model/)
TRAINED = (("implicit_em", "implicit_em_sparse"), ("topk_sae", "topk_sae"), ("batchtopk_sae", "batchtopk_sae"))
#: the names of the trained rows
TRAINED_ROWS = tuple(name for name, _ in TRAINED)
#: every row the frontier can hold, in its order
ROWS = (*TRAINED_ROWS, "sparsify_peer", "random_encoder", "kmeans", "pca")
#: the k of k-sparse probing that ``sparse_probe_mean`` averages
PROBE_MEAN_KS = ("1", "2", "5")
#: metric -> (axis label, whether lower is better), one PNG each
PLOTTED = {
    "fvu": ("FVU (ridge readout, test)", True),
    "fvu_decoder": ("FVU (own decoder, test)", True),
    "dead_fraction": ("dead fraction", True),
    "sparse_probe_mean": ("k-sparse probing, mean of k = 1, 2, 5", False),
    "ce_loss_recovered": ("CE loss recovered", False),
    "kl_div": ("KL (spliced vs clean)", True),
    "train_seconds": ("training seconds", True),
}


def probe_mean(scores: dict | None) -> float | None:
    """The mean of k-sparse probing at k = 1, 2, 5 (None when any is missing or not finite)."""
    values = [(scores or {}).get(k) for k in PROBE_MEAN_KS]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        return None
    return sum(values) / len(values)


def training_curve(run_dir: str | Path, key: str = "train/loss_step") -> list[list[float]]:
    """[step, training loss] at every logged step of a run (its metrics.csv; the SAEs' loss is their MSE)."""
    import csv

    path = RunDir(run_dir).metrics_csv_path
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [[int(float(r["step"])), float(r[key])] for r in csv.DictReader(f) if r.get(key) not in (None, "")]


def curve_change(curve: Sequence[Sequence[float]], fraction: float = 0.2) -> float | None:
    """The relative change of a training curve over its last ``fraction`` of steps: (last - value at the start of
    that stretch) / value there; near 0 when training has converged, None with fewer than 2 points."""
    if len(curve) < 2:
        return None
    steps = [c[0] for c in curve]
    start = next(i for i, st in enumerate(steps) if st >= steps[-1] - fraction * (steps[-1] - steps[0]))
    start = min(start, len(curve) - 2)
    return (curve[-1][1] - curve[start][1]) / abs(curve[start][1]) if curve[start][1] else None


def frontier_seed(
    configs: Path, data: str, folder: Path, components: int, epochs: int, seed: int, l0s: Sequence[int],
    batch_size: int | None, data_root: str | None, probe_method: str, log: Callable[[str], None] = print,
    lm_windows: int | None = None, model_args: Sequence[str] = (), rows_kept: Sequence[str] = ROWS,
    split: str = "test", saes: dict | None = None, lm_tokens: int = 20_480, length: Length | None = None,
) -> list[dict]:  # fmt: skip
    """Every row of one seed: the trained models (each judged by its own fit), sparsify's peer and the random
    encoder at each target L0, then k-means and PCA (those of ``rows_kept``), then each saved SAE of ``saes`` (by
    row name, through its own decoder, at the target L0 of its k). ``model_args``: extra ``scripts/train.py``
    arguments for this model's runs (``--model.net.*``); ``split``: where every row is scored; ``length``: how
    long the trained rows train and how often they save (None: ``epochs`` epochs, the command's checkpoints).
    Every row carries its parameters counted both ways (:func:`~implicit_em.experiments.rows.parameter_counts`).

    Row by row: a trained row, the peer and the random encoder write their row and the arguments that made it
    to ``row.json`` in their run folder (``<folder>/runs/<name>_k<k>/seed<seed>``) once judged, and a row found
    there with the same arguments is taken as it is instead of made again (other arguments: refused); a trained
    row whose run folder holds an unfinished run resumes it from its newest checkpoint (``--ckpt_path last``).
    The data every other row is judged on comes from the first fit made here; when no row was fitted here, from
    the first trained row's DataModule built and set up afresh (:meth:`Data.configured`, the same splits and
    normalisation)."""
    from implicit_em.run.app import fit_module
    from implicit_em.run.checkpoints import find_last_checkpoint

    length = length or Length(epochs)
    shared: Data | None = None
    first_args: list[str] | None = None
    rows: list[dict] = []

    def data_now() -> Data:
        nonlocal shared
        if shared is None:
            log("[frontier] the data of the first trained row, built and set up afresh (its rows came from row.json)")
            shared = Data.configured(first_args, lm_windows, split, lm_tokens)
        return shared

    def add(name: str, target: int | None, numbers: dict, run_root: Path | None = None, made_by=None,
            **extra) -> None:  # fmt: skip
        out = {"model": name, "seed": seed, "target_l0": target, "components": components, "scored_on": split,
               **extra, **numbers, "fvu_decoder": numbers.get("fvu_decoder"),
               "probe_accuracy": numbers.get("probe_accuracy"),
               "sparse_probe_mean": probe_mean(numbers.get("sparse_probe_accuracy"))}  # fmt: skip
        shown = ("l0", "dead_fraction", "fvu", "fvu_decoder", "sparse_probe_mean", "ce_loss_recovered", "kl_div")
        log(f"[frontier] {name} k={target}: " + ", ".join(f"{m} {out.get(m)}" for m in shown))
        rows.append(out)
        if run_root is not None:
            save_row(run_root, made_by, out)

    def kept(name: str, target: int, run_root: Path, made_by) -> bool:
        row = saved_row(run_root, made_by)
        if row is not None:
            log(f"[frontier] {name} k={target}: finished earlier, kept ({run_root / ROW_FILE})")
            rows.append({**row, "seed": seed})
        return row is not None

    def judge(name: str, row: Row, target: int | None, run_root: Path | None = None, made_by=None, **extra) -> None:
        start = time.perf_counter()
        numbers = evaluate_row(row, data_now(), probe_method, lm_windows=lm_windows, split=split, lm_tokens=lm_tokens)
        add(name, target, numbers, run_root, made_by, **extra, eval_seconds=time.perf_counter() - start)

    def peer_row(k: int) -> None:
        """sparsify's SparseCoder at k, trained by sparsify's Trainer on the rows this seed's trained rows saw at
        k (as many, in their order: :func:`implicit_em.lm.peers.train_peer`), judged through its own decoder."""
        import torch

        import implicit_em
        from implicit_em.lm.peers import PEER_FILE, train_peer

        tokens = max(r["rows_trained"] for r in rows if r["target_l0"] == k and r["model"] in TRAINED_ROWS)
        run_root = folder / "runs" / f"sparsify_peer_k{k}" / f"seed{seed}"
        made_by = {"train_peer": {"num_latents": components, "k": k, "tokens": tokens, "seed": seed},
                   "data": first_args}  # fmt: skip
        if kept("sparsify_peer", k, run_root, made_by):
            return
        data = data_now()
        log(f"[frontier] sparsify_peer k={k}: sparsify's Trainer on {tokens:,} rows, K = {components}, seed {seed}")
        start = time.perf_counter()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        path = train_peer(data.datamodule, components, k, int(tokens), seed, run_root, device=device)
        train_seconds = time.perf_counter() - start
        info = json.loads((path / PEER_FILE).read_text())
        sae = implicit_em.load(path)
        judge("sparsify_peer", sae_row(sae, data), k, run_root, made_by,
              n_parameters=sum(p.numel() for p in sae.parameters()), **sae_keys(sae), train_seconds=train_seconds,
              rows_trained=info["tokens"], peer_steps=info["steps"], optimizer=info["train_config"]["optimizer"],
              lr=info["lr"], trained_by=info["trained_by"])  # fmt: skip

    for k in l0s:
        ours_args = None
        for name, config in [(n, c) for n, c in TRAINED if n in rows_kept]:
            run_root = folder / "runs" / f"{name}_k{k}" / f"seed{seed}"
            extra = ["--model.k", str(k), *length.args, *(model_args if name == "implicit_em" else ())]
            args = train_args(configs, data, config, run_root, length.max_epochs, seed, components, batch_size,
                              data_root, probe_method, lm_windows, split, *extra, lm_tokens=lm_tokens)  # fmt: skip
            first_args = first_args or args
            ours_args = args if name == "implicit_em" else ours_args
            if kept(name, k, run_root, args):
                continue
            resume = find_last_checkpoint(run_root) if run_root.is_dir() else None
            what = f"resuming {resume}" if resume else "training"
            log(f"[frontier] {name} k={k}: {what}, {length.described()}, K = {components}, seed {seed}")
            start = time.perf_counter()
            fitted = fit_module([*args, "--ckpt_path", "last"] if resume else args)
            fit_seconds = time.perf_counter() - start
            if shared is None:  # the first fit fixes the data (splits, normalisation) every other row is judged on
                shared = Data.of(fitted.datamodule, lm_windows, split, lm_tokens)
            curve = training_curve(fitted.run.path)
            add(name, k, fitted_numbers(fitted.metrics), run_root, args, n_parameters=fitted.module.n_parameters(),
                **module_parameters(fitted.module), rows_trained=fitted.metrics["rows_trained"],
                train_seconds=sum(fitted.metrics.get("epoch_seconds") or []), fit_seconds=fit_seconds,
                eval_seconds=fitted.metrics.get("eval_seconds"), run_dir=str(fitted.run.path), train_curve=curve,
                train_curve_change=curve_change(curve), resumed=resume is not None)  # fmt: skip
        if "sparsify_peer" in rows_kept:
            peer_row(k)
        if "random_encoder" in rows_kept:
            run_root = folder / "runs" / f"random_encoder_k{k}" / f"seed{seed}"
            if not kept("random_encoder", k, run_root, ours_args):
                module = random_encoder(ours_args, data_now())
                judge("random_encoder", module_row(module), k, run_root, ours_args, n_parameters=module.n_parameters(),
                      **module_parameters(module), train_seconds=0.0)  # fmt: skip

    start = time.perf_counter()
    if "kmeans" in rows_kept and components <= len(data_now().splits["train"].x):
        log("[frontier] kmeans")
        km = kmeans_row(shared, components, seed)
        judge("kmeans", km, None, n_parameters=components * shared.dims,
              **parameter_counts(components * shared.dims, None, components, shared.dims),
              train_seconds=time.perf_counter() - start)  # fmt: skip
    start = time.perf_counter()
    if "pca" in rows_kept:
        log("[frontier] pca")
        n_pca = min(components, data_now().dims)
        pca = pca_row(shared, n_pca)
        judge("pca", pca, None, n_parameters=n_pca * shared.dims + shared.dims,
              **parameter_counts(n_pca * shared.dims + shared.dims, None, n_pca, shared.dims),
              train_seconds=time.perf_counter() - start)  # fmt: skip
    for name, sae in (saes or {}).items():
        log(f"[frontier] {name}: a saved SAE, through its own decoder")
        keys = sae_keys(sae)
        target = int(round(keys["k"])) if keys["k"] is not None else None
        judge(name, sae_row(sae, data_now()), target, n_parameters=sum(p.numel() for p in sae.parameters()),
              **keys, train_seconds=None)  # fmt: skip
    return rows


# -- table and figures ------------------------------------------------------------------------------------
COLUMNS = {
    "target_l0": ("target", "d"), "l0": ("L0", ".1f"), "dead_fraction": ("dead", ".3f"), "fvu": ("FVU", ".3f"),
    "fvu_decoder": ("FVU dec.", ".3f"), "probe_accuracy": ("probe", ".3f"), "sparse_probe_mean": ("probe k=1,2,5", ".3f"),
    "ce_loss_recovered": ("CE rec.", ".3f"), "ce_loss_recovered_ci": ("CE rec. 95%", ".3f"), "kl_div": ("KL", ".3f"),
    "ce_tokens": ("CE tokens", "d"), "parameters_code": ("params code", "d"),
    "parameters_reconstruction": ("params rec.", "d"), "train_seconds": ("train s", ".0f"),
}  # fmt: skip


def markdown(rows: Sequence[dict], header: dict) -> tuple[str, str, str]:
    """frontier.md's (protocol, table, notes): the settings and what the models saw, the table, how to read it."""
    split = header.get("split", "test")
    strength = "val" if split == "test" else "the last tenth of the train rows"
    length = f"{header['tokens']:,} tokens a row" if header.get("tokens") else f"{header['epochs']} epochs"
    protocol = (
        f"K = {header['components']}, {length} ({trained_on(header)}), target L0 {header['l0s']}, "
        f"seeds {header['seeds']} ({{seeds}}), scored on {split}"
        + (f", this model with {' '.join(header['model_args'])}" if header.get("model_args") else "")
        + (f"; saved SAEs judged beside them: {', '.join(header['saes'])}" if header.get("saes") else "")
        + "."
    )
    notes = "\n".join([
        f"FVU: a ridge readout x ~ f R + c fitted on each row's codes (train rows, strength on {strength}), scored on "
        f"{split} rows in raw units; FVU dec.: the row's own decoder on the same rows. L0 and dead: |f| > 0.01 over "
        "all evaluation rows. probe: the full linear probe (multiclass accuracy); probe k=1,2,5: k-sparse probing "
        "(balanced accuracy, per document), mean of k = 1, 2, 5. CE rec. and KL: the causal LM run again with the "
        "layer replaced by the reconstruction (causal harvests only), with the 95% interval and the predicted tokens "
        "where measured. params code: the encoder alone; params rec.: what CE and FVU need, the encoder and its own "
        "decoder, or the ridge readout (K x D + D) for a row without one. random_encoder: this model's net at its "
        "data-aware start, untrained, with the same TopK. sparsify_peer: sparsify's SparseCoder with the same K and k, "
        "trained by sparsify's own Trainer (its optimiser and learning rate in frontier.json) on the rows the trained "
        "rows saw, in their order. A saved SAE (--sae) was trained elsewhere, on its own tokens.", "",
        *seed_lines(rows), *curve_lines(rows),
    ])  # fmt: skip
    return protocol, markdown_table(rows, ["model"], COLUMNS), notes


#: the columns frontier.md also gives seed by seed (the bar's numbers)
PER_SEED = ("l0", "dead_fraction", "fvu", "sparse_probe_mean", "ce_loss_recovered")


def seed_lines(rows: Sequence[dict]) -> list[str]:
    """frontier.md's table of each seed's numbers (seed 1 / seed 2 / ...) when the rows hold several seeds."""
    have = [r for r in rows if len(r.get("per_seed") or []) > 1]
    if not have:
        return []
    seeds = " / ".join(str(s["seed"]) for s in have[0]["per_seed"])
    names = ["model", "target", *(COLUMNS[c][0] for c in PER_SEED)]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in have:
        cells = [" / ".join(format_cell(s.get(c), fmt=COLUMNS[c][1]) for s in r["per_seed"]) for c in PER_SEED]
        lines.append("| " + " | ".join([r["model"], format_cell(r.get("target_l0"), fmt="d"), *cells]) + " |")
    return [f"Seed by seed (seeds {seeds}):", "", *lines, ""]


#: the rows whose training curves show whether the SAEs converged (their loss is their MSE)
CURVE_ROWS = ("topk_sae", "batchtopk_sae")


def curve_lines(rows: Sequence[dict]) -> list[str]:
    """frontier.md's lines on the SAEs' training curves: first and last logged MSE, and the change over the last
    fifth of the steps (``frontier_train_curve.png`` draws them)."""
    lines = []
    for r in rows:
        curve = r.get("train_curve") or []
        if r["model"] in CURVE_ROWS and len(curve) >= 2:
            seeds = r.get("per_seed") or [{"train_curve_change": r.get("train_curve_change")}]
            changes = [s.get("train_curve_change") for s in seeds]
            shown = " / ".join(f"{100 * c:+.1f}%" if c is not None else "—" for c in changes)
            lines.append(f"- {r['model']} k={r['target_l0']}: training MSE {curve[0][1]:.4g} at step {curve[0][0]}, "
                         f"{curve[-1][1]:.4g} at step {curve[-1][0]}; {shown} over the last fifth of the steps"
                         + (" (seed by seed)" if len(changes) > 1 else ""))  # fmt: skip
    head = "Training curves (the first seed's; a single batch's MSE at every logged step, so spikes show):"
    return [head, "", *lines, ""] if lines else []


def plot_curves(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """The SAEs' training MSE against the step, one line per row and target L0 (log scale); None without any."""
    have = [r for r in rows if r["model"] in CURVE_ROWS]
    return panels(path, f"{title}: did the SAEs converge?", lambda ax: draw_curves(ax, have))


def log_frontier(rows: Sequence[dict], header: dict, folder: Path, project: str = "implicit-em") -> Path | None:
    """Log the frontier to W&B (offline by itself, :func:`implicit_em.run.loggers.open_wandb_run`): the table
    (``frontier/table``: model and the markdown's columns) and every PNG in ``folder`` (``frontier/<name>``).
    Returns the run's local directory."""
    import wandb

    from implicit_em.run.loggers import open_wandb_run

    run = open_wandb_run(
        project, folder, "frontier", f"frontier {header['data']} K={header['components']}", dict(header)
    )
    columns = ["model", *COLUMNS]
    cell = lambda v: str(v) if isinstance(v, (list, dict)) else v  # noqa: E731  (an interval as its text)
    run.log({"frontier/table": wandb.Table(columns=columns, data=[[cell(r.get(c)) for c in columns] for r in rows])})
    for png in sorted(folder.glob("frontier_*.png")):
        run.log({f"frontier/{png.stem}": wandb.Image(str(png))})
    where = Path(run.dir).parent if getattr(run, "dir", None) else None
    run.finish()
    return where


def plot_metric(rows: Sequence[dict], metric: str, path: Path, title: str) -> Path | None:
    """One metric against L0: a line per model over the target L0s, a marker for the single points (k-means,
    PCA). None (no file) when no row has the metric."""
    label, lower = PLOTTED[metric]
    return panels(path, title, lambda ax: draw_against_l0(ax, rows, metric, label, lower))


def run_frontier(
    data: str,
    out: str | Path,
    components: int = 768,
    epochs: int = 1,
    seeds: Sequence[int] = (1,),
    l0s: Sequence[int] = DEFAULT_L0S,
    data_root: str | None = None,
    batch_size: int | None = None,
    probe_method: str = "torch",
    configs: str | Path = "configs",
    command: str = "",
    log: Callable[[str], None] = print,
    lm_windows: int | None = None,
    model_args: Sequence[str] = (),
    rows_kept: Sequence[str] | None = None,
    split: str = "test",
    wandb_project: str | None = None,
    sae_dirs: Sequence[str | Path] = (),
    tokens: Sequence[int] | None = None,
    lm_tokens: int = 20_480,
    checkpoint_every: int | None = None,
) -> Path:
    """Train and judge every row (those of ``rows_kept``; None: all that apply) at every target L0 once per seed;
    write frontier.json, frontier.md and the PNGs into ``<out>/<data>/`` after every seed (so an interrupted run
    keeps the seeds it finished: ``seeds`` in the JSON, ``seeds_asked`` the ones asked for; run again with the same
    settings, it keeps those seeds' rows and runs the others, see :func:`finished_seeds`, and within a seed the
    rows it finished, see :func:`frontier_seed`), and log them to W&B project ``wandb_project`` when given at the
    end; returns frontier.json's path. ``sae_dirs``: saved SAEs (SAELens, sparsify, ``scripts/export.py``) judged
    as frozen rows named after their folders. The header's ``tokens_trained``: the rows (a harvest's tokens) each
    trained model saw.

    ``tokens``: token budgets instead of ``epochs``: each trained row trains the fewest optimiser steps whose rows
    reach the budget (:mod:`implicit_em.experiments.budgets`). One budget is one frontier in ``<out>/<data>/``;
    several are one frontier each in ``<out>/<data>/tokens_<N>/``, then their curve in
    ``<out>/<data>/frontier_tokens.json`` (and ``.md``, PNGs), whose path is returned. The largest budget runs
    first: it is the frontier a reader looks for, and it takes longest, so a run cut short holds it and the smaller
    budgets, quick to finish, come after (each resumes row by row). ``checkpoint_every``: the
    steps between a trained row's checkpoints (None: about 20 a row where its steps are known before training,
    with a token budget or on a harvest, else one an epoch). ``lm_tokens``: the predicted tokens of the held-out
    windows the causal LM runs again per row (causal harvests only; SAEBench's 20,480; 0: off);
    ``lm_windows``: that many windows instead (None: by tokens).

    ``sparsify_peer`` (sparsify's SparseCoder, trained by sparsify's own Trainer on the rows the trained rows saw
    at each k) trains on a harvest's shards: on other data it is left out of the default rows, and asked for by
    name (``--rows``) it is refused; so it is where eai-sparsify is not installed (left out of the default rows,
    with a line in the log)."""
    l0s = sorted({int(k) for k in l0s})
    if not l0s or min(l0s) < 1 or max(l0s) > components:
        raise ConfigError(f"--l0: target L0s must lie in 1..{components} (K), got {l0s}")
    asked = rows_kept is not None
    rows_kept = ROWS if rows_kept is None else tuple(rows_kept)
    if unknown := sorted(set(rows_kept) - set(ROWS)):
        raise ConfigError(f"--rows: unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if not any(r in rows_kept for r in TRAINED_ROWS):
        raise ConfigError(f"--rows: keep at least one trained row ({', '.join(TRAINED_ROWS)}): its run fixes "
                         "the data every row is judged on")  # fmt: skip
    if "random_encoder" in rows_kept and "implicit_em" not in rows_kept:
        raise ConfigError("--rows: random_encoder is this model's net untrained; keep implicit_em with it")
    rows_kept = peer_kept(rows_kept, asked, Path(configs), data, log)
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    budgets = sorted({int(n) for n in tokens}) if tokens else [None]
    if budgets[0] is not None and budgets[0] < 1:
        raise ConfigError(f"--tokens: each budget must be a number of tokens >= 1 (got {budgets[0]})")
    folder = Path(out) / data
    where = {n: folder if len(budgets) == 1 else folder / f"tokens_{n}" for n in budgets}
    headers = {n: {"data": data, "components": components, "epochs": None if n else epochs, "tokens": n,
                   "seeds": list(seeds), "l0s": l0s, "batch_size": batch_size, "probe_method": probe_method,
                   "lm_tokens": lm_tokens if lm_windows is None else None, "lm_windows": lm_windows, "split": split,
                   "model_args": list(model_args), "rows_kept": [r for r in ROWS if r in rows_kept],
                   "saes": [str(d) for d in sae_dirs], "command": command} for n in budgets}  # fmt: skip
    finished = {n: finished_seeds(where[n] / "frontier.json", headers[n]) for n in budgets}  # before anything runs
    saes = load_saes(sae_dirs)  # refused before anything trains
    epoch = None  # (rows, batch, drop_last) of a training epoch: the same for every row (their data and batch)
    if budgets[0] is not None or data_class(Path(configs), data).startswith("implicit_em.lm."):  # counted cheaply
        first = next(c for n, c in TRAINED if n in rows_kept)
        args = train_args(Path(configs), data, first, folder / "runs", epochs, seeds[0], components, batch_size,
                          data_root, probe_method, lm_windows, split, "--model.k", str(l0s[0]),
                          lm_tokens=lm_tokens)  # fmt: skip
        epoch = training_epoch(args)
    done_budgets = []
    for n in sorted(budgets, key=lambda n: -1 if n is None else n, reverse=True):  # the largest, the headline, first
        length = training_length(epoch, epochs, n, checkpoint_every)
        if n is not None:
            log(f"[frontier] {n:,} tokens: {length.described()} a trained row, into {where[n]}")
        rows, written = frontier_budget(where[n], headers[n], finished[n], saes, length, Path(configs), data,
                                        components, epochs, seeds, l0s, batch_size, data_root, probe_method, log,
                                        lm_windows, model_args, rows_kept, split, lm_tokens)  # fmt: skip
        if wandb_project:
            log(f"[frontier] W&B: {log_frontier(rows, written, where[n], wandb_project)}")
        done_budgets.append((written, rows))
    if len(budgets) == 1:
        return where[budgets[0]] / "frontier.json"
    common = {k: v for k, v in headers[budgets[0]].items() if k not in ("tokens", "epochs")}
    path = write_curve(done_budgets, {**common, "seeds": done_budgets[-1][0]["seeds"]}, folder)
    log(f"[frontier] the curve over {len(budgets)} budgets: {path}")
    return path


def frontier_budget(
    folder: Path, header: dict, finished: dict, saes: dict, length: Length, configs: Path, data: str,
    components: int, epochs: int, seeds: Sequence[int], l0s: Sequence[int], batch_size: int | None,
    data_root: str | None, probe_method: str, log: Callable[[str], None], lm_windows: int | None,
    model_args: Sequence[str], rows_kept: Sequence[str], split: str, lm_tokens: int,
) -> tuple[list[dict], dict]:  # fmt: skip
    """One frontier (one budget) in ``folder``: every seed's rows (the ``finished`` ones kept), the files rewritten
    after every seed; returns (rows summed up over seeds, the header written)."""
    results: list[dict] = []
    done: list[int] = []
    for seed in seeds:  # the files are rewritten after every seed: an interrupted run keeps the seeds it finished
        if seed in finished:
            log(f"[frontier] seed {seed}: its rows are in {folder / 'frontier.json'} (same settings); kept")
            seed_rows = finished[seed]
        else:
            seed_rows = frontier_seed(configs, data, folder, components, epochs, seed, l0s, batch_size, data_root,
                                      probe_method, log, lm_windows, model_args, rows_kept, split, saes, lm_tokens,
                                      length)  # fmt: skip
        results += [{**r, "seed": seed} for r in seed_rows]
        done.append(seed)
        rows = summarize(results, ["model", "target_l0"])
        written = {**header, "seeds": done, "seeds_asked": list(seeds), "tokens_trained": tokens_trained(rows)}
        path = write_frontier(rows, written, folder)
        log(f"[frontier] seed {seed} finished: {len(done)} of {len(seeds)} seeds in {path}")
    return rows, written


def data_class(configs: Path, data: str) -> str:
    """The DataModule class path ``configs/data/<data>.yaml`` names ('' where it names none)."""
    import yaml

    config = configs / "data" / f"{data}.yaml"
    if not config.is_file():
        return ""
    return str(((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("class_path", ""))


def peer_kept(rows_kept: Sequence[str], asked: bool, configs: Path, data: str, log: Callable[[str], None]):
    """``rows_kept`` with ``sparsify_peer`` where it can train: on a harvest (``configs/data/<data>.yaml`` names
    :class:`~implicit_em.lm.activations.ActivationsDataModule`) with eai-sparsify installed. Left out of the
    default rows elsewhere (the log says so where sparsify is missing); asked for by name there, refused with the
    fix."""
    import importlib.util

    if "sparsify_peer" not in rows_kept:
        return tuple(rows_kept)
    if not data_class(configs, data).endswith(".ActivationsDataModule"):
        if asked:
            raise ConfigError(f"--rows: sparsify_peer trains on a harvest's shards (--data activations), not on {data}; "
                             "drop it from --rows")  # fmt: skip
        return tuple(r for r in rows_kept if r != "sparsify_peer")
    if importlib.util.find_spec("sparsify") is None:
        if asked:
            raise ConfigError("--rows: sparsify_peer needs eai-sparsify: pip install -e '.[peers]', or drop it from "
                             "--rows")  # fmt: skip
        log("[frontier] sparsify_peer left out: eai-sparsify is not installed (pip install -e '.[peers]')")
        return tuple(r for r in rows_kept if r != "sparsify_peer")
    return tuple(rows_kept)


#: the header entries that say what was run (two frontiers with the same ones differ only in their seeds)
SETTINGS = ("data", "components", "epochs", "tokens", "l0s", "batch_size", "lm_tokens", "lm_windows", "split",
            "model_args", "rows_kept", "saes")  # fmt: skip


def finished_seeds(path: Path, header: dict) -> dict[int, list[dict]]:
    """The rows of every seed an earlier frontier.json at ``path`` finished, by seed, when it was run with the
    same settings (:data:`SETTINGS`; a file from before ``rows_kept`` was recorded is read as keeping the rows it
    holds), so a run asked for more seeds goes on from it. ``probe_method`` may differ: sklearn and torch solve the
    same convex problem for the full linear probe, which the frontier's table does not show; the header keeps
    the latest. ``{}`` when there is no such file. A file with other
    settings, or with seeds this run was not asked for, is refused (ConfigError, naming the fix) and left as it
    is: a run never overwrites results it was not asked to extend."""
    if not path.is_file():
        return {}
    try:
        old = json.loads(path.read_text())
        rows, old_seeds = old["rows"], [int(s) for s in old["seeds"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ConfigError(
            f"{path} is not a frontier.json this code can read ({e}); pass another --out or move it"
        ) from e
    old.setdefault("rows_kept", [m for m in ROWS if any(r.get("model") == m for r in rows)])
    old.setdefault("saes", [])
    old.setdefault("tokens", None)  # written before token budgets and the splice by tokens
    old.setdefault("lm_tokens", None)
    differ = [k for k in SETTINGS if old.get(k) != header.get(k)]
    if differ:
        shown = "; ".join(f"{k} {old.get(k)} there, {header.get(k)} now" for k in differ)
        raise ConfigError(f"{path} holds a frontier run with other settings ({shown}); pass another --out or move it")
    if extra := [s for s in old_seeds if s not in header["seeds"]]:
        raise ConfigError(f"{path} holds seeds {extra} this run was not asked for; ask for seeds {old_seeds} too "
                         "(e.g. --seeds " + " ".join(str(s) for s in sorted(set(old_seeds) | set(header["seeds"])))
                         + ") or pass another --out")  # fmt: skip

    def seed_row(r: dict, i: int) -> dict:
        if r.get("per_seed"):
            return {k: v for k, v in r["per_seed"][i].items() if k != "seed"}
        return {k: v for k, v in r.items() if k != "per_seed"}  # one seed, written before per_seed always was

    return {s: [seed_row(r, i) for r in rows] for i, s in enumerate(old_seeds)}


def write_frontier(rows: Sequence[dict], header: dict, folder: Path) -> Path:
    """frontier.json (``header`` and ``rows``), frontier.md and the PNGs in ``folder``; returns the JSON's path."""
    title = f"{header['data']}: K = {header['components']}"
    figures = [plot_metric(rows, metric, folder / f"frontier_{metric}.png", title) for metric in PLOTTED]
    figures.append(plot_curves(rows, folder / "frontier_train_curve.png", title))
    protocol, table, notes = markdown(rows, header)
    return write_results(folder, header, "frontier", {"rows": rows}, table, [f for f in figures if f], notes,
                         protocol, title=f"# Sparsity frontier on {header['data']}")  # fmt: skip


def run_frontier_experiment(s, runs=None) -> Path:
    """The ``frontier`` entry of :data:`implicit_em.experiments.EXPERIMENTS`: :func:`run_frontier` with one
    ``reproduce.py`` call's settings (``--l0``, ``--tokens``, ``--lm-tokens``, ``--lm-windows``, ``--model-set``,
    ``--rows``, ``--split``)."""
    return run_frontier(
        s.data, s.out, s.components, s.epochs, s.seeds, s.l0s or DEFAULT_L0S, s.data_root, s.batch_size,
        s.probe_method, s.configs, s.command, log=runs.log if runs is not None else print, lm_windows=s.lm_windows,
        model_args=s.model_args, rows_kept=s.rows, split=s.split, wandb_project=s.wandb_project, sae_dirs=s.saes,
        tokens=s.tokens, lm_tokens=s.lm_tokens,
    )  # fmt: skip
