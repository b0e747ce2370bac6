"""Other libraries' SAE folders through implicit_em.load: SAEs built and saved by SAELens and sparsify themselves
(random weights), then the codes and reconstructions compared with the library's own on the same inputs."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

import implicit_em
from implicit_em.errors import DataError

D, K = 12, 40
TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _x(n: int = 200, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter drawn N(0, 1) (thresholds: U(0, 1)), so that no bias or norm is trivially 0 or 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.rand(p.shape, generator=g) if "threshold" in name else torch.randn(p.shape, generator=g))


def _one_line_error(path, match: str) -> str:
    with pytest.raises(DataError, match=match) as e:
        implicit_em.load(path)
    assert "\n" not in str(e.value)
    return str(e.value)


# -- sparsify -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparsify():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # the eager decoder on CPU
    return pytest.importorskip("sparsify", reason="eai-sparsify is not installed: pip install -e '.[peers]'")


def _sparse_coder(sparsify, **options):
    torch.manual_seed(0)
    coder = sparsify.SparseCoder(D, sparsify.SparseCoderConfig(num_latents=K, k=5, **options), device="cpu")
    _randomise(coder)
    return coder


def test_a_sparsify_coder_loads_with_sparsifys_codes_and_reconstruction(sparsify, tmp_path):
    coder = _sparse_coder(sparsify)
    coder.save_to_disk(tmp_path / "peer")
    x = _x()
    with torch.no_grad():
        top = coder.encode(x)
        codes = torch.zeros(len(x), K).scatter_(1, top.top_indices, top.top_acts)
        rec = coder.decode(top.top_acts, top.top_indices)
        sae = implicit_em.load(tmp_path / "peer")
        torch.testing.assert_close(sae.encode(x), codes, **TOLERANCE)
        torch.testing.assert_close(sae.decode(sae.encode(x)), rec, **TOLERANCE)
        torch.testing.assert_close(sae(x), coder(x).sae_out, **TOLERANCE)
    assert (sae.n_components, sae.d_in, sae.k, sae.name, sae.architecture) == (K, D, 5, "topk", "topk")
    assert sae.source == "sparsify" and sae.path == tmp_path / "peer"
    assert bool(((sae.encode(x) > 0).sum(1) == 5).all())  # b_dec is subtracted first: without it codes differ
    _one_line_error(tmp_path, r"holds SAE folders \(peer\); pass one of them")  # sparsify saves one per hookpoint


@pytest.mark.parametrize(
    ("options", "match"),
    [({"transcode": True}, "transcode is set"), ({"skip_connection": True}, "skip_connection is set: its "),
     ({"activation": "groupmax"}, "activation 'groupmax' is not read here")],
)  # fmt: skip
def test_sparsify_options_not_run_here_are_refused_in_one_line(sparsify, tmp_path, options, match):
    _sparse_coder(sparsify, **options).save_to_disk(tmp_path / "peer")
    _one_line_error(tmp_path / "peer", match)


# -- SAELens --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sae_lens():
    return pytest.importorskip("sae_lens", reason="sae-lens is not installed: pip install -e '.[peers]'")


def _assert_as_sae_lens(model, sae) -> None:
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(x), model.encode(x), **TOLERANCE)
        torch.testing.assert_close(sae.decode(model.encode(x)), model.decode(model.encode(x)), **TOLERANCE)
    assert (sae.n_components, sae.d_in, sae.source) == (K, D, "sae_lens")


@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_a_sae_lens_standard_sae_loads_with_its_codes_and_reconstruction(sae_lens, tmp_path, apply_b_dec_to_input):
    model = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=K, apply_b_dec_to_input=apply_b_dec_to_input))
    _randomise(model)
    model.save_model(tmp_path / "sae")
    sae = implicit_em.load(tmp_path / "sae")
    _assert_as_sae_lens(model, sae)
    assert (sae.name, sae.k) == ("standard", None)


@pytest.mark.parametrize("rescale", [True, False])
def test_a_sae_lens_topk_sae_loads_with_its_codes_and_reconstruction(sae_lens, tmp_path, rescale):
    cfg = sae_lens.TopKSAEConfig(d_in=D, d_sae=K, k=6, rescale_acts_by_decoder_norm=rescale)
    model = sae_lens.TopKSAE(cfg)
    _randomise(model)  # decoder rows far from unit norm: the rescaling changes which codes win
    model.save_model(tmp_path / "sae")
    sae = implicit_em.load(tmp_path / "sae")
    _assert_as_sae_lens(model, sae)
    assert (sae.name, sae.architecture, sae.k) == ("topk", "topk", 6)


def test_a_sae_lens_jumprelu_sae_loads_with_its_codes_and_reconstruction(sae_lens, tmp_path):
    model = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=D, d_sae=K))
    _randomise(model)
    model.save_model(tmp_path / "sae")
    sae = implicit_em.load(tmp_path / "sae")
    _assert_as_sae_lens(model, sae)
    assert (sae.name, sae.architecture, sae.k) == ("jumprelu", "jumprelu", None)
    assert 0 < (sae.encode(_x()) > 0).float().mean() < 1  # the thresholds cut some codes, not all


def test_a_sae_lens_batchtopk_sae_runs_as_sae_lens_runs_it_at_inference(sae_lens, tmp_path):
    """SAELens saves a trained BatchTopK SAE as JumpReLU with its running threshold for every component; both
    its training save (architecture batchtopk) and that inference save load as SAELens's JumpReLU runs it."""
    model = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=K, k=4.0))
    _randomise(model)
    model.topk_threshold = torch.tensor(1.5, dtype=torch.double)
    model.save_model(tmp_path / "training")
    model.save_inference_model(tmp_path / "inference")
    reference = sae_lens.JumpReLUSAE.load_from_disk(tmp_path / "inference")
    assert json.loads((tmp_path / "training" / "cfg.json").read_text())["architecture"] == "batchtopk"
    for folder in ("training", "inference"):
        sae = implicit_em.load(tmp_path / folder)
        _assert_as_sae_lens(reference, sae)
        assert (sae.name, sae.architecture, sae.k) == ("batchtopk", "jumprelu", 4)


def test_sae_lens_options_not_run_here_are_refused_in_one_line(sae_lens, tmp_path):
    model = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=D, d_sae=K))
    model.save_model(tmp_path / "sae")
    cfg_path = tmp_path / "sae" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    for change, match in (({"normalize_activations": "layer_norm"}, "decoding needs the input"),
                          ({"normalize_activations": "expected_average_only_in"}, "fold_activation_norm_scaling"),
                          ({"architecture": "gated"}, "architecture 'gated' is not read here")):  # fmt: skip
        cfg_path.write_text(json.dumps({**cfg, **change}))
        _one_line_error(tmp_path / "sae", match)


# -- folders that are not SAEs ----------------------------------------------------------------------------------
def test_malformed_folders_are_refused_in_one_line_naming_what_is_missing(tmp_path):
    folder = tmp_path / "sae"
    folder.mkdir()
    assert "neither an SAE folder" in _one_line_error(folder, "pass one of those")
    (folder / "cfg.json").write_text(json.dumps({"d_in": D, "k": 3}))
    _one_line_error(folder, "has cfg.json but neither sae_weights.safetensors .* nor sae.safetensors")
    save_file({"encoder.weight": torch.zeros(K, D), "encoder.bias": torch.zeros(K)}, str(folder / "sae.safetensors"))
    _one_line_error(folder, "sae.safetensors lacks W_dec, b_dec; save the SAE again")
    (folder / "cfg.json").unlink()
    _one_line_error(folder, "has sae.safetensors but no cfg.json")
    (folder / "cfg.json").write_text("{not json")
    _one_line_error(folder, "cfg.json is not valid JSON")
    (folder / "sae.safetensors").unlink()
    save_file({"W_enc": torch.zeros(D, K), "b_enc": torch.zeros(K), "W_dec": torch.zeros(K, D + 1),
               "b_dec": torch.zeros(D)}, str(folder / "sae_weights.safetensors"))  # fmt: skip
    (folder / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    _one_line_error(folder, r"W_dec is \(40, 13\) where W_enc \(12, 40\) needs \(40, 12\)")
