"""Whole networks built from the attention blocks."""

from flax_attention.models import resnet
from flax_attention.models.resnet import *  # noqa: F403

__all__ = [*resnet.__all__]
