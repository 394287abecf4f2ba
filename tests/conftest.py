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
    """Fresh random data each run; the seed is printed on failure to reproduce."""
    import numpy as np
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"rng seed {seed}")
    return np.random.default_rng(seed)
