"""One VQA item as a record, and our own JSONL file format for lists of them.

Every part of the R³V loop (bootstrap sampling, the sample pool, the task builders, the
evaluation) speaks in :class:`Record` s. The public dataset formats are turned into records by
:mod:`r3v_fast.data.loaders`; this module holds the record type itself, the error type that
every loader raises, the report of what a load skipped, and the JSONL format we write.

JSONL layout: one JSON object per line with the keys ``id``, ``image``, ``question``,
``answer``, ``dataset`` and, when set, ``choices`` (list of str), ``unit`` (str) and ``meta``
(object). ``image`` is written relative to the file's directory when the image lies inside it
(so a dataset directory can be moved as a whole) and as an absolute path otherwise. Reading it
back gives records equal to the ones written.

Image-path safety: every image path, relative or absolute, must lie inside the image root
(the file's directory unless one is given), so ``../`` escapes and absolute paths elsewhere are
rejected. Our writer emits an absolute path for an image outside the file's directory; such a
file loads with an image root (``--image-root``) that holds its images. Paths are compared
after lexical normalisation (``os.path.normpath``), not after following symlinks: a symlink
placed inside the root by whoever built the dataset is trusted.

Gold answers are checked where a judge depends on their form: with ``choices`` the answer must
name an option (a letter within the choices, or an option's text); CLEVR-Math and shapes-math
answers must be integers (a non-finite or fractional number can never be judged right).
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from PIL import Image

__all__ = [
    "DataError", "Record", "LoadReport", "write_records", "read_records",
    "resolve_image", "check_image", "load_image", "image_size", "load_rows", "OPTION_LETTERS",
    "INTEGER_DATASETS",
]

# Multiple-choice options are labelled A, B, C, ... everywhere (prompts, loaders, judges).
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Datasets whose judge compares integers: their gold answers must be integers.
INTEGER_DATASETS = ("shapes-math", "clevr-math")
_INTEGER = re.compile(r"[+-]?[0-9]+")


class DataError(ValueError):
    """Bad input data. The message names the file and line (or the record id) and the fault.

    ``reason`` is a short category ("malformed json", "missing field", ...) under which a
    non-strict load counts the skipped record.
    """

    def __init__(self, message: str, reason: str = "invalid record"):
        super().__init__(message)
        self.reason = reason


def _require_text(value, what: str, record_id: str, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise DataError(f"record {record_id!r}: {what} must be a string, got "
                        f"{type(value).__name__}", "bad value")
    if not allow_empty and not value.strip():
        raise DataError(f"record {record_id!r}: empty {what}", f"empty {what}")


@dataclass(frozen=True)
class Record:
    """One VQA item: an image, a question about it and its gold answer."""

    id: str
    image: str  # absolute path of the image file (checked against the image root by loaders)
    question: str
    answer: str  # gold answer as a string; option letter for geoqa / m3cot
    dataset: str  # judge to use: "shapes-math", "chartqa", "tabmwp", "clevr-math", ...
    choices: tuple[str, ...] | None = None
    unit: str | None = None
    meta: dict | None = None  # JSON-serialisable, dataset-specific extras

    def __post_init__(self):
        if not isinstance(self.id, str) or not self.id.strip():
            raise DataError(f"record id must be a non-empty string, got {self.id!r}", "bad id")
        for name in ("image", "question", "answer", "dataset"):
            _require_text(getattr(self, name), name, self.id)
        if self.choices is not None:
            if isinstance(self.choices, list):  # accept a list, store the hashable tuple
                object.__setattr__(self, "choices", tuple(self.choices))
            if not isinstance(self.choices, tuple) or not all(isinstance(c, str) for c in self.choices):
                raise DataError(f"record {self.id!r}: choices must be a list of strings", "bad value")
            if len(self.choices) < 2:
                raise DataError(f"record {self.id!r}: needs at least 2 choices, got "
                                f"{len(self.choices)}", "bad value")
            answer = self.answer.strip()
            letter = answer.strip("()").upper()
            names_letter = len(letter) == 1 and letter in OPTION_LETTERS[:len(self.choices)]
            if not names_letter and not any(c.strip().casefold() == answer.casefold() for c in self.choices):
                raise DataError(f"record {self.id!r}: answer {self.answer!r} names none of the "
                                f"{len(self.choices)} choices", "answer not an option")
        if self.dataset in INTEGER_DATASETS and not _INTEGER.fullmatch(self.answer.strip()):
            raise DataError(f"record {self.id!r}: {self.dataset} answer must be an integer, got "
                            f"{self.answer!r}", "non-integer answer")
        if self.unit is not None:
            _require_text(self.unit, "unit", self.id, allow_empty=True)
        if self.meta is not None and not isinstance(self.meta, dict):
            raise DataError(f"record {self.id!r}: meta must be an object", "bad value")

    # meta is a dict (unhashable), so hash on the identifying fields only; equality still
    # compares every field.
    def __hash__(self):
        return hash((self.id, self.dataset, self.image, self.question, self.answer, self.choices))

    def load_image(self) -> Image.Image:
        """Open the image now (records hold only its path) and return it as RGB."""
        return load_image(self.image, who=f"record {self.id!r}")

    def to_json(self, base_dir: str | os.PathLike | None = None) -> dict:
        """The JSONL object; ``image`` relative to ``base_dir`` when it lies inside it."""
        image = self.image
        if base_dir is not None and os.path.isabs(image):
            base = os.path.abspath(base_dir)
            if _is_inside(image, base):
                image = Path(os.path.relpath(image, base)).as_posix()
        out = {"id": self.id, "image": image, "question": self.question,
               "answer": self.answer, "dataset": self.dataset}
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.unit is not None:
            out["unit"] = self.unit
        if self.meta is not None:
            out["meta"] = self.meta
        return out


@dataclass
class LoadReport:
    """What one load did: how many records came back and how many were skipped, by reason."""

    path: str
    n_loaded: int = 0
    skipped: Counter = field(default_factory=Counter)
    first_errors: list[str] = field(default_factory=list)  # the first few "message [reason]", for logs

    def skip(self, err: DataError, keep: int = 5) -> None:
        self.skipped[err.reason] += 1
        if len(self.first_errors) < keep:
            self.first_errors.append(f"{err} [{err.reason}]")

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def summary(self) -> str:
        """Counts by reason, then the first skipped records, each with its file:line (or item)
        and its fault, one per line."""
        text = f"{self.path}: loaded {self.n_loaded} records"
        if self.skipped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.skipped.items()))
            text += f", skipped {self.n_skipped} ({reasons})"
            more = self.n_skipped - len(self.first_errors)
            text += "".join(f"\n  skipped: {message}" for message in self.first_errors)
            if more > 0:
                text += f"\n  ... and {more} more"
        return text


def _is_inside(path: str, root: str) -> bool:
    path, root = os.path.normpath(path), os.path.normpath(root)
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives on Windows
        return False


def resolve_image(image, root: str | os.PathLike, *, where: str) -> str:
    """Absolute, normalised path of ``image`` (relative to ``root``); DataError if it lies
    outside ``root``, absolute or not."""
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"{where}: image path must be a non-empty string, got {image!r}",
                        "missing field" if image is None else "bad value")
    if "\x00" in image:
        raise DataError(f"{where}: image path contains a NUL byte", "bad image path")
    root = os.path.abspath(root)
    path = os.path.normpath(os.path.join(root, image))  # join ignores root if image is absolute
    if not _is_inside(path, root):
        hint = " (give --image-root a directory that holds it)" if os.path.isabs(image) else ""
        raise DataError(f"{where}: image path {image!r} lies outside the image root {root}{hint}",
                        "bad image path")
    return path


def load_image(path: str, *, who: str | None = None) -> Image.Image:
    """The one image loader of r3v_fast: decode ``path`` as RGB, or raise DataError ("missing
    image" / "corrupt image") naming ``who`` (a record or question) and the file."""
    prefix = f"{who}: " if who else ""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{prefix}image file not found: {path}", "missing image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{prefix}cannot read image {path}: {err}", "corrupt image") from None


def image_size(path: str, *, who: str | None = None) -> tuple[int, int]:
    """(width, height) of the image at ``path`` from its header, without decoding the pixels;
    DataError ("missing image" / "corrupt image") naming ``who`` and the file."""
    prefix = f"{who}: " if who else ""
    try:
        with Image.open(path) as img:
            width, height = img.size
    except FileNotFoundError:
        raise DataError(f"{prefix}image file not found: {path}", "missing image") from None
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{prefix}cannot read image {path}: {err}", "corrupt image") from None
    if width < 1 or height < 1:
        raise DataError(f"{prefix}image {path} has no pixels ({width}x{height})", "corrupt image")
    return width, height


def check_image(path: str, *, where: str) -> None:
    """DataError unless ``path`` is an existing image file that PIL can decode."""
    if not os.path.isfile(path):
        raise DataError(f"{where}: image file not found: {path}", "missing image")
    try:
        with Image.open(path) as img:
            img.verify()  # checks the header and data chunks without decoding pixels fully
    except Exception as err:  # noqa: BLE001 - PIL raises many types for broken files
        raise DataError(f"{where}: cannot read image {path}: {err}", "corrupt image") from None


def load_rows(path: str | os.PathLike) -> list[tuple[str, object]]:
    """Rows of a JSONL file as (location, parsed object or DataError) pairs, blank lines skipped."""
    rows: list[tuple[str, object]] = []
    try:
        # utf-8-sig: a byte-order mark before the first record is not part of it
        with open(path, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {lineno}"
                try:
                    rows.append((where, json.loads(line)))
                except json.JSONDecodeError as err:
                    rows.append((where, DataError(f"{where}: malformed JSON ({err.msg})",
                                                  "malformed json")))
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read file: {err}", "unreadable file") from None
    return rows


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> None:
    """Write records as JSONL, atomically (a temporary file renamed over ``path``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec.to_json(path.parent), ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


_FIELDS = ("id", "image", "question", "answer", "dataset")


def record_from_json(obj, *, where: str, root: str, explicit_root: bool) -> Record:
    """One JSONL object -> Record; DataError naming ``where`` on any fault."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}", "bad value")
    missing = [k for k in _FIELDS if k not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}", "missing field")
    image = resolve_image(obj["image"], root, where=where)
    try:
        return Record(id=obj["id"], image=image, question=obj["question"], answer=obj["answer"],
                      dataset=obj["dataset"], choices=obj.get("choices"), unit=obj.get("unit"),
                      meta=obj.get("meta"))
    except DataError as err:
        raise DataError(f"{where}: {err}", err.reason) from None


def read_records(path: str | os.PathLike, *, strict: bool = True, check_images: bool = False,
                 image_root: str | os.PathLike | None = None) -> tuple[list[Record], LoadReport]:
    """Read our JSONL format. strict: the first bad line raises; else bad lines are counted."""
    path = Path(path)
    root = os.path.abspath(image_root if image_root is not None else path.parent)
    return collect(load_rows(path), str(path), strict=strict, check_images=check_images,
                   convert=lambda obj, where: record_from_json(
                       obj, where=where, root=root, explicit_root=image_root is not None))


def collect(rows, path: str, *, strict: bool, check_images: bool, convert, check=None):
    """Turn (location, object) rows into records with ``convert``; the shared strict/skip loop.

    Also rejects duplicate ids (the sample pool is keyed by id), with ``check_images`` missing or
    undecodable image files, and whatever ``check(record, where)`` raises a DataError for.
    """
    report, records, seen = LoadReport(path), [], {}
    for where, obj in rows:
        try:
            if isinstance(obj, DataError):
                raise obj
            rec = convert(obj, where)
            if rec.id in seen:
                raise DataError(f"{where}: duplicate id {rec.id!r} (first at {seen[rec.id]})",
                                "duplicate id")
            if check is not None:
                check(rec, f"{where} (record {rec.id!r})")
            if check_images:
                check_image(rec.image, where=f"{where} (record {rec.id!r})")
        except DataError as err:
            if strict:
                raise
            report.skip(err)
            continue
        seen[rec.id] = where
        records.append(rec)
    report.n_loaded = len(records)
    return records, report
