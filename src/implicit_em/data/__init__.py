"""DataModules, one per data source, on the base classes of :mod:`.memory`.

Select one with ``--config configs/data/<name>.yaml``: digits, mnist, fashion_mnist, cifar10, synthetic,
and a causal LM's activations (shards on disk, streamed:
:class:`implicit_em.lm.activations.ActivationsDataModule`).
"""

from implicit_em.data.cifar10 import CIFAR10DataModule
from implicit_em.data.digits import DigitsDataModule
from implicit_em.data.memory import ComponentDataModule, InMemoryDataModule, InMemoryLoader
from implicit_em.data.mnist import FashionMNISTDataModule, MNISTDataModule
from implicit_em.data.synthetic import SyntheticMixtureDataModule

__all__ = [
    "CIFAR10DataModule",
    "ComponentDataModule",
    "DigitsDataModule",
    "FashionMNISTDataModule",
    "InMemoryDataModule",
    "InMemoryLoader",
    "MNISTDataModule",
    "SyntheticMixtureDataModule",
]
