"""The math of every mechanism as pure functions (arrays in, arrays out), NHWC.

One file per mechanism family; everything public is re-exported here, so
`flax_attention.functional.criss_cross_attention` is the name to use. The timm family's whole
ops share their file's name (`functional.eca.eca`, `functional.cbam.cbam`, ...): their parts are
re-exported here, the ops themselves are used from their files, so that the files stay
importable as `from flax_attention.functional import eca`.
"""

from flax_attention.functional.attention import (
    combine_masks,
    dot_product_attention,
    dot_product_attention_weights,
    learned_position_embedding,
    sine_position_embedding,
)
from flax_attention.functional.blockwise import blockwise_attention
from flax_attention.functional.boxes import (
    box_area,
    box_cxcywh_to_xyxy,
    box_iou,
    box_xyxy_to_cxcywh,
    generalized_box_iou,
    generalized_box_iou_loss,
)
from flax_attention.functional.cbam import cbam_channel_gates, cbam_spatial_pool, spatial_excite
from flax_attention.functional.coord_attention import (
    coordinate_attention_map,
    coordinate_excite,
    coordinate_pool,
)
from flax_attention.functional.criss_cross import (
    criss_cross_aggregate,
    criss_cross_attention,
    criss_cross_weights,
)
from flax_attention.functional.danet import (
    channel_attention,
    channel_attention_weights,
    position_attention,
    position_attention_weights,
)
from flax_attention.functional.deform_conv import (
    deform_conv2d,
    deform_conv2d_points,
    deform_im2col,
)
from flax_attention.functional.deformable_attention import (
    SpatialShapes,
    get_reference_points,
    ms_deform_attn,
)
from flax_attention.functional.eca import eca_gates, eca_kernel_size
from flax_attention.functional.effective_se import effective_se_gates
from flax_attention.functional.gather_excite import gather_excite_gates
from flax_attention.functional.glimpse import retina
from flax_attention.functional.global_context import (
    fuse_context,
    global_context_pool,
    global_context_weights,
)
from flax_attention.functional.non_local import non_local, non_local_weights
from flax_attention.functional.ram import gaussian_log_prob, hybrid_loss, reinforce_surrogate
from flax_attention.functional.residual_attention import attention_residual, interpolate_bilinear
from flax_attention.functional.selective_kernel import (
    branch_conv,
    selective_kernel_fuse,
    selective_kernel_select,
    selective_kernel_split,
    selective_kernel_weights,
)
from flax_attention.functional.spatial import affine_grid, affine_matrix, bilinear_sample
from flax_attention.functional.squeeze_excitation import (
    excite,
    squeeze_excitation,
    squeeze_excitation_gates,
)

__all__ = [
    "SpatialShapes",
    "affine_grid",
    "affine_matrix",
    "attention_residual",
    "bilinear_sample",
    "blockwise_attention",
    "box_area",
    "box_cxcywh_to_xyxy",
    "box_iou",
    "box_xyxy_to_cxcywh",
    "branch_conv",
    "cbam_channel_gates",
    "cbam_spatial_pool",
    "channel_attention",
    "channel_attention_weights",
    "combine_masks",
    "coordinate_attention_map",
    "coordinate_excite",
    "coordinate_pool",
    "criss_cross_aggregate",
    "criss_cross_attention",
    "criss_cross_weights",
    "deform_conv2d",
    "deform_conv2d_points",
    "deform_im2col",
    "dot_product_attention",
    "dot_product_attention_weights",
    "eca_gates",
    "eca_kernel_size",
    "effective_se_gates",
    "excite",
    "fuse_context",
    "gather_excite_gates",
    "gaussian_log_prob",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "get_reference_points",
    "global_context_pool",
    "global_context_weights",
    "hybrid_loss",
    "interpolate_bilinear",
    "learned_position_embedding",
    "ms_deform_attn",
    "non_local",
    "non_local_weights",
    "position_attention",
    "position_attention_weights",
    "reinforce_surrogate",
    "retina",
    "selective_kernel_fuse",
    "selective_kernel_select",
    "selective_kernel_split",
    "selective_kernel_weights",
    "sine_position_embedding",
    "spatial_excite",
    "squeeze_excitation",
    "squeeze_excitation_gates",
]
