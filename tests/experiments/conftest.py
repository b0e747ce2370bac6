"""What the experiment tests share: a guard that fails any read-back of a run or second normalisation fit."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def one_pass(monkeypatch):
    """Fail the test if an experiment reads a run back (its metrics.json, its checkpoint, a rebuild from its
    config.yaml); returns the list of normalisation fits, one per DataModule set up, for the test to count."""
    from implicit_em.data import normalization
    from implicit_em.run import app, checkpoints, rundir

    def refuse(what):
        def fail(*args, **kwargs):
            raise AssertionError(f"an experiment read its run back: {what}")

        return fail

    monkeypatch.setattr(rundir.RunDir, "metrics", refuse("RunDir.metrics (metrics.json)"))
    monkeypatch.setattr(rundir.RunDir, "config", refuse("RunDir.config (config.yaml)"))
    monkeypatch.setattr(app, "rebuild", refuse("app.rebuild"))
    monkeypatch.setattr(app, "build_cli", refuse("app.build_cli"))
    monkeypatch.setattr(checkpoints, "load_checkpoint", refuse("load_checkpoint"))
    monkeypatch.setattr(app, "load_checkpoint", refuse("load_checkpoint"))
    fits = []
    real_fit = normalization.Normalization.fit.__func__

    def counted(cls, *args, **kwargs):
        fits.append(args[1] if len(args) > 1 else kwargs.get("kind"))
        return real_fit(cls, *args, **kwargs)

    monkeypatch.setattr(normalization.Normalization, "fit", classmethod(counted))
    return fits


@pytest.fixture
def sparsify_folder(tmp_path):
    """A sparsify SparseCoder on digits' 64 dimensions (32 components, k = 4), saved by sparsify itself in its own
    layout (``cfg.json`` + ``sae.safetensors``); returns (folder, coder)."""
    import os

    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder on CPU
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[peers]'")
    import torch

    torch.manual_seed(0)
    coder = sparsify.SparseCoder(64, sparsify.SparseCoderConfig(num_latents=32, k=4), device="cpu")
    with torch.no_grad():
        coder.b_dec.fill_(2.0)  # digits' pixels are 0..16: a start near the data, as sparsify's trainer makes
    coder.save_to_disk(tmp_path / "sparsify_peer")
    return tmp_path / "sparsify_peer", coder
