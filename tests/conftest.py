import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("GRAPHC_SHARED", ROOT.parent / "shared"))

# models/ (reference nets written with the builder) is importable from the tests
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "zoo").is_dir():
        pytest.skip(f"../shared (zoo and golden data) is absent at {SHARED}")
    return SHARED


@pytest.fixture
def rng(request):
    """Fresh random data each run; the seed is printed on failure, and GRAPHC_TEST_SEED=N
    reruns with it."""
    import numpy as np
    env = os.environ.get("GRAPHC_TEST_SEED")
    seed = int(env) if env else int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)


def _cuda_device_usable() -> bool:
    """A CUDA driver that initializes and sees at least one device."""
    import ctypes
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    n = ctypes.c_int()
    try:
        return lib.cuInit(0) == 0 and lib.cuDeviceGetCount(ctypes.byref(n)) == 0 and n.value > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly where no CUDA device is usable."""
    gpu_items = [it for it in items if it.get_closest_marker("gpu")]
    if not gpu_items or _cuda_device_usable():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with its driver (none usable here)")
    for it in gpu_items:
        it.add_marker(skip)
