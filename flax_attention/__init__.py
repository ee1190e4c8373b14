"""flax-attention: the attention mechanisms of computer vision as Flax modules.

The math of each mechanism is a pure function in `flax_attention.functional`, the main ones
re-exported here (`flax_attention.non_local` is the function; `from flax_attention.non_local
import NonLocal2D` still reads the block's module); the modules own the parameters;
`flax_attention.interop.torch.from_torch` loads the reference PyTorch implementations' weights;
whole networks are in `flax_attention.models`.
"""

from flax_attention import functional
from flax_attention.cbam import CbamModule, LightCbamModule
from flax_attention.coord_attention import CoordAttention
from flax_attention.criss_cross import CrissCrossAttention, RCCAModule
from flax_attention.danet import ChannelAttention, DANetHead, PositionAttention
from flax_attention.deform_conv import DeformConv2d
from flax_attention.deformable_attention import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MSDeformAttn,
)
from flax_attention.deformable_transformer import (
    DeformableTransformer,
    DeformableTransformerDecoder,
)
from flax_attention.eca import CecaModule, EcaModule
from flax_attention.effective_se import EffectiveSEModule
from flax_attention.functional import (
    affine_grid,
    affine_matrix,
    attention_residual,
    bilinear_sample,
    blockwise_attention,
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    channel_attention,
    channel_attention_weights,
    combine_masks,
    criss_cross_aggregate,
    criss_cross_attention,
    criss_cross_weights,
    deform_conv2d,
    dot_product_attention,
    dot_product_attention_weights,
    excite,
    gaussian_log_prob,
    generalized_box_iou,
    generalized_box_iou_loss,
    hybrid_loss,
    interpolate_bilinear,
    learned_position_embedding,
    ms_deform_attn,
    non_local_weights,
    position_attention,
    position_attention_weights,
    reinforce_surrogate,
    retina,
    sine_position_embedding,
    squeeze_excitation_gates,
)
from flax_attention.gather_excite import GatherExcite
from flax_attention.glimpse import GlimpseSensor
from flax_attention.global_context import GlobalContext
from flax_attention.models.ram import RecurrentAttentionModel
from flax_attention.multi_head_attention import MultiHeadAttention
from flax_attention.non_local import NonLocal1D, NonLocal2D, NonLocal3D
from flax_attention.position_encoding import PositionEmbeddingLearned, PositionEmbeddingSine
from flax_attention.residual_attention import PreActBottleneck, ResidualAttentionModule
from flax_attention.selective_kernel import SelectiveKernel, SelectiveKernelAttn
from flax_attention.spatial_transformer import LocalizationNet, SpatialTransformer
from flax_attention.squeeze_excitation import SEBasicBlock, SEBottleneck, SELayer, SEModule
from flax_attention.transformer import (
    Transformer,
    TransformerDecoder,
    TransformerDecoderLayer,
    TransformerEncoder,
    TransformerEncoderLayer,
)
from flax_attention.xla_options import compiler_options

# Importing the block's module above bound `non_local` to that module; the public name is the
# function (the module stays in `sys.modules`, so `from flax_attention.non_local import ...` works).
non_local = functional.non_local

__version__ = "0.1.0"

__all__ = [
    "functional",
    "compiler_options",
    # the timm family, under timm's class names
    "CbamModule",
    "CecaModule",
    "CoordAttention",
    "EcaModule",
    "EffectiveSEModule",
    "GatherExcite",
    "GlobalContext",
    "LightCbamModule",
    "SEModule",
    "SelectiveKernel",
    "SelectiveKernelAttn",
    "affine_grid",
    "affine_matrix",
    "attention_residual",
    "bilinear_sample",
    "blockwise_attention",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "channel_attention",
    "channel_attention_weights",
    "combine_masks",
    "criss_cross_aggregate",
    "criss_cross_attention",
    "criss_cross_weights",
    "deform_conv2d",
    "dot_product_attention",
    "dot_product_attention_weights",
    "excite",
    "gaussian_log_prob",
    "hybrid_loss",
    "reinforce_surrogate",
    "retina",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "interpolate_bilinear",
    "learned_position_embedding",
    "ms_deform_attn",
    "non_local",
    "non_local_weights",
    "position_attention",
    "position_attention_weights",
    "sine_position_embedding",
    "squeeze_excitation_gates",
    "ChannelAttention",
    "GlimpseSensor",
    "RecurrentAttentionModel",
    "CrissCrossAttention",
    "DANetHead",
    "DeformConv2d",
    "DeformableTransformer",
    "DeformableTransformerDecoder",
    "DeformableTransformerDecoderLayer",
    "DeformableTransformerEncoder",
    "DeformableTransformerEncoderLayer",
    "LocalizationNet",
    "MSDeformAttn",
    "MultiHeadAttention",
    "NonLocal1D",
    "NonLocal2D",
    "NonLocal3D",
    "PositionAttention",
    "PositionEmbeddingLearned",
    "PositionEmbeddingSine",
    "PreActBottleneck",
    "RCCAModule",
    "ResidualAttentionModule",
    "SEBasicBlock",
    "SEBottleneck",
    "SELayer",
    "SpatialTransformer",
    "Transformer",
    "TransformerDecoder",
    "TransformerDecoderLayer",
    "TransformerEncoder",
    "TransformerEncoderLayer",
]
