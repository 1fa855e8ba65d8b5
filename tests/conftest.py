"""Shared fixtures. Real-data tests use ../shared/data beside the repository and skip with a
reason when it is absent (a user's clone does not have it)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOC_ROOT = SHARED_DATA / "VOCdevkit" / "VOC2012"
NYU_ROOT = SHARED_DATA / "nyu-depth-v2"


@pytest.fixture(scope="module")
def single_thread():
    """One torch thread for a module's tests (results do not depend on the machine's cores)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def voc_root() -> Path:
    if not (VOC_ROOT / "SegmentationClass").is_dir():
        pytest.skip(f"real VOC data not found at {VOC_ROOT} (only present beside the project's CI checkout)")
    return VOC_ROOT


@pytest.fixture
def nyu_root() -> Path:
    if not (NYU_ROOT / "labels40").is_dir():
        pytest.skip(f"real NYUv2 data not found at {NYU_ROOT} (only present beside the project's CI checkout)")
    return NYU_ROOT
