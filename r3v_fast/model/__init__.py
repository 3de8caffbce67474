"""Model side of r3v_fast: loading local HF VLM directories and the tiny test/default VLMs.

`loading` validates and loads `--model DIR` and exposes the handles the engine needs (lm_head
and backbone, end-of-turn and pad ids); `tiny` builds tiny random Qwen2-VL / Qwen2.5-VL / LLaVA
directories from configs.
"""

from r3v_fast.model.loading import (SUPPORTED_MODEL_TYPES, ModelLoadError, check_model_dir,
                                    end_of_turn_id, lm_head_and_backbone, load_vlm, pad_id)

__all__ = ["SUPPORTED_MODEL_TYPES", "ModelLoadError", "check_model_dir", "end_of_turn_id",
           "lm_head_and_backbone", "load_vlm", "pad_id"]
