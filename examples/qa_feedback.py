"""
QA-Feedback (Wu et al., NeurIPS 2023) in this project: a converter to our preference JSONL,
and a measurement of the method's central assumption on human data: does the token diff of
a minimal edit mark what a human called an error?

QA-Feedback (allenai/FineGrainedRLHF, Apache-2.0, tasks/qa_feedback/data/dev_feedback.json)
has, per ASQA question: `question`, `passages` (lists [title, sentence, ...]), four sampled
answers `prediction 1..4`, `preference` (1v2, 1v3, 1v4, 2v3, 2v4, 3v4: 1 = first preferred,
2 = second, 0 = none), and for prediction 1 only `feedback`: `errors` (character spans
[start, end) of prediction 1 with an `error type`), `missing-info` (passage sentences the
answer should have used) and `corrected-prediction` (the annotator's edit that fixes them).

    python examples/qa_feedback.py convert dev_feedback.json qa.jsonl [--question_only]
    python examples/qa_feedback.py agreement dev_feedback.json [--vocab_size=4096 | --init=GPT2_DIR]

convert: one record per question, {"prompt", "chosen", "rejected", "edited"}:
    rejected = prediction 1, edited = its corrected prediction;
    prompt   = the passages, then the question last ("context: wikipage: T text: ... \\nquestion: Q"):
               the errors (unverifiable, wrong grounding, missing info) are judged against the
               passages, so the policy needs them; last, because Chat.prompt cuts long prompts from
               the left. --question_only gives the question alone (for a small block_size);
    chosen   = of the predictions the annotators preferred over prediction 1, the one that wins
               most of its comparisons (ties: the lowest number). With none, chosen = edited: the
               annotator's own correction of prediction 1 is, by construction, preferred to it.
Dropped: an empty corrected prediction (the annotator deleted the whole answer; our records
need text) and a record with neither an edit nor a preferred prediction (nothing to learn).

agreement: token-level precision / recall / F1 of our diff's bad labels (reward.label_pair,
both label schemes) against the tokens a human error span overlaps, pooled over answers; per
error type on the answers whose spans all have that type; and, for answers with missing-info
annotations, how often the diff gives the omission an omission mark (bad_vs_rest only).
The <|endoftext|> token has no characters: it is outside the span metric and counts only as a
place for an insertion mark. Tokenizer: GPT-2's if --init names a checkpoint directory, else our
BPE trained on the file's answers and corrections (GPT-2's files cannot be downloaded offline).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import reward  # noqa: E402
import tokenizer as tok  # noqa: E402

SCHEMES = list(reward.SCHEMES)  # bad_vs_rest, bad_neutral_good


# -----------------------------------------------------------------------------
# convert

def prompt_of(item, question_only=False):
    if question_only:
        return item["question"]
    context = " ".join(f"wikipage: {p[0]} text: {' '.join(s.strip() for s in p[1:])}" for p in item["passages"])
    return f"context: {context}\nquestion: {item['question']}"


def preferred(item):
    """The prediction (2..4) preferred over prediction 1 that wins most comparisons, or None."""
    pairs = [(1, 2), (1, 3), (1, 4), (2, 3), (2, 4), (3, 4)]
    wins = {k: sum((p == 1 and a == k) or (p == 2 and b == k) for (a, b), p in zip(pairs, item["preference"]))
            for k in (1, 2, 3, 4)}
    better = [k for (a, k), p in zip(pairs[:3], item["preference"][:3]) if p == 2]
    return max(better, key=lambda k: (wins[k], -k), default=None)


def convert(items, question_only=False):
    """(records, counts) from QA-Feedback items (see the module docstring)."""
    records, counts = [], {"questions": len(items), "chosen_preferred": 0, "chosen_edited": 0,
                           "dropped_empty_edit": 0, "dropped_no_signal": 0}
    for it in items:
        rejected, edited = it["prediction 1"].strip(), it["feedback"]["corrected-prediction"].strip()
        k = preferred(it)
        if not edited:
            counts["dropped_empty_edit"] += 1
        elif k is None and edited == rejected:
            counts["dropped_no_signal"] += 1
        else:
            counts["chosen_preferred" if k else "chosen_edited"] += 1
            records.append({"prompt": prompt_of(it, question_only), "chosen": it[f"prediction {k}"].strip() if k else edited,
                            "rejected": rejected, "edited": edited})
    return records, counts


# -----------------------------------------------------------------------------
# agreement

def span_tokens(enc, text, spans):
    """Indices of the tokens of enc.encode_ordinary(text) that overlap any character span [start, end)."""
    ids = enc.encode_ordinary(text)
    _, starts = enc.decode_with_offsets(ids)  # character offset where each token starts
    ends = starts[1:] + [len(text)]
    return {i for i, (a, b) in enumerate(zip(starts, ends)) if any(a < e and b > s for s, e in spans)}


def prf(tp, fp, fn):
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12), "tp": tp, "fp": fp, "fn": fn}


def agreement(items, enc):
    """{scheme: {"all": prf, "by_type": {type: prf + answers}, "recall_all_spans": {type: recall}},
    "missing_info": {...}} (see the module docstring)."""
    out = {}
    for scheme in SCHEMES:
        total, by_type, spans_of = [0, 0, 0], {}, {}
        for it in items:
            text, errs = it["prediction 1"], it["feedback"]["errors"]
            lo, _ = reward.label_pair(enc, text, it["feedback"]["corrected-prediction"], scheme)
            bad = {i for i, v in enumerate(lo[:-1]) if v == -1}  # lo[-1] is the <|endoftext|>
            gold = span_tokens(enc, text, [(e["start"], e["end"]) for e in errs])
            counts = (len(bad & gold), len(bad - gold), len(gold - bad))
            total = [a + b for a, b in zip(total, counts)]
            types = {e["error type"] for e in errs}
            if len(types) == 1:  # an answer whose spans all have one type: its P/R/F1 belong to that type
                (t,) = types
                by_type[t] = [a + b for a, b in zip(by_type.get(t, [0, 0, 0, 0]), counts + (1,))]
            for e in errs:
                g = span_tokens(enc, text, [(e["start"], e["end"])])
                hit = spans_of.setdefault(e["error type"], [0, 0])
                hit[0], hit[1] = hit[0] + len(g & bad), hit[1] + len(g)
        out[scheme] = {"all": prf(*total),
                       "by_type": {t: prf(*c[:3]) | {"answers": c[3]} for t, c in sorted(by_type.items())},
                       "recall_all_spans": {t: h / max(n, 1) for t, (h, n) in sorted(spans_of.items())}}
    # omissions: an omission mark is a bad label of bad_vs_rest that bad_neutral_good lacks
    groups = {"with_missing_info": [0, 0, 0], "without_missing_info": [0, 0, 0]}  # answers, marked, any insertion
    for it in items:
        args = (enc, it["prediction 1"], it["feedback"]["corrected-prediction"])
        (lb, le), (lp, _) = reward.label_pair(*args, "bad_vs_rest"), reward.label_pair(*args, "bad_neutral_good")
        g = groups["with_missing_info" if it["feedback"]["missing-info"] else "without_missing_info"]
        g[0], g[1], g[2] = g[0] + 1, g[1] + any(b != p for b, p in zip(lb, lp)), g[2] + (1 in le)
    out["missing_info"] = {k: {"answers": n, "insertion_mark": m / max(n, 1), "any_inserted_token": a / max(n, 1)}
                           for k, (n, m, a) in groups.items()}
    return out


def table(res):
    """The agreement as markdown."""
    lines = ["| answers | scheme | precision | recall | F1 | recall on every span of the type |", "|---|---|---|---|---|---|"]
    for scheme in SCHEMES:
        a = res[scheme]["all"]
        lines.append(f"| all | {scheme} | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | |")
    for t in res[SCHEMES[0]]["recall_all_spans"]:
        for scheme in SCHEMES:
            r = res[scheme]["by_type"].get(t)
            cells = f"{r['precision']:.3f} | {r['recall']:.3f} | {r['f1']:.3f}" if r else "- | - | -"
            n = r["answers"] if r else 0
            lines.append(f"| only {t} ({n}) | {scheme} | {cells} | {res[scheme]['recall_all_spans'][t]:.3f} |")
    lines += ["", "| answers | count | with an omission mark | with any inserted token |", "|---|---|---|---|"]
    for k, v in res["missing_info"].items():
        lines.append(f"| {k.replace('_', ' ')} | {v['answers']} | {v['insertion_mark']:.3f} | {v['any_inserted_token']:.3f} |")
    return "\n".join(lines)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["convert", "agreement"])
    p.add_argument("feedback", help="QA-Feedback's dev_feedback.json (or train_feedback.json)")
    p.add_argument("out", nargs="?", help="convert: the JSONL to write")
    p.add_argument("--question_only", action="store_true", help="convert: the prompt is the question alone")
    p.add_argument("--vocab_size", type=int, default=4096, help="agreement: of the BPE trained on the file")
    p.add_argument("--init", default="", help="agreement: a GPT-2 checkpoint directory whose encoding to use")
    args = p.parse_args(argv)
    with open(args.feedback, encoding="utf-8") as f:
        items = json.load(f)
    if args.command == "convert":
        if not args.out:
            sys.exit("error: convert needs an output path")
        records, counts = convert(items, args.question_only)
        data.write_jsonl(args.out, records)
        print(json.dumps(counts))
        return
    if args.init:
        enc = tok.build_encoding(tok.gpt2_ranks(args.init))
    else:
        texts = [it[k] for it in items for k in ("prediction 1", "prediction 2", "prediction 3", "prediction 4")]
        enc = tok.build_encoding(tok.train_bpe(texts + [it["feedback"]["corrected-prediction"] for it in items],
                                               args.vocab_size))
    print(f"{len(items)} answers, tokenizer: {'GPT-2 from ' + args.init if args.init else f'our BPE, {enc.n_vocab} tokens'}")
    print(table(agreement(items, enc)))


if __name__ == "__main__":
    main(sys.argv[1:])
