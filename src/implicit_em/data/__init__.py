"""DataModules, one per data source, all serving in-memory tensors through :mod:`.memory`."""

from implicit_em.data.digits import DigitsDataModule
from implicit_em.data.memory import InMemoryDataModule, InMemoryLoader
from implicit_em.data.mnist import FashionMNISTDataModule, MNISTDataModule

__all__ = ["DigitsDataModule", "FashionMNISTDataModule", "InMemoryDataModule", "InMemoryLoader", "MNISTDataModule"]
