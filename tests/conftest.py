"""Test setup: deterministic, 2 threads, repo root on the path, the golden fixtures in tests/fixtures."""
import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

# the toy Inception of every toy test: trained for 3 steps on first use, in a folder of this session, shared
TINY_EVALUATOR = ["--evaluator", str(Path(tempfile.mkdtemp(prefix="depthrae-")) / "toy_evaluator.pt"),
                  "--evaluator-steps", "3"]

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
