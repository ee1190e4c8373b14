"""The math of every mechanism as pure functions (arrays in, arrays out), NHWC.

One file per mechanism family; everything public is re-exported here, so
`flax_attention.functional.criss_cross_attention` is the name to use.
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
from flax_attention.functional.non_local_ops import non_local, non_local_weights
from flax_attention.functional.spatial import affine_grid, affine_matrix, bilinear_sample
from flax_attention.functional.squeeze_excitation_ops import (
    excite,
    squeeze_excitation,
    squeeze_excitation_gates,
)

__all__ = [
    "affine_grid",
    "affine_matrix",
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
    "dot_product_attention",
    "dot_product_attention_weights",
    "excite",
    "generalized_box_iou",
    "generalized_box_iou_loss",
    "learned_position_embedding",
    "non_local",
    "non_local_weights",
    "position_attention",
    "position_attention_weights",
    "sine_position_embedding",
    "squeeze_excitation",
    "squeeze_excitation_gates",
]
