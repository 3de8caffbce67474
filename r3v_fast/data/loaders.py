"""Loaders: public VQA dataset files -> :class:`~r3v_fast.data.records.Record` lists.

``load_dataset(path, fmt="auto")`` reads one annotation file. Formats and the fields read:

``jsonl``       our own format (:mod:`r3v_fast.data.records`).
``mmsi``        MM-Self-Improve JSON: a list of ``{"id"?, "image", "conversations": [user, assistant]}``
                where a turn is ``{"from": "user"|"human", "value": ...}`` /
                ``{"from": "assistant"|"gpt", "value": ...}``. ``<image>`` tags are removed from
                the user text, then its last line when it is one of the public answer-format
                instructions (:data:`PUBLIC_PROMPT_SUFFIXES`, kept in ``meta["prompt_suffix"]``);
                then trailing option lines ("A. ...", "(B) ...", "C: ...", optionally under a
                "Choices:"/"Options:" header) become ``choices`` and a trailing "(Unit: x)" the
                ``unit``. The assistant value is the answer (a direct-answer QA record), or a
                CoT whose text after the last "Answer:" is the answer (the full CoT is kept in
                ``meta["rationale"]``). The dataset name comes from ``dataset=``, else from the
                file's or its folder's name (chartqa/sft_qa.json -> chartqa; clevr -> clevr-math),
                else "mmsi".
``chartqa``     raw ChartQA: a list of ``{"imgname", "query", "label"}``; images in ``<dir>/png``.
``tabmwp``      raw TabMWP ``problems_*.json``: a dict keyed by problem id with ``question``,
                ``choices`` (list or null), ``unit`` (str or null), ``answer``; images
                ``<dir>/tables/<id>.png``.
``clevr-math``  a list (JSON) or lines (JSONL) of ``{"filename", "question", "answer"}``;
                images in ``<dir>/images``.
``geoqa``, ``m3cot``  multiple choice, a JSON list or JSONL of objects with
                ``question``; ``choices`` or ``options`` (a list, or a dict keyed by letter);
                ``answer`` (a letter, a 0-based index, or the text of an option); the image in
                ``image`` / ``image_path`` / ``img`` / ``filename``; the id in ``id`` /
                ``question_id`` / ``pid`` (else ``<file stem>-<index>``). M3CoT's optional
                ``context`` is put before the question. The answer is stored as a letter.

``image_root`` overrides the image directory named above (default: the file's directory for
``jsonl``, ``mmsi``, ``geoqa`` and ``m3cot``). Every image path, absolute or relative, must stay
inside the image root. A UTF-8 byte-order mark at the start of a file is skipped. ``strict=True`` raises :class:`DataError` at the first bad record, naming the file and
the line (JSONL) or item index / id (JSON); ``strict=False`` skips such records and counts
them in the returned :class:`LoadReport`.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace
from pathlib import Path

from .records import (OPTION_LETTERS, DataError, LoadReport, Record, collect, load_rows, record_from_json,
                      resolve_image)

__all__ = ["FORMATS", "PUBLIC_PROMPT_SUFFIXES", "load_dataset", "detect_format", "split_choices",
           "split_unit", "strip_prompt_suffix", "load_files"]

FORMATS = ("auto", "jsonl", "mmsi", "chartqa", "tabmwp", "clevr-math", "geoqa", "m3cot")
_KNOWN_NAMES = ("geoqa", "m3cot", "chartqa", "tabmwp", "clevr-math", "clevr_math", "clevr", "shapes-math")
_NAME_ALIASES = {"clevr": "clevr-math", "clevr_math": "clevr-math"}

# Answer-format instructions that the public MM-Self-Improve files append to the question as its
# last line (direct-answer QA files, then their CoT counterparts, then LLaVA's CoT cue). Our own
# prompts add their own instruction, so a loaded question must not carry one already.
PUBLIC_PROMPT_SUFFIXES = (
    "Answer the question with a numerical value, Yes/No, or a word or phrase.",
    "Answer the question using a single numerical value (0-10).",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "First generate a step-by-step solution, then answer the question with a numerical value, "
    "Yes/No, or a word or phrase.",
    "First generate a step-by-step solution, then answer the question using a single numerical value (0-10).",
    "First generate a step-by-step solution, then answer the question using a single word or phrase.",
    "First generate a step-by-step solution, then answer with the option's letter from the given "
    "choices directly.",
    "Let's think step by step.",
)
# Any other "First generate a step-by-step solution, then ..." line is a suffix too.
_GENERIC_SUFFIX = re.compile(r"first generate a step-by-step solution, then .+", re.IGNORECASE)


def _read_items(path: Path) -> list[tuple[str, object]]:
    """(location, object) pairs: JSON list -> items, JSON dict -> values by key, else JSONL lines."""
    if path.suffix.lower() != ".json":
        return load_rows(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))   # a leading byte-order mark is allowed
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno}: {err.msg}",
                        "malformed json") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read file: {err}", "unreadable file") from None
    if isinstance(data, list):
        return [(f"{path}, item {i}", item) for i, item in enumerate(data)]
    if isinstance(data, dict):  # TabMWP: keyed by problem id; the key travels with the item
        return [(f"{path}, id {key!r}", (key, item)) for key, item in data.items()]
    raise DataError(f"{path}: expected a JSON list or object at top level", "bad value")


def _name_from_file(path: Path) -> str | None:
    """The dataset a file belongs to, from its name, else from its folder's (the public
    MM-Self-Improve files are chartqa/sft_qa.json, clevr/qwenvl_sft_gpt.json, ...)."""
    for part in (path.name, path.parent.name):
        name = part.lower()
        for known in _KNOWN_NAMES:
            if known in name:
                return _NAME_ALIASES.get(known, known)
    return None


def _same_suffix(line: str, suffix: str) -> bool:
    # The public files write the apostrophe of "option's" as U+2019.
    return line.strip().replace("\u2019", "'").casefold() == suffix.casefold()


def strip_prompt_suffix(text: str) -> tuple[str, str | None]:
    """Split a known answer-format instruction off the end of a question: (question, suffix)."""
    lines = text.rstrip().split("\n")
    last = lines[-1].strip() if lines else ""
    if len(lines) > 1 and (any(_same_suffix(last, s) for s in PUBLIC_PROMPT_SUFFIXES)
                           or _GENERIC_SUFFIX.fullmatch(last)):
        return "\n".join(lines[:-1]).rstrip(), last
    return text.strip(), None


def detect_format(path: str | os.PathLike, items=None) -> str:
    """Guess the format of ``path`` from the keys of its first well-formed item."""
    path = Path(path)
    items = _read_items(path) if items is None else items
    first = next((obj for _, obj in items if not isinstance(obj, DataError)), None)
    if isinstance(first, tuple):  # dict keyed by id
        return "tabmwp"
    if not isinstance(first, dict):
        raise DataError(f"{path}: cannot detect the format (no well-formed item); pass fmt= "
                        "(--data-format)", "unknown format")
    keys = set(first)
    if {"id", "image", "question", "answer", "dataset"} <= keys:
        return "jsonl"
    if "conversations" in keys:
        return "mmsi"
    if {"imgname", "query", "label"} <= keys:
        return "chartqa"
    if "filename" in keys and "question" in keys and not keys & {"choices", "options"}:
        return "clevr-math"
    if keys & {"choices", "options"}:
        name = _name_from_file(path)
        if name in ("geoqa", "m3cot"):
            return name
        raise DataError(f"{path}: multiple-choice file, but the name tells neither geoqa nor "
                        "m3cot; pass fmt='geoqa' or fmt='m3cot' (--data-format)", "unknown format")
    raise DataError(f"{path}: cannot detect the format from keys {sorted(keys)}; pass fmt= "
                    "(--data-format)", "unknown format")


def _field(obj, names: tuple[str, ...], where: str, *, required: bool = True):
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", "bad value")
    for name in names:
        if name in obj and obj[name] is not None:
            return obj[name]
    if required:
        raise DataError(f"{where}: missing field {' / '.join(names)}", "missing field")
    return None


def _answer_text(value, where: str) -> str:
    """Gold answers arrive as str, int or float; store them as text (7.0 -> "7")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: answer must be a string or a number, got {value!r}", "bad value")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: answer must be a finite number, got {value!r}", "bad value")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _record(where: str, **fields) -> Record:
    try:
        return Record(**fields)
    except DataError as err:
        raise DataError(f"{where}: {err}", err.reason) from None


# -- multiple-choice helpers ------------------------------------------------------------------

# Matched against a stripped line: a lazy "(.+?)\s*$" would backtrack quadratically on a line
# with a long run of inner spaces.
_OPTION_LINE = re.compile(r"\(?([A-Z])\s*[).:：]\s*(.+)")
_CHOICES_HEADER = re.compile(r"^\s*(choices|options)\s*[:：]?\s*$", re.IGNORECASE)


def split_choices(text: str) -> tuple[str, tuple[str, ...] | None]:
    """Split trailing option lines ("A. x", "(B) y", "C: z") off a question; None if there are none.

    The options must be the last lines, labelled A, B, C, ... in order, at least two of them.
    """
    lines = text.rstrip().split("\n")
    options: list[str] = []            # collected from the last line up, reversed once (linear)
    i = len(lines)
    while i > 0:
        match = _OPTION_LINE.fullmatch(lines[i - 1].strip())
        if not match:
            break
        options.append(match.group(1) + match.group(2))
        i -= 1
    options.reverse()
    labels = "".join(o[0] for o in options)
    if len(options) < 2 or labels != OPTION_LETTERS[:len(options)]:
        return text.strip(), None
    if i > 0 and _CHOICES_HEADER.match(lines[i - 1]):
        i -= 1
    return "\n".join(lines[:i]).strip(), tuple(o[1:] for o in options)


def split_unit(text: str) -> tuple[str, str | None]:
    """Split a trailing "(Unit: x)" off a question (TabMWP): (question, unit or None). A string
    scan from the end, not a regular-expression search, so a long line costs linear time."""
    stripped = text.rstrip()
    start = stripped.rfind("(Unit: ")
    if start < 0 or not stripped.endswith(")"):
        return text, None
    unit = stripped[start + len("(Unit: "):-1]
    if "(" in unit or ")" in unit or not unit.strip():
        return text, None
    return stripped[:start].rstrip(), unit.strip()


def _choices(value, where: str) -> tuple[str, ...]:
    if isinstance(value, dict):  # {"A": "...", "B": "..."}: order by letter
        value = [value[k] for k in sorted(value)]
    if not isinstance(value, list) or len(value) < 2:
        raise DataError(f"{where}: choices must be a list of at least 2 options", "bad value")
    if len(value) > len(OPTION_LETTERS):
        raise DataError(f"{where}: too many choices ({len(value)})", "bad value")
    return tuple(_answer_text(c, where) for c in value)


def _answer_letter(answer, choices: tuple[str, ...], where: str) -> str:
    """Gold answer as an option letter: from a letter, a 0-based index or the option text."""
    if isinstance(answer, int) and not isinstance(answer, bool):
        if 0 <= answer < len(choices):
            return OPTION_LETTERS[answer]
        raise DataError(f"{where}: answer index {answer} out of range for {len(choices)} choices",
                        "bad value")
    text = _answer_text(answer, where)
    letter = text.strip("()").upper()
    if len(letter) == 1 and letter in OPTION_LETTERS[:len(choices)]:
        return letter
    for i, choice in enumerate(choices):
        if choice.strip().lower() == text.lower():
            return OPTION_LETTERS[i]
    raise DataError(f"{where}: answer {text!r} is neither an option letter nor an option",
                    "bad value")


# -- per-format converters: (obj, where) -> Record ----------------------------------------------

def _mmsi(obj, where, *, root, dataset, stem, index):
    convo = _field(obj, ("conversations",), where)
    if not isinstance(convo, list):
        raise DataError(f"{where}: conversations must be a list", "bad value")
    user = next((t for t in convo if isinstance(t, dict) and t.get("from") in ("user", "human")), None)
    bot = next((t for t in convo if isinstance(t, dict) and t.get("from") in ("assistant", "gpt")), None)
    if user is None or bot is None:
        raise DataError(f"{where}: conversations need a user and an assistant turn", "missing field")
    user_text, response = _field(user, ("value",), where), _field(bot, ("value",), where)
    if not isinstance(user_text, str) or not isinstance(response, str):
        raise DataError(f"{where}: conversation values must be strings", "bad value")
    question, suffix = strip_prompt_suffix(user_text.replace("<image>", "").strip())
    question, choices = split_choices(question)
    question, unit = split_unit(question)   # TabMWP; our prompts state the unit themselves
    answer, meta = response.strip(), {}
    if suffix:
        meta["prompt_suffix"] = suffix
    tail = re.split(r"answer\s*:", response, flags=re.IGNORECASE)
    if len(tail) > 1:  # a CoT target: the answer is the first line after the last "Answer:"
        answer = tail[-1].strip().split("\n")[0].strip()
        meta["rationale"] = response.strip()
    if choices is not None and answer:
        answer = _answer_letter(answer, choices, where)
    image = resolve_image(_field(obj, ("image",), where), root, where=where)
    rid = str(obj.get("id") or f"{stem}-{index}")
    return _record(where, id=rid, image=image, question=question, answer=answer,
                   dataset=dataset, choices=choices, unit=unit, meta=meta or None)


def _chartqa(obj, where, *, root, dataset, stem, index):
    image = resolve_image(_field(obj, ("imgname",), where), root, where=where)
    return _record(where, id=f"{stem}-{index}", image=image, question=_field(obj, ("query",), where),
                   answer=_answer_text(_field(obj, ("label",), where), where), dataset=dataset)


def _tabmwp(item, where, *, root, dataset, stem, index):
    if not isinstance(item, tuple):
        raise DataError(f"{where}: TabMWP files are a JSON object keyed by problem id", "bad value")
    key, obj = item
    choices = _field(obj, ("choices",), where, required=False)
    unit = _field(obj, ("unit",), where, required=False)
    image = resolve_image(f"{key}.png", root, where=where)
    return _record(where, id=str(key), image=image, question=_field(obj, ("question",), where),
                   answer=_answer_text(_field(obj, ("answer",), where), where), dataset=dataset,
                   choices=_choices(choices, where) if choices else None, unit=unit or None)


def _clevr(obj, where, *, root, dataset, stem, index):
    image = resolve_image(_field(obj, ("filename",), where), root, where=where)
    rid = str(obj.get("id") or f"{stem}-{index}")
    return _record(where, id=rid, image=image, question=_field(obj, ("question",), where),
                   answer=_answer_text(_field(obj, ("answer",), where), where), dataset=dataset)


def _multiple_choice(obj, where, *, root, dataset, stem, index):
    question = _field(obj, ("question",), where)
    context = obj.get("context") if isinstance(obj, dict) else None
    if isinstance(question, str) and isinstance(context, str) and context.strip():
        question = f"{context.strip()}\n{question}"
    choices = _choices(_field(obj, ("choices", "options"), where), where)
    answer = _answer_letter(_field(obj, ("answer",), where), choices, where)
    image = resolve_image(_field(obj, ("image", "image_path", "img", "filename"), where), root,
                          where=where)
    rid = str(_field(obj, ("id", "question_id", "pid"), where, required=False) or f"{stem}-{index}")
    return _record(where, id=rid, image=image, question=question, answer=answer,
                   dataset=dataset, choices=choices)


_CONVERTERS = {"mmsi": _mmsi, "chartqa": _chartqa, "tabmwp": _tabmwp, "clevr-math": _clevr,
               "geoqa": _multiple_choice, "m3cot": _multiple_choice}
_DEFAULT_IMAGE_DIR = {"chartqa": "png", "tabmwp": "tables", "clevr-math": "images"}


def load_dataset(path: str | os.PathLike, *, fmt: str = "auto", image_root=None, strict: bool = True,
                 check_images: bool = False, dataset: str | None = None, check=None
                 ) -> tuple[list[Record], LoadReport]:
    """Load one annotation file as records (see the module docstring for the formats).

    ``dataset`` overrides the dataset name stored in the records (it picks the judge);
    by default it is the format's name. ``check(record, where)`` may reject a record with a
    DataError (a caller's own rule: chat special tokens in its text, ...).
    """
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if not path.is_file():
        raise DataError(f"{path}: no such file", "missing file")
    items = _read_items(path)
    if fmt == "auto":
        fmt = detect_format(path, items)
    if fmt == "jsonl":
        root = os.path.abspath(image_root if image_root is not None else path.parent)

        def convert(obj, where):
            rec = record_from_json(obj, where=where, root=root, explicit_root=image_root is not None)
            return rec if dataset is None else replace(rec, dataset=dataset)
    else:
        root = image_root if image_root is not None else path.parent / _DEFAULT_IMAGE_DIR.get(fmt, "")
        name = dataset or ((_name_from_file(path) or "mmsi") if fmt == "mmsi" else fmt)
        converter = _CONVERTERS[fmt]
        positions = {where: i for i, (where, _) in enumerate(items)}

        def convert(obj, where):
            return converter(obj, where, root=os.path.abspath(root), dataset=name,
                             stem=path.stem, index=positions[where])
    return collect(items, str(path), strict=strict, check_images=check_images, convert=convert, check=check)


def load_files(patterns, *, fmt: str = "auto", image_root=None, strict: bool = True,
               check_images: bool = False, dataset: str | None = None, check=None
               ) -> tuple[list[Record], list[LoadReport]]:
    """Load several annotation files (paths or glob patterns, each expanded in sorted order),
    e.g. the public QA + CoT warm-up pair. Records keep file order; an id that an earlier file
    already used is qualified with its file (``chartqa/sft_qa:sft_qa-3``) so ids stay unique.
    DataError when a pattern matches no file."""
    import glob

    records: list[Record] = []
    reports: list[LoadReport] = []
    seen: set[str] = set()
    for pattern in ([patterns] if isinstance(patterns, (str, os.PathLike)) else patterns):
        pattern = str(pattern)
        paths = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not paths:
            raise DataError(f"{pattern}: no file matches", "missing file")
        for path in paths:
            loaded, report = load_dataset(path, fmt=fmt, image_root=image_root, strict=strict,
                                          check_images=check_images, dataset=dataset, check=check)
            for rec in loaded:
                if rec.id in seen:
                    rec = replace(rec, id=f"{Path(path).parent.name}/{Path(path).stem}:{rec.id}")
                seen.add(rec.id)
                records.append(rec)
            reports.append(report)
    return records, reports
