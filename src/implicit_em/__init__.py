"""implicit-em: decoder-free sparse autoencoders trained as implicit expectation-maximization."""

__version__ = "0.1.0"


def load(path):
    """A ``scripts/export.py`` directory, a run directory or a checkpoint as a torch module with ``encode(x)`` and
    ``decode(f)`` on raw inputs (loaded with ``weights_only=True`` / safetensors: never code)."""
    from implicit_em.export import load as _load

    return _load(path)
