"""A wheel carries the built-in model's profile: installed away from the source tree,
`compresskv` still finds it (it fell back to SnapKV when profiles sat beside the source)."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PROFILE = REPO / "ckv_mlx" / "profiles" / "data" / "smollm2-135m-instruct.json"
CHECK = """
import json, ckv_mlx
from ckv_mlx.model.gguf import BUILTIN_MODEL
from ckv_mlx.policy.methods import make_method
from ckv_mlx.model.models import ModelShape
from ckv_mlx.profiles import resolve_profile
profile, path, notes = resolve_profile(None, ModelShape(BUILTIN_MODEL, "llama", 30, 9, 3, 64))
method, method_notes = make_method("compresskv", profile)
print(json.dumps({"package": ckv_mlx.__file__, "profile": str(path), "notes": notes + method_notes,
                  "method": type(method).__name__}))
"""


def pip(*args):
    """Offline pip: never the index, never dependencies."""
    subprocess.run([sys.executable, "-m", "pip", "-q", *args, "--no-index", "--no-deps"], check=True)


def copy_source(to: Path) -> Path:
    """What the wheel is built from, outside the repository (no build/ left in it)."""
    for name in ("ckv_mlx", "app"):
        shutil.copytree(REPO / name, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, to / name)
    return to


@pytest.mark.slow
def test_an_installed_wheel_uses_the_shipped_profile(tmp_path):
    pip("wheel", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(copy_source(tmp_path / "src")))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    pip("--python", str(python), "install", str(next((tmp_path / "dist").glob("ckv_mlx-*.whl"))))
    (site / "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")  # mlx, mlx-lm, ...: not ckv_mlx
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CKV_PROFILES_DIR")}
    out = subprocess.run([str(python), "-c", CHECK], cwd=tmp_path, env=env, capture_output=True, text=True, check=True)
    found = json.loads(out.stdout.splitlines()[-1])
    assert Path(found["package"]).is_relative_to(site)
    assert Path(found["profile"]).is_relative_to(site) and Path(found["profile"]).read_bytes() == PROFILE.read_bytes()
    assert found["method"] == "CompressKV" and found["notes"] == []
