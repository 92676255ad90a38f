"""Test setup: deterministic, 2 threads, repo root on the path, the golden fixtures in tests/fixtures."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

torch.set_num_threads(2)
os.environ.setdefault("TORCH_HOME", str(ROOT / ".pytest_torch_home"))  # never touch a real hub cache

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

def reference(name):
    """Path of a golden fixture of the official code (tests/fixtures/README.md says what each holds)."""
    path = FIXTURES / name
    assert path.exists(), f"golden fixture {path} is missing from the checkout"
    return path
