"""Export to the SAELens layout and load back: raw activations in, the same reconstructions out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from implicit_em.errors import ConfigError, DataError
from implicit_em.export import export_run, find_normalization, load
from implicit_em.run.rundir import RunDir

REPO = Path(__file__).resolve().parents[1]
D, K = 6, 10


def _normalization(seed: int = 0) -> dict:
    """A nontrivial x' = ((x - mean) * scale) @ matrix: every part present, the matrix well conditioned."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(D, D, generator=g))
    return {
        "mean": torch.randn(D, generator=g) * 3,
        "scale": torch.rand(D, generator=g) + 0.5,
        "matrix": q @ torch.diag(torch.rand(D, generator=g) + 0.5),
    }


def _normalise(x: torch.Tensor, norm: dict) -> torch.Tensor:
    return ((x.double() - norm["mean"].double()) * norm["scale"].double()) @ norm["matrix"].double()


def _unnormalise(x: torch.Tensor, norm: dict) -> torch.Tensor:
    return (x.double() @ torch.linalg.inv(norm["matrix"].double())) / norm["scale"].double() + norm["mean"].double()


def _run(
    tmp_path: Path, kind: str = "implicit_em", activation: str = "relu", readout: bool = True, k=None,
    net_args: dict | None = None, buffers: dict | None = None,
) -> dict:  # fmt: skip
    """A run directory as scripts/train.py leaves it, with random weights (``net_args``: more of the net's
    init_args; ``buffers``: more of its state, by name under ``model.``)."""
    g = torch.Generator().manual_seed(1)
    w, b = torch.randn(K, D, generator=g), torch.randn(K, generator=g) * 0.5
    hparams = {"_class_path": "implicit_em.training.module.ComponentModule", "in_features": D, "n_components": K,
               "k": k, "seed": 0}  # fmt: skip
    if kind == "implicit_em":
        state = {"model.linear.weight": w, "model.linear.bias": b}
        module = "implicit_em_sparse.ImplicitEMSparse" if k else "implicit_em.ImplicitEM"  # k: the sparse model
        net = f"implicit_em.models.{module}\n      init_args:\n        activation: {activation}"
        net += "".join(f"\n        {key}: {value}" for key, value in (net_args or {}).items())
        state.update({f"model.{name}": t for name, t in (buffers or {}).items()})
    else:
        state = {
            "model.encoder.weight": w, "model.encoder.bias": b,
            "model.decoder.weight": torch.randn(D, K, generator=g), "model.decoder.bias": torch.randn(D, generator=g),
        }  # fmt: skip
        net = "implicit_em.models.topk_sae.TopKSAE" if k else "implicit_em.models.sae.SparseAutoencoder"
    norm = _normalization()
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = {
        "state_dict": state,
        "hyper_parameters": hparams,
        "global_step": 7,
        "DigitsDataModule": {"normalization": norm},
    }
    torch.save(ckpt, run / "checkpoints" / "epoch=0-step=7.ckpt")
    (run / "checkpoints" / "last.ckpt").symlink_to("epoch=0-step=7.ckpt")
    (run / "config.yaml").write_text(
        "data:\n  class_path: implicit_em.data.DigitsDataModule\n  init_args:\n    batch_size: 8\n"
        f"model:\n  class_path: implicit_em.training.module.ComponentModule\n  init_args:\n    net:\n      class_path: {net}\n"
    )
    r, c = torch.randn(K, D, generator=g), torch.randn(D, generator=g)
    if readout:
        RunDir(run).save_readout({"R": r, "c": c})
    return {"run": run, "w": w, "b": b, "R": r, "c": c, "norm": norm, "state": state}


def _reference(run: dict, x: torch.Tensor, decoder: str = "readout", k=None):
    """Features and raw reconstruction computed the way training and the evaluation do: normalise, encode,
    read out in the normalised space, unnormalise."""
    xn = _normalise(x, run["norm"])
    f = torch.relu(xn @ run["w"].double().T + run["b"].double())
    if k:
        f = torch.zeros_like(f).scatter(1, f.topk(k, dim=1).indices, f.topk(k, dim=1).values)
    if decoder == "readout":
        x_hat = f @ run["R"].double() + run["c"].double()
    else:
        x_hat = f @ run["state"]["model.decoder.weight"].double().T + run["state"]["model.decoder.bias"].double()
    return f, _unnormalise(x_hat, run["norm"])


def _raw(n: int = 64) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(5)) * 2 + 1


def test_export_load_round_trip_on_raw_activations(tmp_path):
    run = _run(tmp_path)
    x = _raw()
    f_ref, x_hat_ref = _reference(run, x)
    out = export_run(run["run"], tmp_path / "export")
    model = load(out)
    torch.testing.assert_close(model.encode(x).double(), f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x).double(), x_hat_ref, atol=1e-5, rtol=1e-5)
    # the same from the run directory and from the checkpoint, exported in memory
    for source in (run["run"], run["run"] / "checkpoints" / "last.ckpt"):
        torch.testing.assert_close(load(source)(x), model(x), atol=1e-6, rtol=1e-6)


def test_the_files_have_the_sae_lens_names_shapes_and_formula(tmp_path):
    run = _run(tmp_path)
    out = export_run(run["run"], tmp_path / "export")
    w = load_file(str(out / "sae_weights.safetensors"))
    cfg = json.loads((out / "cfg.json").read_text())
    assert {n: tuple(t.shape) for n, t in w.items()} == {"W_enc": (D, K), "b_enc": (K,), "W_dec": (K, D), "b_dec": (D,)}
    assert all(t.dtype == torch.float32 for t in w.values())
    assert (cfg["d_in"], cfg["d_sae"], cfg["architecture"], cfg["apply_b_dec_to_input"]) == (D, K, "standard", False)
    assert cfg["activation_fn_str"] == "relu" and cfg["normalize_activations"] == "none"
    assert isinstance(cfg["hook_name"], str) and cfg["dtype"] == "float32"
    assert cfg["implicit_em"]["data"]["class_path"] == "implicit_em.data.DigitsDataModule"
    assert cfg["implicit_em"]["normalization_folded"] == {"mean": True, "scale": True, "matrix": True}
    x = _raw()
    x_hat = torch.relu(x @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]  # what a SAELens user computes
    torch.testing.assert_close(x_hat.double(), _reference(run, x)[1], atol=1e-5, rtol=1e-5)


def test_find_normalization_in_a_checkpoint():
    norm = {"mean": torch.zeros(2), "scale": None, "matrix": None}
    found = find_normalization({"state_dict": {}, "ActivationsDataModule": {"normalization": norm}})
    assert torch.equal(found.mean, norm["mean"]) and found.scale is None
    assert find_normalization({"state_dict": {}, "loops": {}}).is_identity


def test_an_unregistered_model_is_refused_in_one_line(tmp_path):
    run = _run(tmp_path)
    config = (run["run"] / "config.yaml").read_text().replace("implicit_em.models.implicit_em.ImplicitEM", "my.Model")
    (run["run"] / "config.yaml").write_text(config)
    with pytest.raises(ConfigError, match="unknown model 'my.Model'; registered models: .*batchtopk_sae") as e:
        export_run(run["run"], tmp_path / "export")
    assert "\n" not in str(e.value)


def test_the_repr_names_the_architecture_and_the_sizes(tmp_path):
    run = _run(tmp_path, kind="sae", k=3)
    sae = load(run["run"])
    text = repr(sae)
    assert "architecture=topk" in text and f"d_in={D}" in text and f"d_sae={K}" in text and "k=3" in text
    assert (sae.name, sae.k, sae.n_components, sae.d_in, sae.source) == ("topk", 3, K, D, "implicit_em")


def test_other_activations_are_refused(tmp_path):
    run = _run(tmp_path, activation="softplus")
    with pytest.raises(ConfigError, match="activation 'softplus'") as e:
        export_run(run["run"], tmp_path / "export")
    assert "\n" not in str(e.value)


def test_a_run_without_its_readout_is_refused(tmp_path):
    run = _run(tmp_path, readout=False)
    with pytest.raises(DataError, match="readout.safetensors is missing"):
        load(run["run"])


def test_an_sae_exports_its_own_decoder_or_the_readout(tmp_path):
    run = _run(tmp_path, kind="sae")
    x = _raw()
    torch.testing.assert_close(load(run["run"])(x).double(), _reference(run, x, "decoder")[1], atol=1e-5, rtol=1e-5)
    out = export_run(run["run"], tmp_path / "export", use_readout=True)
    torch.testing.assert_close(load(out)(x).double(), _reference(run, x, "readout")[1], atol=1e-5, rtol=1e-5)


def test_a_topk_sae_exports_its_k(tmp_path):
    run = _run(tmp_path, kind="sae", k=3)
    out = export_run(run["run"], tmp_path / "export")
    cfg = json.loads((out / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["activation_fn_str"], cfg["activation_fn_kwargs"]) == ("topk", "topk", {"k": 3})
    model, x = load(out), _raw()
    assert ((model.encode(x) != 0).sum(1) <= 3).all()
    torch.testing.assert_close(model(x).double(), _reference(run, x, "decoder", k=3)[1], atol=1e-5, rtol=1e-5)


def test_the_cli_exports_and_fails_in_one_line(tmp_path):
    """scripts/export.py's ``main`` in this process: exit 0 and the export folder's path on stdout; a missing run:
    exit 2 and one line naming it."""
    from tests.conftest import script_in_process

    run = _run(tmp_path)
    script = REPO / "scripts" / "export.py"
    ok = script_in_process(script, run["run"], "--out", tmp_path / "e")
    assert ok.returncode == 0, ok.stderr
    assert Path(ok.stdout.strip()) == (tmp_path / "e").resolve() and (tmp_path / "e" / "cfg.json").is_file()
    bad = script_in_process(script, tmp_path / "nowhere", "--out", tmp_path / "f")
    assert bad.returncode == 2 and bad.stdout == "" and not (tmp_path / "f").exists()
    assert bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


def test_a_corrupt_readout_is_one_line(tmp_path):
    run = _run(tmp_path, readout=False)
    (run["run"] / "readout.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DataError, match="not a readable safetensors"):
        load(run["run"])
    save_file({"R": torch.zeros(K, D)}, str(run["run"] / "readout.safetensors"))
    with pytest.raises(DataError, match="lacks R or c"):
        load(run["run"])


def test_a_trained_run_exports_the_fvu_it_was_judged_by(tmp_path):
    """The acceptance check in small: train on digits with ZCA whitening, judge the features, save the
    readout, export; the FVU recomputed from the exported files on raw inputs equals the evaluation's."""
    from implicit_em.eval.sae_metrics import readout_scores, sae_evaluation
    from implicit_em.experiments.rows import Data, module_row
    from implicit_em.run.app import fit_run, rebuild

    metrics_path = fit_run([
        "--config", str(REPO / "configs" / "default.yaml"), "--data.normalization", "zca",
        "--model.n_components", "24", "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path),
        "--trainer.enable_progress_bar", "false", "--components.every_n_epochs", "0", "--probe.every_n_epochs", "0",
        "--report.kmeans", "false", "--report.probe_method", "torch",
    ])  # fmt: skip
    run_dir = metrics_path.parent
    module, datamodule = rebuild(run_dir)
    datamodule.setup("fit")
    data = Data.of(datamodule)
    f = module_row(module).features(data)
    s = data.splits
    metrics, readout = sae_evaluation(
        f["train"], s["train"].x, f["val"], s["val"].x, f["test"], s["test"].x, None, None, to_raw=data.to_raw
    )
    RunDir(run_dir).save_readout(readout.state_dict())
    out = export_run(run_dir, tmp_path / "export")
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["implicit_em"]["normalization_folded"] == {"mean": True, "scale": False, "matrix": True}
    w = load_file(str(out / "sae_weights.safetensors"))
    raw = data.to_raw(s["test"].x)
    x_hat = torch.relu(raw @ w["W_enc"] + w["b_enc"]) @ w["W_dec"] + w["b_dec"]
    assert readout_scores(raw, x_hat)["fvu"] == pytest.approx(metrics["fvu"], abs=1e-4)
    torch.testing.assert_close(load(out).encode(raw), f["test"], atol=1e-4, rtol=1e-4)


def test_a_folder_that_is_not_empty_is_refused_unless_overwrite(tmp_path):
    run = _run(tmp_path)
    out = tmp_path / "export"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not empty; pass --overwrite"):
        export_run(run["run"], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # nothing written
    export_run(run["run"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "cfg.json").is_file()
