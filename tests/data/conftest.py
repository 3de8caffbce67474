"""Fixtures for the data-layer tests: tiny image files written into tmp_path."""

from pathlib import Path

import pytest
from PIL import Image


def write_png(path: Path, color=(200, 30, 30), size=(8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n this is not image data")
    return path


@pytest.fixture
def png():
    return write_png


@pytest.fixture
def corrupt_png():
    return write_corrupt
