"""Shared fixtures (helpers live in ``tests/helpers.py``)."""

from pathlib import Path

import pytest

from tests.helpers import shared_path


@pytest.fixture
def golden_dir() -> Path:
    return shared_path("golden", "openelm", "tiny")
