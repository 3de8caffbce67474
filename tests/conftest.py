"""Shared test fixtures: tiny random VLM directories (built once per session) and RGB images.

Each model fixture is a normal Hugging Face directory from r3v_fast.model.tiny with seed 0,
so `make_tiny_*(seed=0)` rebuilds the identical model in memory. Building one takes well
under a second once transformers is imported. Treat the directories as read-only: copy one
(shutil.copytree) before changing files in it.
"""

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def tiny_qwen2vl_dir(tmp_path_factory):
    from r3v_fast.model.tiny import build_tiny_qwen2vl

    return build_tiny_qwen2vl(tmp_path_factory.mktemp("tiny_qwen2vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_5vl_dir(tmp_path_factory):
    from r3v_fast.model.tiny import build_tiny_qwen2_5vl

    return build_tiny_qwen2_5vl(tmp_path_factory.mktemp("tiny_qwen2_5vl"), seed=0)


@pytest.fixture(scope="session")
def tiny_llava_dir(tmp_path_factory):
    from r3v_fast.model.tiny import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny_llava"), seed=0)


@pytest.fixture(scope="session")
def rgb_images():
    """Three seeded random RGB images: 112x112, 84x140 (height x width) and 56x56."""
    rng = np.random.default_rng(0)
    shapes = [(112, 112), (84, 140), (56, 56)]
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            for h, w in shapes]
