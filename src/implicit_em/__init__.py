"""implicit-em: decoder-free sparse autoencoders trained as implicit expectation-maximization."""

__version__ = "0.1.0"


def load(path):
    """An SAE folder (``scripts/export.py``'s, SAELens's or sparsify's), a run directory or a checkpoint as a torch
    module with ``encode(x)`` and ``decode(f)`` on raw inputs, and ``n_components``, ``d_in``, ``k``, ``name``,
    ``source`` (:class:`implicit_em.sae_folders.ExportedSAE`; read with ``weights_only=True`` / safetensors: never code)."""
    from implicit_em.export import load as _load

    return _load(path)
