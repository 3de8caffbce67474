"""Judges on realistic model outputs, plus hypothesis properties (no crash; gold is accepted)."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from r3v_fast.data.judge import canonical_answer, extract_answer, is_correct

COT = "Let me look at the image carefully.\nThere are several steps here: 12 + 3 = 15.\n"


@pytest.mark.parametrize("dataset, text, expected", [
    ("shapes-math", "I see 7 objects. 7 - 3 = 4.\nAnswer: 4", "4"),
    ("shapes-math", "Answer: 3 (wrong)\nLet me redo it.\nANSWER:   5  \nextra", "5"),  # last one wins
    ("shapes-math", "**Answer:** 6", "6"),
    ("shapes-math", "Answer:\n\n  2", "2"),  # first non-empty line after the marker
    ("shapes-math", "So 7 - 3 = 4 objects remain.", None),  # no answer line: no credit
    ("clevr-math", "So 7 - 3 = 4 objects remain.", "4"),  # fallback: last number
    ("shapes-math", "I cannot tell.", None),
    ("clevr-math", "The final answer is 3.", "3."),
    ("chartqa", "The bars show 10, 20 and 31.", "31"),
    ("chartqa", "Answer: 1,234.5%", "1,234.5%"),
    ("geoqa", "so the correct option is (C), not (A)... wait, it is (D)", "(D)"),
    ("geoqa", "B", "B"),
    ("geoqa", "The angle is 30 degrees.", None),  # no letter: no answer, no random credit
    ("m3cot", "Answer: (A) the cat", "(A) the cat"),
    ("tabmwp", "The total is $3.50 + $2 = $5.50", "5.50"),
    ("tabmwp", "I pick (B) since it is odd.", "(B)"),
    ("vqa-other", "line one\nthe last line  \n\n", "the last line"),
])
def test_extract_answer(dataset, text, expected):
    assert extract_answer(dataset, text) == expected


@pytest.mark.parametrize("dataset, text, gold, choices, unit, expected", [
    # shapes-math / clevr-math: integers
    ("shapes-math", COT + "Answer: 4", "4", None, None, True),
    ("shapes-math", COT + "Answer: 7 - 3 = 4", "4", None, None, True),
    ("shapes-math", COT + "Answer: 4 objects.", "4", None, None, True),
    ("shapes-math", COT + "Answer: four", "4", None, None, True),
    ("shapes-math", COT + "Answer: 4.0", "4", None, None, True),
    ("shapes-math", COT + "Answer: 4.5", "4", None, None, False),
    ("shapes-math", COT + "Answer: 5", "4", None, None, False),
    ("shapes-math", "Answer: none", "0", None, None, False),  # unparseable is wrong
    ("CLEVR_Math", "There are 6 objects; removing 2 leaves 4.", "4", None, None, True),
    ("clevr-math", "", "0", None, None, False),
    # chartqa: relaxed accuracy
    ("chartqa", COT + "Answer: 45", "45", None, None, True),
    ("chartqa", COT + "Answer: 47.2", "45", None, None, True),   # within 5%
    ("chartqa", COT + "Answer: 47.3", "45", None, None, False),  # 5.1% off
    ("chartqa", COT + "Answer: 42.75", "45", None, None, True),  # exactly 5% below
    ("chartqa", COT + "Answer: 45%", "45", None, None, True),
    ("chartqa", COT + "Answer: 1,234", "1234", None, None, True),
    ("chartqa", COT + "Answer: $1,200", "1234", None, None, True),
    ("chartqa", COT + "Answer: 0.0", "0", None, None, True),
    ("chartqa", COT + "Answer: 0.01", "0", None, None, False),  # gold 0 needs exactly 0
    ("chartqa", COT + "Answer: democrats.", "Democrats", None, None, True),
    ("chartqa", COT + "Answer: Republicans", "Democrats", None, None, False),
    ("chartqa", COT + "Answer: 45 percent", "45", None, None, False),  # not a plain number
    # tabmwp
    ("tabmwp", COT + "Answer: $3.50", "3.5", None, "$", True),
    ("tabmwp", COT + "Answer: 3.5", "$3.50", None, "$", True),
    ("tabmwp", COT + "Answer: 3/4", "0.75", None, None, True),
    ("tabmwp", COT + "Answer: 0.7501", "3/4", None, None, True),  # both round to 0.75
    ("tabmwp", COT + "Answer: 0.751", "3/4", None, None, False),
    ("tabmwp", COT + "Answer: 1,020 pounds", "1020", None, "pounds", True),
    ("tabmwp", COT + "Answer: 12 cm.", "12", None, "cm", True),
    ("tabmwp", COT + "Answer: 13", "12", None, None, False),
    ("tabmwp", COT + "Answer: 3/0", "3/0", None, None, True),  # no number: plain text match
    ("tabmwp", COT + "Answer: Jenny", "jenny", None, None, True),
    ("tabmwp", COT + "Answer: odd", "odd", ("even", "odd"), None, True),
    ("tabmwp", COT + "Answer: (B)", "odd", ("even", "odd"), None, True),
    ("tabmwp", COT + "Answer: B. odd", "odd", ("even", "odd"), None, True),
    ("tabmwp", COT + "Answer: A", "odd", ("even", "odd"), None, False),
    ("tabmwp", COT + "Answer: even", "odd", ("even", "odd"), None, False),
    ("tabmwp", COT + "Answer: C", "odd", ("even", "odd"), None, False),  # no option C
    # geoqa / m3cot: option letters
    ("geoqa", COT + "Answer: C", "C", ("20°", "30°", "40°", "50°"), None, True),
    ("geoqa", COT + "Answer: (C)", "C", None, None, True),
    ("geoqa", COT + "Answer: C. 40°", "C", ("20°", "30°", "40°", "50°"), None, True),
    ("geoqa", COT + "Answer: 40°", "C", ("20°", "30°", "40°", "50°"), None, True),
    ("geoqa", COT + "Answer: 40°", "40°", ("20°", "30°", "40°", "50°"), None, True),  # gold as text
    ("geoqa", COT + "Answer: c", "C", None, None, True),
    ("geoqa", COT + "Answer: B", "C", ("20°", "30°", "40°", "50°"), None, False),
    ("geoqa", COT + "Answer: 40°", "C", None, None, False),  # text without the options: unknown
    ("geoqa", "So the answer is (C).", "C", None, None, True),
    ("geoqa", "Hmm, I am not sure.", "A", None, None, False),  # never random credit
    ("m3cot", COT + "Answer: option D", "D", ("a", "b", "c", "d", "e"), None, True),
    ("m3cot", COT + "Answer: E", "E", None, None, True),
    ("m3cot", COT + "Answer: F", "E", None, None, False),
    ("geoqa", COT + "Answer: A", "A", ("B", "A"), None, True),  # letters first for geoqa
    ("tabmwp", COT + "Answer: A", "A", ("B", "A"), None, True),  # option text first for tabmwp
    ("tabmwp", COT + "Answer: A", "B", ("B", "A"), None, False),
    ("m3cot", COT + "Answer: Because of the heat, A", "A", None, None, False),
    # any other dataset: numbers to 1e-6, else text
    ("vqa", COT + "Answer: 2.0", "2", None, None, True),
    ("vqa", COT + "Answer: Blue", "blue", None, None, True),
])
def test_is_correct(dataset, text, gold, choices, unit, expected):
    assert is_correct(dataset, text, gold, choices=choices, unit=unit) is expected


DATASETS = ["shapes-math", "clevr-math", "chartqa", "tabmwp", "geoqa", "m3cot", "other"]


@settings(max_examples=300, deadline=None)
@given(dataset=st.sampled_from(DATASETS), text=st.text(max_size=400),
       gold=st.text(max_size=20), choices=st.none() | st.lists(st.text(max_size=10), min_size=2, max_size=6))
def test_never_raises_on_arbitrary_text(dataset, text, gold, choices):
    found = extract_answer(dataset, text)
    assert found is None or isinstance(found, str)
    key = canonical_answer(dataset, text, choices=choices)
    assert key is None or isinstance(key, str)
    assert is_correct(dataset, text, gold, choices=choices) in (True, False)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8"), max_size=200).map(lambda s: s + "\n"),
       number=st.integers(min_value=0, max_value=10**6), dataset=st.sampled_from(["shapes-math", "clevr-math"]))
def test_integer_gold_is_accepted(text, number, dataset):
    assert is_correct(dataset, f"{text}Answer: {number}", str(number))


_WORDS = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJ XYZ0123456789-'", min_size=1,
                 max_size=15).filter(lambda s: s.strip() and "answer" not in s.lower())


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=200), gold=_WORDS | st.floats(-1e6, 1e6, allow_nan=False).map(lambda x: f"{x:.2f}")
       | st.integers(-10**9, 10**9).map(lambda n: f"{n:,}"))
def test_chartqa_gold_is_accepted(prefix, gold):
    assert is_correct("chartqa", f"{prefix}\nAnswer: {gold}", gold)


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=200),
       gold=_WORDS | st.integers(0, 10**6).map(str) | st.tuples(st.integers(1, 99), st.integers(1, 99)).map(
           lambda t: f"{t[0]}/{t[1]}") | st.decimals(0, 10**4, places=2).map(lambda d: f"${d}"))
def test_tabmwp_free_text_gold_is_accepted(prefix, gold):
    assert is_correct("tabmwp", f"{prefix}\nAnswer: {gold}", gold, unit="$")


@settings(max_examples=200, deadline=None)
@given(prefix=st.text(max_size=200), data=st.data(),
       choices=st.lists(_WORDS, min_size=2, max_size=5, unique_by=lambda s: s.strip().lower()))
def test_multiple_choice_gold_is_accepted(prefix, data, choices):
    index = data.draw(st.integers(0, len(choices) - 1))
    letter = "ABCDE"[index]
    for dataset in ("geoqa", "m3cot"):
        assert is_correct(dataset, f"{prefix}\nAnswer: {letter}", letter, choices=choices)
        assert is_correct(dataset, f"{prefix}\nAnswer: ({letter})", letter)
    # TabMWP stores the gold as the option text; the model may answer by letter or text (an
    # option whose text is a letter is read as text, so the letter reading is checked without one)
    if not any(c.strip().lower() == letter.lower() for c in choices):
        assert is_correct("tabmwp", f"{prefix}\nAnswer: {letter}", choices[index], choices=choices)
    assert is_correct("tabmwp", f"{prefix}\nAnswer: {choices[index]}", choices[index], choices=choices)


def test_never_evaluates_model_text():
    # an expression is not computed: "2+2" is not the number 4
    assert not is_correct("shapes-math", "Answer: __import__('os').getpid()", "4")
    assert not is_correct("chartqa", "Answer: 2*2", "4")
    assert not is_correct("tabmwp", "Answer: 2**2", "4")


def test_long_adversarial_text_is_fast():
    import time
    text = ("answer " * 20_000) + ("1," * 20_000) + "(" * 10_000
    start = time.perf_counter()
    for dataset in DATASETS:
        is_correct(dataset, text, "1")
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize("dataset, texts, choices, key", [
    ("shapes-math", ["Answer: 4", "Answer: 4.", "Answer: 4 objects", "Answer: four", "so the answer is 4"], None, "4"),
    ("geoqa", ["Answer: B", "Answer: (b)", "Answer: B. 45°", "Answer: 45°", "the answer is (B)"],
     ("30°", "45°"), "B"),
    ("chartqa", ["Answer: 1,200", "Answer: $1200", "Answer: 1200.0", "Answer: 1200%"], None, "1200"),
    ("chartqa", ["Answer: Democrats.", "Answer: **democrats**"], None, "democrats"),
    ("tabmwp", ["Answer: $0.50", "Answer: 1/2", "Answer: 0.5 dollars"], None, "0.5"),
    ("tabmwp", ["Answer: odd", "Answer: (B)", "Answer: Odd."], ("even", "odd"), "odd"),
    ("shapes-math", ["Answer: none", "nothing"], None, None),
])
def test_canonical_answer_groups_equal_answers(dataset, texts, choices, key):
    assert [canonical_answer(dataset, t, choices=choices) for t in texts] == [key] * len(texts)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="0123456789 .,$%/()ABCDEabcde-+\nAnswer:four", max_size=60),
       dataset=st.sampled_from(DATASETS), gold=st.sampled_from(["4", "B", "0.5", "1/2", "1,200", "odd", "A"]))
def test_canonical_answer_keeps_the_verdict(text, dataset, gold):
    choices = ("even", "odd", "4") if dataset == "tabmwp" else None
    key = canonical_answer(dataset, text, choices=choices, unit="$")
    verdict = is_correct(dataset, text, gold, choices=choices, unit="$")
    if key is None:
        assert not verdict
    else:
        assert is_correct(dataset, f"Answer: {key}", gold, choices=choices, unit="$") == verdict


@pytest.mark.parametrize("output, gold", [
    ("Answer: \u22123", "-3"),                       # U+2212, the minus sign
    ("Answer: $\\frac{3}{4}$", "3/4"),
    ("Answer: $\\frac{3}{4}$", "0.75"),
    ("Answer: \\dfrac{3}{4}", "3/4"),
    ("Answer: $\\tfrac{1}{3}$", "1/3"),
    ("Answer: $-\\frac{3}{2}$", "-3/2"),
    ("Answer: $\\frac{-3}{2}$", "-1.5"),
    ("Answer: \\(\\frac{16}{95}\\)", "16/95"),
    ("Answer: 5 \\text{ students}", "5"),
    ("Answer: \\$1,200", "1200"),
    ("Answer: $\u2212\\frac{1}{4}$", "-0.25"),
])
def test_tabmwp_reads_latex_and_the_minus_sign(output, gold):
    assert is_correct("tabmwp", output, gold, unit="students")


@pytest.mark.parametrize("output, gold", [
    ("Answer: $\\frac{3}{5}$", "3/4"),
    ("Answer: \u22123", "3"),
    ("Answer: \\frac{3}", "3"),                     # not a fraction: no credit
])
def test_tabmwp_latex_does_not_give_free_credit(output, gold):
    assert not is_correct("tabmwp", output, gold)


def test_minus_sign_in_other_datasets():
    assert is_correct("chartqa", "Answer: \u221212.0", "-12")
    assert is_correct("clevr-math", "Answer: \u22121", "-1")
