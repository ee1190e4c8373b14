"""Benchmarks of gather-excite against its PyTorch reference (timm's `GatherExcite`, with the
one-line fix it needs to be built) on x `[32, 56, 56, 256]`, forward and forward+backward
(gradients w.r.t. x and every parameter): the default global extent (SE with biases), the
parameter-free gather of extent 8 (15x15 average pooling every 8 pixels, nearest resize back),
and the parametric gather of extent 4 (two depthwise stride-2 convolutions with BatchNorm in
inference mode).
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.eca import module_case

_EXTENT8 = {"extent": 8}
_PARAMS4 = {"extra_params": True, "extent": 4}

CASES = [
    module_case("ge", "gather_excite", "GatherExcite"),
    module_case("ge extent 8", "gather_excite", "GatherExcite", _EXTENT8, _EXTENT8),
    module_case("ge params extent 4", "gather_excite", "GatherExcite", _PARAMS4, _PARAMS4),
]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.gather_excite", __doc__)
