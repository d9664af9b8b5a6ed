"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from transformer import host

# Tests run on the CPU; libtpu and the CUDA plugin (the [tpu]/[gpu] extras) only compile.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Eight host devices for the sharding tests; must be set before JAX initialises its backend.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

# As transformer.main does: jitted steps reuse freed host memory instead of faulting it in.
host.retain_freed_memory()

_DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def multi30k_dir() -> Path:
  """Multi30k Task 1 raw files: $TRANSFORMER_DATA_DIR (default ../shared/data)/multi30k."""
  path = Path(os.environ.get("TRANSFORMER_DATA_DIR", _DEFAULT_DATA_DIR)) / "multi30k"
  if not (path / "train.en").exists():
    pytest.fail(f"{path} not found: set TRANSFORMER_DATA_DIR to the shared data directory")
  return path
