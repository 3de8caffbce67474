"""Shared test fixtures: tiny random VLM directories (built once per session) and RGB images.

Each model fixture is a normal Hugging Face directory from r3v_fast.model.tiny with seed 0,
so `make_tiny_*(seed=0)` rebuilds the identical model in memory. Building one takes well
under a second once transformers is imported. Treat the directories as read-only: copy one
(shutil.copytree) before changing files in it.
"""

from pathlib import Path

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


# -- the public MM-Self-Improve data layout, written here with its exact structure -------------
def _suffixes():
    qa = "Answer the question with a numerical value, Yes/No, or a word or phrase."
    cot = ("First generate a step-by-step solution, then answer the question with a numerical value, "
           "Yes/No, or a word or phrase.")
    return qa, cot


def write_public_chartqa(root, n_qa=6, n_cot=3, image_size=(112, 112)):
    """chartqa/sft_qa.json (direct-answer QA) + chartqa/qwenvl_sft_gpt.json (distilled CoT) with
    the public suffix lines, images in images/; returns the two file paths. Questions ask about
    the number of bars of a tiny drawn chart, so the answers are integers."""
    import json

    root = Path(root)
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    qa_suffix, cot_suffix = _suffixes()
    qa, cot = [], []
    for i in range(n_qa + n_cot):
        bars = 1 + i % 4
        img = Image.new("RGB", image_size, "white")
        for b in range(bars):
            for x in range(10 + 20 * b, 22 + 20 * b):
                for y in range(40, 100):
                    img.putpixel((x, y), (30, 60, 200))
        name = f"{i:05d}.png"
        img.save(images / name)
        question = "How many bars does the chart show?"
        if i < n_qa:
            qa.append({"image": name, "conversations": [
                {"from": "user", "value": f"{question}\n{qa_suffix}"},
                {"from": "assistant", "value": str(bars)}]})
        else:
            cot.append({"image": name, "conversations": [
                {"from": "user", "value": f"{question}\n{cot_suffix}"},
                {"from": "assistant", "value": f"Solution:\n1. I count {bars} bars.\n\nAnswer:\n{bars}"}]})
    folder = root / "chartqa"
    folder.mkdir(exist_ok=True)
    (folder / "sft_qa.json").write_text(json.dumps(qa))
    (folder / "qwenvl_sft_gpt.json").write_text(json.dumps(cot))
    return folder / "sft_qa.json", folder / "qwenvl_sft_gpt.json"


@pytest.fixture
def public_chartqa(tmp_path):
    return (tmp_path, *write_public_chartqa(tmp_path))
