"""Tests for data.py: the toy world, the gold judge, noisy responses, the minimal-edit annotator, JSONL I/O."""
import json
import os
import random
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
from data import (ALL_FACTS, ATTRS, FACT, KB, OFF_TOPIC, QUESTIONS, RUDE, VALUES, WEIGHTS,  # noqa: E402
                  DataError, WorldConfig, annotate, classify, error_rates, ideal_response, judge,
                  max_score, noisy_response, parse_prompt, read_jsonl, sample_prompt, score,
                  split_sentences, write_jsonl)

ALL_PROMPTS = ([t.format(e=e) for e in KB for t in ALL_FACTS]
               + [t.format(e=e) for e in KB for ts in QUESTIONS.values() for t in ts])
COW_ALL = "Tell me about the cow."
COW_FOOD = "What does the cow eat?"


def sentences(text):
    """The sentences of text, as the judge splits them."""
    return [text[s:t] for s, t in split_sentences(text)]


def errors(counts):
    """Number of penalised items in a judge's counts."""
    return sum(n for k, n in counts.items() if k != "correct")


def check_judge(prompt, response):
    """The judge's result is well-formed: a float score that is the weighted sum of int counts."""
    s, c = judge(prompt, response)
    assert isinstance(s, float)
    assert set(c) == set(WEIGHTS) and all(isinstance(n, int) and n >= 0 for n in c.values())
    assert s == sum(WEIGHTS[k] * n for k, n in c.items())
    return s, c


# -----------------------------------------------------------------------------
# The world

def test_kb_values_are_in_value_sets():
    """Every KB value belongs to its attribute's value set, and every entity has all attributes."""
    for e, facts in KB.items():
        assert list(facts) == ATTRS
        for a, v in facts.items():
            assert v in VALUES[a], (e, a, v)


def test_parse_prompt_all_templates():
    """Every prompt template parses to its entity and attributes; unknown prompts give (None, [])."""
    for e in KB:
        for t in ALL_FACTS:
            assert parse_prompt(t.format(e=e)) == (e, ATTRS)
        for a, ts in QUESTIONS.items():
            for t in ts:
                assert parse_prompt(t.format(e=e)) == (e, [a])
    for p in ["", "Tell me about the dragon.", "Tell me about the cow", "tell me about the cow.",
              "Tell me about the cow. ", "What does the cow eat", "Hello?", "Tell me about the cow.\n"]:
        assert parse_prompt(p) == (None, [])


def test_sample_prompt_is_parseable_and_seeded():
    """sample_prompt returns prompts of this world, both kinds, deterministically for a seed."""
    a = [sample_prompt(random.Random(5)) for _ in range(3)]
    rng = random.Random(1)
    ps = [sample_prompt(rng) for _ in range(500)]
    assert all(parse_prompt(p)[0] is not None for p in ps)
    n_all = sum(len(parse_prompt(p)[1]) == 8 for p in ps)
    assert 180 < n_all < 320  # p_all_facts = 0.5
    assert a == [sample_prompt(random.Random(5)) for _ in range(3)]


# -----------------------------------------------------------------------------
# The judge: exact scores

def test_ideal_gets_max_score_equal_to_requested():
    """The ideal response of every prompt scores max_score == number of requested facts, all correct."""
    for p in ALL_PROMPTS:
        n = len(parse_prompt(p)[1])
        s, c = check_judge(p, ideal_response(p))
        assert s == max_score(p) == n == score(p, ideal_response(p))
        assert c["correct"] == n and errors(c) == 0


def test_ideal_response_text():
    """The ideal response is the canonical fact sentences joined by single spaces."""
    assert ideal_response(COW_FOOD) == "The cow eats grass."
    assert ideal_response(COW_ALL).startswith("The cow is brown. The cow is big in size. The cow says moo.")
    assert len(sentences(ideal_response(COW_ALL))) == 8


def _with(sents, i, extra):
    return " ".join(sents[:i] + [extra] + sents[i:])


@pytest.mark.parametrize("kind,extra", [("rude", RUDE[0]), ("rude", RUDE[-1]),
                                        ("off_topic", OFF_TOPIC[0]), ("off_topic", OFF_TOPIC[3]),
                                        ("unparseable", "Blah blah."), ("unparseable", "The cow is purple."),
                                        ("unparseable", "The cow is big."), ("unparseable", "!"),
                                        ("repeated", "The cow eats grass."), ("repeated", "The cow eats fish."),
                                        ("unrequested", "The pig eats fruit."),
                                        ("unrequested", "The pig eats grass.")])
@pytest.mark.parametrize("pos", [0, 4, 8])
def test_extra_sentence_costs_one(kind, extra, pos):
    """An added bad sentence anywhere lowers the full-prompt score by exactly 1, in its category."""
    sents = sentences(ideal_response(COW_ALL))
    if kind == "repeated":
        pos = max(pos, 4)  # a repeat comes after the first statement of the fact (food is 4th)
    s, c = check_judge(COW_ALL, _with(sents, pos, extra))
    assert s == max_score(COW_ALL) - 1
    assert c[kind] == 1 and c["correct"] == 8 and errors(c) == 1


def test_unrequested_attribute_for_single_fact_prompt():
    """Another attribute of the right animal is unrequested for a one-fact prompt (-1)."""
    for extra in ["The cow is brown.", "The cow has four legs.", "The cow is covered in wool."]:
        for r in [f"The cow eats grass. {extra}", f"{extra} The cow eats grass."]:
            s, c = check_judge(COW_FOOD, r)
            assert s == 0.0 and c["unrequested"] == 1 and c["correct"] == 1 and errors(c) == 1


def test_wrong_value_and_omission():
    """A wrong value turns +1 into -1 (score -2), an omission turns +1 into a -1 missing (score -2)."""
    ideal = ideal_response(COW_ALL)
    s, c = check_judge(COW_ALL, ideal.replace("eats grass", "eats fish"))
    assert s == 8 - 2 and c["wrong"] == 1 and c["correct"] == 7 and errors(c) == 1
    s, c = check_judge(COW_ALL, ideal.replace(" The cow eats grass.", ""))
    assert s == 8 - 2 and c["missing"] == 1 and c["correct"] == 7 and errors(c) == 1
    s, c = check_judge(COW_FOOD, "The cow eats meat.")
    assert s == -1.0 and c["wrong"] == 1 and errors(c) == 1
    s, c = check_judge(COW_FOOD, "")
    assert s == -1.0 and c["missing"] == 1 and errors(c) == 1


def test_score_is_correct_minus_errors():
    """Errors of every category add up: score = correct - number of errors."""
    sents = sentences(ideal_response(COW_ALL))
    sents[1] = "The cow is tiny in size."             # wrong
    del sents[6]                                     # missing cover
    sents += [RUDE[1], OFF_TOPIC[2], "Blah blah.", "The cow says moo.", "The fox eats meat."]
    s, c = check_judge(COW_ALL, " ".join(sents))
    assert c == {"correct": 6, "wrong": 1, "missing": 1, "repeated": 1, "unrequested": 1,
                 "rude": 1, "off_topic": 1, "unparseable": 1}
    assert s == 6 - 7


def test_judge_whitespace_and_unknown_prompt():
    """Spacing between sentences does not matter; for an unknown prompt every fact is unrequested."""
    ideal = ideal_response(COW_ALL)
    odd = "\n  " + ideal.replace("moo. ", "moo.").replace(". ", ".\n\t ") + "  \n"
    assert "moo.The" in odd and ".\n\t The" in odd
    assert judge(COW_ALL, odd) == judge(COW_ALL, ideal)
    s, c = check_judge("Tell me about the dragon.", ideal)
    assert c["unrequested"] == 8 and s == -8.0 and c["missing"] == 0


def test_classify_spans():
    """classify gives each sentence's span, kind, attribute and value."""
    r = " The cow eats fish.  Blah. The cow says moo."
    verdicts, missing = classify(COW_ALL, r)
    assert [(r[s:t], k, a, v) for (s, t), k, a, v in verdicts] == [
        ("The cow eats fish.", "wrong", "food", "fish"), ("Blah.", "unparseable", None, None),
        ("The cow says moo.", "correct", "sound", "moo")]
    assert missing == [a for a in ATTRS if a not in ("food", "sound")]


# -----------------------------------------------------------------------------
# The judge and the annotator on arbitrary strings

def _fuzz_strings(rng, prompt=COW_ALL):
    """A hostile string of one of several kinds, some made of pieces relevant to `prompt`."""
    e = parse_prompt(prompt)[0] or rng.choice(sorted(KB))
    noisy = WorldConfig(p_wrong=0.5, p_omit=0.2, p_rude=0.5, p_off_topic=0.5)
    pieces = (sentences(noisy_response(f"Tell me about the {e}.", rng, noisy)) * 3
              + sentences(ideal_response(f"Tell me about the {rng.choice(sorted(KB))}."))
              + RUDE + OFF_TOPIC + ["The", e, "eats", "grass", "is", "in size", "Blah blah"])
    punct = [".", "?", "!", " ", "  ", "\n", "\t", "..", ". .", "\u2028", "\x00", "", "\r\n"]
    ws = " \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0\u1680\u2000\u2028\u2029\u3000"
    kind = rng.randrange(6)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(120))).decode("utf-8", errors="replace")
    if kind == 1:
        return "".join(chr(rng.randrange(0x110000)) for _ in range(rng.randrange(60)))
    if kind == 2:
        return rng.choice(["", " ", "."]) if rng.random() < 0.3 else \
            "".join(rng.choice(ws) for _ in range(rng.randrange(1, 20)))
    if kind == 3:  # shuffled pieces of real sentences and punctuation
        parts = [rng.choice(pieces) if rng.random() < 0.6 else rng.choice(punct) for _ in range(rng.randrange(30))]
        return "".join(parts) if rng.random() < 0.5 else " ".join(parts)
    if kind == 4:  # a real noisy response, then mangled a little
        r = list(noisy_response(f"Tell me about the {e}.", rng))
        for _ in range(rng.randrange(4)):
            if r:
                r[rng.randrange(len(r))] = rng.choice(".?! x\nÅ")
        return "".join(r)
    return rng.choice([" ", "", "\n", "  "]).join(rng.choice(pieces) for _ in range(rng.randrange(20)))


def _fuzz_prompt(rng):
    """A real prompt (half the time) or an unknown / near-miss / garbage one."""
    if rng.random() < 0.5:
        return rng.choice([sample_prompt(rng), rng.choice(ALL_PROMPTS)])
    return rng.choice(["", "Tell me about the dragon.", "What does the cow eat", "Tell me about the cow. ",
                       "tell me about the cow.", _fuzz_strings(rng)])


def test_fuzz_judge_and_annotate_never_raise():
    """On 12,000 hostile strings the judge returns (float, counts) and annotate a str that reaches max score."""
    rng = random.Random(1234)
    for i in range(12000):
        p = _fuzz_prompt(rng)
        r = _fuzz_strings(rng, p)
        check_judge(p, r)
        e, _ = parse_prompt(p)
        if i % 3 == 0:
            out = annotate(p, r)
            assert isinstance(out, str)
            if e is None:
                assert out == r
            else:
                assert judge(p, out)[0] == max_score(p), (p, r, out)
        if i % 50 == 0:
            out = annotate(p, r, p_miss=0.5, rng=random.Random(i))
            assert isinstance(out, str) and (e is not None or out == r)


def test_fuzz_very_long_strings():
    """The judge and annotate handle 100k-character strings of several kinds."""
    rng = random.Random(0)
    sent = sentences(noisy_response(COW_ALL, rng)) + RUDE + ["The cow eats fish.", "x"]
    longs = ["a" * 100_000, "." * 100_000, " " * 100_000, "The cow eats grass" * 6000,
             " ".join(rng.choice(sent) for _ in range(5000))[:100_000],
             "".join(chr(rng.randrange(0x110000)) for _ in range(100_000))]
    for r in longs:
        for p in (COW_ALL, COW_FOOD, "Unknown prompt."):
            check_judge(p, r)
            out = annotate(p, r)
            assert isinstance(out, str)
            if p == "Unknown prompt.":
                assert out == r
            else:
                assert judge(p, out)[0] == max_score(p)


# -----------------------------------------------------------------------------
# Noisy responses

def test_noisy_response_rates():
    """Over 3000 seeded samples, wrong / omitted / rude / off-topic rates match WorldConfig."""
    cfg = WorldConfig()
    rng = random.Random(0)
    ps = [sample_prompt(rng) for _ in range(3000)]
    rs = [noisy_response(p, rng) for p in ps]
    er = error_rates(ps, rs)
    assert er["wrong"] == pytest.approx(cfg.p_wrong, abs=0.02)
    assert er["missing"] == pytest.approx(cfg.p_omit, abs=0.012)
    assert er["rude"] == pytest.approx(cfg.p_rude, abs=0.025)
    assert er["off_topic"] == pytest.approx(cfg.p_off_topic, abs=0.025)
    assert er["repeated"] == er["unrequested"] == er["unparseable"] == 0
    # the noisy corpus only contains sentences of the world
    assert all(all(k in ("correct", "wrong", "rude", "off_topic") for _, k, _, _ in classify(p, r)[0])
               for p, r in zip(ps[:300], rs[:300]))


def test_noisy_response_rates_follow_config():
    """A custom config's rates are honoured (all-wrong, no noise; never wrong)."""
    rng = random.Random(3)
    allwrong = WorldConfig(p_wrong=1.0, p_omit=0.0, p_rude=0.0, p_off_topic=0.0)
    for _ in range(50):
        p = sample_prompt(rng)
        s, c = judge(p, noisy_response(p, rng, allwrong))
        assert c["wrong"] == len(parse_prompt(p)[1]) and errors(c) == c["wrong"]
    clean = WorldConfig(p_wrong=0.0, p_omit=0.0, p_rude=0.0, p_off_topic=0.0)
    for p in ALL_PROMPTS[:40]:
        assert noisy_response(p, rng, clean) == ideal_response(p)


def test_noisy_response_deterministic():
    """noisy_response is a function of the rng state."""
    def run(seed):
        rng = random.Random(seed)
        return [noisy_response(sample_prompt(rng), rng) for _ in range(200)]
    assert run(42) == run(42)
    assert run(42) != run(43)


# -----------------------------------------------------------------------------
# The annotator

def test_annotate_noisy_gives_ideal():
    """Exact mode: for 3000 noisy responses the edit reaches max score (it is the ideal response)."""
    rng = random.Random(7)
    n_changed = 0
    for _ in range(3000):
        p = sample_prompt(rng)
        r = noisy_response(p, rng)
        out = annotate(p, r)
        assert judge(p, out)[0] == max_score(p)
        assert out == ideal_response(p)  # the noisy corpus is in canonical order with single spaces
        n_changed += out != r
    assert n_changed > 1000


def test_annotate_keeps_correct_sentences_in_order():
    """Sentences that needed no change appear byte-identical in the edit, in the same order."""
    rng = random.Random(11)
    extras = RUDE + OFF_TOPIC + ["Blah blah.", "The fox eats meat.", "The cow is purple."]
    for _ in range(1500):
        p = sample_prompt(rng)
        e, req = parse_prompt(p)
        sents = sentences(noisy_response(p, rng))
        for _ in range(rng.randrange(3)):
            sents.insert(rng.randint(0, len(sents)), rng.choice(extras + sents[:1]))  # sents[:1] may repeat
        rng.shuffle(sents)
        r = rng.choice([" ", "  ", "\n"]).join(sents)
        out = annotate(p, r)
        assert judge(p, out)[0] == max_score(p)
        verdicts, missing = classify(p, r)
        kept = [r[s:t] if k == "correct" else FACT[a].format(e=e, v=KB[e][a])
                for (s, t), k, a, _ in verdicts if k in ("correct", "wrong")]
        inserted = {FACT[a].format(e=e, v=KB[e][a]) for a in missing}
        assert [s for s in sentences(out) if s not in inserted] == kept
        correct = [r[s:t] for (s, t), k, _, _ in verdicts if k == "correct"]
        assert [s for s in sentences(out) if s in correct] == correct


def test_annotate_perfect_and_unknown_unchanged():
    """A perfect response, and any response to an unknown prompt, come back unchanged."""
    for p in ALL_PROMPTS:
        r = ideal_response(p)
        assert annotate(p, r) == r
        assert annotate(p, "  " + r.replace(". ", ".\n") + "\n") == "  " + r.replace(". ", ".\n") + "\n"
    for p in ["Tell me about the dragon.", "", "What does the cow eat"]:
        for r in ["The cow eats fish.", "", "Blah", RUDE[0]]:
            assert annotate(p, r) == r


def test_annotate_wrong_value_changes_only_the_value():
    """The edit of a single wrong value replaces that word and keeps every other character."""
    ideal = ideal_response(COW_ALL)
    for a in ATTRS:
        right = KB["cow"][a]
        wrong = next(v for v in VALUES[a] if v != right)
        old, new = FACT[a].format(e="cow", v=wrong), FACT[a].format(e="cow", v=right)
        r = "\t" + ideal.replace(new, old).replace(". ", ".  ") + " \n"
        out = annotate(COW_ALL, r)
        i = r.index(old) + old.index(wrong)
        assert out[:i] == r[:i]
        assert out[i:i + len(right)] == right
        assert out[i + len(right):] == r[i + len(wrong):]
        assert len(out) - len(r) == len(right) - len(wrong)


def test_annotate_deletes_bad_sentence_with_its_gap():
    """A deleted sentence takes one gap with it; all other characters stay."""
    assert annotate(COW_FOOD, "Blah blah. The cow eats grass.") == "The cow eats grass."
    assert annotate(COW_FOOD, "The cow eats grass. Blah blah.") == "The cow eats grass."
    assert annotate(COW_FOOD, "  The cow eats grass.\n" + RUDE[0] + "\n") == "  The cow eats grass.\n"
    assert annotate(COW_FOOD, "\n" + OFF_TOPIC[0] + "  The cow eats grass.") == "\nThe cow eats grass."
    assert annotate(COW_FOOD, "Blah.") == "The cow eats grass."
    assert annotate(COW_FOOD, "") == "The cow eats grass."
    r = ideal_response(COW_ALL)
    assert annotate(COW_ALL, r.replace("The cow says moo. ", "The cow says moo. Blah. ")) == r


def test_annotate_inserts_missing_in_canonical_place():
    """A missing fact is inserted before the first fact of a later attribute, else at the end."""
    ideal = ideal_response(COW_ALL)
    for a in ATTRS:
        f = FACT[a].format(e="cow", v=KB["cow"][a])
        r = ideal.replace(f, "").replace("  ", " ").strip()
        assert judge(COW_ALL, r)[1]["missing"] == 1
        assert annotate(COW_ALL, r) == ideal


def test_annotate_noisy_mode():
    """p_miss=1.0 changes nothing; p_miss=0.5 fixes about half of the errors."""
    rng = random.Random(5)
    before = after = full = partial = 0
    for i in range(1500):
        p = sample_prompt(rng)
        r = noisy_response(p, rng)
        assert annotate(p, r, p_miss=1.0, rng=random.Random(i)) == r
        out = annotate(p, r, p_miss=0.5, rng=random.Random(i))
        assert out == annotate(p, r, p_miss=0.5, rng=random.Random(i))  # seeded
        e0, e1 = errors(judge(p, r)[1]), errors(judge(p, out)[1])
        assert e1 <= e0
        before, after = before + e0, after + e1
        if e0:
            full += e1 == 0
            partial += e1 > 0
    assert before > 500
    assert 0.4 < after / before < 0.6
    assert full > 50 and partial > 50


# -----------------------------------------------------------------------------
# JSONL

REC = {"prompt": COW_FOOD, "chosen": "The cow eats grass.", "rejected": "The cow eats fish."}


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _err(path, **kw):
    with pytest.raises(DataError) as ei:
        read_jsonl(path, **kw)
    return str(ei.value)


def test_jsonl_roundtrip(tmp_path):
    """write_jsonl then read_jsonl gives the records back (unicode, quotes, newlines included)."""
    recs = [dict(REC), dict(REC, edited="The cow eats grass."),
            {"prompt": "Ünïcödé \"q\" \\ \n\t 🐄", "chosen": "a\nb", "rejected": "é", "edited": "x"}]
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, recs)
    assert read_jsonl(path) == recs
    assert os.listdir(tmp_path) == ["prefs.jsonl"]  # no temporary file left behind
    write_jsonl(str(path), recs[:1])  # overwrites; str paths work too
    assert read_jsonl(str(path)) == recs[:1]


def test_jsonl_drops_unknown_fields_and_blank_lines(tmp_path):
    """Extra fields are dropped, blank lines skipped, and `edited` kept when present."""
    p = _write(tmp_path / "a.jsonl", ["", json.dumps(dict(REC, extra=1)), "   ",
                                      json.dumps(dict(REC, edited="E"))])
    assert read_jsonl(p) == [REC, dict(REC, edited="E")]
    assert read_jsonl(p, required=("prompt",), optional=()) == [{"prompt": COW_FOOD}] * 2


def test_jsonl_roundtrip_unicode_line_separators(tmp_path):
    """Strings containing U+2028, U+2029 or U+0085 survive a write/read round trip."""
    recs = [dict(REC, chosen="a\u2028b\u2029c\x85d")]
    path = tmp_path / "sep.jsonl"
    write_jsonl(path, recs)
    assert read_jsonl(path) == recs


def test_jsonl_invalid_json_names_line(tmp_path):
    """Invalid JSON on line 3 is reported as name.jsonl:3."""
    p = _write(tmp_path / "name.jsonl", [json.dumps(REC), json.dumps(REC), '{"prompt": "x",'])
    msg = _err(p)
    assert msg.startswith("name.jsonl:3:") and "invalid JSON" in msg and str(tmp_path) not in msg
    p = _write(tmp_path / "name.jsonl", [json.dumps(REC), "", "[1, 2]"])
    assert _err(p).startswith("name.jsonl:3:") and "JSON object" in _err(p)


def test_jsonl_missing_fields(tmp_path):
    """A missing required field names the field and the line; `edited` only when required."""
    rec = dict(REC)
    del rec["chosen"]
    p = _write(tmp_path / "name.jsonl", [json.dumps(REC), json.dumps(rec)])
    assert _err(p) == 'name.jsonl:2: missing field "chosen"'
    p = _write(tmp_path / "name.jsonl", [json.dumps(dict(REC, edited="E")), json.dumps(REC)])
    assert read_jsonl(p) == [dict(REC, edited="E"), REC]  # optional by default
    assert _err(p, required=data.FIELDS, optional=()) == 'name.jsonl:2: missing field "edited"'


@pytest.mark.parametrize("field,value,what", [("prompt", 3, "must be a string"),
                                              ("rejected", None, "must be a string"),
                                              ("chosen", ["a"], "must be a string"),
                                              ("chosen", "", "is empty"),
                                              ("rejected", " \n\t", "is empty"),
                                              ("edited", "", "is empty"),
                                              ("edited", 1.5, "must be a string")])
def test_jsonl_bad_field(tmp_path, field, value, what):
    """A non-string or empty field is reported with file, line and field name."""
    p = _write(tmp_path / "name.jsonl", [json.dumps(REC), json.dumps(REC), json.dumps(dict(REC, **{field: value}))])
    assert _err(p) == f'name.jsonl:3: field "{field}" {what}'


def test_jsonl_not_utf8(tmp_path):
    """Bytes that are not UTF-8 on line 2 are reported as name.jsonl:2."""
    p = tmp_path / "name.jsonl"
    p.write_bytes(json.dumps(REC).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    assert _err(p) == "name.jsonl:2: not valid UTF-8"


def test_jsonl_empty_file(tmp_path):
    """An empty (or blank) file is an error that says so; a missing file too."""
    for content in ["", "\n  \n"]:
        p = tmp_path / "name.jsonl"
        p.write_text(content)
        msg = _err(p)
        assert msg.startswith("name.jsonl") and "empty" in msg
    assert "cannot read" in _err(tmp_path / "nope.jsonl")


def test_jsonl_lone_surrogate_and_bom(tmp_path):
    """Half a surrogate pair is a clear error naming file:line; a UTF-8 byte-order mark is fine."""
    p = tmp_path / "s.jsonl"
    p.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "\\ud83d", "rejected": "b"}\n')
    with pytest.raises(DataError, match=r's\.jsonl:2: field "chosen" is not valid Unicode'):
        read_jsonl(p)
    b = tmp_path / "bom.jsonl"
    b.write_bytes(b'\xef\xbb\xbf{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert read_jsonl(b) == [{"prompt": "p", "chosen": "a", "rejected": "b"}]


def test_annotator_noise_changes_only_the_edits(monkeypatch):
    """world.ToyWorld.preference_pairs at p_annotator_miss 0 and 0.3: the same (prompt, chosen,
    rejected) pairs, only the edits differ, so a noise sweep compares edits, not draws."""
    import world

    class FakeChat:  # SFT samples: noisy corpus answers, the same stream on every call
        def sample(self, model, prompts, gen):
            return [data.noisy_response(p, self.rng) for p in prompts]
    monkeypatch.setattr(world.GPT, "from_checkpoint", lambda path, device: None)
    out = []
    for p_miss in (0.0, 0.3):
        chat = FakeChat()
        chat.rng = random.Random(0)
        cfg = data.WorldConfig(p_annotator_miss=p_miss)
        out.append(world.ToyWorld(cfg).preference_pairs(chat, "unused", 40, seed=1, device="cpu")[0])
    pairs = [[(r["prompt"], r["chosen"], r["rejected"]) for r in rs] for rs in out]
    assert pairs[0] == pairs[1]
    assert all(r["edited"] == data.annotate(r["prompt"], r["rejected"]) for r in out[0])
    assert sum(a["edited"] != b["edited"] for a, b in zip(*out)) >= 3


def test_a_noisy_edit_never_leaves_the_answer_empty():
    """A junk-only answer: a noisy annotator may delete it and overlook the facts it lacks,
    but then writes them in (no record may hold an empty edit); at p = 0 the same edit."""
    prompt, junk = "What does the crab eat?", "Ask someone else next time."
    full = data.annotate(prompt, junk)
    edits = {data.annotate(prompt, junk, 0.5, random.Random(s)) for s in range(40)}
    # overlooked, kept with the fact added, or deleted with the fact written in; never ""
    assert edits == {junk, junk + " " + full, full}
    assert data.annotate(prompt, junk, 1.0, random.Random(0)) == junk
