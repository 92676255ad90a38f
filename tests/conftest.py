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
    """Path of a golden fixture in ../shared/reference (CI clones the repo with shared/ beside it)."""
    path = REFERENCE / name
    assert path.exists(), f"reference fixture {path} not found: check out shared/ beside the repo"
    return path
