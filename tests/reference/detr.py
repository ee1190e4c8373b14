"""PyTorch reference of facebookresearch/detr's whole `DETR` (models/detr.py, backbone.py), with
its exact module names, so its `state_dict` has the keys of DETR's checkpoints:
`backbone.0.body.*` (torchvision's ResNet with `FrozenBatchNorm2d`, `IntermediateLayerGetter` up to
layer4, no `fc`), `transformer.*`, `input_proj`, `query_embed`, `class_embed`,
`bbox_embed.layers.{0,1,2}`. Images NCHW; the padding mask is an argument (DETR's `NestedTensor`).
The backbone may be any of tests/reference/resnet.py's ResNets (DETR's `--backbone resnet18`,
`resnet34`, `resnet50`, `resnet101`; `--dilation` is `replace_stride_with_dilation[2]`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests.reference.resnet import ResNet
from tests.reference.transformer import PositionEmbeddingSine, Transformer


class FrozenBatchNorm2d(nn.Module):
    """DETR's BatchNorm with fixed statistics and affine parameters (buffers), eps 1e-5."""

    def __init__(self, n: int):
        super().__init__()
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1)
                                                     + 1e-5).rsqrt()
        bias = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + bias


def _freeze_batch_norms(module: nn.Module) -> None:
    """torchvision's `norm_layer=FrozenBatchNorm2d`: every BatchNorm2d replaced, same names."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, FrozenBatchNorm2d(child.num_features))
        else:
            _freeze_batch_norms(child)


class Backbone(nn.Module):
    """DETR's `Backbone`: `body` is the ResNet without `fc`; the mask is resized as DETR does."""

    def __init__(self, resnet: ResNet):
        super().__init__()
        del resnet.fc
        _freeze_batch_norms(resnet)
        self.body = resnet
        last = getattr(resnet, f"layer{resnet.num_layers}")[-1]  # layer4 but in tiny ResNets
        self.num_channels = last.planes * last.expansion

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        x = self.body.forward_features(images)
        mask = F.interpolate(mask[None].float(), size=x.shape[-2:]).to(torch.bool)[0]
        return x, mask


class Joiner(nn.Sequential):
    """`backbone.0` the Backbone, `backbone.1` the position embedding (no parameters)."""

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        x, mask = self[0](images, mask)
        return x, mask, self[1](mask).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        self.num_layers = num_layers
        h = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in
                                    zip([input_dim, *h], [*h, output_dim], strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < self.num_layers - 1 else layer(x)
        return x


class DETR(nn.Module):
    def __init__(self, backbone: Joiner, transformer: Transformer, num_classes: int,
                 num_queries: int, hidden_dim: int):
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone[0].num_channels, hidden_dim, kernel_size=1)
        self.backbone = backbone

    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None) -> dict:
        """images `[B, 3, H, W]`, mask `[B, H, W]` (True = padded) -> the last decoder layer's
        `pred_logits` `[B, Q, K + 1]` and `pred_boxes` `[B, Q, 4]`."""
        if mask is None:
            mask = torch.zeros(images.shape[0], *images.shape[2:], dtype=torch.bool)
        src, mask, pos = self.backbone(images, mask)
        hs = self.transformer(self.input_proj(src), mask, self.query_embed.weight, pos)[0]
        return {"pred_logits": self.class_embed(hs)[-1],
                "pred_boxes": self.bbox_embed(hs).sigmoid()[-1]}


def build_detr(resnet: ResNet, num_classes: int = 91, num_queries: int = 100,
               hidden_dim: int = 256, nheads: int = 8, enc_layers: int = 6, dec_layers: int = 6,
               dim_feedforward: int = 2048, pre_norm: bool = False) -> DETR:
    """DETR's `build` (main.py's argument names), sine position embedding, eval mode."""
    backbone = Joiner(Backbone(resnet), PositionEmbeddingSine(hidden_dim // 2, normalize=True))
    transformer = Transformer(hidden_dim, nheads, enc_layers, dec_layers, dim_feedforward,
                              dropout=0.1, normalize_before=pre_norm,
                              return_intermediate_dec=True)
    return DETR(backbone, transformer, num_classes, num_queries, hidden_dim).eval()
