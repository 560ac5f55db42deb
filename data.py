"""
The toy world: a knowledge base about animals, prompts, a noisy SFT corpus, a gold judge
and a minimal-edit annotator. Everything is a program, so "human" preferences and edits
cost nothing and evaluation needs no human either.

The world is built so that a single scalar preference hides *which* tokens were wrong:
"Tell me about the cow." asks for all 8 facts (long answers), and the dominant error of
the SFT corpus is one wrong value among them ("The cow eats fish."), a one-token change.

    prompt   : "Tell me about the cow."              or "What does the cow eat?"
    response : "The cow is brown. The cow is big in size. The cow says moo. ..."

Judge: +1 per correct requested fact, -1 per wrong fact, -1 per missing requested fact,
-1 per rude / off-topic / unparseable / repeated / unrequested sentence.
Annotator: the smallest edit that makes the judge give the maximum score: it substitutes
wrong values, deletes bad sentences, inserts missing facts, and leaves every other
character byte-identical.

Run `python data.py` to print a few noisy samples with the judge's breakdown.
"""

import json
import os
import random
import re
from dataclasses import dataclass

import torch

from tokenizer import decode_response

# -----------------------------------------------------------------------------
# Knowledge base. Values come from small shared sets, so a wrong value is a plausible word.

ATTRS = ["colour", "size", "sound", "food", "home", "legs", "cover", "active"]

VALUES = {
    "colour": ["brown", "black", "white", "grey", "green", "red", "yellow", "orange"],
    "size":   ["tiny", "small", "medium", "big", "huge"],
    "sound":  ["moo", "oink", "baa", "quack", "roar", "hiss", "buzz", "squeak", "croak", "hoot"],
    "food":   ["grass", "seeds", "fish", "meat", "insects", "fruit", "leaves", "nuts"],
    "home":   ["farm", "forest", "river", "desert", "jungle", "ocean", "cave", "pond"],
    "legs":   ["zero", "two", "four", "six", "eight"],
    "cover":  ["fur", "feathers", "scales", "wool", "shell", "skin"],
    "active": ["day", "night", "dawn", "dusk"],
}

# entity: colour, size, sound, food, home, legs, cover, active
_KB = """
cow      brown  big    moo    grass   farm   four  fur      day
pig      pink   medium oink   fruit   farm   four  skin     day
sheep    white  medium baa    grass   farm   four  wool     day
duck     yellow small  quack  seeds   pond   two   feathers day
lion     yellow huge   roar   meat    desert four  fur      night
snake    green  small  hiss   insects jungle zero  scales   night
bee      yellow tiny   buzz   fruit   garden six   fur      day
mouse    grey   tiny   squeak seeds   farm   four  fur      night
frog     green  small  croak  insects pond   four  skin     night
owl      brown  small  hoot   meat    forest two   feathers night
horse    brown  big    neigh  grass   farm   four  fur      day
goat     white  medium baa    leaves  mountain four fur     day
bear     brown  huge   roar   fish    forest four  fur      dusk
spider   black  tiny   hiss   insects cave   eight skin     night
crab     red    small  squeak fish    ocean  ten   shell    night
bat      black  small  squeak fruit   cave   two   fur      night
tiger    orange huge   roar   meat    jungle four  fur      dusk
parrot   green  small  squeak fruit   jungle two   feathers day
turtle   green  medium hiss   leaves  river  four  shell    day
wolf     grey   big    howl   meat    forest four  fur      night
fox      orange medium bark   meat    forest four  fur      dusk
whale    grey   huge   sing   fish    ocean  zero  skin     dawn
camel    brown  huge   grunt  leaves  desert four  fur      day
penguin  black  medium squawk fish    ocean  two   feathers day
"""

KB = {}
for _line in _KB.strip().splitlines():
    _name, *_vals = _line.split()
    KB[_name] = dict(zip(ATTRS, _vals))
for _facts in KB.values():  # every value of the KB joins its attribute's shared set
    for _a, _v in _facts.items():
        if _v not in VALUES[_a]:
            VALUES[_a].append(_v)

# One sentence template per attribute. Each compiles to a regex that parses it back.
FACT = {
    "colour": "The {e} is {v}.",
    "size":   "The {e} is {v} in size.",
    "sound":  "The {e} says {v}.",
    "food":   "The {e} eats {v}.",
    "home":   "The {e} lives in the {v}.",
    "legs":   "The {e} has {v} legs.",
    "cover":  "The {e} is covered in {v}.",
    "active": "The {e} is active at {v}.",
}
_FACT_RE = {a: re.compile("^" + re.escape(t).replace(r"\{e\}", r"(\w+)").replace(r"\{v\}", r"(\w+)") + "$")
            for a, t in FACT.items()}

ALL_FACTS = ["Tell me about the {e}.", "Describe the {e}."]
QUESTIONS = {
    "colour": ["What colour is the {e}?", "Which colour does the {e} have?"],
    "size":   ["How big is the {e}?", "What size is the {e}?"],
    "sound":  ["What sound does the {e} make?", "What does the {e} say?"],
    "food":   ["What does the {e} eat?", "What food does the {e} like?"],
    "home":   ["Where does the {e} live?", "What is the home of the {e}?"],
    "legs":   ["How many legs does the {e} have?", "Count the legs of the {e}."],
    "cover":  ["What is the {e} covered in?", "What covers the body of the {e}?"],
    "active": ["When is the {e} active?", "At what time is the {e} awake?"],
}
RUDE = ["That is a stupid question.", "Ask someone else next time.", "I do not care about animals.",
        "Stop asking me things.", "You should know this already."]
OFF_TOPIC = ["The weather is nice today.", "Paris is in France.", "I like to play chess.",
             "Trains run on rails.", "Bread is made from flour."]

# -----------------------------------------------------------------------------
# Config of the world: every rate and size in one place.

@dataclass
class WorldConfig:
    p_all_facts: float = 0.5    # share of "tell me everything" prompts (the long answers)
    p_wrong: float = 0.25       # each stated fact gets a wrong value (the dominant error)
    p_omit: float = 0.05        # each requested fact is left out
    p_rude: float = 0.1         # one rude sentence at a random position
    p_off_topic: float = 0.1    # one off-topic sentence at a random position
    p_annotator_miss: float = 0.0  # the annotator overlooks each error (robustness studies)


def parse_prompt(prompt):
    """(entity, requested attributes) of a prompt of this world, or (None, []) if unknown."""
    for t in ALL_FACTS:
        m = re.fullmatch(re.escape(t).replace(r"\{e\}", r"(\w+)"), prompt)
        if m and m.group(1) in KB:
            return m.group(1), list(ATTRS)
    for a, ts in QUESTIONS.items():
        for t in ts:
            m = re.fullmatch(re.escape(t).replace(r"\{e\}", r"(\w+)"), prompt)
            if m and m.group(1) in KB:
                return m.group(1), [a]
    return None, []


def sample_prompt(rng, cfg=WorldConfig()):
    e = rng.choice(sorted(KB))
    if rng.random() < cfg.p_all_facts:
        return rng.choice(ALL_FACTS).format(e=e)
    a = rng.choice(ATTRS)
    return rng.choice(QUESTIONS[a]).format(e=e)


def ideal_response(prompt):
    e, attrs = parse_prompt(prompt)
    return " ".join(FACT[a].format(e=e, v=KB[e][a]) for a in attrs)


def noisy_response(prompt, rng, cfg=WorldConfig()):
    """An SFT-corpus response: the ideal one with wrong values, omissions, rude and off-topic
    sentences at the configured rates."""
    e, attrs = parse_prompt(prompt)
    sents = []
    for a in attrs:
        if rng.random() < cfg.p_omit:
            continue
        v = KB[e][a]
        if rng.random() < cfg.p_wrong:
            v = rng.choice([w for w in VALUES[a] if w != v])
        sents.append(FACT[a].format(e=e, v=v))
    for p, pool in ((cfg.p_rude, RUDE), (cfg.p_off_topic, OFF_TOPIC)):
        if rng.random() < p:
            sents.insert(rng.randint(0, len(sents)), rng.choice(pool))
    return " ".join(sents)

# -----------------------------------------------------------------------------
# The gold judge. It reads any string and never raises.

WEIGHTS = {"correct": 1.0, "wrong": -1.0, "missing": -1.0, "repeated": -1.0, "unrequested": -1.0,
           "rude": -1.0, "off_topic": -1.0, "unparseable": -1.0}
_SENT_RE = re.compile(r"[^.?!]*[.?!]|[^.?!]+$")  # a sentence ends at . ? ! (or at the end)


def split_sentences(text):
    """[(start, end)] character spans of the sentences of text, surrounding spaces excluded."""
    spans = []
    for m in _SENT_RE.finditer(text):
        s, t = m.start(), m.end()
        while s < t and text[s].isspace():
            s += 1
        while t > s and text[t - 1].isspace():
            t -= 1
        if s < t:
            spans.append((s, t))
    return spans


def classify(prompt, response):
    """One verdict per sentence: (span, kind, attr, value) with kind in the judge's categories."""
    e, requested = parse_prompt(prompt)
    seen, out = set(), []
    for s, t in split_sentences(response):
        sent = response[s:t]
        kind, attr, val = "unparseable", None, None
        if sent in RUDE:
            kind = "rude"
        elif sent in OFF_TOPIC:
            kind = "off_topic"
        else:
            for a, rx in _FACT_RE.items():
                m = rx.match(sent)
                if m and m.group(2) in VALUES[a]:
                    attr, val = a, m.group(2)
                    if m.group(1) != e or a not in requested:
                        kind = "unrequested"
                    elif a in seen:
                        kind = "repeated"
                    else:
                        kind = "correct" if val == KB[e][a] else "wrong"
                        seen.add(a)
                    break
        out.append(((s, t), kind, attr, val))
    return out, [a for a in requested if a not in seen]


def judge(prompt, response):
    """(score, counts): the gold score of a response and its count per category."""
    verdicts, missing = classify(prompt, response)
    counts = dict.fromkeys(WEIGHTS, 0)
    for _, kind, _, _ in verdicts:
        counts[kind] += 1
    counts["missing"] = len(missing)
    return sum(WEIGHTS[k] * n for k, n in counts.items()), counts


def score(prompt, response):
    return judge(prompt, response)[0]


def max_score(prompt):
    return judge(prompt, ideal_response(prompt))[0]

def error_rates(prompts, responses):
    """The judge's view of a set of responses: mean score and the rate of each error type
    (wrong per stated fact, missing per requested fact, unparseable per sentence, the
    others per response), the numbers a report shows beside a win rate; and the wrong-fact
    rate of the all-facts answers by position (first / middle / last third of the sentences)."""
    tot = dict.fromkeys(WEIGHTS, 0)
    scores, requested = [], 0
    by_third = [[0, 0] for _ in range(3)]  # [wrong, stated] facts in each third of the long answers
    for p, r in zip(prompts, responses):
        s, c = judge(p, r)
        scores.append(s)
        requested += len(parse_prompt(p)[1])
        for k, n in c.items():
            tot[k] += n
        verdicts = classify(p, r)[0]
        for i, (_, kind, _, _) in enumerate(verdicts if len(parse_prompt(p)[1]) > 1 else []):
            if kind in ("correct", "wrong"):
                by_third[3 * i // len(verdicts)][0] += kind == "wrong"
                by_third[3 * i // len(verdicts)][1] += 1
    n, sents = max(len(scores), 1), max(sum(tot[k] for k in tot if k != "missing"), 1)
    return {"judge_score": sum(scores) / n,
            "wrong": tot["wrong"] / max(tot["correct"] + tot["wrong"], 1),
            "missing": tot["missing"] / max(requested, 1),
            "rude": tot["rude"] / n, "off_topic": tot["off_topic"] / n,
            "repeated": tot["repeated"] / n, "unrequested": tot["unrequested"] / n,
            "unparseable": tot["unparseable"] / sents,
            # where the wrong facts of "Tell me about" answers sit: by the sentence's third of the answer
            **{f"wrong_{part}": w / max(n, 1) for part, (w, n) in zip(("first", "middle", "last"), by_third)}}


# -----------------------------------------------------------------------------
# The minimal-edit annotator.

def annotate(prompt, response, p_miss=0.0, rng=None):
    """The smallest character edit after which the judge gives the maximum score: wrong
    values are substituted in place, bad sentences deleted together with the space before
    them, missing facts inserted at their place in the canonical attribute order. Every
    other character stays as it was. With p_miss > 0 each error is overlooked with that
    probability (a noisy annotator). An answer is never left empty: an annotator who deleted
    every sentence writes in the facts it lacks, as an annotation form that requires an
    answer would make them (and as no record may hold an empty field)."""
    e, _ = parse_prompt(prompt)
    if e is None:
        return response
    rng = rng or random.Random(0)
    fix = lambda: p_miss == 0 or rng.random() >= p_miss  # noqa: E731
    verdicts, missing = classify(prompt, response)
    out, prev_end, first = "", 0, True
    for (s, t), kind, attr, val in verdicts:
        gap, sent = response[prev_end:s], response[s:t]
        prev_end = t
        if kind == "wrong" and fix():
            i, j = _FACT_RE[attr].match(sent).span(2)  # substitute the value, nothing else
            sent = sent[:i] + KB[e][attr] + sent[j:]
        elif kind not in ("correct", "wrong") and fix():
            continue  # delete the sentence and the gap in front of it
        out += (response[:verdicts[0][0][0]] if first else gap) + sent
        first = False
    out += response[prev_end:]
    for a in missing:
        if fix() or (response.strip() and not out.strip()):
            out = insert_fact(prompt, out, a, FACT[a].format(e=e, v=KB[e][a]))
    return out


def insert_fact(prompt, text, attr, new):
    """Insert sentence `new` before the first stated fact of a later attribute, else at the end."""
    verdicts, _ = classify(prompt, text)
    for (s, t), kind, a, _ in verdicts:
        if a is not None and ATTRS.index(a) > ATTRS.index(attr):
            return text[:s] + new + " " + text[s:]
    return (text + " " + new) if text.strip() else new


def judge_token_rewards(enc, prompt, ids):
    """The gold judge's score of one response, made dense over its token ids (eot included
    if generated): each sentence's verdict (WEIGHTS: +1 a correct fact, -1 an error) on
    the sentence's last token, where the verdict is decided, and each missing fact's -1 on
    the token where the answer departed from the text with that fact inserted (the first
    character that differs; at the end, the eot that stopped too early). The rewards sum
    exactly to score(prompt, text): the judge's objective, only denser."""
    text = decode_response(enc, ids)
    ends = [len(decode_response(enc, ids[:k + 1])) for k in range(len(ids))]  # characters after token k

    def at(c):  # the token holding character c of text (the last token if c is past the end)
        return next((k for k, e in enumerate(ends) if e > c), len(ids) - 1)
    out = [0.0] * len(ids)
    verdicts, missing = classify(prompt, text)
    for (_, t), kind, _, _ in verdicts:
        out[at(t - 1)] += WEIGHTS[kind]
    e, _ = parse_prompt(prompt)
    for a in missing:
        fixed = insert_fact(prompt, text, a, FACT[a].format(e=e, v=KB[e][a]))
        d = next((i for i, (x, y) in enumerate(zip(text, fixed)) if x != y), len(text))
        out[at(d)] += WEIGHTS["missing"]
    return out


# -----------------------------------------------------------------------------
# JSONL I/O for preference records {"prompt", "chosen", "rejected", "edited"}, and JSON files.

FIELDS = ("prompt", "chosen", "rejected", "edited")


class DataError(ValueError):
    """Bad input data; the message names the file and line."""


def write_jsonl(path, records):
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def write_json(obj, path):
    """One JSON file, written atomically (the folder is created if needed)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)


def save_atomic(obj, path):
    """torch.save to a temp file, then rename: a crash never leaves half a checkpoint."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def read_jsonl(path, required=("prompt", "chosen", "rejected"), optional=("edited",)):
    """Preference records from a JSONL file; a bad line raises DataError naming file:line."""
    name = str(path).split("/")[-1]
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is tolerated
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{name}:{line}: not valid UTF-8") from None
    records = []
    for n, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 is legal inside JSON strings
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{name}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise DataError(f"{name}:{n}: expected a JSON object")
        for k in tuple(required) + tuple(k for k in optional if k in r):
            if k not in r:
                raise DataError(f'{name}:{n}: missing field "{k}"')
            if not isinstance(r[k], str):
                raise DataError(f'{name}:{n}: field "{k}" must be a string')
            if not r[k].strip():
                raise DataError(f'{name}:{n}: field "{k}" is empty')
            try:
                r[k].encode("utf-8")
            except UnicodeEncodeError:  # JSON can carry half a surrogate pair ("\ud83d")
                raise DataError(f'{name}:{n}: field "{k}" is not valid Unicode') from None
        records.append({k: r[k] for k in tuple(required) + tuple(optional) if k in r})
    if not records:
        raise DataError(f"{name}: no records (empty file)")
    return records


if __name__ == "__main__":
    rng = random.Random(0)
    for _ in range(4):
        p = sample_prompt(rng)
        r = noisy_response(p, rng)
        print(p, "\n ", r, "\n ", judge(p, r), "\n  edit:", annotate(p, r), "\n")
