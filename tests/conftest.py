"""Deterministic tests: seeded RNGs, a clean Pyro param store, a private data cache."""

import os
import tempfile
from pathlib import Path

import pyro
import pytest
import torch

os.environ.setdefault("PROBKIT_CACHE", tempfile.mkdtemp(prefix="probkit-test-cache-"))

SPECS = Path(__file__).resolve().parent.parent / "specs"
TEST_SPECS = Path(__file__).resolve().parent / "specs"


@pytest.fixture(autouse=True)
def _seeded():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    pyro.clear_param_store()


@pytest.fixture
def write_spec(tmp_path):
    """Write spec text to tmp_path/<name>.yaml and return its path."""

    def write(text: str, name: str = "spec") -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        return path

    return write
