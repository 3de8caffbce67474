"""How many image tokens a processor expands one image into, from the image's size alone.

The streaming data path (docs/architecture.md, "The data path") decides which training
examples fit ``max_length`` before any pixel is decoded: an example's length is its text tokens
plus the image tokens its placeholder expands to, and that count follows from the image's
height and width (read from the file header) and the processor's resize rules:

- Qwen2-VL / Qwen2.5-VL: ``smart_resize`` rounds both sides to a multiple of patch x merge
  size (28 px) and rescales the area into [min_pixels, max_pixels]; the image becomes a
  (1, h/14, w/14) patch grid, merged 2x2 into h*w / 28^2 tokens.
- LLaVA-1.5 (CLIP image processor): resize + centre crop to a fixed size, so a fixed count
  (crop/patch)^2, plus the CLS token, minus one under the "default" feature selection (which
  drops CLS).
- LLaVA-NeXT ("anyres"): the best-fitting grid pinpoint for the image's aspect ratio gives the
  number of crop-sized tiles; the count is the base tile's patches plus the unpadded patches of
  the tiled image plus one newline token per row (the processor's own arithmetic).

These are written here from the published rules rather than taken from private helpers of the
processors, and tests check them against the real processor's expansion for each family at
several sizes and aspect ratios. :func:`image_token_count` returns None for a processor it does
not know; the caller then measures the count with the processor itself.
"""

from __future__ import annotations

import math

__all__ = ["smart_resize", "image_token_count", "select_best_resolution"]


def _get(mapping, key: str):
    """``mapping[key]`` for a dict or a transformers SizeDict (attribute access); None if absent."""
    if mapping is None:
        return None
    if isinstance(mapping, dict):
        return mapping.get(key)
    return getattr(mapping, key, None)


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize target: both sides multiples of ``factor``, area within
    [min_pixels, max_pixels], aspect ratio kept as closely as possible.

    Raises ValueError for an aspect ratio above 200 (the processor refuses such images too).
    """
    if min(height, width) < 1:
        raise ValueError(f"image of {width}x{height} px has an empty side")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} of a {width}x{height} px "
                         "image is above 200, which Qwen-VL processors refuse")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def select_best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
    """LLaVA-NeXT's choice of tiling resolution (height, width): the pinpoint that keeps the most
    of the image's resolution when scaled to fit, then the one that wastes the least area."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for pin_height, pin_width in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        scaled_width, scaled_height = int(width * scale), int(height * scale)
        effective = min(scaled_width * scaled_height, width * height)
        wasted = pin_width * pin_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (pin_height, pin_width), effective, wasted
    return best


def _qwen_count(image_processor, height: int, width: int) -> int:
    patch, merge = image_processor.patch_size, image_processor.merge_size
    size = getattr(image_processor, "size", None)
    min_pixels = _get(size, "shortest_edge") or getattr(image_processor, "min_pixels", None)
    max_pixels = _get(size, "longest_edge") or getattr(image_processor, "max_pixels", None)
    if getattr(image_processor, "do_resize", True):
        height, width = smart_resize(height, width, patch * merge, min_pixels, max_pixels)
    grid_h, grid_w = height // patch, width // patch
    return grid_h * grid_w // (merge * merge)


def _processed_size(image_processor, height: int, width: int) -> tuple[int, int]:
    """Output size of a CLIP-style resize (shortest edge, or fixed height x width) + centre crop."""
    if getattr(image_processor, "do_center_crop", False):
        crop = image_processor.crop_size
        return _get(crop, "height"), _get(crop, "width")
    size = getattr(image_processor, "size", None)
    if getattr(image_processor, "do_resize", True) and size is not None:
        if _get(size, "height") and _get(size, "width"):
            return _get(size, "height"), _get(size, "width")
        short = _get(size, "shortest_edge")
        if short:
            # transformers' get_resize_output_image_size(default_to_square=False): the short side
            # becomes `short`, the long side int(short * long / short_side).
            if height <= width:
                return short, int(short * width / height)
            return int(short * height / width), short
    return height, width


def _llava_count(processor, height: int, width: int) -> int:
    out_h, out_w = _processed_size(processor.image_processor, height, width)
    patch = processor.patch_size
    count = (out_h // patch) * (out_w // patch) + (processor.num_additional_image_tokens or 0)
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def _llava_next_count(processor, height: int, width: int) -> int:
    image_processor = processor.image_processor
    # The image is cut into square tiles of the crop size, and each tile goes through the
    # CLIP-style resize + crop; the processor counts with the processed tile's size.
    size = getattr(image_processor, "size", None)
    side = (_get(image_processor.crop_size, "height") or _get(size, "height")
            or _get(size, "shortest_edge"))
    tile_h, tile_w = _processed_size(image_processor, side, side)
    best_h, best_w = select_best_resolution(height, width, image_processor.image_grid_pinpoints)
    scale_h, scale_w = best_h // tile_h, best_w // tile_w
    patches_h, patches_w = tile_h // processor.patch_size, tile_w // processor.patch_size
    # Unpadded features: the tiled patch grid minus the rows (or columns) of padding that the
    # aspect-preserving resize into the best resolution left.
    current_h, current_w = patches_h * scale_h, patches_w * scale_w
    if width / height > current_w / current_h:
        new_h = int(round(height * (current_w / width), 7))
        current_h -= 2 * ((current_h - new_h) // 2)
    else:
        new_w = int(round(width * (current_h / height), 7))
        current_w -= 2 * ((current_w - new_w) // 2)
    count = current_h * current_w + current_h                      # unpadded + one newline per row
    count += patches_h * patches_w + (processor.num_additional_image_tokens or 0)   # the base tile
    if processor.vision_feature_select_strategy == "default":
        count -= 1
    return count


def image_token_count(processor, height: int, width: int) -> int | None:
    """Image tokens ``processor`` expands an image of ``height`` x ``width`` px into; None when
    the processor's family is not one of Qwen2-VL, Qwen2.5-VL, LLaVA, LLaVA-NeXT.

    Raises ValueError for an image the processor would refuse (e.g. aspect ratio above 200 for
    the Qwen-VL family).
    """
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is None:
        return None
    if all(hasattr(image_processor, a) for a in ("merge_size", "patch_size", "temporal_patch_size")):
        return _qwen_count(image_processor, height, width)
    if not all(hasattr(processor, a) for a in ("patch_size", "vision_feature_select_strategy")) \
            or not processor.patch_size:
        return None
    if getattr(image_processor, "image_grid_pinpoints", None):
        return _llava_next_count(processor, height, width)
    if hasattr(image_processor, "crop_size") or hasattr(image_processor, "size"):
        return _llava_count(processor, height, width)
    return None
