"""Loaders: every public format on small fixture files, format detection and bad input."""

import json

import pytest

from r3v_fast.data.loaders import detect_format, load_dataset, split_choices
from r3v_fast.data.records import DataError, Record, write_records


def _dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))
    return path


def _dump_lines(path, objs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(o) + "\n" for o in objs))
    return path


def test_own_jsonl(tmp_path, png):
    rec = Record(id="s1", image=str(png(tmp_path / "images" / "s1.png")), question="How many?",
                 answer="4", dataset="shapes-math", meta={"qtype": "count_all"})
    write_records(tmp_path / "train.jsonl", [rec])
    records, report = load_dataset(tmp_path / "train.jsonl", check_images=True)
    assert records == [rec] and report.n_loaded == 1
    renamed, _ = load_dataset(tmp_path / "train.jsonl", fmt="jsonl", dataset="clevr-math")
    assert renamed[0].dataset == "clevr-math" and renamed[0].id == "s1"


def test_mmsi(tmp_path, png):
    png(tmp_path / "images" / "1.png")
    png(tmp_path / "images" / "2.png")
    items = [
        {"id": "geo-1", "image": "images/1.png", "conversations": [
            {"from": "user", "value": "<image>\nFind angle ABC.\nChoices:\nA. 30°\nB. 45°\nC. 60°"},
            {"from": "assistant", "value": "Angle ABC is half of 90°, so 45°.\nAnswer: B"}]},
        {"image": "images/2.png", "conversations": [
            {"from": "human", "value": "<image>What is x?\n(A) 2\n(B) 3"},
            {"from": "gpt", "value": "3"}]},
    ]
    path = _dump(tmp_path / "geoqa_train_cot.json", items)
    records, report = load_dataset(path, check_images=True)
    first, second = records
    assert first == Record(id="geo-1", image=str(tmp_path / "images" / "1.png"),
                           question="Find angle ABC.", answer="B", dataset="geoqa",
                           choices=("30°", "45°", "60°"),
                           meta={"rationale": "Angle ABC is half of 90°, so 45°.\nAnswer: B"})
    # an answer given as option text becomes its letter; the id falls back to stem-index
    assert (second.id, second.question, second.choices, second.answer, second.meta) == \
        ("geoqa_train_cot-1", "What is x?", ("2", "3"), "B", None)
    # without a dataset name in the file name, the name comes from dataset= or defaults to mmsi
    other = _dump(tmp_path / "train.json", items[:1])
    assert load_dataset(other)[0][0].dataset == "mmsi"
    assert load_dataset(other, dataset="m3cot")[0][0].dataset == "m3cot"


def test_mmsi_free_text_answer(tmp_path, png):
    png(tmp_path / "c.png")
    items = [{"image": "c.png", "conversations": [
        {"from": "user", "value": "<image>\nSubtract all balls. How many objects are left?"},
        {"from": "assistant", "value": "There are 5 objects and 2 balls. 5 - 2 = 3.\nanswer: 3"}]}]
    rec = load_dataset(_dump(tmp_path / "clevr_math_mmsi.json", items))[0][0]
    assert (rec.question, rec.answer, rec.choices, rec.dataset) == \
        ("Subtract all balls. How many objects are left?", "3", None, "clevr-math")


def test_chartqa(tmp_path, png):
    png(tmp_path / "test" / "png" / "1234.png")
    path = _dump(tmp_path / "test" / "test_human.json", [
        {"imgname": "1234.png", "query": "What is the highest value?", "label": "45.5"},
        {"imgname": "1234.png", "query": "Which party won?", "label": "Democrats"},
        {"imgname": "1234.png", "query": "How many bars?", "label": 7.0}])
    records, report = load_dataset(path, check_images=True)
    assert [(r.id, r.question, r.answer, r.dataset) for r in records] == [
        ("test_human-0", "What is the highest value?", "45.5", "chartqa"),
        ("test_human-1", "Which party won?", "Democrats", "chartqa"),
        ("test_human-2", "How many bars?", "7", "chartqa")]
    assert records[0].image == str(tmp_path / "test" / "png" / "1234.png")


def test_tabmwp(tmp_path, png):
    png(tmp_path / "tables" / "7.png")
    png(tmp_path / "tables" / "12.png")
    path = _dump(tmp_path / "problems_dev.json", {
        "7": {"question": "How much does a pen cost?", "choices": None, "unit": "$", "answer": "3.50",
              "table": "pen | $3.50", "ques_type": "free_text"},
        "12": {"question": "Is the number even or odd?", "choices": ["even", "odd"], "unit": None,
               "answer": "odd", "ques_type": "multi_choice"}})
    records, report = load_dataset(path, check_images=True)
    pen, parity = records
    assert (pen.id, pen.answer, pen.unit, pen.choices, pen.dataset) == ("7", "3.50", "$", None, "tabmwp")
    assert (parity.id, parity.answer, parity.unit, parity.choices) == ("12", "odd", None, ("even", "odd"))
    assert parity.image == str(tmp_path / "tables" / "12.png")


def test_clevr_math_json_and_jsonl(tmp_path, png):
    png(tmp_path / "images" / "CLEVR_train_000001.png")
    items = [{"filename": "CLEVR_train_000001.png",
              "question": "Subtract all red cubes. How many objects are left?", "answer": 6}]
    for path in (_dump(tmp_path / "clevr.json", items), _dump_lines(tmp_path / "clevr.jsonl", items)):
        (rec,), _ = load_dataset(path, check_images=True)
        assert (rec.answer, rec.dataset, rec.id) == ("6", "clevr-math", f"{path.stem}-0")
        assert rec.image == str(tmp_path / "images" / "CLEVR_train_000001.png")


@pytest.mark.parametrize("name", ["geoqa", "m3cot"])
def test_multiple_choice(tmp_path, png, name):
    png(tmp_path / "img" / "a.png")
    items = [
        {"id": "q1", "question": "Find x.", "choices": ["1", "2", "3", "4"], "answer": "C", "image": "img/a.png"},
        {"question_id": 5, "question": "Find y.", "options": {"B": "cat", "A": "dog"}, "answer": 1,
         "image_path": "img/a.png"},
        {"question": "Which animal?", "context": "A farm.", "choices": ["cow", "hen"], "answer": "hen",
         "img": "img/a.png"},
    ]
    path = _dump_lines(tmp_path / f"{name}_test.jsonl", items)
    assert detect_format(path) == name
    records, _ = load_dataset(path, check_images=True)
    assert [(r.id, r.question, r.choices, r.answer, r.dataset) for r in records] == [
        ("q1", "Find x.", ("1", "2", "3", "4"), "C", name),
        ("5", "Find y.", ("dog", "cat"), "B", name),
        (f"{name}_test-2", "A farm.\nWhich animal?", ("cow", "hen"), "B", name)]
    # a multiple-choice file whose name (and folder name) says neither dataset needs fmt=
    (tmp_path / "plain").mkdir()
    unnamed = _dump_lines(tmp_path / "plain" / "mc.jsonl", items)
    with pytest.raises(DataError, match=r"pass fmt=.*\(--data-format\)"):
        load_dataset(unnamed)
    assert load_dataset(unnamed, fmt=name)[0][0].answer == "C"


def test_split_choices():
    assert split_choices("Q?\nA. x\nB. y") == ("Q?", ("x", "y"))
    assert split_choices("Q?\nOptions:\n(A) x\n(B) y\n(C) z") == ("Q?", ("x", "y", "z"))
    assert split_choices("Q?\nA: 1\nC: 3") == ("Q?\nA: 1\nC: 3", None)  # not A, B, ... in order
    assert split_choices("How many balls?") == ("How many balls?", None)


# -- bad input ------------------------------------------------------------------------------------

def _mc(**overrides):
    obj = {"id": "q", "question": "Find x.", "choices": ["1", "2"], "answer": "A", "image": "a.png"}
    obj.update(overrides)
    return {k: v for k, v in obj.items() if v is not None}


BAD_MC = [
    (_mc(question=None), "missing field question", "missing field"),
    (_mc(question=""), "empty question", "empty question"),
    (_mc(answer="F"), "neither an option letter nor an option", "bad value"),
    (_mc(answer=7), "index 7 out of range", "bad value"),
    (_mc(choices="AB"), "choices must be a list", "bad value"),
    (_mc(image="../../etc/passwd"), "outside the image root", "bad image path"),
    (_mc(image="/etc/passwd"), "outside the image root", "bad image path"),
    (_mc(image=None), "missing field image", "missing field"),
]


@pytest.mark.parametrize("bad, message, reason", BAD_MC)
def test_bad_multiple_choice_record(tmp_path, png, bad, message, reason):
    png(tmp_path / "a.png")
    path = tmp_path / "geoqa.jsonl"
    lines = [json.dumps(_mc(id="q0")), json.dumps(bad), json.dumps(_mc(id="q2"))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=f"geoqa.jsonl, line 2: .*{message}"):
        load_dataset(path)
    records, report = load_dataset(path, strict=False)
    assert [r.id for r in records] == ["q0", "q2"] and report.skipped == {reason: 1}


def test_malformed_jsonl_line(tmp_path, png):
    png(tmp_path / "images" / "x.png")
    path = tmp_path / "clevr.jsonl"
    good = json.dumps({"filename": "x.png", "question": "How many?", "answer": 2})
    path.write_text(good + "\n" + '{"filename": "x.png", "question": ' + "\n" + good + "\n")
    with pytest.raises(DataError, match="clevr.jsonl, line 2: malformed JSON"):
        load_dataset(path)
    records, report = load_dataset(path, strict=False)
    assert len(records) == 2 and report.skipped == {"malformed json": 1}


def test_bad_json_list_items_name_the_index(tmp_path, png, corrupt_png):
    png(tmp_path / "png" / "ok.png")
    corrupt_png(tmp_path / "png" / "bad.png")
    path = _dump(tmp_path / "val.json", [
        {"imgname": "ok.png", "query": "Q?", "label": "1"},
        {"imgname": "ok.png", "query": "Q?"},
        {"imgname": "gone.png", "query": "Q?", "label": "1"},
        {"imgname": "bad.png", "query": "Q?", "label": "1"},
        {"imgname": "../ok.png", "query": "Q?", "label": "1"},
        "not an object"])
    with pytest.raises(DataError, match=r"val.json, item 1: missing field label"):
        load_dataset(path, fmt="chartqa")
    records, report = load_dataset(path, fmt="chartqa", strict=False, check_images=True)
    assert [r.image.rsplit("/", 1)[1] for r in records] == ["ok.png"]
    assert report.skipped == {"missing field": 1, "missing image": 1, "corrupt image": 1,
                              "bad image path": 1, "bad value": 1}
    ok, corrupt = {"imgname": "ok.png", "query": "Q?", "label": "1"}, {"imgname": "bad.png", "query": "Q?", "label": "1"}
    with pytest.raises(DataError, match=r"val.json, item 3 \(record 'val-3'\): cannot read image"):
        load_dataset(_dump(tmp_path / "val.json", [ok, ok, ok, corrupt]), check_images=True)


def test_corrupt_image_found_at_load_image(tmp_path, png, corrupt_png):
    corrupt_png(tmp_path / "tables" / "3.png")
    path = _dump(tmp_path / "problems_test.json", {"3": {"question": "Q?", "choices": None,
                                                          "unit": None, "answer": "5"}})
    (rec,), _ = load_dataset(path)  # images are opened lazily
    with pytest.raises(DataError, match="record '3': cannot read image"):
        rec.load_image()


def test_whole_file_errors(tmp_path):
    bad = tmp_path / "broken.json"
    bad.write_text('[{"imgname": "a.png",')
    with pytest.raises(DataError, match="broken.json: malformed JSON at line 1"):
        load_dataset(bad)
    with pytest.raises(DataError, match="no such file"):
        load_dataset(tmp_path / "absent.json")
    odd = _dump(tmp_path / "odd.json", [{"foo": 1}])
    with pytest.raises(DataError, match="cannot detect the format"):
        load_dataset(odd)
    with pytest.raises(ValueError, match="unknown format"):
        load_dataset(odd, fmt="vqa")
    listed = _dump(tmp_path / "problems_x.json", [{"question": "q"}])
    with pytest.raises(DataError, match="keyed by problem id"):
        load_dataset(listed, fmt="tabmwp")


# -- the public MM-Self-Improve files ---------------------------------------------------------
def test_public_qa_and_cot_files_lose_their_suffix_and_keep_their_kind(public_chartqa):
    from r3v_fast.data.loaders import PUBLIC_PROMPT_SUFFIXES, load_files

    root, qa_file, cot_file = public_chartqa
    records, reports = load_files([str(root / "chartqa" / "*.json")], image_root=root / "images",
                                  check_images=True)
    assert [r.n_loaded for r in reports] == [3, 6]             # qwenvl_sft_gpt.json, then sft_qa.json
    assert len(records) == 9 and len({r.id for r in records}) == 9
    assert {r.dataset for r in records} == {"chartqa"}          # from the folder name
    for r in records:
        assert r.question == "How many bars does the chart show?"   # no answer-format instruction left
        assert r.meta["prompt_suffix"].replace("\u2019", "'") in PUBLIC_PROMPT_SUFFIXES
    cot = [r for r in records if "rationale" in r.meta]
    assert len(cot) == 3 and all(r.meta["rationale"].startswith("Solution:") for r in cot)
    assert all(r.answer == r.meta["rationale"].split("\n")[-1] for r in cot)
    with pytest.raises(DataError, match="no file matches"):
        load_files([str(root / "chartqa" / "nothing*.json")])


def test_public_tabmwp_options_after_the_suffix_and_the_unit(tmp_path, png):
    png(tmp_path / "38064.png")
    png(tmp_path / "19903.png")
    items = [
        {"image": "38064.png", "conversations": [
            {"from": "user", "value": "Look at the table. Then answer the question. At a price of $1,735, is there "
                                      "a shortage or a surplus?\nOptions:\n(A) shortage\n(B) surplus\nFirst generate "
                                      "a step-by-step solution, then answer with the option\u2019s letter from the "
                                      "given choices directly."},
            {"from": "assistant", "value": "Solution:\n1. Supply exceeds demand.\nAnswer: B"}]},
        {"image": "19903.png", "conversations": [
            {"from": "user", "value": "How many students scored exactly 41 points? (Unit: students)\nFirst generate a "
                                      "step-by-step solution, then answer the question using a single word or phrase."},
            {"from": "assistant", "value": "Solution:\n1. Three rows show 41.\nAnswer: 3"}]},
        {"image": "19903.png", "conversations": [
            {"from": "user", "value": "Which is larger?\nOptions:\n(A) 4\n(B) 7\nLet's think step by step."},
            {"from": "assistant", "value": "7 > 4.\nAnswer: B"}]},
    ]
    path = tmp_path / "tabmwp" / "qwenvl_sft_gpt.json"
    path.parent.mkdir()
    path.write_text(json.dumps(items))
    records, report = load_dataset(path, image_root=tmp_path, check_images=True)
    assert report.n_loaded == 3 and {r.dataset for r in records} == {"tabmwp"}
    mc, free, llava = records
    assert mc.choices == ("shortage", "surplus") and mc.answer == "B"
    assert mc.question.endswith("is there a shortage or a surplus?")
    assert free.unit == "students" and free.question == "How many students scored exactly 41 points?"
    assert llava.choices == ("4", "7") and llava.meta["prompt_suffix"] == "Let's think step by step."


def test_strip_prompt_suffix_leaves_other_last_lines_alone():
    from r3v_fast.data.loaders import strip_prompt_suffix

    assert strip_prompt_suffix("Q?\nAnswer the question using a single numerical value (0-10).") == (
        "Q?", "Answer the question using a single numerical value (0-10).")
    assert strip_prompt_suffix("Q?\nFirst generate a step-by-step solution, then answer briefly.")[1] is not None
    assert strip_prompt_suffix("Q?\nA. x\nB. y") == ("Q?\nA. x\nB. y", None)
    assert strip_prompt_suffix("Let's think step by step.") == ("Let's think step by step.", None)


def test_public_clevr_files(tmp_path, png):
    png(tmp_path / "images" / "CLEVR_train_006841.png")
    qa = [{"image": "CLEVR_train_006841.png", "conversations": [
        {"from": "user", "value": "Add 1 matte cubes. How many matte cubes exist?\n"
                                  "Answer the question using a single numerical value (0-10)."},
        {"from": "assistant", "value": "3"}]}]
    cot = [{"image": "CLEVR_train_006841.png", "conversations": [
        {"from": "user", "value": "Subtract all blocks. How many objects are left?\nLet's think step by step."},
        {"from": "assistant", "value": "1. There are 8 objects in total.\n2. One block.\n3. 8 - 1 = 7.\nAnswer:\n7"}]}]
    _dump(tmp_path / "clevr" / "sft_qa.json", qa)
    _dump(tmp_path / "clevr" / "llava_sft_gpt.json", cot)
    from r3v_fast.data.loaders import load_files

    records, reports = load_files([str(tmp_path / "clevr" / "sft_qa.json"), str(tmp_path / "clevr" / "llava*.json")],
                                  image_root=tmp_path / "images", check_images=True)
    assert [r.n_loaded for r in reports] == [1, 1]
    direct, worked = records
    assert (direct.dataset, direct.question, direct.answer) == ("clevr-math", "Add 1 matte cubes. How many matte "
                                                                "cubes exist?", "3")
    assert "rationale" not in direct.meta and worked.meta["rationale"].endswith("Answer:\n7")
    assert (worked.answer, worked.question) == ("7", "Subtract all blocks. How many objects are left?")


@pytest.mark.parametrize("text", [
    "A. x" + " " * 100_000 + "y",                     # an option line with a long run of spaces inside
    "Which?\nA. 1\nB. 2" + " " * 100_000 + "z",
    " " * 100_000 + "A",
    "Q (Unit: " + " " * 100_000 + "m",                # an unclosed unit on one huge line
    "Q?\n" + "A. x\n" * 200_000,                      # many option lines (each once put in front)
])
def test_hostile_lines_are_split_in_linear_time(text):
    # Quadratic backtracking took ~5 s at 20k spaces (~2 min at 100k), and putting each option
    # line in front of the list ~1.9 s at 80k lines; a linear scan takes milliseconds to a few
    # hundred. The bound only guards against a return to quadratic behaviour.
    import time

    from r3v_fast.data.loaders import split_unit

    start = time.process_time()
    split_choices(text)
    split_unit(text)
    assert time.process_time() - start < 2.0


def test_split_unit():
    from r3v_fast.data.loaders import split_unit

    assert split_unit("How many? (Unit: students) ") == ("How many?", "students")
    assert split_unit("How many? (Unit: (a) b)") == ("How many? (Unit: (a) b)", None)
    assert split_unit("How many?") == ("How many?", None)
    assert split_choices("Q\nA.  x  \n(B) y") == ("Q", ("x", "y"))


def test_json_with_a_byte_order_mark_and_non_finite_gold(tmp_path, png):
    png(tmp_path / "images" / "a.png")
    items = [{"filename": "a.png", "question": "How many?", "answer": 3},
             {"filename": "a.png", "question": "How many?", "answer": float("nan")},
             {"filename": "a.png", "question": "How many?", "answer": 2.5}]
    path = tmp_path / "clevr_test.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(items).encode())
    records, report = load_dataset(path, strict=False)
    assert [r.answer for r in records] == ["3"]
    assert report.skipped == {"bad value": 1, "non-integer answer": 1}
