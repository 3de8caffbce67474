"""Prompts for the three R³V tasks: chain-of-thought, self-refine and self-select.

The same functions build the prompts for training and for inference, so the two are byte-
identical (the public Qwen-VL code is not). Messages are in the Hugging Face chat format with
one image placeholder, and :func:`render` turns them into the model's text through the
processor's own chat template.

Structure (docs/architecture.md, "Prompts"): the user text of the refine and select prompts STARTS WITH the exact
CoT user text (question, options, CoT instruction). Refine then adds "Model's prediction:" and
the rationale to fix; select adds "Model's prediction i:" and candidate i for i = 1..N, then
its instruction. The CoT, refine and select prompts of one record therefore share a long token
prefix (image + question), which the shared-prefix sampler and tree packing exploit. The
select target is :func:`answer_line` only, not a rationale.
"""

from __future__ import annotations

from typing import Callable, Sequence

from r3v_fast.data.records import OPTION_LETTERS

# chat messages -> the rendered prompt text, bound to one processor (see :func:`renderer`)
Renderer = Callable[[list[dict]], str]

__all__ = ["COT_INSTRUCTION", "DIRECT_INSTRUCTION", "REFINE_INSTRUCTION", "SELECT_INSTRUCTION", "cot_text",
           "direct_text", "direct_messages", "cot_messages", "refine_messages", "select_messages", "render", "render_prefix",
           "answer_line", "user_text", "Renderer", "renderer"]


# The CoT text ends in a letter on purpose: BPE pre-tokenizers (Qwen2's included) glue trailing
# punctuation to the newlines that follow it (".\n\n" can be one token), which would make the
# last token of the CoT text differ between the CoT prompt and the refine / select prompts. After
# a letter the token boundary is stable, so the shared prefix is the whole CoT text in tokens too.
COT_INSTRUCTION = ("Think it through step by step, and on the last line write \"Answer:\" "
                   "followed by the final answer")
REFINE_INSTRUCTION = ("The prediction above may contain mistakes. Check every step against the "
                      "image and the question, fix what is wrong, and write the corrected "
                      "solution, ending with the line \"Answer: <answer>\".")
# The direct-answer prompt of warm-up QA records (no rationale to teach): the same question text,
# an instruction to reply with the answer line alone.
DIRECT_INSTRUCTION = "Reply with the final answer only, as \"Answer: <answer>\"."
SELECT_INSTRUCTION = ("Compare the predictions above with the image and the question, decide "
                      "which one is correct, and reply only with its final answer as "
                      "\"Answer: <answer>\".")


def _question_text(record) -> str:
    """Question, options (if any) and unit (if any): what every prompt of the record starts with."""
    parts = [record.question.strip()]
    if record.choices:
        parts.append("Options:\n" + "\n".join(f"{OPTION_LETTERS[i]}. {c}" for i, c in enumerate(record.choices)))
    if record.unit:
        parts.append(f"Give the answer in {record.unit}.")
    return "\n".join(parts)


def cot_text(record) -> str:
    """The CoT user text: question, options (if any), unit (if any) and the CoT instruction."""
    return f"{_question_text(record)}\n{COT_INSTRUCTION}"


def direct_text(record) -> str:
    """The direct-answer user text: the same question, then :data:`DIRECT_INSTRUCTION`."""
    return f"{_question_text(record)}\n{DIRECT_INSTRUCTION}"


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def cot_messages(record) -> list[dict]:
    """Chat messages asking for a step-by-step solution of ``record``."""
    return _user(cot_text(record))


def direct_messages(record) -> list[dict]:
    """Chat messages asking for the final answer at once, without a rationale (warm-up QA)."""
    return _user(direct_text(record))


def refine_messages(record, prediction: str) -> list[dict]:
    """Chat messages asking to check and correct ``prediction`` (a full CoT rationale)."""
    return _user(f"{cot_text(record)}\n\nModel's prediction:\n{prediction.strip()}\n\n{REFINE_INSTRUCTION}")


def select_messages(record, candidates: Sequence[str]) -> list[dict]:
    """Chat messages asking which of N >= 2 candidate solutions is correct."""
    if isinstance(candidates, str) or len(candidates) < 2:
        raise ValueError(f"select_messages needs at least 2 candidates, got "
                         f"{1 if isinstance(candidates, str) else len(candidates)}")
    shown = "\n\n".join(f"Model's prediction {i}:\n{c.strip()}" for i, c in enumerate(candidates, 1))
    return _user(f"{cot_text(record)}\n\n{shown}\n\n{SELECT_INSTRUCTION}")


def user_text(messages: list[dict]) -> str:
    """The text part of the (single) user message built above."""
    return next(part["text"] for part in messages[0]["content"] if part["type"] == "text")


def render(processor, messages: list[dict]) -> str:
    """Prompt text through the processor's (or tokenizer's) own chat template, ready to generate."""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def renderer(processor) -> Renderer:
    """:func:`render` bound to ``processor``: what the task builders and the evaluation take."""
    return lambda messages: render(processor, messages)


def render_prefix(processor, record) -> str:
    """The rendered text shared by the CoT, refine and select prompts of ``record``.

    It is the rendered CoT prompt cut right after the CoT user text (chat header, image
    placeholder, question, options, instruction); every rendered refine / select prompt of the
    record starts with it.
    """
    full, text = render(processor, cot_messages(record)), cot_text(record)
    return full[:full.rindex(text) + len(text)]


def answer_line(answer: str) -> str:
    """The final-answer line; also the whole target of a select example."""
    return f"Answer: {str(answer).strip()}"
