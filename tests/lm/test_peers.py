"""The sparsify peer: sparsify's own Trainer on our training rows, saved in its layout, read by implicit_em.load."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import implicit_em
from implicit_em.errors import ConfigError, DataError
from implicit_em.lm.activations import ActivationsDataModule
from implicit_em.lm.peers import (
    PEER_FILE,
    batch_sizes,
    tokens_per_epoch,
    train_peer,
    train_sparsify,
    training_batches,
)

D, K, TOP_K, BATCH = 16, 64, 4, 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sparsify():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder on CPU
    return pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[peers]'")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """600 rows of 12 clusters (offset from the origin, raw units) in two shards, documents of 1..20 rows."""
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (12, D)) * 2
    y = rng.integers(0, 12, 600)
    x = (3 + centres[y] + rng.normal(0, 0.3, (600, D))).astype(np.float32)
    np.save(root / "part-000.npy", x[:350])
    np.save(root / "part-001.npy", x[350:])
    np.save(root / "doc_ids.npy", np.repeat(np.arange(600), rng.integers(1, 20, 600))[:600])
    return root


def _datamodule(root: Path, seed: int = 1, **options) -> ActivationsDataModule:
    return ActivationsDataModule(root=str(root), batch_size=BATCH, shuffle_seed=seed, block_rows=32,
                                 buffer_rows=128, **options)  # fmt: skip


def _rows(root: Path, split: str) -> torch.Tensor:
    dm = _datamodule(root)
    ranges = dm.split_rows()[split].ranges(0, dm.split_rows()[split].n)
    return torch.cat([dm.shards.to_float32(dm.shards.read(lo, hi)) for lo, hi in ranges])


def _fvu(coder, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(coder(x).fvu)


@pytest.fixture(scope="module")
def peer(sparsify, shards, tmp_path_factory) -> Path:
    """Three epochs of the training rows, seed 1."""
    n = tokens_per_epoch(_datamodule(shards))
    return train_peer(_datamodule(shards), K, TOP_K, 3 * n, 1, tmp_path_factory.mktemp("peer") / "sparsify_peer")


def test_the_peer_sees_the_rows_our_runs_train_on_in_their_order_raw(shards):
    dm = _datamodule(shards, normalization="none")
    dm.setup()
    loader = dm.train_dataloader()
    ours = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        ours += [b for chunk in loader for b in chunk]
    batches = training_batches(_datamodule(shards))
    theirs = [next(batches) for _ in range(len(ours))]
    batches.close()
    assert len(ours) > 4 and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert sum(map(len, ours)) == 2 * dm.rows["train"].n == 2 * tokens_per_epoch(dm)
    sizes = batch_sizes(dm.rows["train"].n, BATCH, False, 2 * dm.rows["train"].n - 5)
    assert sizes[: len(ours) - 1] == [len(b) for b in ours[:-1]] and sum(sizes) == 2 * dm.rows["train"].n - 5


def test_the_trained_folder_is_sparsifys_and_loads_with_its_codes(sparsify, peer, shards):
    assert sorted(p.name for p in peer.iterdir()) == ["cfg.json", PEER_FILE, "sae.safetensors"]
    coder = sparsify.SparseCoder.load_from_disk(peer)
    sae = implicit_em.load(peer)
    assert (sae.source, sae.k, sae.n_components, sae.d_in) == ("sparsify", TOP_K, K, D)
    x = _rows(shards, "test")
    with torch.no_grad():
        top = coder.encode(x)
        codes = torch.zeros(len(x), K).scatter_(1, top.top_indices, top.top_acts)
        torch.testing.assert_close(sae.encode(x), codes, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sae.decode(sae.encode(x)), coder.decode(top.top_acts, top.top_indices),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    info = json.loads((peer / PEER_FILE).read_text())
    n = _datamodule(shards).split_rows()["train"].n
    assert info["tokens"] == 3 * n and info["steps"] == len(batch_sizes(n, BATCH, False, 3 * n))
    assert info["train_config"]["optimizer"] == "signum" and info["lr"] == pytest.approx(5e-3 / (K / 2**14) ** 0.5)


def test_decoder_rows_keep_unit_norm_and_fvu_falls_below_the_untrained_coders(sparsify, peer, shards):
    coder = sparsify.SparseCoder.load_from_disk(peer)
    norms = coder.W_dec.detach().norm(dim=1)
    assert (norms - 1).abs().max() < 0.05  # the schedule-free average of unit-norm rows: a few percent short
    torch.manual_seed(1)  # the Trainer's start: seeded init, b_dec the first batch's mean
    untrained = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=K, k=TOP_K))
    batches = training_batches(_datamodule(shards))
    untrained.b_dec.data = next(batches).mean(0)
    batches.close()
    x = _rows(shards, "test")
    assert _fvu(coder, x) < 0.5 * _fvu(untrained, x)


def test_a_seed_reproduces_its_coder_and_another_seed_does_not(sparsify, shards, tmp_path):
    x = _rows(shards, "train")
    runs = [train_sparsify(x.split(BATCH), D, K, TOP_K, 300, seed, tmp_path / f"run{i}")
            for i, seed in enumerate((5, 5, 6))]  # fmt: skip
    weights = [load_file(run / "sae.safetensors") for run in runs]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][n], weights[1][n]) for n in weights[0])
    assert not torch.equal(weights[0]["W_dec"], weights[2]["W_dec"])
    assert json.loads((runs[0] / PEER_FILE).read_text())["tokens"] == 300


def test_bad_input_is_refused_in_one_line(sparsify, shards, tmp_path):
    x = _rows(shards, "train")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    cases = [
        (ConfigError, "k must be at most", dict(k=K + 1)),
        (ConfigError, "not an earlier peer folder", dict(out_dir=tmp_path / "taken")),
        (ConfigError, "options .'momentum'. are not set here", dict(momentum=0.9)),
        (DataError, "fewer than the 10000 tokens", dict(tokens=10_000)),
        (DataError, r"rows x 15 \(d_in\)", dict(d_in=15)),
    ]
    for error, match, change in cases:
        args = {"batches": x.split(BATCH), "d_in": D, "num_latents": K, "k": TOP_K, "tokens": 200, "seed": 0,
                "out_dir": tmp_path / "out", **change}  # fmt: skip
        with pytest.raises(error, match=match) as e:
            train_sparsify(**args)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and (tmp_path / "taken" / "notes.txt").is_file()


def test_the_script_trains_a_peer_and_prints_its_folder_last(sparsify, shards, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    monkeypatch.chdir(REPO)
    sys.modules.pop("train_peer", None)
    import train_peer as script

    args = ["--data-root", str(shards), "--components", str(K), "--k", str(TOP_K), "--seed", "2",
            "--batch-size", str(BATCH)]  # fmt: skip
    assert script.main([*args, "--tokens", "400", "--out", str(tmp_path / "peer")]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder == (tmp_path / "peer").resolve() and implicit_em.load(folder).k == TOP_K
    assert json.loads((folder / PEER_FILE).read_text())["shuffle_seed"] == 2
    for bad, match in ((["--tokens", "1"], "tokens must be"), (["--tokens", "400", "--k", "0"], "k must be")):
        assert script.main([*args, *bad, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert match in err and "\n" not in err
    assert script.main([*args, "--tokens", "400", "--out", str(tmp_path / "nodata"),
                        "--data-root", str(tmp_path / "none")]) == 2  # fmt: skip
    assert "no such directory" in capsys.readouterr().err
