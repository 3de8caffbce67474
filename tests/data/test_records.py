"""Records and our JSONL format: exact round trip, atomic writes, path safety, bad input."""

import json
import os

import pytest
from PIL import Image

from r3v_fast.data.records import DataError, LoadReport, Record, read_records, write_records


def _records(tmp_path, png):
    inside = png(tmp_path / "ds" / "images" / "a.png")
    outside = png(tmp_path / "elsewhere" / "b.png")
    return [
        Record(id="q1", image=str(inside), question="How many?", answer="3", dataset="shapes-math",
               meta={"objects": [{"shape": "circle", "x": 3}], "qtype": "count_all"}),
        Record(id="q2", image=str(outside), question="Which angle?", answer="B", dataset="geoqa",
               choices=("30°", "45°", "60°")),
        Record(id="q3", image=str(inside), question="Cost?", answer="3/4", dataset="tabmwp",
               unit="$", choices=None),
    ]


def test_round_trip_is_exact(tmp_path, png):
    records = _records(tmp_path, png)
    path = tmp_path / "ds" / "data.jsonl"
    write_records(path, records)
    # inside the file's directory -> relative path; outside -> absolute path as given
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0]["image"] == "images/a.png"
    assert lines[1]["image"] == str(tmp_path / "elsewhere" / "b.png")
    assert lines[1]["choices"] == ["30°", "45°", "60°"] and "choices" not in lines[0]
    # an absolute path outside the file's directory loads only under an image root that holds it
    with pytest.raises(DataError, match="line 2: image path .* outside the image root .*--image-root"):
        read_records(path)
    inside = [records[0], records[2]]
    write_records(path, inside)
    back, report = read_records(path)
    assert back == inside
    assert report.n_loaded == 2 and not report.skipped


def test_moved_directory_still_loads(tmp_path, png):
    records = _records(tmp_path, png)[:1]
    write_records(tmp_path / "ds" / "data.jsonl", records)
    os.rename(tmp_path / "ds", tmp_path / "moved")
    back, _ = read_records(tmp_path / "moved" / "data.jsonl", check_images=True)
    assert back[0].image == str(tmp_path / "moved" / "images" / "a.png")


def test_write_is_atomic(tmp_path, png):
    path = tmp_path / "ds" / "data.jsonl"
    records = [r for r in _records(tmp_path, png) if r.id != "q2"]     # images inside the folder
    write_records(path, records)

    def broken():
        yield records[0]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_records(path, broken())
    assert read_records(path)[0] == records  # old file untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.jsonl", "images"]  # no temp left


def test_record_validation_and_load_image(tmp_path, png, corrupt_png):
    with pytest.raises(DataError, match="empty question"):
        Record(id="x", image="/i.png", question="  ", answer="1", dataset="d")
    with pytest.raises(DataError, match="at least 2 choices"):
        Record(id="x", image="/i.png", question="q", answer="A", dataset="d", choices=("only",))
    good = Record(id="ok", image=str(png(tmp_path / "g.png", size=(5, 7))), question="q", answer="b",
                  dataset="d", choices=["a", "b"])
    assert good.choices == ("a", "b") and hash(good) == hash(good)
    img = good.load_image()
    assert img.mode == "RGB" and img.size == (5, 7)
    gray = tmp_path / "gray.png"
    Image.new("L", (4, 4), 9).save(gray)
    assert Record(id="g", image=str(gray), question="q", answer="1", dataset="d").load_image().mode == "RGB"
    missing = Record(id="gone-7", image=str(tmp_path / "nope.png"), question="q", answer="1", dataset="d")
    with pytest.raises(DataError, match="gone-7.*not found"):
        missing.load_image()
    broken = Record(id="bad-3", image=str(corrupt_png(tmp_path / "c.png")), question="q", answer="1",
                    dataset="d")
    with pytest.raises(DataError, match="bad-3.*cannot read image"):
        broken.load_image()



def test_image_size_reads_the_header_only(tmp_path, png, corrupt_png):
    from r3v_fast.data.records import image_size, load_image

    assert image_size(str(png(tmp_path / "g.png", size=(5, 7)))) == (5, 7)
    with pytest.raises(DataError, match="q-1: image file not found") as err:
        image_size(str(tmp_path / "nope.png"), who="q-1")
    assert err.value.reason == "missing image"
    with pytest.raises(DataError, match="q-2: cannot read image") as err:
        image_size(str(corrupt_png(tmp_path / "c.png")), who="q-2")
    assert err.value.reason == "corrupt image"
    # A truncated JPEG: the header is intact (size known), only decoding the pixels fails.
    full = tmp_path / "full.jpg"
    Image.effect_noise((64, 48), 60).convert("RGB").save(full, quality=90)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    assert image_size(str(cut)) == (64, 48)
    with pytest.raises(DataError, match="q-3: cannot read image") as err:
        load_image(str(cut), who="q-3")
    assert err.value.reason == "corrupt image"

def _line(**overrides):
    obj = {"id": "r", "image": "img.png", "question": "How many?", "answer": "2", "dataset": "shapes-math"}
    obj.update(overrides)
    return json.dumps({k: v for k, v in obj.items() if v is not None})


BAD_LINES = [
    ("{not json", "malformed JSON", "malformed json"),
    (_line(question=None), "missing field.*question", "missing field"),
    (_line(question="   "), "empty question", "empty question"),
    (_line(answer=""), "empty answer", "empty answer"),
    (_line(image="../outside.png"), "outside the image root", "bad image path"),
    (_line(image="sub/../../outside.png"), "outside the image root", "bad image path"),
    (_line(id="r0"), "duplicate id", "duplicate id"),
    ('["a", "list"]', "expected a JSON object", "bad value"),
    (_line(choices=["one"]), "at least 2 choices", "bad value"),
    # a letter beyond the choices: a prediction "E" would be judged right against it
    (_line(dataset="geoqa", answer="E", choices=["1", "2"]), "'E' names none of the 2 choices",
     "answer not an option"),
    (_line(answer="2.5"), "shapes-math answer must be an integer", "non-integer answer"),
    (_line(answer="NaN", dataset="clevr-math"), "clevr-math answer must be an integer", "non-integer answer"),
    (_line(answer="inf"), "must be an integer", "non-integer answer"),
    (_line(image="/etc/hosts"), "outside the image root", "bad image path"),
]


@pytest.mark.parametrize("bad, message, reason", BAD_LINES)
def test_bad_line_strict_and_lenient(tmp_path, png, bad, message, reason):
    png(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_text(_line(id="r0") + "\n\n" + bad + "\n" + _line(id="r9") + "\n")
    with pytest.raises(DataError, match=f"data.jsonl, line 3: .*{message}"):
        read_records(path)
    records, report = read_records(path, strict=False)
    assert [r.id for r in records] == ["r0", "r9"]
    assert report.skipped == {reason: 1} and report.n_loaded == 2
    assert "loaded 2 records, skipped 1" in report.summary() and reason in report.summary()


def test_image_checks(tmp_path, png, corrupt_png):
    png(tmp_path / "img.png")
    corrupt_png(tmp_path / "broken.png")
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join([_line(id="a"), _line(id="b", image="missing.png"),
                               _line(id="c", image="broken.png")]) + "\n")
    assert len(read_records(path)[0]) == 3  # paths are not opened unless asked
    with pytest.raises(DataError, match=r"line 2 \(record 'b'\): image file not found"):
        read_records(path, check_images=True)
    records, report = read_records(path, strict=False, check_images=True)
    assert [r.id for r in records] == ["a"]
    assert report.skipped == {"missing image": 1, "corrupt image": 1}


def test_absolute_paths_and_explicit_root(tmp_path, png):
    root = tmp_path / "root"
    inside = png(root / "in.png")
    outside = png(tmp_path / "out.png")
    path = tmp_path / "data.jsonl"
    path.write_text(_line(id="a", image=str(inside)) + "\n" + _line(id="b", image=str(outside)) + "\n")
    # no explicit root: the file's directory is the root, and both lie inside it
    assert len(read_records(path)[0]) == 2
    # explicit root: an absolute path elsewhere is an escape
    with pytest.raises(DataError, match="line 2: image path .* outside the image root"):
        read_records(path, image_root=root)
    records, report = read_records(path, image_root=root, strict=False)
    assert [r.id for r in records] == ["a"] and report.skipped == {"bad image path": 1}


def test_unreadable_file(tmp_path):
    with pytest.raises(DataError, match="cannot read file"):
        read_records(tmp_path / "absent.jsonl")


def test_report_summary():
    report = LoadReport("f.jsonl", n_loaded=4)
    assert report.summary() == "f.jsonl: loaded 4 records"
    report.skip(DataError("x", "missing field"))
    report.skip(DataError("y", "bad image path"))
    assert report.summary() == ("f.jsonl: loaded 4 records, skipped 2 (bad image path: 1, missing field: 1)\n"
                                "  skipped: x [missing field]\n  skipped: y [bad image path]")


def test_a_byte_order_mark_does_not_cost_the_first_record(tmp_path, png):
    png(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (_line(id="r1") + "\n" + _line(id="r2") + "\n").encode())
    records, report = read_records(path, strict=False)
    assert [r.id for r in records] == ["r1", "r2"] and not report.skipped


def test_the_summary_names_the_first_skipped_records(tmp_path, png):
    png(tmp_path / "img.png")
    path = tmp_path / "data.jsonl"
    bad = [_line(id=f"b{i}", answer="x") for i in range(7)]
    path.write_text("\n".join([_line(id="ok"), *bad]) + "\n")
    _, report = read_records(path, strict=False)
    lines = report.summary().splitlines()
    assert lines[0].endswith("loaded 1 records, skipped 7 (non-integer answer: 7)")
    assert lines[1] == (f"  skipped: {path}, line 2: record 'b0': shapes-math answer must be an integer, "
                        "got 'x' [non-integer answer]")
    assert [line.split(", ")[1].split(":")[0] for line in lines[1:6]] == [f"line {n}" for n in range(2, 7)]
    assert lines[6] == "  ... and 2 more"
