"""implicit-em: decoder-free sparse autoencoders trained as implicit expectation-maximization."""

__version__ = "0.1.0"
