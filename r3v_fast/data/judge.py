"""Answer judges: is a model's chain-of-thought output right? (docs/architecture.md, "Judges")

``extract_answer(dataset, text)`` finds the model's final answer in its full output;
``canonical_answer`` spells it one way per meaning (the key for majority votes);
``is_correct(dataset, text, answer, choices=None)`` compares it with the gold answer. The
judge decides which samples become SFT targets, which questions are "mixed" (refine / select
data) and every accuracy we report, so it is strict where the public evaluation is strict and
never guesses: model text is only matched with regular expressions (never ``eval``), and an
answer that cannot be parsed is wrong (the public GeoQA judge gives random credit; we do not).

Extraction, in order:
1. the text after the LAST "Answer:" (case-insensitive), its first non-empty line;
2. else the text after the last "the answer is";
3. else a per-dataset fallback over the whole output:
   - shapes-math: none. The task teaches the "Answer:" line, and crediting the last number
     of free text would reward rambling (a random model's digits hit the small integer answers
     about one time in five) and put rationales without an answer line into the SFT set;
   - clevr-math, chartqa: the last number in the text;
   - geoqa, m3cot: the last option letter in parentheses ("(C)"), or a reply that is just a
     letter ("C", "C.");
   - tabmwp: as geoqa, else the last number;
   - any other dataset name: the last non-empty line.
Surrounding markdown emphasis (``**``, backticks) is removed from what is extracted.

Comparison per dataset:
- shapes-math, clevr-math: integers. The last number in the extracted line (so "7 - 3 = 4"
  gives 4), or a number word zero..twenty; it must equal the gold integer.
- chartqa: relaxed accuracy. If both parse as numbers, |pred - gold| <= 5% |gold| (gold 0 needs
  exactly 0); else case-insensitive exact match. We strip "%", "$" and thousands commas before
  parsing; the public code (pix2struct) does not, and divides "x%" by 100, so "45%" vs gold "45"
  is right here and wrong there, and "1,234" vs "1234" likewise.
- tabmwp: with choices, the option picked by its text or by letter ("B", "(B)") must be the gold
  option (gold given as option text, as in TabMWP, or as a letter). Option texts are matched
  before letters, so an option whose text is "A" is read as that option. Without choices, numbers are
  normalised as in the public TabMWP code (the minus sign U+2212 as "-", "$\\frac{a}{b}$" (also
  \\dfrac, \\tfrac) as a/b, LaTeX \\text{} and math delimiters dropped; strip "$", commas,
  trailing ".", the unit and other trailing words; "a/b" -> round(a/b, 3); floats rounded to 3
  decimals) and compared; other text is compared case-insensitively.
- every dataset reads the minus sign U+2212 in a number as "-".
- geoqa, m3cot: option letters (A..E, or as many as there are choices). The gold may be a letter
  or, when choices are given, the option text; the prediction may be a letter or an option text
  (letters are read first).
- other datasets: numbers compared to 1e-6 relative, else case-insensitive exact text.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

from r3v_fast.data.records import OPTION_LETTERS

__all__ = ["extract_answer", "is_correct", "canonical_answer", "normalise_dataset"]

_ANSWER = re.compile(r"answer\s*:", re.IGNORECASE)
_ANSWER_IS = re.compile(r"\bthe (?:final |correct )?answer is\b\s*:?", re.IGNORECASE)
# A number as written in answers: sign, digits with optional thousands commas, decimals.
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_PAREN_LETTER = re.compile(r"\(([A-Z])\)")
_LONE_LETTER = re.compile(r"\(?([A-Za-z])\)?[.:)]?")
_LEADING_LETTER = re.compile(r"(?:option|choice)?\s*\(?([A-Z])(?:\)|[.:]\s|\s*$)", re.IGNORECASE)
_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
          "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_NUMBER_WORDS = {w: i for i, w in enumerate(_WORDS)}
_INTEGER_SETS = ("shapes-math", "clevr-math")
_LETTER_SETS = ("geoqa", "m3cot")
_MINUS = "\u2212"   # the minus sign U+2212 is read as "-" in every number
# Longer model outputs are cut to their tail: the answer is at the end, and this bounds the
# regex work on pathological inputs.
_MAX_CHARS = 20_000


def normalise_dataset(dataset: str) -> str:
    """Dataset names are compared lower-case with '-' for '_' ("CLEVR_Math" -> "clevr-math")."""
    return str(dataset).strip().lower().replace("_", "-")


def _clean(text: str) -> str:
    return text.strip().strip("*`").strip()


def _first_line(text: str) -> str | None:
    for line in text.split("\n"):
        line = _clean(line)
        if line:
            return line
    return None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text.replace(_MINUS, "-"))
    return numbers[-1] if numbers else None


def _letter_fallback(text: str) -> str | None:
    letters = _PAREN_LETTER.findall(text)
    if letters:
        return f"({letters[-1]})"
    lone = _clean(text)
    return lone if _LONE_LETTER.fullmatch(lone) else None


def extract_answer(dataset: str, text: str) -> str | None:
    """The model's final answer in ``text`` (see the module docstring), or None if it has none."""
    if not isinstance(text, str):
        return None
    text = text[-_MAX_CHARS:]
    for pattern in (_ANSWER, _ANSWER_IS):
        matches = list(pattern.finditer(text))
        if matches:
            found = _first_line(text[matches[-1].end():])
            if found:
                return found
    name = normalise_dataset(dataset)
    if name == "shapes-math":
        return None   # our own task teaches the answer line: text without one earns nothing
    if name in _INTEGER_SETS or name == "chartqa":
        return _last_number(text)
    if name in _LETTER_SETS:
        return _letter_fallback(text)
    if name == "tabmwp":
        return _letter_fallback(text) or _last_number(text)
    lines = [line for line in map(_clean, text.split("\n")) if line]
    return lines[-1] if lines else None


# -- numbers ------------------------------------------------------------------------------------

def _to_float(text: str) -> float | None:
    """A plain number ("1,234.5", "-3", "−3", ".5") -> float; None for anything else or non-finite."""
    text = text.strip().replace(_MINUS, "-")
    if not _NUMBER.fullmatch(text):
        return None
    try:
        value = float(text.replace(",", ""))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


def _plain_number(text: str) -> float | None:
    """Number with the usual decorations removed: "$1,234.", "45%", "**7**" -> float."""
    text = _clean(text).rstrip(".").strip()
    text = text.removeprefix("$").removesuffix("%").strip()
    return _to_float(text)


def _integer(text: str) -> int | None:
    """shapes-math / clevr-math: the last number in the line (or a number word) as an int."""
    number = _last_number(text)
    if number is not None:
        value = _to_float(number)
        return int(value) if value is not None and value.is_integer() else None
    words = re.findall(r"[a-z]+", text.lower())
    hits = [_NUMBER_WORDS[w] for w in words if w in _NUMBER_WORDS]
    return hits[-1] if hits else None


_TABMWP_NUMBER = re.compile(
    r"(?P<num>[-+]?(?:\d+(?:\.\d+)?|\.\d+))(?:\s*/\s*(?P<den>\d+(?:\.\d+)?))?(?:\s+[A-Za-z][A-Za-z .'-]*)?")


# LaTeX that models write around TabMWP answers, as the public TabMWP evaluation reads it:
# "$\frac{3}{4}$" is 3/4 (also \dfrac, \tfrac, a signed numerator), "\text{ cm}" its text,
# "\$" a dollar sign, and the math delimiters \( \) \[ \] and thin spaces "\," vanish.
_FRAC = re.compile(r"\\[dt]?frac\s*\{\s*([-+]?[\d.,]+)\s*\}\s*\{\s*([-+]?[\d.,]+)\s*\}")
_TEXT = re.compile(r"\\(?:text|mathrm)\s*\{([^{}]*)\}")


def _unlatex(text: str) -> str:
    text = _FRAC.sub(r"\1/\2", text.replace(_MINUS, "-"))
    text = _TEXT.sub(r"\1", text)
    text = text.replace("\\$", "$").replace("\\%", "%")
    return re.sub(r"\\[()\[\],!]", "", text).strip()


def _tabmwp_number(text: str, unit: str | None) -> float | None:
    """TabMWP normalisation: strip $, commas, unit, trailing '.'; a/b -> round(a/b, 3)."""
    text = _clean(text).replace("$", "")
    text = re.sub(r"(?<=\d),(?=\d)", "", text)
    if unit and unit.strip() and unit.strip() != "$":
        text = text.replace(unit.strip(), " ")
    text = text.strip().rstrip(".").strip()
    match = _TABMWP_NUMBER.fullmatch(text)
    if not match:
        return None
    try:
        value = float(match["num"])
        if match["den"] is not None:
            den = float(match["den"])
            if den == 0:
                return None
            value /= den
    except (ValueError, OverflowError):
        return None
    return round(value, 3) if math.isfinite(value) else None


def _same_text(a: str, b: str) -> bool:
    return _clean(a).rstrip(".").strip().casefold() == _clean(b).rstrip(".").strip().casefold()


# -- options ------------------------------------------------------------------------------------

def _option_index(text: str, choices: Sequence[str] | None, n_letters: int,
                  *, text_first: bool = False) -> int | None:
    """Which option ``text`` names: by letter ("B", "(B)", "B. 30°", "option B") or by its text.

    With ``text_first`` the option texts are tried before the letter reading.
    """
    cleaned = _clean(text)

    def by_letter():
        match = _LONE_LETTER.fullmatch(cleaned) or _LEADING_LETTER.match(cleaned)
        index = OPTION_LETTERS.find(match.group(1).upper()) if match else -1
        return index if 0 <= index < n_letters else None

    def by_text():
        for i, choice in enumerate(choices or ()):
            if _same_text(cleaned, str(choice)):
                return i
        return None

    first, second = (by_text, by_letter) if text_first else (by_letter, by_text)
    found = first()
    return found if found is not None else second()


def is_correct(dataset: str, text: str, answer: str, choices: Sequence[str] | None = None,
               unit: str | None = None) -> bool:
    """Whether the model output ``text`` ends in the gold ``answer`` (see the module docstring)."""
    pred = extract_answer(dataset, text)
    if pred is None or answer is None:
        return False
    gold = str(answer)
    name = normalise_dataset(dataset)
    if name in _INTEGER_SETS:
        gold_int = _integer(gold)
        return gold_int is not None and _integer(pred) == gold_int
    if name == "chartqa":
        p, g = _plain_number(pred), _plain_number(gold)
        if p is not None and g is not None:
            return p == 0 if g == 0 else abs(p - g) <= 0.05 * abs(g)
        return _same_text(pred, gold)
    if name in _LETTER_SETS or (name == "tabmwp" and choices):
        n_letters = len(choices) if choices else 5
        # TabMWP names options by their text, GeoQA / M3CoT by letter: that decides which reading
        # wins when an option's text is itself a letter.
        text_first = name == "tabmwp"
        gold_index = _option_index(gold, choices, n_letters, text_first=text_first)
        if gold_index is None:  # gold is neither a letter nor an option: plain text match
            return _same_text(pred, gold)
        return _option_index(pred, choices, n_letters, text_first=text_first) == gold_index
    if name == "tabmwp":
        pred, gold = _unlatex(pred), _unlatex(gold)
        p, g = _tabmwp_number(pred, unit), _tabmwp_number(gold, unit)
        if p is not None and g is not None:
            return p == g
        return _same_text(pred, gold)
    p, g = _plain_number(pred), _plain_number(gold)
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=1e-6, abs_tol=1e-9)
    return _same_text(pred, gold)


def canonical_answer(dataset: str, text: str, choices: Sequence[str] | None = None,
                     unit: str | None = None) -> str | None:
    """The model's answer in one canonical spelling, as a key for majority votes.

    Spellings the judge treats alike get the same key: "4.", "4 objects" and "four" -> "4"
    (shapes-math), "(b)" and "B. 45°" -> "B" (geoqa), "$1,200" -> "1200", "0.50" -> "0.5".
    Feeding ``answer_line(key)`` back to :func:`is_correct` gives the verdict of the original
    text. None when the output has no answer (an integer task with no integer counts as none).
    """
    pred = extract_answer(dataset, text)
    if pred is None:
        return None
    name = normalise_dataset(dataset)
    if name in _INTEGER_SETS:
        value = _integer(pred)
        return None if value is None else str(value)
    if name == "tabmwp":
        pred = _unlatex(pred)
    if name in _LETTER_SETS or (name == "tabmwp" and choices):
        index = _option_index(pred, choices, len(choices) if choices else 5, text_first=name == "tabmwp")
        if index is not None:
            return str(choices[index]).strip() if name == "tabmwp" else OPTION_LETTERS[index]
    else:
        number = _tabmwp_number(pred, unit) if name == "tabmwp" else _plain_number(pred)
        if number is not None:
            return str(int(number)) if number.is_integer() else repr(number)
    return _clean(pred).rstrip(".").strip().casefold() or None
