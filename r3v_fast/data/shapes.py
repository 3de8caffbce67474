"""shapes-math: the synthetic visual-reasoning task shipped with the package.

A CLEVR-Math-like task small enough for a tiny VLM on a CPU: each image shows 2-8 large,
well-separated shapes (circle, square, triangle) in four colours (red, blue, green, yellow) on
a plain background, one object per cell of a 3x3 grid (with a little jitter), so that at the
default 112x112 px every object covers about 2x2 patches of a 14-px vision encoder. Each
image comes with one question whose answer is an integer. Question types, easiest first:

=========================  ===========================================================  =====
type                       example                                                      level
=========================  ===========================================================  =====
count_all                  How many objects are there?                                  1
count_color                How many red objects are there?                              2
count_shape                How many circles are there?                                  2
remove_color               Remove all red objects. How many objects are left?           3
remove_shape               Remove all circles. How many objects are left?               3
add_shape                  Add 2 blue squares. How many squares are there?              3
remove_color_and_shape     Remove all circles and all green objects. How many ...       4
=========================  ===========================================================  =====

The scene (objects with shape, colour, centre and size), the question type and its parameters
are kept in ``Record.meta``, so :func:`template_cot` can write a truthful worked solution whose
arithmetic differs per type (the analogue of the paper's distilled CoT warm-up data).

Everything is deterministic from the seed; train, test and warm-up come from disjoint seed
streams, and test items that repeat a train item (same question, same objects in the same
cells) are drawn again. ``python -m r3v_fast.data.shapes --out DIR --n-train N --n-test M``
writes ``DIR/images/*.png`` and ``DIR/{train,test,warmup}.jsonl``.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

from .records import Record, write_records

__all__ = ["SHAPES", "COLORS", "QUESTION_TYPES", "make_item", "render_scene", "generate",
           "template_cot", "default_dataset", "main"]

DATASET = "shapes-math"
VERSION = 3  # bump when the generator's output changes, so cached copies are rebuilt
SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (220, 45, 45), "blue": (40, 95, 225), "green": (35, 160, 65), "yellow": (240, 200, 20)}
BACKGROUND = (245, 245, 245)
OUTLINE = (40, 40, 40)
GRID = 3  # objects sit in distinct cells of a GRID x GRID layout: well separated by construction
MIN_OBJECTS, MAX_OBJECTS = 2, 8
QUESTION_TYPES = {"count_all": 1, "count_color": 2, "count_shape": 2, "remove_color": 3,
                  "remove_shape": 3, "add_shape": 3, "remove_color_and_shape": 4}
_SUPERSAMPLE = 4  # draw at 4x, then average 4x4 blocks (BOX): smooth, exact edges


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


# -- scenes and questions ---------------------------------------------------------------------

def _make_scene(rng: random.Random, image_size: int) -> list[dict]:
    n = rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    cell = image_size / GRID
    size = round(0.68 * cell)  # object bounding box, px
    slack = (cell - size) / 2 * 0.7  # jitter keeps a gap of >= 0.3 * (cell - size) between cells
    objects = []
    for index in sorted(rng.sample(range(GRID * GRID), n)):
        row, col = divmod(index, GRID)
        objects.append({
            "shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)),
            "x": round((col + 0.5) * cell + rng.uniform(-slack, slack)),
            "y": round((row + 0.5) * cell + rng.uniform(-slack, slack)),
            "size": size, "cell": index,
        })
    return objects


def _pick(rng: random.Random, present: list[str], every: list[str]) -> str:
    """Mostly ask about something in the image, sometimes about something absent (answer 0)."""
    return rng.choice(sorted(set(present))) if present and rng.random() < 0.85 else rng.choice(every)


def _count(objects, shape=None, color=None) -> int:
    return sum((shape is None or o["shape"] == shape) and (color is None or o["color"] == color)
               for o in objects)


def _question(rng: random.Random, objects: list[dict]) -> tuple[str, int, dict]:
    qtype = rng.choice(list(QUESTION_TYPES))
    color = _pick(rng, [o["color"] for o in objects], list(COLORS))
    shape = _pick(rng, [o["shape"] for o in objects], list(SHAPES))
    n = len(objects)
    if qtype == "count_all":
        return "How many objects are there?", n, {"qtype": qtype}
    if qtype == "count_color":
        return f"How many {color} objects are there?", _count(objects, color=color), {"qtype": qtype, "color": color}
    if qtype == "count_shape":
        return f"How many {shape}s are there?", _count(objects, shape=shape), {"qtype": qtype, "shape": shape}
    if qtype == "remove_color":
        return (f"Remove all {color} objects. How many objects are left?",
                n - _count(objects, color=color), {"qtype": qtype, "color": color})
    if qtype == "remove_shape":
        return (f"Remove all {shape}s. How many objects are left?",
                n - _count(objects, shape=shape), {"qtype": qtype, "shape": shape})
    if qtype == "add_shape":
        k = rng.randint(1, 3)
        return (f"Add {k} {color} {shape if k == 1 else shape + 's'}. How many {shape}s are there?",
                _count(objects, shape=shape) + k, {"qtype": qtype, "shape": shape, "color": color, "k": k})
    removed = _count(objects, shape=shape) + _count(objects, color=color) - _count(objects, shape, color)
    return (f"Remove all {shape}s and all {color} objects. How many objects are left?",
            n - removed, {"qtype": qtype, "shape": shape, "color": color})


def make_item(rng: random.Random, image_size: int = 112) -> tuple[str, int, dict]:
    """One random (question, answer, meta) triple; meta holds the scene and the question type."""
    objects = _make_scene(rng, image_size)
    question, answer, params = _question(rng, objects)
    meta = {**params, "level": QUESTION_TYPES[params["qtype"]], "image_size": image_size,
            "objects": objects}
    return question, answer, meta


def render_scene(objects: list[dict], image_size: int) -> Image.Image:
    """Draw the objects (centres and sizes in px at ``image_size``) as an RGB image."""
    s = _SUPERSAMPLE
    img = Image.new("RGB", (image_size * s, image_size * s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in objects:
        cx, cy, half = o["x"] * s, o["y"] * s, o["size"] * s / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        style = {"fill": COLORS[o["color"]], "outline": OUTLINE, "width": s}
        if o["shape"] == "circle":
            draw.ellipse(box, **style)
        elif o["shape"] == "square":
            draw.rectangle((cx - 0.85 * half, cy - 0.85 * half, cx + 0.85 * half, cy + 0.85 * half), **style)
        else:  # upward triangle filling the box
            draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], **style)
    return img.resize((image_size, image_size), Image.Resampling.BOX)


# -- template CoT -------------------------------------------------------------------------------

def _listing(counts: list[tuple[int, str]]) -> str:
    words = [_plural(n, noun) for n, noun in counts]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _tally(objects, *, shape=None, color=None, by_color=True) -> list[tuple[int, str]]:
    """Nonzero counts of the matching objects, grouped by (colour and) shape, in a fixed order."""
    groups = []
    for c in (COLORS if by_color else [None]):
        for sh in SHAPES:
            n = _count(objects, shape=sh, color=c)
            if n and (shape is None or sh == shape) and (color is None or c == color):
                groups.append((n, f"{c} {sh}" if c else sh))
    return groups


def _sum_text(groups, noun_if_none: str) -> str:
    """'I see 2 red circles and 1 red square. 2 + 1 = 3.' (no arithmetic for one group)."""
    if not groups:
        return f"I see no {noun_if_none}."
    total = sum(n for n, _ in groups)
    text = f"I see {_listing(groups)}."
    if len(groups) > 1:
        text += " " + " + ".join(str(n) for n, _ in groups) + f" = {total}."
    return text


def template_cot(record: Record) -> str:
    """A correct worked solution for a shapes-math record, ending in its "Answer:" line."""
    meta = record.meta or {}
    objects, qtype = meta.get("objects"), meta.get("qtype")
    if objects is None or qtype not in QUESTION_TYPES:
        raise ValueError(f"record {record.id!r} has no shapes-math scene in meta")
    shape, color, n = meta.get("shape"), meta.get("color"), len(objects)
    if qtype == "count_all":
        steps = _sum_text(_tally(objects, by_color=False), "objects")
        answer = n
    elif qtype == "count_color":
        steps = _sum_text(_tally(objects, color=color), f"{color} objects")
        answer = _count(objects, color=color)
    elif qtype == "count_shape":
        steps = _sum_text(_tally(objects, shape=shape), f"{shape}s")
        answer = _count(objects, shape=shape)
    elif qtype == "remove_color":
        k = _count(objects, color=color)
        steps, answer = f"I see {_plural(k, color + ' object')} and {n} objects in all. {n} - {k} = {n - k}.", n - k
    elif qtype == "remove_shape":
        k = _count(objects, shape=shape)
        steps, answer = f"I see {_plural(k, shape)} and {n} objects in all. {n} - {k} = {n - k}.", n - k
    elif qtype == "add_shape":
        have, k = _count(objects, shape=shape), meta["k"]
        steps = f"I see {_plural(have, shape)}. Adding {k} more gives {have} + {k} = {have + k}."
        answer = have + k
    else:
        a, b, both = _count(objects, shape=shape), _count(objects, color=color), _count(objects, shape, color)
        removed = a + b - both
        overlap = (f", and {_plural(both, color + ' ' + shape)} {'is' if both == 1 else 'are'} both, "
                   f"so {a} + {b} - {both} = {removed} go") if both else f", so {a} + {b} = {removed} go"
        steps = (f"I see {n} objects in all: {_plural(a, shape)} and {_plural(b, color + ' object')}"
                 f"{overlap}. {n} - {removed} = {n - removed}.")
        answer = n - removed
    if str(answer) != record.answer:
        raise ValueError(f"record {record.id!r}: scene gives {answer}, record says {record.answer}")
    return f"{steps}\nAnswer: {answer}"


# -- dataset files ------------------------------------------------------------------------------

def _scene_key(question: str, meta: dict) -> tuple:
    return question, tuple((o["cell"], o["shape"], o["color"]) for o in meta["objects"])


def _split(out_dir: Path, name: str, n: int, seed: int, image_size: int, avoid: set) -> list[Record]:
    rng = random.Random(f"r3v-shapes-math/{seed}/{name}")  # str seeds are hashed (sha512)
    records = []
    while len(records) < n:
        question, answer, meta = make_item(rng, image_size)
        key = _scene_key(question, meta)
        if key in avoid:
            continue
        avoid.add(key)
        image = out_dir / "images" / f"{name}-{len(records):05d}.png"
        render_scene(meta["objects"], image_size).save(image)
        record = Record(id=f"shapes-{name}-{len(records):05d}", image=str(image),
                        question=question, answer=str(answer), dataset=DATASET, meta=meta)
        if name == "warmup":   # the worked solution travels as record data, like any CoT warm-up set
            record = replace(record, meta={**meta, "rationale": template_cot(record)})
        records.append(record)
    return records


def generate(out_dir, *, n_train: int, n_test: int, seed: int = 0, image_size: int = 112,
             n_warmup: int | None = None) -> dict[str, Path]:
    """Write images and train / test / warm-up JSONL files into ``out_dir``; return their paths.

    ``n_warmup`` (default ``n_train // 5``) items for the CoT warm-up set are drawn from their
    own seed stream, like the other splits; :func:`template_cot` writes their solutions into
    ``meta["rationale"]``, the field any loader fills with a record's worked solution.
    """
    if min(n_train, n_test) < 0 or (n_warmup is not None and n_warmup < 0):
        raise ValueError("split sizes must be >= 0")
    if image_size < 2 * GRID * 4:
        raise ValueError(f"image_size must be at least {2 * GRID * 4} px, got {image_size}")
    n_warmup = n_train // 5 if n_warmup is None else n_warmup
    out_dir = Path(out_dir).resolve()
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    paths, seen = {"images": out_dir / "images"}, set()
    for name, n in (("train", n_train), ("warmup", n_warmup), ("test", n_test)):
        paths[name] = out_dir / f"{name}.jsonl"
        write_records(paths[name], _split(out_dir, name, n, seed, image_size, seen))
    return paths


def default_dataset(cache_dir=None, *, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """The default shapes-math split, generated into a cache directory on first use.

    The cache is ``cache_dir`` or ``$R3V_CACHE`` or ``~/.cache/r3v_fast``. The split is built
    in a temporary directory and renamed into place, so concurrent callers never see half of it.
    """
    cache = Path(cache_dir or os.environ.get("R3V_CACHE") or Path.home() / ".cache" / "r3v_fast")
    target = cache / f"shapes-math-v{VERSION}-seed{seed}-{n_train}-{n_test}"
    if all((target / f"{name}.jsonl").is_file() for name in ("train", "test", "warmup")):
        return target
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=cache))
    try:
        generate(tmp, n_train=n_train, n_test=n_test, seed=seed)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first (target exists, non-empty)
            if not (target / "test.jsonl").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m r3v_fast.data.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--n-train", type=int, default=600)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--n-warmup", type=int, default=None, help="default: n-train // 5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=112, help="square image side, px")
    args = parser.parse_args(argv)
    paths = generate(args.out, n_train=args.n_train, n_test=args.n_test, seed=args.seed,
                     image_size=args.image_size, n_warmup=args.n_warmup)
    for name, path in paths.items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
