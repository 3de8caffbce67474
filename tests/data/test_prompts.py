"""Prompts: the structure of docs/architecture.md ("Prompts"), the shared (image + question) prefix in text and tokens."""

import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from r3v_fast.data.prompts import (COT_INSTRUCTION, answer_line, cot_messages, cot_text, refine_messages,
                                   render, render_prefix, select_messages, user_text)
from r3v_fast.data.records import Record

# A chat template of the Qwen2-VL shape (system turn, vision placeholders, generation prompt).
TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Qwen2's pre-tokenizer pattern: punctuation runs swallow the newlines that follow them.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]

MC = Record(id="g1", image="/data/g1.png", question="In the figure, AB = AC. Find angle B.",
            answer="C", dataset="geoqa", choices=("30°", "45°", "60°", "75°"))
NUM = Record(id="t1", image="/data/t1.png", question="How much do 3 pens cost?", answer="4.5",
             dataset="tabmwp", unit="$")
SHAPES = Record(id="s1", image="/data/s1.png", question="How many circles are there?", answer="3",
                dataset="shapes-math")
CANDIDATES = ["I see 2 circles.\nAnswer: 2", "I see 3 circles.\nAnswer: 3.\n\n", "Answer: 4", "Answer: 3"]


@pytest.fixture(scope="module")
def tokenizer():
    """A tiny byte-level BPE with Qwen2's pre-tokenizer, trained on prompts so merges like '.\\n\\n' exist."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    corpus = [user_text(m) for r in (MC, NUM, SHAPES)
              for m in (cot_messages(r), refine_messages(r, CANDIDATES[0]), select_messages(r, CANDIDATES))]
    tok.train_from_iterator(corpus * 20, trainers.BpeTrainer(
        vocab_size=600, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=TEMPLATE)


def test_cot_text_shape():
    assert cot_text(MC) == ("In the figure, AB = AC. Find angle B.\nOptions:\nA. 30°\nB. 45°\nC. 60°\nD. 75°\n"
                            + COT_INSTRUCTION)
    assert cot_text(NUM) == "How much do 3 pens cost?\nGive the answer in $.\n" + COT_INSTRUCTION
    assert cot_text(SHAPES) == "How many circles are there?\n" + COT_INSTRUCTION
    assert "Answer:" in COT_INSTRUCTION
    messages = cot_messages(SHAPES)
    assert messages == [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": cot_text(SHAPES)}]}]


@pytest.mark.parametrize("record", [MC, NUM, SHAPES])
def test_refine_and_select_start_with_the_cot_text(record):
    cot = cot_text(record)
    refine = user_text(refine_messages(record, "  I see 2 circles.\nAnswer: 2\n"))
    assert refine.startswith(cot + "\n\nModel's prediction:\nI see 2 circles.\nAnswer: 2\n\n")
    for n in (2, 3, 4):
        select = user_text(select_messages(record, CANDIDATES[:n]))
        assert select.startswith(cot + "\n\n")
        positions = [select.index(f"Model's prediction {i}:\n{CANDIDATES[i - 1].strip()}") for i in range(1, n + 1)]
        assert positions == sorted(positions) and f"Model's prediction {n + 1}:" not in select
    assert refine_messages(record, "x")[0]["content"][0] == {"type": "image"}


def test_select_needs_two_candidates():
    for bad in ([], ["only one"], "a string is not a list"):
        with pytest.raises(ValueError, match="at least 2 candidates"):
            select_messages(SHAPES, bad)


def test_answer_line():
    assert answer_line("4") == "Answer: 4"
    assert answer_line(" B ") == "Answer: B"


def test_render_uses_the_chat_template(tokenizer):
    text = render(tokenizer, cot_messages(SHAPES))
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>" + cot_text(SHAPES)
                    + "<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("record", [MC, NUM, SHAPES])
def test_shared_prefix_in_text_and_tokens(tokenizer, record):
    prefix = render_prefix(tokenizer, record)
    assert prefix.endswith(cot_text(record)) and "<|image_pad|>" in prefix
    prompts = [render(tokenizer, cot_messages(record)), render(tokenizer, refine_messages(record, CANDIDATES[1])),
               render(tokenizer, select_messages(record, CANDIDATES[:3]))]
    prefix_ids = tokenizer(prefix, add_special_tokens=False)["input_ids"]
    for prompt in prompts:
        assert prompt.startswith(prefix)
        # the token ids of every prompt start with the token ids of the shared prefix
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"][:len(prefix_ids)] == prefix_ids


def test_prompts_are_deterministic():
    assert cot_messages(MC) == cot_messages(MC)
    assert select_messages(MC, CANDIDATES) == select_messages(MC, list(CANDIDATES))
