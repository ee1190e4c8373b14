"""Whole networks built from the attention blocks, and the registry that names them.

`create(name, num_classes=..., **overrides)` builds any of `list_models()`.
"""

from flax_attention.models.byobnet import (
    ByobBottleneck,
    ByobNet,
    gcresnet50t,
)
from flax_attention.models.detr import (
    DETR,
    MLP,
    detr_resnet50,
    downsample_mask,
)
from flax_attention.models.ram import (
    RamOutput,
    RecurrentAttentionModel,
)
from flax_attention.models.registry import (
    create,
    list_models,
)
from flax_attention.models.residual_attention import (
    ResidualAttentionNetwork,
    residual_attention_56,
    residual_attention_56_cifar,
    residual_attention_92,
    residual_attention_92_cifar,
)
from flax_attention.models.resnet import (
    BasicBlock,
    Bottleneck,
    ResNet,
    resnet18,
    resnet34,
    resnet50,
    resnet101,
    resnet152,
    se_resnet18,
    se_resnet34,
    se_resnet50,
    se_resnet101,
    se_resnet152,
    se_resnext50_32x4d,
)
from flax_attention.models.segmentation import (
    CCNet,
    DANet,
    ccnet_resnet50,
    ccnet_resnet101,
    danet_resnet50,
    danet_resnet101,
)
from flax_attention.models.timm_resnet import (
    SelectiveKernelBasic,
    cbam_resnet50,
    ecaresnet26t,
    ecaresnet50d,
    ecaresnet50t,
    resnet50d,
    seresnet18,
    seresnet34,
    seresnet50,
    seresnet50t,
    skresnet18,
    skresnet34,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet101",
    "resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "se_resnet101",
    "se_resnet152",
    "se_resnet18",
    "se_resnet34",
    "se_resnet50",
    "se_resnext50_32x4d",
    "SelectiveKernelBasic",
    "ByobBottleneck",
    "ByobNet",
    "gcresnet50t",
    "cbam_resnet50",
    "ecaresnet26t",
    "ecaresnet50d",
    "ecaresnet50t",
    "resnet50d",
    "seresnet18",
    "seresnet34",
    "seresnet50",
    "seresnet50t",
    "skresnet18",
    "skresnet34",
    "ResidualAttentionNetwork",
    "residual_attention_56",
    "residual_attention_56_cifar",
    "residual_attention_92",
    "residual_attention_92_cifar",
    "CCNet",
    "DANet",
    "ccnet_resnet101",
    "ccnet_resnet50",
    "danet_resnet101",
    "danet_resnet50",
    "DETR",
    "MLP",
    "detr_resnet50",
    "downsample_mask",
    "RamOutput",
    "RecurrentAttentionModel",
    "create",
    "list_models",
]
