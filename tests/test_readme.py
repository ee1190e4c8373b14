"""The README's Python snippets run as written; the licence is declared as the packaging
standards ask (a LICENSE file, `project.license` an SPDX string)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)


def _project() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_the_readme_has_snippets():
    assert len(SNIPPETS) >= 1


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_a_readme_snippet_runs_as_written(index):
    """Each ```python block, alone in a fresh namespace (so none leans on another)."""
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), {})


def test_the_license_is_a_file_and_an_spdx_string():
    project = _project()
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text


def test_the_notebooks_extra_has_what_the_notebooks_import():
    extras = _project()["optional-dependencies"]["notebooks"]
    names = {re.split(r"[<>=\[ ]", requirement)[0] for requirement in extras}
    assert {"jupyterlab", "ipykernel", "torch"} <= names


def test_the_attention_pictures_have_colour_bars():
    """The pictures the README shows read without a legend elsewhere: a colour bar per row of
    query maps, one for the spatial maps and one for the attention matrices."""
    import numpy as np

    from flax_attention import visualize as vis

    rng = np.random.default_rng(0)
    images = rng.uniform(size=(2, 8, 8, 1))
    figures = {
        "attention": (vis.attention_figure(images, rng.uniform(size=(2, 3, 8, 8)),
                                           np.full((2, 3, 2), 4.0)), 2),
        "spatial": (vis.spatial_figure(images, rng.uniform(size=(2, 4, 4))), 1),
        "matrix": (vis.matrix_figure(rng.uniform(size=(2, 5, 5))), 1),
    }
    for name, (figure, bars) in figures.items():
        labels = [ax.get_ylabel() for ax in figure.axes if ax.get_label() == "<colorbar>"]
        assert len(labels) == bars and all(labels), name
