"""flax-attention: the attention mechanisms of computer vision as Flax modules."""

__version__ = "0.1.0"
