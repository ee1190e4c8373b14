"""The one `implementation` vocabulary (`kernels._common`): each op's subset, the message of a
bad choice, None resolved to XLA, and kernels refused for inputs they cannot take."""

from __future__ import annotations

import pytest

from flax_attention.functional import attention, blockwise, criss_cross, spatial
from flax_attention.kernels import _common

CHOICES = ("xla", "pallas", None)


def test_every_op_takes_a_subset_of_one_vocabulary():
    for choices in (attention.IMPLEMENTATIONS, blockwise.IMPLEMENTATIONS,
                    criss_cross.IMPLEMENTATIONS, spatial.IMPLEMENTATIONS):
        assert set(choices) <= set(_common.IMPLEMENTATIONS)
        assert "xla" in choices and None in choices


def test_a_bad_choice_names_the_op_and_its_choices():
    with pytest.raises(ValueError, match=r"implementation must be one of \('xla', 'pallas', "
                                         r"None\) for my_op, got 'cudnn'"):
        _common.check_implementation("my_op", "cudnn", CHOICES)


def test_none_is_xla_until_a_benchmark_proves_otherwise():
    assert _common.PROVEN_BEST == {}
    assert _common.pick_implementation("my_op", None, CHOICES) == "xla"
    assert _common.pick_implementation("my_op", None, CHOICES, {"pallas": None}) == "xla"
    assert _common.pick_implementation("my_op", "pallas", CHOICES, {"pallas": None}) == "pallas"


def test_an_explicit_kernel_that_cannot_run_raises():
    with pytest.raises(ValueError, match="implementation='pallas' cannot run my_op here: too big"):
        _common.pick_implementation("my_op", "pallas", CHOICES, {"pallas": "too big"})
    assert _common.pick_implementation("my_op", "xla", CHOICES, {"pallas": "too big"}) == "xla"
