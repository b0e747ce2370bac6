"""The one evaluation path: every run and every baseline row meets evaluate_codes; unlabelled data finishes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_em.data.memory import Split
from implicit_em.run.report import NO_LABELS, Codes, ReportConfig, evaluate_codes

REPO = Path(__file__).resolve().parents[2]


def _splits(labelled: bool, n: int = 300, d: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("train", "val", "test"):
        y = torch.randint(0, 3, (n,), generator=g)
        x = torch.randn(n, d, generator=g) + y[:, None].float()
        out[name] = Split(x, y if labelled else torch.full((n,), -1))
    return out


def test_codes_equal_to_the_inputs_reconstruct_exactly_and_probe():
    splits = _splits(labelled=True)
    codes = Codes(*(s.x for s in splits.values()))
    row, readout = evaluate_codes(codes, splits, ReportConfig(probe_method="torch", kmeans=False))
    assert row["fvu"] < 1e-6 and row["explained_variance"] > 1 - 1e-6
    assert row["probe_accuracy"] > 0.6 and "probes_skipped" not in row
    assert readout is not None and row["log10_density"].shape == (6,)


def test_unlabelled_codes_skip_the_probes_and_say_so():
    splits = _splits(labelled=False)
    codes = Codes(*(torch.relu(s.x) for s in splits.values()))
    row, _ = evaluate_codes(codes, splits, ReportConfig(probe_method="torch", kmeans=False))
    assert row["probes_skipped"] == NO_LABELS and "probe_accuracy" not in row
    assert "sparse_probe_accuracy" not in row and 0 < row["fvu"] < 1 and row["l0"] > 0


def test_shards_without_labels_train_and_finish_with_every_label_free_metric(tmp_path, capsys):
    from implicit_em.run.app import main

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (4, 16)).astype(np.float32)
    for s in range(2):
        y = rng.integers(0, 4, 3000)
        np.save(tmp_path / f"part-{s}.npy", (centres[y] + rng.normal(0, 0.5, (3000, 16))).astype(np.float32))
    code = main([
        "--config", str(REPO / "configs" / "data" / "activations.yaml"), "--data.root", str(tmp_path),
        "--model.n_components", "32", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--trainer.enable_progress_bar", "false", "--data.eval_train_rows", "2000",
    ], [REPO / "configs" / "default.yaml"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    metrics = json.loads(Path(out.strip().splitlines()[-1]).read_text())
    assert metrics["probes_skipped"] == NO_LABELS and "probe_accuracy" not in metrics and "nmi" not in metrics
    assert all(isinstance(metrics[k], float) for k in ("fvu", "l0", "dead_fraction", "final_loss"))
    assert err.count(NO_LABELS) == 1


@pytest.mark.parametrize("split", ["test", "val"])
def test_the_scored_split_is_the_configured_one(split):
    splits = _splits(labelled=True)
    splits["val"] = Split(splits["val"].x * 0, splits["val"].y)  # val rows carry nothing
    codes = Codes(*(s.x for s in splits.values()))
    row, _ = evaluate_codes(codes, splits, ReportConfig(probe_method="torch", kmeans=False, split=split))
    assert row["scored_on"] == split
    assert (row["probe_accuracy"] < 0.5) == (split == "val")


def test_the_splice_settings_count_tokens_by_default_and_zero_turns_it_off():
    from implicit_em.errors import ConfigError

    config = ReportConfig()
    assert config.lm_tokens == 20_480 and config.lm_windows is None and config.splices
    assert not ReportConfig(lm_windows=0).splices and not ReportConfig(lm_tokens=0).splices
    assert ReportConfig(lm_windows=4).splices
    for bad in ({"lm_tokens": -1}, {"lm_windows": -2}, {"split": "train"}):
        with pytest.raises(ConfigError):
            ReportConfig(**bad)
