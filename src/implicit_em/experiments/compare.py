"""The comparison SAE users expect: this model and the usual baselines, judged the same way on the same data.

``reproduce.py --experiment compare`` writes ``<out>/<data>/compare.json`` (``rows``: one per model, each with
``model``, ``components``, every metric of :func:`implicit_em.eval.sae_metrics.sae_evaluation`, the full linear
probe ``probe_accuracy``, ``fvu_decoder`` where the row has its own decoder and ``seconds``; mean and ``_std``
over seeds, each seed's row under ``per_seed``), ``compare.md`` and ``compare.png``. Rows:

- ``implicit_em``: this model (``configs/model/implicit_em.yaml``);
- ``sae``: the standard SAE, MSE + L1 (``configs/model/sae.yaml``);
- ``topk_sae_l0``, ``topk_sae_32``: TopK SAEs (``configs/model/topk_sae.yaml``), k = this model's L0
  (rounded) and k = 32; ``batchtopk_sae_32``: the BatchTopK SAE with k = 32;
- ``kmeans``: scikit-learn MiniBatchKMeans with the same K on the training rows (random starts); features: the
  one-hot hard assignment (L0 = 1; the readout then learns one reconstruction per cluster, vector quantisation);
- ``pca``: the top min(K, D) principal directions; features: the centred projections (dense, signed);
- ``random_encoder``: this model's architecture at its start (seeded init and data-aware start), untrained;
- ``raw``: the (normalised) inputs as features, for the probes only.

The trained models go through :func:`implicit_em.run.app.fit_module` (the path of ``scripts/train.py``) with this
evaluation as their end-of-run report: their rows are the fit's own numbers. Every other row's codes meet the
same evaluation (:func:`implicit_em.experiments.rows.evaluate_row`) on the data of this model's fit: the ridge
readout (fit on train, strength on val, scored on test in raw activation units), L0 and dead fraction over all
evaluation rows, k-sparse probing (per document where the data has document ids), the full linear probe, and
CE loss recovered and KL where the data is a causal LM's harvest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

from implicit_em.eval.sae_metrics import SPARSE_PROBE_KS
from implicit_em.experiments.plots import draw_against_l0, draw_sparse_probing, panels
from implicit_em.experiments.rows import (
    METRICS,
    RAW,
    Data,
    evaluate_row,
    fitted_numbers,
    kmeans_row,
    load_saes,
    matched_k,
    module_row,
    pca_row,
    random_encoder,
    sae_keys,
    sae_row,
    tokens_trained,
    train_args,
    trained_on,
)
from implicit_em.experiments.tables import markdown_table, summarize, write_results

ROWS = (
    "implicit_em",
    "sae",
    "topk_sae_l0",
    "topk_sae_32",
    "batchtopk_sae_32",
    "kmeans",
    "pca",
    "random_encoder",
    "raw",
)
TOPK_FIXED = 32
#: column header and number format of compare.md
COLUMNS = {
    "components": ("K", "d"), "k": ("k", ".3g"), "l0": ("L0", ".1f"), "dead_fraction": ("dead", ".3f"),
    "fvu": ("FVU", ".3f"), "fvu_decoder": ("FVU dec.", ".3f"), "explained_variance": ("expl. var.", ".3f"),
    "cosine": ("cosine", ".3f"), "l2_ratio": ("l2 ratio", ".3f"), "probe_accuracy": ("probe", ".3f"),
    "ce_loss_recovered": ("CE rec.", ".3f"), "kl_div": ("KL", ".3f"),
    **{f"sparse_probe_accuracy.{k}": (f"sparse k={k}", ".3f") for k in SPARSE_PROBE_KS},
    "seconds": ("seconds", ".0f"),
}  # fmt: skip
NOTES = (
    "FVU, explained variance (1 - FVU, pooled), cosine and l2 ratio: a ridge readout x ~ f R + c fitted on the "
    "training rows of each model's features (strength chosen on validation rows), scored on test rows in raw "
    "activation units; FVU dec.: the row's own decoder on the same rows. L0 and dead: components with |f| > 0.01, "
    "over all evaluation rows. sparse k: k-sparse probing, one vs rest per label, balanced accuracy (chance 0.5); "
    "per document where the data has document ids. probe: the full linear probe (multiclass accuracy). kmeans "
    "features are one-hot assignments; pca features are signed projections; raw: the inputs themselves (probes "
    "only)."
)


def compare_seed(
    configs: Path, data: str, folder: Path, components: int, epochs: int, seed: int, batch_size: int | None,
    data_root: str | None, probe_method: str, log: Callable[[str], None] = print, lm_windows: int | None = None,
    saes: dict | None = None, lm_tokens: int = 20_480,
) -> list[dict]:  # fmt: skip
    """Every row of one seed: train what needs training (each judged by its own fit), then judge the other rows
    the same way on the data of this model's fit (with the causal LM's splice on ``lm_tokens`` predicted tokens
    of held-out windows, or ``lm_windows`` windows when not None, where the data is a causal LM's harvest);
    ``saes``: saved SAEs by row name (:func:`load_saes`), each a frozen row through its own decoder."""
    from implicit_em.run.app import fit_module

    def args_of(name: str, model: str, *extra: str) -> list[str]:
        run_root = folder / "runs" / name / f"seed{seed}"
        return train_args(configs, data, model, run_root, epochs, seed, components, batch_size, data_root,
                          probe_method, lm_windows, "test", *extra, lm_tokens=lm_tokens)  # fmt: skip

    def row(name: str, n: int, numbers: dict, start: float, **extra) -> dict:
        return {"model": name, "seed": seed, "components": n, **extra, **numbers,
                "seconds": time.perf_counter() - start}  # fmt: skip

    rows: list[dict] = []

    def trained(name: str, model: str, *extra: str, **keys):
        log(f"[compare] {name}: training {epochs} epochs, K = {components}, seed {seed}")
        start = time.perf_counter()
        fitted = fit_module(args_of(name, model, *extra))
        numbers = fitted_numbers(fitted.metrics)  # judged by its own fit: nothing read back, nothing judged twice
        rows.append(row(name, components, numbers, start, **keys, run_dir=str(fitted.run.path),
                        rows_trained=fitted.metrics["rows_trained"]))  # fmt: skip
        return fitted

    def judged(name: str, n: int, encoder, start: float, probes_only: bool = False, **keys) -> None:
        numbers = evaluate_row(encoder, shared, probe_method, probes_only, lm_windows, lm_tokens=lm_tokens)
        rows.append(row(name, n, numbers, start, **keys))

    # this model first: its fit fixes the data (splits, normalisation) every other row is judged on
    shared = Data.of(trained("implicit_em", "implicit_em").datamodule, lm_windows, lm_tokens=lm_tokens)
    k_l0, k_fixed = matched_k(rows[0]["l0"], components), min(TOPK_FIXED, components)
    trained("sae", "sae")
    trained("topk_sae_l0", "topk_sae", "--model.k", str(k_l0), k=k_l0)
    trained("topk_sae_32", "topk_sae", "--model.k", str(k_fixed), k=k_fixed)
    trained("batchtopk_sae_32", "batchtopk_sae", "--model.k", str(k_fixed), k=k_fixed)

    log("[compare] kmeans, pca, random_encoder, raw")
    start = time.perf_counter()
    n_train = len(shared.splits["train"].x)
    if components <= n_train:
        judged("kmeans", components, kmeans_row(shared, components, seed), start)
    else:
        rows.append(row("kmeans", components, {m: None for m in METRICS}, start,
                        note=f"K = {components} exceeds the {n_train} training rows"))  # fmt: skip
    start = time.perf_counter()
    n_pca = min(components, shared.dims)
    judged("pca", n_pca, pca_row(shared, n_pca), start)
    start = time.perf_counter()
    untrained = random_encoder(args_of("implicit_em", "implicit_em"), shared)  # the same settings, no fit
    judged("random_encoder", components, module_row(untrained), start)
    start = time.perf_counter()
    judged("raw", shared.dims, RAW, start, probes_only=True)
    for name, sae in (saes or {}).items():
        log(f"[compare] {name}: a saved SAE, through its own decoder")
        start = time.perf_counter()
        judged(name, sae.n_components, sae_row(sae, shared), start, **sae_keys(sae))
    return rows


def table(rows: Sequence[dict]) -> str:
    """compare.md's table."""
    return markdown_table(rows, ["model"], COLUMNS)


def plot(rows: Sequence[dict], path: Path, title: str) -> Path | None:
    """compare.png: FVU against L0 (the usual sparsity-fidelity plane), and k-sparse probing against k."""
    return panels(
        path, title,
        lambda ax: draw_against_l0(ax, rows, "fvu", "FVU (test, ridge readout)", lower=True),
        lambda ax: draw_sparse_probing(ax, rows, SPARSE_PROBE_KS),
    )  # fmt: skip


def run_compare(
    data: str,
    out: str | Path,
    components: int = 64,
    epochs: int = 100,
    seeds: Sequence[int] = (1,),
    data_root: str | None = None,
    batch_size: int | None = None,
    probe_method: str = "torch",
    configs: str | Path = "configs",
    command: str = "",
    log: Callable[[str], None] = print,
    lm_windows: int | None = None,
    sae_dirs: Sequence[str | Path] = (),
    lm_tokens: int = 20_480,
) -> Path:
    """Train and judge every row on ``data`` once per seed; write compare.json, compare.md and compare.png
    into ``<out>/<data>/`` and return compare.json's path. ``lm_tokens``: predicted tokens of the held-out windows
    the causal LM runs again per row (causal harvests only; 0: off); ``lm_windows``: that many windows instead
    (None: by tokens; 0: off); ``sae_dirs``: saved SAEs (SAELens, sparsify, ``scripts/export.py``)
    added as frozen rows named after their folders."""
    folder = Path(out) / data
    saes = load_saes(sae_dirs)  # refused before anything trains
    per_seed = [
        r
        for seed in seeds
        for r in compare_seed(
            Path(configs),
            data,
            folder,
            components,
            epochs,
            seed,
            batch_size,
            data_root,
            probe_method,
            log,
            lm_windows,
            saes,
            lm_tokens,
        )
    ]
    rows = summarize(per_seed, ["model"])
    header = {"data": data, "components": components, "epochs": epochs, "seeds": list(seeds),
              "tokens_trained": tokens_trained(rows), "batch_size": batch_size, "probe_method": probe_method,
              "lm_tokens": lm_tokens if lm_windows is None else None, "lm_windows": lm_windows,
              "saes": [str(d) for d in sae_dirs], "command": command}  # fmt: skip
    figures = [p for p in [plot(rows, folder / "compare.png", f"{data}: K = {components}, {epochs} epochs")] if p]
    protocol = (f"K = {components}, {epochs} epochs ({trained_on(header)}), {{seeds}}; probe: {probe_method}."
                + (f" Saved SAEs judged beside them: {', '.join(map(str, sae_dirs))}." if sae_dirs else ""))  # fmt: skip
    return write_results(folder, header, "compare", {"rows": rows}, table(rows), figures, NOTES, protocol,
                         title=f"# SAE comparison on {data}")  # fmt: skip


def run_compare_experiment(s, runs=None) -> Path:
    """The ``compare`` entry of :data:`implicit_em.experiments.EXPERIMENTS`: :func:`run_compare` with one
    ``reproduce.py`` call's settings (its own plain runs: the shared ensemble runs do not apply)."""
    return run_compare(
        s.data, s.out, s.components, s.epochs, s.seeds, s.data_root, s.batch_size, s.probe_method, s.configs,
        s.command, log=runs.log if runs is not None else print, lm_windows=s.lm_windows, sae_dirs=s.saes,
        lm_tokens=s.lm_tokens,
    )  # fmt: skip
