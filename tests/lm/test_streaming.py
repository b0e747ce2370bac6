"""Streaming a layer into training: the stream's rows are the harvest's, epochs and buffers cover it exactly once,
a resumed loader goes on where it stopped, and a run trains and is judged on the evaluation harvest."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from implicit_em.errors import DataError
from implicit_em.lm import harvest as hv
from implicit_em.lm import streaming as st
from implicit_em.lm.shards import ShardSet
from implicit_em.lm.text import text_sources
from tests.conftest import REPO, main_in_process
from tests.lm.test_causal_lm import tiny_llama, word_corpus


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    base = tmp_path_factory.mktemp("stream")
    return tiny_llama(base / "model"), word_corpus(base, n_docs=25), base


def test_the_stream_after_the_evaluation_harvest_is_the_harvest_of_the_documents_that_follow(llama):
    """The rows streamed (other groups and batches than a harvest's) equal, bit for bit in bfloat16, the rows a
    harvest of the whole text stores for the documents after the evaluation harvest's."""
    model, files, base = llama
    settings = {"separator": "%", "context": 24, "batch_size": 4, "lm_dtype": "bfloat16"}  # as on a GPU
    whole = hv.harvest(model, 1, files, base / "whole", **settings)
    part = hv.harvest(model, 1, files, base / "eval", max_tokens=400, **settings)
    last = part["documents"] - 1
    docs = np.load(base / "whole" / "doc_ids.npy")
    shards = ShardSet(base / "whole")
    expected = shards.to_float32(shards.read(0, shards.n_rows))[torch.from_numpy(docs > last)]
    lm = hv.open_layer(model, 1, 24, "cpu", whole["lm_dtype"], None, whole["pad_multiple"])
    sources = text_sources(files)

    def windows():
        return hv.token_windows(lm.tokenize, sources, "%", lm.width, None)

    got = torch.cat(list(st.stream_rows(lm, (w for w in windows() if w.doc > last), 0, 3))).float()
    assert got.shape == expected.shape and torch.equal(got, expected)
    later = torch.cat(list(st.stream_rows(lm, (w for w in windows() if w.doc > last), 37, 3))).float()
    assert torch.equal(later, expected[37:])  # from a row inside a window: only the windows from there are run
    endless = st.stream_windows(windows, last)
    n = sum(1 for w in windows() if w.doc > last)
    again = [next(endless) for _ in range(n + 2)]
    assert [w.index for w in again[n:]] == [w.index for w in again[:2]]  # the text ends: again from the start
    with pytest.raises(DataError, match="no document after the evaluation harvest"):
        next(st.stream_windows(windows, whole["documents"] - 1))


def _loader(n_rows: int = 1000, batch: int = 10, n_batches: int = 25, buffer: int = 64, **kw):
    reads = []

    def blocks_from(start):
        reads.append(start)
        for lo in range(start, n_rows * 10, 7):  # blocks of 7 rows; row r holds r
            yield torch.arange(lo, lo + 7, dtype=torch.float64)[:, None]

    return st.StreamingLoader(st.RowStream(blocks_from), batch, n_batches, 0, buffer, **kw), reads


def test_each_epoch_serves_its_stream_rows_once_permuted_within_buffers():
    loader, reads = _loader()
    for epoch in (0, 1):
        loader.set_epoch(epoch)
        rows = torch.cat([b for chunk in loader for b in chunk])[:, 0].long()
        assert torch.equal(rows.sort().values, torch.arange(epoch * 250, epoch * 250 + 250))
        assert not torch.equal(rows, rows.sort().values)
        for k in range(4):  # buffers of 64 rows, the last of 58: each a permutation of its own rows
            expected = torch.arange(epoch * 250 + 64 * k, epoch * 250 + min(64 * k + 64, 250))
            assert torch.equal(rows[64 * k : 64 * k + 64].sort().values, expected)
    assert reads == [0]  # one stream read from the start: epoch 1 goes on where epoch 0 ended


def test_a_resumed_loader_serves_the_same_batches_from_its_position():
    whole, _ = _loader()
    whole.set_epoch(1)
    batches = [b for chunk in whole for b in chunk]
    resumed, reads = _loader()
    resumed.load_state_dict({"epoch": 1, "batch": 9})
    rest = [b for chunk in resumed for b in chunk]
    assert len(rest) == 16 and all(torch.equal(a, b) for a, b in zip(rest, batches[9:]))
    assert reads == [250 + 64]  # the stream starts at the buffer holding the position (batch 9: rows 90-99)


def test_a_streaming_run_trains_and_is_judged_on_the_evaluation_harvest(llama, tmp_path):
    model, files, _ = llama
    run = main_in_process(
        "--config", str(REPO / "configs" / "data" / "streaming.yaml"), "--data.model", str(model),
        "--data.layer", "1", "--data.text", f"[{','.join(map(str, files))}]", "--data.root", str(tmp_path / "eval"),
        "--data.context", "24", "--data.eval_tokens", "500", "--data.train_tokens", "1600", "--data.batch_size", "32",
        "--data.block_rows", "64", "--data.buffer_rows", "256", "--data.eval_train_rows", "1000",
        "--data.lm_batch_size", "4", "--data.lm_dtype", "bfloat16", "--model.n_components", "16",
        "--trainer.max_epochs", "2", "--report.lm_windows", "12", "--report.probe_method", "torch",
        "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    m = run.metrics
    assert m["ce_loss_zero_ablation"] > m["ce_loss_clean"] > 0 and m["ce_tokens"] > 0 and m["lm_dtype"] == "bfloat16"
    assert len(m["ce_loss_recovered_ci"]) == 2 and (tmp_path / "eval" / "manifest.json").is_file()
    assert ShardSet(tmp_path / "eval").n_rows == 500  # the only rows on disk
