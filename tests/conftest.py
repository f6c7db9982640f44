"""Shared fixtures."""

from pathlib import Path

import pytest

RSNA_DIR = Path(__file__).resolve().parents[2] / "shared/data/rsna-bone-age"


@pytest.fixture
def rsna_dir() -> Path:
    """The real RSNA sample beside the repository (../shared/data/rsna-bone-age), or skip."""
    if not (RSNA_DIR / "labels.csv").is_file():
        pytest.skip(f"real RSNA sample not found at {RSNA_DIR}")
    return RSNA_DIR
