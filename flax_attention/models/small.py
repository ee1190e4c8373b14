"""Small DETR, DANet, CCNet and FCN for the embedded 64 x 64 single-channel canvases
(`data.load_dataset("digit-detection" | "digit-segmentation")`), trainable on a CPU in minutes.

All four share one backbone, `tiny_resnet`: the first two stages of a ResNet-10 (the 7x7 stem
and max-pool, then one `BasicBlock` of 64 and one of 128 channels), output stride 8, so a
64 x 64 canvas gives an 8 x 8 feature map of 128 channels. The heads keep their references'
structure at a width of C / 4 = 32 (DANet's `inter`; CCNet's bottleneck and deep-supervision
head; the FCN baseline's `conv5`), so the segmenters differ only in the attention:

- `detr_small`: d_model 128, 8 heads, 2 encoder and 2 decoder layers, feed-forward 512, 10
  queries (a canvas holds at most 5 digits), no dropout (short runs), 10 classes.
- `danet_small`, `ccnet_small` (with the deep-supervision head `dsn` on layer1, as the reference
  puts it on the stage before the last), `fcn_small`: 11 classes (background and the digits).

Any ResNet input channel count works: `conv1` takes the images' channels (1 here).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from flax_attention.models.detr import DETR
from flax_attention.models.resnet import BasicBlock, ResNet
from flax_attention.models.segmentation import FCN, CCNet, DANet

__all__ = ["ccnet_small", "danet_small", "detr_small", "fcn_small", "tiny_resnet"]

_TINY_STAGES = 2
_HEAD_WIDTH = 32  # C / 4 of the backbone's 128 channels


def tiny_resnet(*, replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                **fields) -> ResNet:
    """The first two stages of a ResNet-10 (`[B, H, W, C]` -> `[B, H / 8, W / 8, 128]`).

    Args:
      replace_stride_with_dilation: in the four-stage convention of the segmenters'
        `output_stride` (one entry per stage after the first); the entries of the stages it
        lacks are ignored, so its output stride is 8 for output_stride 8, 16 or 32.
      **fields: the other `ResNet` fields (features_only, feature_stages, dtype, name, ...).
    """
    return ResNet(block_cls=BasicBlock, stage_sizes=(1,) * _TINY_STAGES,
                  replace_stride_with_dilation=tuple(replace_stride_with_dilation)[
                      :_TINY_STAGES - 1], **fields)


detr_small = functools.partial(
    DETR, num_classes=10, num_queries=10, backbone=tiny_resnet, hidden_dim=128, nheads=8,
    num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=512, dropout=0.0)
danet_small = functools.partial(DANet, num_classes=11, backbone=tiny_resnet)
ccnet_small = functools.partial(
    CCNet, num_classes=11, backbone=tiny_resnet, head_channels=_HEAD_WIDTH, dsn=True,
    dsn_channels=_HEAD_WIDTH, dsn_stages=(1, 2))
fcn_small = functools.partial(FCN, num_classes=11, backbone=tiny_resnet)
