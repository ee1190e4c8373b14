"""The top-level `kernels/` folder installs as `flax_attention.kernels`, both ways."""

import pathlib
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("editable", [
    False, pytest.param(True, marks=pytest.mark.slow)], ids=["wheel", "editable"])
def test_kernels_import_after_install(tmp_path, editable):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    target = ["-e", str(ROOT)] if editable else [str(ROOT)]
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", "-q", *target], check=True,
        capture_output=True,
    )
    # The fresh environment has the project only; the dependencies come from this one's
    # site-packages by PYTHONPATH (whose .pth files, including our own install's, are not read).
    env = {"PYTHONPATH": sysconfig.get_paths()["purelib"], "JAX_PLATFORMS": "cpu"}
    probe = "import flax_attention.kernels as k, flax_attention as f; print(k.__file__, f.__file__)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env,
        capture_output=True, text=True, check=True,
    )
    kernels_file, package_file = map(pathlib.Path, out.stdout.split())
    if editable:
        assert kernels_file == ROOT / "kernels" / "__init__.py"
        assert package_file == ROOT / "flax_attention" / "__init__.py"
    else:
        assert venv in kernels_file.parents and kernels_file.parent.name == "kernels"
        assert kernels_file.parent.parent == package_file.parent
