"""The dashboard of a run on a tiny harvest: what each page's data says is what the run computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, script_in_process
from tests.lm.dashboard.conftest import WORDS, K, copy_run_with_root, needs_minilm

pytestmark = needs_minilm


def _root(run_dir) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]["init_args"]["root"]


def _codes(run_dir, rows: np.ndarray) -> torch.Tensor:
    """The run's codes of harvest rows, computed here from scratch (shards, checkpoint normalisation, module)."""
    from implicit_em.run.app import load_run

    run = load_run(run_dir)
    root = run.datamodule.root
    x = np.concatenate([np.load(f"{root}/shard-00000.npy"), np.load(f"{root}/shard-00001.npy")])[rows]
    with torch.no_grad():
        return run.module(run.normalization(torch.from_numpy(x.astype(np.float32))))


def test_top_contexts_hold_the_harvest_tokens_and_the_runs_values(causal_dashboard, causal_run):
    dash = causal_dashboard
    root = _root(causal_run)
    tokens = np.load(f"{root}/tokens/tokens.npy")
    windows = np.load(f"{root}/tokens/windows.npy")
    assert len(dash.rows) == K and [r[0] for r in dash.rows] == list(range(K))
    checked = 0
    for j in (0, 7, K - 1):
        block, c = dash.component(j)
        assert c["i"] == j
        for x in c["top"][:3]:
            # where the context is: find its tokens in the harvest (a window holds them consecutively)
            n = len(x["t"])
            starts = [s for s in np.flatnonzero(tokens == x["t"][0]) if list(tokens[s : s + n]) == x["t"]]
            assert starts, "the context's tokens are a run of the harvest"
            s = starts[0]
            assert len(set(windows[s : s + n])) == 1  # one window
            values = _codes(causal_run, np.arange(s, s + n))[:, j].numpy()
            shown = np.array(x["a"]) * x["s"] / 1000
            np.testing.assert_allclose(shown, values, atol=2e-3 * max(1.0, abs(values).max()))
            assert x["v"] == pytest.approx(values.max(), rel=2e-3)
            assert x["p"] == int(np.argmax(values))
            assert all(str(t) in block["vocab"] for t in x["t"])
            checked += 1
        if c["top"]:  # best first; never above the component's max
            vs = [x["v"] for x in c["top"]]
            assert vs == sorted(vs, reverse=True) and vs[0] == pytest.approx(c["max"], rel=1e-3)
    assert checked >= 3
    # token strings: what the word adds after another word (WordPiece words start with a space)
    _, c0 = dash.component(next(r[0] for r in dash.rows if not r[6]))
    vocab = dash.component(c0["i"])[0]["vocab"]
    shown_words = {vocab[str(t)].strip() for x in c0["top"] for t in x["t"]}
    assert shown_words <= set(WORDS)


def test_density_histogram_and_index_rows_agree(causal_dashboard):
    dash = causal_dashboard
    for row in dash.rows:
        j, density, mean_active, maximum, top, spark, dead = row
        _, c = dash.component(j)
        assert density == c["dens"] and dead == int(c["act"] == 0)
        assert sum(c["hist"]["counts"]) == pytest.approx(c["act"], abs=0)  # ReLU: every active value is positive
        assert c["act"] / dash.meta["rows"] == pytest.approx(density, rel=1e-3)
        if not dead:
            assert maximum == c["max"] and len(spark) >= 1 and top
            lo_q = [g["lo"] for g in c["quant"]]
            assert lo_q == sorted(lo_q, reverse=True)


def test_logit_effects_are_the_unembedding_times_the_gained_readout(causal_dashboard, causal_run):
    from transformers import AutoModelForCausalLM

    from implicit_em.lm.dashboard.extras import readout_directions
    from implicit_em.run.app import load_run

    run = load_run(causal_run)
    directions, where = readout_directions(run)
    assert "readout" in where
    manifest = json.loads((Path(_root(causal_run)) / "manifest.json").read_text())
    lm = AutoModelForCausalLM.from_pretrained(manifest["model"])
    effects = (directions * lm.transformer.ln_f.weight.detach()) @ lm.lm_head.weight.detach().T
    assert "ln_f" in causal_dashboard.meta["logit_note"]
    for j in (0, 5):
        block, c = causal_dashboard.component(j)
        want = effects[j].topk(10)
        got = [v for _, v in c["logits"]["pos"]]
        np.testing.assert_allclose(got, want.values.numpy(), rtol=1e-3, atol=1e-6)
        strings = [s for s, _ in c["logits"]["pos"]]
        assert strings[0] == block["vocab"][str(int(want.indices[0]))]
        assert [v for _, v in c["logits"]["neg"]][0] == pytest.approx(float(effects[j].min()), rel=1e-3)


def test_a_gguf_unembedding_is_read_from_the_file_tied_or_not(tmp_path):
    gguf = pytest.importorskip("gguf")
    from implicit_em.lm.dashboard.extras import unembedding

    rng = np.random.default_rng(0)
    embed, head = rng.normal(size=(2, 50, 8)).astype(np.float32)  # vocab x d_model, as GGUF stores them
    gain = rng.uniform(0.5, 1.5, 8).astype(np.float32)
    for tied in (True, False):
        path = tmp_path / f"tied-{tied}.gguf"
        w = gguf.GGUFWriter(path, "llama")
        w.add_tensor("token_embd.weight", embed)
        if not tied:
            w.add_tensor("output.weight", head)
        w.add_tensor("output_norm.weight", gain)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        u, g, name = unembedding(path)
        np.testing.assert_array_equal(u.numpy(), embed if tied else head)
        np.testing.assert_array_equal(g.numpy(), gain)
        assert "output_norm" in name


def test_nearest_components_by_weight_cosine(causal_dashboard, causal_run):
    from implicit_em.run.app import load_run

    w = torch.nn.functional.normalize(load_run(causal_run).module.model.component_weights().detach(), dim=1)
    cos = w @ w.T
    cos.fill_diagonal_(-2)
    for j in (1, 9):
        _, c = causal_dashboard.component(j)
        assert [i for i, _ in c["near"]] == cos[j].topk(4).indices.tolist()


def test_neuronpedia_batches_have_the_upload_fields(causal_dashboard):
    files = sorted((causal_dashboard.out / "neuronpedia").glob("batch-*.json"))
    assert len(files) == -(-K // 5)
    features = [f for p in files for f in json.loads(p.read_text())["features"]]
    assert [f["feature_index"] for f in features] == list(range(K))
    head = json.loads(files[0].read_text())
    assert head["layer"] == 1 and head["model_id"] == "lm"
    for f in features:
        _, c = causal_dashboard.component(f["feature_index"])
        assert f["frac_nonzero"] == c["dens"]
        assert len(f["freq_hist_data_bar_heights"]) == len(f["freq_hist_data_bar_values"])
        assert len(f["pos_str"]) == len(f["pos_values"]) == 10 and len(f["neg_str"]) == 10
        assert len(f["logits_hist_data_bar_heights"]) == len(f["logits_hist_data_bar_values"]) == 32
        for a in f["activations"]:
            assert len(a["tokens"]) == len(a["values"]) and all(isinstance(t, str) for t in a["tokens"])
            assert a["values"][a["maxValueTokenIndex"]] == a["maxValue"] == max(a["values"])
            chosen = a["values"][a["qualifying_token_index"]]
            if a["bin_min"] == -1:  # a top context: chosen by its maximum
                assert chosen == pytest.approx(a["maxValue"], rel=1e-2, abs=1e-3)
            else:  # a quantile sample: chosen by a value in the bin
                assert a["bin_min"] - 1e-2 <= chosen <= a["bin_max"] + 1e-2
        tops = [a for a in f["activations"] if a["bin_min"] == -1]
        assert len(tops) == len(c["top"])


def test_the_script_writes_the_folder_prints_it_last_and_logs_offline_to_wandb(causal_run, tmp_path):
    """scripts/dashboard.py (its ``main``, in this process) with --wandb: exit 0, the folder's path as the last
    stdout line; summary.json within --max-rows on the --split asked for, with K components and the pass's speed
    and memory; index.html and no neuronpedia/ (--no-neuronpedia); with WANDB_MODE=offline and no key, an offline
    W&B run inside the folder holding the components' table (K rows) and --wandb-pages pages of the dashboard."""
    out = tmp_path / "dash"
    r = script_in_process(REPO / "scripts" / "dashboard.py", causal_run, "--out", out, "--top", "5", "--samples", "4",
                          "--max-rows", "700", "--split", "test", "--no-neuronpedia", "--wandb",
                          "--wandb-pages", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == str(out.resolve())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"] <= 700 and summary["split"] == "test" and summary["components"] == K
    assert summary["pass"]["contexts_per_s"] > 0 and summary["pass"]["peak_rss_mb"] > 0
    assert (out / "index.html").is_file() and not (out / "neuronpedia").exists()
    (run,) = (out / "wandb").glob("offline-run-*")  # WANDB_MODE=offline and no key: a run to sync later
    table = json.loads(next((run / "files").rglob("*.table.json")).read_text())
    assert len(table["data"]) == K and table["columns"][:2] == ["component", "density"]
    pages = sorted((run / "files").rglob("*.html"))
    assert len(pages) == 2 and all("DASH_PRELOADED" in p.read_text() for p in pages)


def test_a_harvest_without_tokens_is_one_line_and_exit_2(causal_run, tmp_path):
    root = _root(causal_run)
    bare = tmp_path / "harvest"
    shutil.copytree(root, bare)
    (bare / "tokens" / "tokens.npy").unlink()
    run = copy_run_with_root(causal_run, bare, tmp_path / "run")
    r = script_in_process(REPO / "scripts" / "dashboard.py", run, "--out", tmp_path / "out")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "tokens.npy" in lines[-1] and "Traceback" not in r.stderr
    bad = script_in_process(REPO / "scripts" / "dashboard.py", run, "--out", tmp_path / "out", "--bins", "12")
    assert bad.returncode == 2 and "power of two" in bad.stderr.strip().splitlines()[-1]


def test_an_sae_folder_opens_over_a_harvest_with_its_own_codes(causal_run, tmp_path):
    """A SAELens-layout top-k SAE (b_dec subtracted first) over the run's harvest: the top contexts' values are
    its codes of those rows on raw activations; without --data-root, one line and exit 2."""
    from safetensors.torch import save_file

    import implicit_em
    from tests.lm.dashboard.conftest import D_MODEL

    g = torch.Generator().manual_seed(0)
    folder, n = tmp_path / "sae", 20
    folder.mkdir()
    save_file({"W_enc": torch.randn(D_MODEL, n, generator=g), "b_enc": torch.randn(n, generator=g),
               "W_dec": torch.randn(n, D_MODEL, generator=g), "b_dec": torch.randn(D_MODEL, generator=g)},
              str(folder / "sae_weights.safetensors"))  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps({"architecture": "topk", "d_in": D_MODEL, "d_sae": n, "k": 3}))
    out, root = tmp_path / "dash", _root(causal_run)
    r = script_in_process(REPO / "scripts" / "dashboard.py", folder, "--data-root", root, "--out", out, "--top", "4",
                          "--samples", "4", "--no-neuronpedia")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "summary.json").read_text())["components"] == n
    assert "the sae_lens SAE's decoder (W_dec)" in (out / "data" / "meta.js").read_text()  # its logit effects
    x = np.concatenate([np.load(f"{root}/shard-00000.npy"), np.load(f"{root}/shard-00001.npy")]).astype(np.float32)
    with torch.no_grad():
        codes = implicit_em.load(folder).encode(torch.from_numpy(x))
    windows = np.load(f"{root}/tokens/windows.npy")
    counted = np.concatenate([[False], windows[1:] == windows[:-1]])  # a causal LM's first token is left out
    expected = codes[torch.from_numpy(counted)].max(0).values
    text = (out / "data" / "blocks" / "b000000.js").read_text()
    block = json.loads(text[len("DASH_BLOCK(") : text.rindex(")")])
    assert len(block["components"]) == n and any(c["max"] for c in block["components"])
    for c in block["components"]:
        assert (c["max"] or 0.0) == pytest.approx(float(expected[c["i"]]), rel=1e-3, abs=1e-4)
    bad = script_in_process(REPO / "scripts" / "dashboard.py", folder, "--out", tmp_path / "o2")
    assert bad.returncode == 2 and "pass --data-root DIR" in bad.stderr.strip().splitlines()[-1]


def _bare_run(folder: Path) -> Path:
    """A run directory as far as --out is concerned: a checkpoint (unreadable: nothing may load it first)."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"not a checkpoint")
    return folder


def test_out_takes_a_new_or_empty_folder_or_a_dashboard_of_the_same_run(tmp_path):
    from implicit_em.errors import DataError
    from implicit_em.lm.dashboard.build import SUMMARY, check_out

    run, other = _bare_run(tmp_path / "run"), _bare_run(tmp_path / "other")
    check_out(tmp_path / "new", run)
    (tmp_path / "empty").mkdir()
    check_out(tmp_path / "empty", run)
    out = tmp_path / "out"
    out.mkdir()
    (out / SUMMARY).write_text(json.dumps({"run_dir": str(run)}))  # an earlier dashboard of this run: rebuilt
    check_out(out, run)
    check_out(out, run / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError, match=f"{out} is not empty and holds no dashboard of {other}; pass another --out"):
        check_out(out, other)
    check_out(out, other, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file; pass a folder"):
        check_out(tmp_path / "file", run)


def test_the_script_refuses_a_folder_of_other_files_in_one_line_and_leaves_it_alone(tmp_path):
    run = _bare_run(tmp_path / "run")
    out = tmp_path / "out"
    out.mkdir()
    (out / "index.html").write_text("my own page")
    r = script_in_process(REPO / "scripts" / "dashboard.py", run, "--out", out)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "--overwrite" in lines[0] and "Traceback" not in r.stderr
    assert [p.name for p in out.iterdir()] == ["index.html"] and (out / "index.html").read_text() == "my own page"
    loads = script_in_process(REPO / "scripts" / "dashboard.py", run, "--out", out, "--overwrite")
    assert loads.returncode == 2 and "has no config.yaml" in loads.stderr  # past --out: the run is read
