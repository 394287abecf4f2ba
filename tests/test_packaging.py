"""The installed package carries what the code generators read at compile time: a wheel
built from the tree holds every module, the Caffe schema and every template."""
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools_ok() -> bool:
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 68


def test_wheel_holds_modules_schema_and_templates(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "tests", "bench"))
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path / "w"),
           str(src)]
    if _setuptools_ok():   # else pip fetches the build requirements into an isolated env
        cmd.insert(4, "--no-build-isolation")
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    (wheel,) = (tmp_path / "w").glob("graphc-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"graphc/{p.relative_to(ROOT / 'graphc').as_posix()}"
            for p in (ROOT / "graphc").rglob("*.py") if "__pycache__" not in p.parts}
    want |= {f"graphc/templates/{p.relative_to(ROOT / 'templates').as_posix()}"
             for p in (ROOT / "templates").rglob("*") if p.is_file()}
    want.add("graphc/frontend/caffe.proto")
    missing = sorted(want - names)
    assert not missing, f"the wheel lacks {missing}"
