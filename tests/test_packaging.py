"""The top-level `kernels/` folder installs as `flax_attention.kernels`, both ways."""

import importlib.metadata
import pathlib
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
# The fresh installs have the project only; the dependencies come from this environment's
# site-packages by PYTHONPATH (whose .pth files, including our own install's, are not read).
PROBE = "import flax_attention.kernels as k, flax_attention as f; print(k.__file__, f.__file__)"
DEPENDENCIES = sysconfig.get_paths()["purelib"]


def _probe(python: str, path: str, cwd: pathlib.Path, *flags: str) -> tuple[pathlib.Path, ...]:
    """The files of `flax_attention.kernels` and `flax_attention` as `python` imports them."""
    out = subprocess.run([python, *flags, "-c", PROBE], cwd=cwd, capture_output=True, text=True,
                         env={"PYTHONPATH": path, "JAX_PLATFORMS": "cpu"}, check=True)
    return tuple(map(pathlib.Path, out.stdout.split()))


def _build_isolation() -> list[str]:
    """No build isolation (seconds, not a minute) when this environment's setuptools can build
    the project (pyproject's `setuptools>=77`)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return []
    return ["--no-build-isolation"] if major >= 77 else []


def test_kernels_import_from_the_wheel(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *_build_isolation(),
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("flax_attention-*.whl")
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q",
                    "--target", str(target), str(wheel)], check=True, capture_output=True)
    # -S: without this environment's site-packages, where the project is installed editable.
    kernels_file, package_file = _probe(sys.executable, f"{target}:{DEPENDENCIES}", tmp_path,
                                        "-S")
    assert target in kernels_file.parents and kernels_file.parent.name == "kernels"
    assert kernels_file.parent.parent == package_file.parent


@pytest.mark.slow
def test_kernels_import_after_an_editable_install(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "--no-deps", "-q", "-e", str(ROOT)],
                   check=True, capture_output=True)
    kernels_file, package_file = _probe(str(venv / "bin" / "python"), DEPENDENCIES, tmp_path)
    assert kernels_file == ROOT / "kernels" / "__init__.py"
    assert package_file == ROOT / "flax_attention" / "__init__.py"
