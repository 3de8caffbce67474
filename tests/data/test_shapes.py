"""shapes-math: answers, images and worked solutions checked against independent references.

The references here do not use the generator's code: answers are recomputed by parsing the
question text and counting the scene, and the images are segmented (connected components) to
check that each object is drawn where the scene says, in its colour and shape.
"""

import re
import subprocess
import sys
from collections import deque

import numpy as np
import pytest

from r3v_fast.data.judge import is_correct
from r3v_fast.data.records import Record, read_records
from r3v_fast.data.shapes import QUESTION_TYPES, default_dataset, generate, main, template_cot


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    paths = generate(out, n_train=160, n_test=60, seed=3, n_warmup=20)
    return {name: read_records(paths[name], check_images=True)[0] for name in ("train", "test", "warmup")}


def _reference_answer(question: str, objects: list[dict]) -> int:
    """Count from the scene, reading the question's text with our own patterns."""
    def count(shape=None, color=None):
        return sum((shape is None or o["shape"] == shape) and (color is None or o["color"] == color)
                   for o in objects)
    n = len(objects)
    if question == "How many objects are there?":
        return n
    if m := re.fullmatch(r"How many (red|blue|green|yellow) objects are there\?", question):
        return count(color=m[1])
    if m := re.fullmatch(r"How many (circle|square|triangle)s are there\?", question):
        return count(shape=m[1])
    if m := re.fullmatch(r"Remove all (red|blue|green|yellow) objects\. How many objects are left\?", question):
        return n - count(color=m[1])
    if m := re.fullmatch(r"Remove all (circle|square|triangle)s\. How many objects are left\?", question):
        return n - count(shape=m[1])
    if m := re.fullmatch(r"Add (\d) (\w+) (circle|square|triangle)s?\. How many (\w+)s are there\?", question):
        assert m[3] == m[4]
        return count(shape=m[3]) + int(m[1])
    if m := re.fullmatch(r"Remove all (\w+)s and all (\w+) objects\. How many objects are left\?", question):
        return sum(not (o["shape"] == m[1] or o["color"] == m[2]) for o in objects)
    raise AssertionError(f"unexpected question {question!r}")


def test_answers_match_an_independent_count(dataset):
    records = [r for split in dataset.values() for r in split]
    assert len(records) == 240
    for rec in records:
        assert rec.dataset == "shapes-math" and rec.answer == str(_reference_answer(rec.question, rec.meta["objects"]))
        assert 2 <= len(rec.meta["objects"]) <= 8 and len(rec.question) <= 80
    assert {r.meta["qtype"] for r in dataset["train"]} == set(QUESTION_TYPES)
    assert len({r.answer for r in records}) >= 6  # answers spread over many values


def test_splits_are_disjoint_and_ids_unique(dataset):
    def keys(split):
        return {(r.question, tuple((o["cell"], o["shape"], o["color"]) for o in r.meta["objects"]))
                for r in dataset[split]}
    assert not keys("train") & keys("test") and not keys("warmup") & keys("test")
    ids = [r.id for split in dataset.values() for r in split]
    assert len(ids) == len(set(ids))


REFERENCE_COLORS = {"red": (255, 0, 0), "blue": (0, 0, 255), "green": (0, 150, 0), "yellow": (255, 220, 0)}


def _components(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean mask (0 = background)."""
    labels = np.zeros(mask.shape, dtype=np.int32)
    count = 0
    for start in zip(*np.nonzero(mask)):
        if labels[start]:
            continue
        count += 1
        labels[start] = count
        queue = deque([start])
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = count
                    queue.append((ny, nx))
    return labels


def test_images_show_the_scene(dataset):
    for rec in dataset["test"][:30]:
        pixels = np.asarray(rec.load_image(), dtype=np.int32)  # [H, W, 3]
        assert pixels.shape == (112, 112, 3)
        background = pixels[0, 0]
        labels = _components(np.abs(pixels - background).sum(-1) > 60)  # [H, W]
        objects = rec.meta["objects"]
        hit = [labels[o["y"], o["x"]] for o in objects]
        # one connected blob per object, each containing the object's centre
        assert 0 not in hit and len(set(hit)) == len(objects) == labels.max(), rec.id
        for obj, label in zip(objects, hit):
            ys, xs = np.nonzero(labels == label)
            fill = len(ys) / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))  # blob area / bounding-box area
            shape = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
            centre = pixels[obj["y"], obj["x"]]
            color = min(REFERENCE_COLORS, key=lambda c: np.abs(centre - REFERENCE_COLORS[c]).sum())
            assert (shape, color) == (obj["shape"], obj["color"]), (rec.id, obj, fill)


def _scene(*objects):
    return [{"shape": s, "color": c, "x": 0, "y": 0, "size": 20, "cell": i} for i, (c, s) in enumerate(objects)]


SCENE = _scene(("red", "circle"), ("red", "circle"), ("red", "square"), ("green", "circle"),
               ("blue", "triangle"), ("green", "square"), ("yellow", "circle"))


@pytest.mark.parametrize("params, question, answer, cot", [
    ({"qtype": "count_all"}, "How many objects are there?", 7,
     "I see 4 circles, 2 squares and 1 triangle. 4 + 2 + 1 = 7."),
    ({"qtype": "count_color", "color": "red"}, "How many red objects are there?", 3,
     "I see 2 red circles and 1 red square. 2 + 1 = 3."),
    ({"qtype": "count_color", "color": "blue"}, "How many blue objects are there?", 1,
     "I see 1 blue triangle."),
    ({"qtype": "count_shape", "shape": "triangle"}, "How many triangles are there?", 1,
     "I see 1 blue triangle."),
    ({"qtype": "count_shape", "shape": "circle"}, "How many circles are there?", 4,
     "I see 2 red circles, 1 green circle and 1 yellow circle. 2 + 1 + 1 = 4."),
    ({"qtype": "count_color", "color": "yellow"}, "How many yellow objects are there?", 1,
     "I see 1 yellow circle."),
    ({"qtype": "remove_color", "color": "red"}, "Remove all red objects. How many objects are left?", 4,
     "I see 3 red objects and 7 objects in all. 7 - 3 = 4."),
    ({"qtype": "remove_shape", "shape": "square"}, "Remove all squares. How many objects are left?", 5,
     "I see 2 squares and 7 objects in all. 7 - 2 = 5."),
    ({"qtype": "add_shape", "shape": "square", "color": "blue", "k": 2},
     "Add 2 blue squares. How many squares are there?", 4, "I see 2 squares. Adding 2 more gives 2 + 2 = 4."),
    ({"qtype": "remove_color_and_shape", "shape": "circle", "color": "green"},
     "Remove all circles and all green objects. How many objects are left?", 2,
     "I see 7 objects in all: 4 circles and 2 green objects, and 1 green circle is both, "
     "so 4 + 2 - 1 = 5 go. 7 - 5 = 2."),
    ({"qtype": "remove_color_and_shape", "shape": "triangle", "color": "red"},
     "Remove all triangles and all red objects. How many objects are left?", 3,
     "I see 7 objects in all: 1 triangle and 3 red objects, so 1 + 3 = 4 go. 7 - 4 = 3."),
])
def test_template_cot_by_hand(params, question, answer, cot):
    assert _reference_answer(question, SCENE) == answer  # the hand-written case is consistent
    rec = Record(id="h", image="/x.png", question=question, answer=str(answer), dataset="shapes-math",
                 meta={**params, "objects": SCENE})
    assert template_cot(rec) == f"{cot}\nAnswer: {answer}"


def test_template_cot_on_generated_records(dataset):
    for rec in dataset["warmup"] + dataset["train"][:50]:
        text = template_cot(rec)
        assert text.endswith(f"\nAnswer: {rec.answer}") and is_correct("shapes-math", text, rec.answer)
    rec = dataset["train"][0]
    wrong = Record(**{**rec.__dict__, "answer": str(int(rec.answer) + 1)})
    with pytest.raises(ValueError, match="scene gives"):
        template_cot(wrong)
    with pytest.raises(ValueError, match="no shapes-math scene"):
        template_cot(Record(id="n", image="/x.png", question="q", answer="1", dataset="shapes-math"))


def test_deterministic_from_seed(tmp_path):
    a = generate(tmp_path / "a", n_train=12, n_test=5, seed=7)
    b = generate(tmp_path / "b", n_train=12, n_test=5, seed=7)
    c = generate(tmp_path / "c", n_train=12, n_test=5, seed=8)
    for name in ("train", "test", "warmup"):
        assert a[name].read_bytes() == b[name].read_bytes()
    assert a["train"].read_bytes() != c["train"].read_bytes()
    assert sorted(p.name for p in a["images"].iterdir()) == sorted(p.name for p in b["images"].iterdir())
    for png in a["images"].iterdir():
        assert png.read_bytes() == (b["images"] / png.name).read_bytes()
    assert len(read_records(a["warmup"])[0]) == 2  # default n_warmup = n_train // 5


def test_generate_arguments(tmp_path):
    with pytest.raises(ValueError, match=">= 0"):
        generate(tmp_path, n_train=-1, n_test=1)
    with pytest.raises(ValueError, match="image_size"):
        generate(tmp_path, n_train=1, n_test=1, image_size=8)
    paths = generate(tmp_path / "big", n_train=2, n_test=1, image_size=168, n_warmup=0)
    (rec,), _ = read_records(paths["test"])
    assert rec.load_image().size == (168, 168) and read_records(paths["warmup"])[0] == []


def test_cli(tmp_path):
    main(["--out", str(tmp_path / "m"), "--n-train", "3", "--n-test", "2", "--seed", "1"])
    assert len(read_records(tmp_path / "m" / "test.jsonl", check_images=True)[0]) == 2
    out = subprocess.run([sys.executable, "-m", "r3v_fast.data.shapes", "--out", str(tmp_path / "s"),
                          "--n-train", "4", "--n-test", "2", "--seed", "1", "--image-size", "56"],
                         capture_output=True, text=True, check=True)
    assert "train.jsonl" in out.stdout
    (rec, *_), _ = read_records(tmp_path / "s" / "train.jsonl", check_images=True)
    assert rec.load_image().size == (56, 56)
    # same seed, same records as the in-process run
    assert read_records(tmp_path / "s" / "train.jsonl")[0][0].question == \
        read_records(tmp_path / "m" / "train.jsonl")[0][0].question


def test_default_dataset_is_cached(tmp_path):
    first = default_dataset(tmp_path, n_train=6, n_test=3)
    stamp = (first / "train.jsonl").stat().st_mtime_ns
    assert default_dataset(tmp_path, n_train=6, n_test=3) == first
    assert (first / "train.jsonl").stat().st_mtime_ns == stamp
    assert len(read_records(first / "test.jsonl", check_images=True)[0]) == 3
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary directory left
