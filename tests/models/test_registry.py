"""The model registry: every model file registers itself under one name, and a saved name finds its class again."""

from __future__ import annotations

import pytest

from implicit_em.errors import ConfigError
from implicit_em.models import MODELS, Net, model_class, model_names
from implicit_em.models.registry import class_path
from implicit_em.models.sae import SparseAutoencoder


@pytest.fixture
def registry(monkeypatch):
    """MODELS as it is, restored after the test (names registered by the test are dropped)."""
    monkeypatch.setattr("implicit_em.models.registry.MODELS", dict(MODELS))
    from implicit_em.models import registry as module

    return module


def test_every_model_module_registers_its_net_under_its_name():
    for name in ("implicit_em", "sae", "topk_sae", "batchtopk_sae"):
        cls = MODELS[name]
        assert issubclass(cls, Net) and cls.name == name
    assert model_names() == sorted(MODELS) and len(set(model_names())) == len(MODELS)


@pytest.mark.parametrize("spelling", ["sae", "SparseAutoencoder", "implicit_em.models.sae.SparseAutoencoder"])
def test_a_name_a_class_name_or_a_class_path_finds_the_class(spelling):
    assert model_class(spelling) is SparseAutoencoder
    assert class_path(SparseAutoencoder) == "implicit_em.models.sae.SparseAutoencoder"


def test_an_unknown_model_is_one_line_listing_the_registered_ones():
    with pytest.raises(ConfigError) as e:
        model_class("saee")
    message = str(e.value)
    assert "unknown model 'saee'" in message and "\n" not in message
    assert all(name in message for name in model_names())


def test_register_adds_a_class_and_names_it(registry):
    @registry.register("toy")
    class Toy(Net):
        pass

    assert registry.MODELS["toy"] is Toy and Toy.name == "toy"
    assert registry.model_class("Toy") is Toy
    assert registry.register("toy")(Toy) is Toy  # the same class again: no error


def test_a_second_class_under_a_taken_name_is_refused(registry):
    class Other(Net):
        pass

    with pytest.raises(ValueError, match="registered twice"):
        registry.register("sae")(Other)
    assert registry.MODELS["sae"] is SparseAutoencoder
