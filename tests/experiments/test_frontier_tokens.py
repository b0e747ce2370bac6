"""The frontier by token budget: the steps each row trains, one frontier per budget and their curve, the sparsify
peer row, and a run that goes on row by row (finished rows kept from row.json, an interrupted row resumed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from implicit_em.experiments import frontier
from implicit_em.experiments.budgets import Length, default_checkpoint_every, training_length
from implicit_em.experiments.frontier import run_frontier
from implicit_em.experiments.rows import ROW_FILE, row_identity
from tests.experiments.conftest import REPO
from tests.experiments.test_frontier import _reproduce

DIGITS_EPOCH = (1293, 128, False)  # digits' training rows, its batch, the last batch (13 rows) kept


def test_a_budget_trains_the_fewest_steps_whose_rows_reach_it():
    one = training_length(DIGITS_EPOCH, epochs=7, tokens=1000)
    assert one == Length(max_epochs=1, max_steps=8, checkpoint_every=50)  # 8 x 128 = 1024 >= 1000 > 7 x 128
    two = training_length(DIGITS_EPOCH, epochs=7, tokens=1500)  # 11 steps (1,293 rows), 12 (1,421), 13 (1,549)
    assert two.max_steps == 13 and two.max_epochs == 2
    assert two.args == ["--trainer.max_steps", "13", "--checkpoint.every_n_train_steps", "50",
                        "--checkpoint.every_n_epochs", "0"]  # fmt: skip
    assert training_length(DIGITS_EPOCH, 7, 1000, checkpoint_every=3).args[-3:-2] == ["3"]
    by_epochs = training_length(DIGITS_EPOCH, epochs=3)  # 33 steps, saved at the end only
    assert by_epochs == Length(3, None, 50) and by_epochs.args[:1] == ["--checkpoint.every_n_train_steps"]
    assert training_length(None, epochs=3) == Length(3) and Length(3).args == []  # the command's: every epoch
    long = 5_000_000 // 1024 + 1  # a 5M-token row in batches of 1,024: about 20 checkpoints
    assert default_checkpoint_every(long) == 250 and 19 <= long / default_checkpoint_every(long) <= 20
    with pytest.raises(ValueError, match="--tokens"):
        training_length(None, epochs=3, tokens=100)


def test_reproduce_takes_token_budgets_and_the_splice_by_tokens(monkeypatch):
    reproduce = _reproduce()
    s, _ = reproduce.settings(["--experiment", "frontier", "--tokens", "300000", "1000000", "--lm-tokens", "4096"])
    assert s.tokens == [300000, 1000000] and s.lm_tokens == 4096 and s.lm_windows is None
    assert reproduce.settings(["--experiment", "frontier"])[0].tokens is None
    seen = {}
    monkeypatch.setattr(frontier, "run_frontier", lambda *a, **kw: seen.update(kw))
    frontier.run_frontier_experiment(s)
    assert seen["tokens"] == [300000, 1000000] and seen["lm_tokens"] == 4096 and seen["lm_windows"] is None
    for bad in (["--tokens", "0"], ["--tokens", "10", "--epochs", "2"], ["--lm-tokens", "-1"],
                ["--tokens", "10", "--experiment", "frontier", "compare"]):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            reproduce.settings(["--experiment", "frontier", *bad])
        assert e.value.code == 2


def test_row_identity_leaves_out_how_a_run_saves_and_resumes():
    args = ["--model.k", "2", "--checkpoint.every_n_train_steps", "2", "--ckpt_path", "last", "--checkpoint.x=1"]
    assert row_identity(args) == ["--model.k", "2"]
    assert row_identity({"data": args, "k": (1, 2)}) == {"data": ["--model.k", "2"], "k": [1, 2]}


class _Stop(Exception):
    pass


def _stop_at(step: int):
    """A callback that stops a fit with an error once it has taken ``step`` optimiser steps."""
    from lightning.pytorch.callbacks import Callback

    class Stop(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= step:
                raise _Stop(f"stopped at step {trainer.global_step}")

    return Stop()


def test_a_frontier_goes_on_row_by_row_keeping_finished_rows_and_resuming_the_interrupted_one(tmp_path, monkeypatch):
    from implicit_em.run import app

    kw = {"components": 16, "seeds": [1], "l0s": [2], "configs": REPO / "configs", "tokens": [1000],
          "rows_kept": ["implicit_em", "topk_sae", "random_encoder"], "checkpoint_every": 2,
          "log": lambda _: None}  # fmt: skip
    runs = tmp_path / "digits" / "runs"
    real_fit, fits = app.fit, []

    def fit_stopping_the_second(cli):  # the TopK SAE's fit stops after 4 of its 8 steps
        fits.append(cli)
        if len(fits) == 2:
            cli.trainer.callbacks.append(_stop_at(4))
        return real_fit(cli)

    monkeypatch.setattr(app, "fit", fit_stopping_the_second)
    with pytest.raises(_Stop):
        run_frontier("digits", tmp_path, **kw)
    assert (runs / "implicit_em_k2" / "seed1" / ROW_FILE).is_file()
    assert not (runs / "topk_sae_k2" / "seed1" / ROW_FILE).exists()
    assert list((runs / "topk_sae_k2" / "seed1").rglob("*.ckpt"))
    assert not (tmp_path / "digits" / "frontier.json").exists()

    monkeypatch.setattr(app, "fit", real_fit)
    calls = []
    real_fit_module = app.fit_module
    monkeypatch.setattr(app, "fit_module", lambda args: calls.append(args) or real_fit_module(args))
    result = json.loads(run_frontier("digits", tmp_path, **kw).read_text())
    assert len(calls) == 1 and "topk_sae.yaml" in calls[0][5] and calls[0][-2:] == ["--ckpt_path", "last"]
    by = {r["model"]: r for r in result["rows"]}
    assert by["topk_sae"]["resumed"] and not by["implicit_em"]["resumed"]  # the one resumed, the other kept
    assert by["topk_sae"]["rows_trained"] == by["implicit_em"]["rows_trained"] == 1024  # 8 steps of 128 rows
    assert result["tokens"] == 1000 and result["tokens_trained"] == 1024 and result["epochs"] is None
    assert "1,000 tokens a row" in (tmp_path / "digits" / "frontier.md").read_text()

    # every trained row finished: a rerun trains nothing, and builds the data afresh for the row it must judge
    (tmp_path / "digits" / "frontier.json").unlink()
    (runs / "random_encoder_k2" / "seed1" / ROW_FILE).unlink()
    monkeypatch.setattr(app, "fit_module", lambda args: pytest.fail(f"trained again: {args}"))
    lines = []
    again = json.loads(run_frontier("digits", tmp_path, **{**kw, "log": lines.append}).read_text())
    assert any("built and set up afresh" in line for line in lines)
    for old, new in zip(result["rows"], again["rows"]):
        assert old["model"] == new["model"]
        for key in ("fvu", "l0", "dead_fraction", "probe_accuracy", "sparse_probe_mean"):
            assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-7), (old["model"], key)

    # a row made with other arguments is refused, naming its folder and the fix
    (tmp_path / "digits" / "frontier.json").unlink()
    saved = runs / "implicit_em_k2" / "seed1" / ROW_FILE
    row = json.loads(saved.read_text())
    row["args"][row["args"].index("--seed_everything") + 1] = "9"
    saved.write_text(json.dumps(row))
    refused = r"implicit_em_k2/seed1/row.json holds a row made with other arguments \(--seed_everything 9 there, "
    with pytest.raises(ValueError, match=refused + r"--seed_everything 1 now\).*remove"):
        run_frontier("digits", tmp_path, **kw)


def test_several_budgets_make_one_frontier_each_and_their_curve(tmp_path):
    lines = []
    path = run_frontier("digits", tmp_path, components=16, seeds=[1], l0s=[2], configs=REPO / "configs",
                        tokens=[256, 512], rows_kept=["implicit_em", "random_encoder"], log=lines.append)  # fmt: skip
    folder = tmp_path / "digits"
    started = [line.split(" tokens:")[0] for line in lines if " tokens: " in line]
    assert started == ["[frontier] 512", "[frontier] 256"]  # the largest budget, the headline, runs first
    assert path == folder / "frontier_tokens.json"
    for n in (256, 512):
        header = json.loads((folder / f"tokens_{n}" / "frontier.json").read_text())
        assert header["tokens"] == n == header["tokens_trained"]  # whole batches of 128
    curve = json.loads(path.read_text())
    assert curve["tokens"] == [256, 512] and curve["tokens_trained"] == {"256": 256, "512": 512}
    by = {c["model"]: c for c in curve["curves"]}
    ours, untrained = by["implicit_em"], by["random_encoder"]
    assert ours["target_l0"] == 2 and [p["tokens_trained"] for p in ours["points"]] == [256, 512]
    metrics = ("fvu", "l0", "dead_fraction", "probe_accuracy")
    assert all(isinstance(p[m], float) for p in ours["points"] for m in metrics)
    assert [p["tokens_trained"] for p in untrained["points"]] == [None, None]
    assert [p["x"] for p in untrained["points"]] == [256, 512]  # drawn at its budget's trained rows
    assert (folder / "frontier_tokens_fvu.png").is_file()
    assert not (folder / "frontier_tokens_ce_loss_recovered.png").exists()  # digits: no causal LM
    assert "| implicit_em | 2 | 256 | 256 |" in (folder / "frontier_tokens.md").read_text()


@pytest.fixture
def harvest(tmp_path):
    """600 rows of 12 clusters in 16 dimensions (raw units, off the origin) in two shards, documents of 1..20 rows."""
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (12, 16)) * 2
    x = (3 + centres[rng.integers(0, 12, 600)] + rng.normal(0, 0.3, (600, 16))).astype(np.float32)
    root = tmp_path / "harvest"
    root.mkdir()
    np.save(root / "part-000.npy", x[:350])
    np.save(root / "part-001.npy", x[350:])
    np.save(root / "doc_ids.npy", np.repeat(np.arange(600), rng.integers(1, 20, 600))[:600])
    return root


def test_the_sparsify_peer_trains_on_the_rows_our_rows_saw_and_is_judged_through_its_decoder(
    tmp_path, harvest, monkeypatch
):
    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder on CPU (read when sparsify is imported)
    pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[peers]'")
    kw = {"components": 32, "seeds": [1], "l0s": [4], "configs": REPO / "configs", "data_root": str(harvest),
          "batch_size": 64, "tokens": [300], "rows_kept": ["topk_sae", "sparsify_peer"],
          "log": lambda _: None}  # fmt: skip
    result = json.loads(run_frontier("activations", tmp_path, **kw).read_text())
    by = {r["model"]: r for r in result["rows"]}
    peer, ours = by["sparsify_peer"], by["topk_sae"]
    assert peer["rows_trained"] == ours["rows_trained"] == 320 == result["tokens_trained"]  # 5 steps of 64 rows
    assert peer["source"] == "sparsify" and peer["target_l0"] == 4 and peer["l0"] <= 4 + 1e-9
    assert peer["peer_steps"] == 5 and peer["optimizer"] == "signum" and peer["lr"] > 0 and peer["train_seconds"] > 0
    assert isinstance(peer["fvu_decoder"], float) and isinstance(peer["fvu"], float)
    folder = tmp_path / "activations" / "runs" / "sparsify_peer_k4" / "seed1"
    assert (folder / "peer.json").is_file() and (folder / "cfg.json").is_file() and (folder / ROW_FILE).is_file()

    # run again: the peer is kept from its row.json, not trained again
    from implicit_em.lm import peers

    (tmp_path / "activations" / "frontier.json").unlink()
    monkeypatch.setattr(peers, "train_peer", lambda *a, **k: pytest.fail("the peer trained again"))
    again = json.loads(run_frontier("activations", tmp_path, **kw).read_text())
    assert {r["model"]: r for r in again["rows"]}["sparsify_peer"]["fvu"] == pytest.approx(peer["fvu"])

    with pytest.raises(ValueError, match="--rows: sparsify_peer trains on a harvest"):
        run_frontier("digits", tmp_path, components=16, l0s=[2], rows_kept=["topk_sae", "sparsify_peer"])


def test_on_a_causal_harvest_every_row_splices_the_lm_by_tokens(tmp_path, monkeypatch):
    """A tiny Llama's harvest (tests/lm's helpers): the trained row (through its fit's report) and the peer
    (through the frontier's evaluation) both run the LM again on the same --lm-tokens predicted tokens."""
    from implicit_em.lm import harvest as hv
    from tests.lm.test_causal_lm import tiny_llama, word_corpus

    monkeypatch.setenv("SPARSIFY_DISABLE_TRITON", "1")
    pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[peers]'")
    model, files = tiny_llama(tmp_path / "llama"), word_corpus(tmp_path)
    root = tmp_path / "harvest"
    hv.harvest(model, 1, files, root, separator="%", context=16, shard_rows=50, batch_size=4, dtype="float32",
               lm_dtype="float32")  # fmt: skip
    path = run_frontier("activations", tmp_path / "out", components=16, seeds=[1], l0s=[4], configs=REPO / "configs",
                        data_root=str(root), batch_size=64, tokens=[200], lm_tokens=64,
                        rows_kept=["topk_sae", "sparsify_peer"], log=lambda _: None)  # fmt: skip
    result = json.loads(path.read_text())
    assert result["lm_tokens"] == 64 and result["lm_windows"] is None
    by = {r["model"]: r for r in result["rows"]}
    for name in ("topk_sae", "sparsify_peer"):
        r = by[name]
        assert r["lm_tokens"] == 64 and r["n_tokens"] >= 64 and isinstance(r["ce_loss_recovered"], float), name
    assert by["topk_sae"]["ce_loss_clean"] == by["sparsify_peer"]["ce_loss_clean"]  # the same windows
