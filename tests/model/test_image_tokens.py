"""Image token counts from the image size (r3v_fast.model.image_tokens) against the real
processors: the number of placeholder tokens each processor actually emits for an image, for
Qwen2-VL and Qwen2.5-VL (the tiny models' settings and Qwen2-VL's released min/max pixels),
LLaVA-1.5 (with and without centre crop) and LLaVA-NeXT (anyres tiling), at square, landscape,
portrait, tiny and extreme-aspect sizes."""

import numpy as np
import pytest
from PIL import Image

from r3v_fast.model.image_tokens import image_token_count, smart_resize
from r3v_fast.model.tiny import make_tiny_llava, make_tiny_qwen2_5vl, make_tiny_qwen2vl

# (height, width): square, 4:3 landscape / portrait, odd sizes, tiny, long strips.
SIZES = [(448, 448), (600, 800), (800, 600), (112, 112), (84, 140), (57, 911), (1000, 37), (30, 30),
         (1023, 767), (960, 1280), (13, 2000)]


def processor_count(processor, height, width):
    """Placeholder tokens the processor expands one image of this size into."""
    image = Image.fromarray(np.random.default_rng(height * 7919 + width).integers(
        0, 256, (height, width, 3), dtype=np.uint8))
    text = processor.image_token + " how many?"
    ids = processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0]
    return int((ids == processor.image_token_id).sum())


def qwen_processors():
    yield "qwen2vl tiny", make_tiny_qwen2vl()[1]
    yield "qwen2.5vl tiny", make_tiny_qwen2_5vl()[1]
    # Qwen2-VL's released processor settings: 56*56 .. 28*28*1280 pixels.
    yield "qwen2vl released", make_tiny_qwen2vl(min_pixels=56 * 56, max_pixels=28 * 28 * 1280)[1]
    yield "qwen2.5vl wide range", make_tiny_qwen2_5vl(min_pixels=256 * 28 * 28, max_pixels=512 * 28 * 28)[1]


def llava_next_processor():
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer = make_tiny_llava()[1].tokenizer
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
        image_grid_pinpoints=[[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]])
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


def all_processors():
    yield from qwen_processors()
    yield "llava tiny", make_tiny_llava()[1]
    no_crop = make_tiny_llava()[1]
    no_crop.image_processor.do_center_crop = False
    yield "llava no crop", no_crop
    yield "llava-next", llava_next_processor()


@pytest.mark.parametrize("name, processor", list(all_processors()), ids=lambda v: v if isinstance(v, str) else "")
def test_count_equals_the_processors_expansion(name, processor):
    for height, width in SIZES:
        if "qwen" in name and max(height, width) / min(height, width) > 200:
            continue
        assert image_token_count(processor, height, width) == processor_count(processor, height, width), \
            (name, height, width)


def test_smart_resize_rules():
    # Sides become multiples of 28, and the area is brought into [min, max].
    assert smart_resize(448, 448, 28, 56 * 56, 28 * 28 * 1280) == (448, 448)
    assert smart_resize(600, 800, 28, 56 * 56, 28 * 28 * 1280) == (588, 812)
    h, w = smart_resize(3000, 4000, 28, 56 * 56, 28 * 28 * 1280)
    assert h % 28 == 0 and w % 28 == 0 and h * w <= 28 * 28 * 1280
    h, w = smart_resize(20, 30, 28, 56 * 56, 28 * 28 * 1280)
    assert h * w >= 56 * 56
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2500, 28, 56 * 56, 28 * 28 * 1280)


def test_refused_images_raise_like_the_processor():
    processor = make_tiny_qwen2vl()[1]
    with pytest.raises(ValueError):
        processor_count(processor, 5, 1500)
    with pytest.raises(ValueError, match="aspect ratio"):
        image_token_count(processor, 5, 1500)


def test_unknown_processor_gives_none():
    class TextOnly:
        tokenizer = None

    assert image_token_count(TextOnly(), 100, 100) is None
