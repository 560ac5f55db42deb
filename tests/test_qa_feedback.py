"""Tests for examples/qa_feedback.py on a hand-written file in QA-Feedback's format: the
converter's records and counts, and the agreement's P/R/F1 computed by hand. The tokenizer
is byte-level (no merges), so every character is a token and the counts can be read off."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))
import data  # noqa: E402
import qa_feedback as qa  # noqa: E402
import tokenizer as tok  # noqa: E402


def item(pred1, corrected, errors=(), missing=(), preference=(1, 1, 1, 0, 0, 0)):
    return {"question": "Q?", "passages": [["T1", "S1.", "S2."], ["T2", "S3."]], "gold": "",
            **{f"prediction {k}": f"answer {k}" for k in (2, 3, 4)}, "prediction 1": pred1,
            "preference": list(preference),
            "feedback": {"errors": [{"error type": t, "explanation": "", "start": s, "end": e} for t, s, e in errors],
                         "missing-info": [{"error type": "Missing-Answer", "passage_id": 1, "sentence_id": [1]}
                                          for _ in missing],
                         "corrected-prediction": corrected}}


@pytest.fixture
def items():
    return [
        # "C d." is irrelevant; the diff deletes " C d." (slid to end on the ".")
        item("A b. C d. E f.", "A b. E f.", [("Irrelevant", 5, 9)], preference=(2, 1, 1, 0, 0, 0)),
        # an omission at the end: nothing bad in the text, the omission mark is on <|endoftext|>
        item("X y.", "X y. Z w.", missing=[1]),
        # "red" -> "blue": r and d are replaced, the shared e is kept; 3 beats 2 beats 1
        item("The sky is red.", "The sky is blue.", [("Wrong-Grounding", 11, 14)], preference=(2, 2, 0, 2, 0, 0)),
        # the annotator deleted everything: dropped by convert, all four tokens bad
        item("Q r.", "", [("Irrelevant", 0, 4)]),
        # no error, no edit, nothing preferred over it: dropped by convert
        item("Fine.", "Fine."),
    ]


def test_convert_records_and_counts(tmp_path, items):
    """chosen = the preferred prediction that wins most, else the edit; empty edits and records
    without any signal are dropped; the prompt ends with the question; the JSONL reads back."""
    records, counts = qa.convert(items)
    assert counts == {"questions": 5, "chosen_preferred": 2, "chosen_edited": 1, "dropped_empty_edit": 1,
                      "dropped_no_signal": 1}
    assert [(r["chosen"], r["rejected"], r["edited"]) for r in records] == [
        ("answer 2", "A b. C d. E f.", "A b. E f."), ("X y. Z w.", "X y.", "X y. Z w."),
        ("answer 3", "The sky is red.", "The sky is blue.")]
    assert records[0]["prompt"] == "context: wikipage: T1 text: S1. S2. wikipage: T2 text: S3.\nquestion: Q?"
    assert qa.convert(items, question_only=True)[0][0]["prompt"] == "Q?"
    src, out = tmp_path / "fb.json", tmp_path / "qa.jsonl"
    src.write_text(json.dumps(items))
    qa.main(["convert", str(src), str(out)])
    assert data.read_jsonl(str(out)) == records


def test_agreement_by_hand(items):
    """Characters as tokens. Span tokens / diff-bad tokens per answer (tp, fp, fn):
    1: gold C,' ',d,. ; bad ' ',C,' ',d,.  -> (4, 1, 0)
    2: no span; the insertion marks only <|endoftext|> (outside the span metric) -> (0, 0, 0)
    3: gold r,e,d ; bad r,d                -> (2, 0, 1)
    4: gold Q,' ',r,. ; all deleted        -> (4, 0, 0)
    5: nothing                             -> (0, 0, 0)
    so P = R = 10/11 for both schemes; Irrelevant-only answers (1, 4): P 8/9, R 1; Wrong-Grounding
    (3): P 1, R 2/3. Insertion marks: answer 2 of 1 with missing info; 0 of 4 without, where 1 of
    4 inserts tokens (answer 3's replacement)."""
    enc = tok.build_encoding({bytes([i]): i for i in range(256)})
    res = qa.agreement(items, enc)
    for scheme in ("bad_neutral_good", "bad_vs_rest"):
        a = res[scheme]["all"]
        assert (a["tp"], a["fp"], a["fn"]) == (10, 1, 1)
        assert a["precision"] == a["recall"] == a["f1"] == pytest.approx(10 / 11)
        irr, wg = res[scheme]["by_type"]["Irrelevant"], res[scheme]["by_type"]["Wrong-Grounding"]
        assert (irr["precision"], irr["recall"], irr["f1"], irr["answers"]) == pytest.approx((8 / 9, 1, 16 / 17, 2))
        assert (wg["precision"], wg["recall"], wg["f1"], wg["answers"]) == pytest.approx((1, 2 / 3, 0.8, 1))
        assert res[scheme]["recall_all_spans"] == pytest.approx({"Irrelevant": 1.0, "Wrong-Grounding": 2 / 3})
    assert res["missing_info"] == {
        "with_missing_info": {"answers": 1, "insertion_mark": 1.0, "any_inserted_token": 1.0},
        "without_missing_info": {"answers": 4, "insertion_mark": 0.0, "any_inserted_token": 0.25}}
    md = qa.table(res)
    assert "| all | bad_neutral_good | 0.909 | 0.909 | 0.909 | |" in md and "| only Wrong-Grounding (1) | bad_neutral_good |" in md


def test_span_tokens_overlap():
    """A token is inside a span if it overlaps it by one character: " cow" (from the space) is
    inside a span that starts at "c"."""
    enc = tok.build_encoding(tok.train_bpe(["the cow the cow the cow"] * 3, 270))  # merges up to " cow"
    ids = enc.encode_ordinary("the cow")
    assert [enc.decode([i]) for i in ids][-1] == " cow"
    assert qa.span_tokens(enc, "the cow", [(4, 7)]) == {len(ids) - 1}
    assert qa.span_tokens(enc, "the cow", [(0, 3)]) == set(range(len(ids) - 1))
