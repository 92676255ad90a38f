"""Shared test setup: deterministic, 2 threads, repo root on the path, the shared reference fixtures."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REFERENCE = ROOT.parent / "shared" / "reference"

torch.set_num_threads(2)
os.environ.setdefault("TORCH_HOME", str(ROOT / ".pytest_torch_home"))  # never touch a real hub cache


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(name):
    """Path of a golden fixture in ../shared/reference; skip the test if the folder is absent."""
    path = REFERENCE / name
    if not path.exists():
        pytest.skip(f"reference fixture {path} not found")
    return path
