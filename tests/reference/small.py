"""PyTorch twins of `flax_attention/models/small.py`'s four models (NCHW), built from the other
references so that their `state_dict`s have the keys the Flax converters read:

- the backbone `TinyResNet`: tests/reference/resnet.py's ResNet with one `BasicBlock` in each of
  two stages (64 and 128 channels, output stride 8), `conv1` taking 1 input channel, no `fc`;
- `detr_small`: DETR (tests/reference/detr.py) with d_model 128, 8 heads, 2 + 2 layers,
  feed-forward 512, 10 queries, dropout 0, 10 classes; `DETRSmall.forward` also returns the
  first decoder layer's predictions ("aux_outputs"), as the Flax model does for the criterion;
- `DANetSmall` (junfu1115/DANet's `pretrained` + `head` = `DANetHead(128)`), `CCNetSmall`
  (speedinghzl/CCNet's layout: the backbone at the top level, `head` = `RCCAModule(128, 32)`,
  `dsn` on layer1, every BatchNorm an InPlaceABN), `FCNSmall` (the `encoding` package's FCN:
  `pretrained` + `head.conv5`).
  The segmenters return their logits upsampled bilinearly (aligned corners) to the input size:
  DANet `(fused, pam, cam)`, CCNet `(logits, dsn)`, FCN the logits; 11 classes.

The training semantics are those of the Flax models under `flax_attention.train`: the
segmenters' BatchNorms use batch statistics in train mode and their heads' channel dropout is
0.1 (the FCN's `Dropout2d`, as the Flax FCN; `encoding`'s FCNHead drops single elements). DETR's
backbone BatchNorms keep fixed statistics (`FrozenBatchNorm2d`) but, as in the Flax trainer,
which optimises every parameter, their scale and bias are trainable parameters here (DETR's are
buffers), so both sides count and update the same parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.criss_cross import InPlaceABN, RCCAModule, to_inplace_abn
from tests.reference.danet import DANetHead
from tests.reference.detr import DETR, Backbone, FrozenBatchNorm2d, Joiner
from tests.reference.resnet import BasicBlock, ResNet
from tests.reference.transformer import PositionEmbeddingSine, Transformer

CHANNELS = 128  # the backbone's output channels
HEAD_WIDTH = CHANNELS // 4
SEG_CLASSES, DET_CLASSES = 11, 10


class TinyResNet(ResNet):
    """The first two stages of a ResNet-10 on single-channel images, without `fc`."""

    def __init__(self, in_channels: int = 1):
        super().__init__(BasicBlock, [1, 1])
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        del self.fc

    def stages(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[B, C, H, W]` -> layer1 `[B, 64, H / 4, W / 4]`, layer2 `[B, 128, H / 8, W / 8]`."""
        layer1 = self.layer1(self.maxpool(torch.relu(self.bn1(self.conv1(x)))))
        return layer1, self.layer2(layer1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def _upsample(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size, mode="bilinear", align_corners=True)


class DANetSmall(nn.Module):
    def __init__(self, nclass: int = SEG_CLASSES):
        super().__init__()
        self.pretrained = TinyResNet()
        self.head = DANetHead(CHANNELS, nclass)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(_upsample(o, x.shape[2:]) for o in self.head(self.pretrained(x)))


class CCNetSmall(TinyResNet):
    def __init__(self, num_classes: int = SEG_CLASSES, recurrence: int = 2):
        super().__init__()
        self.head = RCCAModule(CHANNELS, HEAD_WIDTH, num_classes, recurrence)
        self.dsn = nn.Sequential(nn.Conv2d(64, HEAD_WIDTH, 3, 1, 1), InPlaceABN(HEAD_WIDTH),
                                 nn.Dropout2d(0.1), nn.Conv2d(HEAD_WIDTH, num_classes, 1))
        to_inplace_abn(self)  # CCNet's backbone BatchNorms are InPlaceABNs too

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer1, layer2 = self.stages(x)
        return _upsample(self.head(layer2), x.shape[2:]), _upsample(self.dsn(layer1), x.shape[2:])


class FCNHead(nn.Module):
    """The `encoding` package's FCNHead (`conv5`: 3x3 conv to C / 4, BN, ReLU, dropout, 1x1)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        inter = in_channels // 4
        self.conv5 = nn.Sequential(nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
                                   nn.BatchNorm2d(inter), nn.ReLU(), nn.Dropout2d(0.1),
                                   nn.Conv2d(inter, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv5(x)


class FCNSmall(nn.Module):
    def __init__(self, nclass: int = SEG_CLASSES):
        super().__init__()
        self.pretrained = TinyResNet()
        self.head = FCNHead(CHANNELS, nclass)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _upsample(self.head(self.pretrained(x)), x.shape[2:])


class DETRSmall(DETR):
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images `[B, 1, H, W]` -> the last decoder layer's `pred_logits` `[B, Q, K + 1]`,
        `pred_boxes` `[B, Q, 4]` and "aux_outputs", the earlier layers' as a list of dicts."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        src, mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos)[0]
        logits, boxes = self.class_embed(hs), self.bbox_embed(hs).sigmoid()
        return {"pred_logits": logits[-1], "pred_boxes": boxes[-1],
                "aux_outputs": [{"pred_logits": a, "pred_boxes": b}
                                for a, b in zip(logits[:-1], boxes[:-1], strict=True)]}


def _trainable_affine(module: nn.Module) -> None:
    """Makes every `FrozenBatchNorm2d`'s weight and bias parameters (same keys)."""
    for bn in module.modules():
        if isinstance(bn, FrozenBatchNorm2d):
            for name in ("weight", "bias"):
                value = bn._buffers.pop(name)
                bn.register_parameter(name, nn.Parameter(value))


def detr_small(num_classes: int = DET_CLASSES) -> DETRSmall:
    hidden = 128
    resnet = TinyResNet()
    resnet.fc = nn.Identity()  # what DETR's Backbone deletes
    backbone = Joiner(Backbone(resnet), PositionEmbeddingSine(hidden // 2, normalize=True))
    _trainable_affine(backbone)
    transformer = Transformer(hidden, 8, 2, 2, 512, dropout=0.0, return_intermediate_dec=True)
    return DETRSmall(backbone, transformer, num_classes, num_queries=10, hidden_dim=hidden)


# the twin of each of `flax_attention.models.registry`'s small models
TWINS = {"detr-small": detr_small, "danet-small": DANetSmall, "ccnet-small": CCNetSmall,
         "fcn-small": FCNSmall}
