"""Image data (the default digits run): the top images beside the component's own image, and W&B offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import DEFAULT_CONFIG, QUIET


@pytest.fixture(scope="module")
def digits_dashboard(tmp_path_factory):
    from implicit_em.lm.dashboard.build import Settings, build
    from implicit_em.lm.dashboard.stream import StreamConfig
    from implicit_em.run.app import fit_run

    base = tmp_path_factory.mktemp("digits")
    os.environ.setdefault("WANDB_MODE", "offline")
    metrics = fit_run([
        "--config", str(DEFAULT_CONFIG), "--trainer.max_epochs", "2", "--model.n_components", "16",
        "--trainer.default_root_dir", str(base / "runs"), "--trainer.logger", "false", *QUIET,
    ])  # fmt: skip
    run = Path(metrics).parent
    from implicit_em.run.app import load_run

    dash_settings = Settings(stream=StreamConfig(top=5, samples=8, quantiles=2), block=4)
    return run, build(run, base / "dash", dash_settings, run=load_run(run))


def test_top_images_are_the_rows_with_the_largest_values(digits_dashboard):
    from implicit_em.lm.dashboard.source import make_source
    from implicit_em.run.app import load_run

    run_dir, dash = digits_dashboard
    assert dash.meta["kind"] == "image" and dash.meta["image"] == {"h": 8, "w": 8, "c": 1, "layout": "hw"}
    run = load_run(run_dir)
    source, _ = make_source(run, "all")
    with torch.no_grad():
        codes = run.module(source.x)
    weights = run.module.model.component_weights().detach()
    for j in (0, 7):
        _, c = dash.component(j)
        want = codes[:, j].topk(5).values.numpy()
        np.testing.assert_allclose([x["v"] for x in c["top"]], want, rtol=1e-3)
        best = int(codes[:, j].argmax())
        px = source.raw[best].numpy()
        scaled = np.rint((px - px.min()) / (px.max() - px.min()) * 255)
        assert c["top"][0]["img"] == scaled.astype(int).tolist()  # the image, min-max scaled to 0-255
        assert c["top"][0]["lab"] == int(source.labels[best])
        w = weights[j].numpy()
        assert c["wimg"] == np.rint(w / np.abs(w).max() * 1000).astype(int).tolist()
    row = dash.rows[0]
    assert "%" in row[4]  # top labels with their share, e.g. "3 80% · 5 20%"


def test_wandb_offline_gets_the_index_table_and_pages(digits_dashboard, monkeypatch):
    from implicit_em.lm.dashboard.wandb_log import COLUMNS, log_dashboard

    _, dash = digits_dashboard
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    where = log_dashboard(dash, pages=3)
    assert where is not None and where.is_dir() and "offline-run" in where.name
    files = where / "files"
    tables = list(files.rglob("*.table.json"))
    assert len(tables) == 1
    table = json.loads(tables[0].read_text())
    assert table["columns"] == COLUMNS and len(table["data"]) == dash.meta["k"]
    pages = list(files.rglob("*.html"))
    assert len(pages) == 3
    text = pages[0].read_text()
    assert "DASH_PRELOADED" in text and "<script src=" not in text  # self-contained
