"""Benchmarks of effective squeeze-excitation against its PyTorch reference (timm's
`EffectiveSEModule`): timm's defaults (hard sigmoid gate) and `add_maxpool`, on x
`[32, 56, 56, 256]`, forward and forward+backward (gradients w.r.t. x and every parameter).
"""

from __future__ import annotations

from benchmarks import harness
from benchmarks.eca import module_case

CASES = [
    module_case("ese", "effective_se", "EffectiveSEModule"),
    module_case("ese maxpool", "effective_se", "EffectiveSEModule", {"add_maxpool": True},
                {"add_maxpool": True}),
]

if __name__ == "__main__":
    harness.main(CASES, "benchmarks.effective_se", __doc__)
