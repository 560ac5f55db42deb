import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diff_labels import apply, diff, render, token_labels  # noqa: E402

EOT = "<|endoftext|>"
SENTENCES = ["The", " cow", " is", " brown", ".", " The", " cow", " is", " rude", ".",
             " The", " cow", " eats", " grass", "."]


def lcs(a, b):
    """Plain O(NM) dynamic program: length of a longest common subsequence."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def check(a, b, breaks=()):
    """The script is valid for (a, b) and has the minimal number of edits."""
    s = diff(a, b, breaks)
    assert all(op in "=-+" for op, _ in s)
    assert apply(a, s) == list(b)
    assert [t for op, t in s if op != "+"] == list(a)
    assert sum(op != "=" for op, _ in s) == len(a) + len(b) - 2 * lcs(a, b)
    return s


def random_pair(rng):
    """A random (a, b) pair from one of several families."""
    n = rng.choice([rng.randint(0, 8), rng.randint(0, 30), rng.randint(0, 30), rng.randint(0, 200)])
    k = rng.randint(2, 50)
    a = [rng.randrange(k) for _ in range(n)]
    kind = rng.randrange(6)
    if kind == 0:                                   # independent
        return a, [rng.randrange(k) for _ in range(rng.randint(0, n + 5))]
    if kind == 1:                                   # identical
        return a, list(a)
    if kind == 2:                                   # disjoint alphabets
        return a, [k + rng.randrange(k) for _ in range(rng.randint(0, n + 5))]
    b, i = list(a), rng.randint(0, n)
    if kind == 3 and n:                             # one substitution
        b[min(i, n - 1)] = rng.randrange(k + 1)
    elif kind == 4:                                 # one insertion
        b.insert(i, rng.randrange(k))
    elif n:                                         # one deletion
        del b[min(i, n - 1)]
    for _ in range(rng.randint(0, 3)):              # plus a few random point edits
        j = rng.randint(0, len(b))
        b[j:j + rng.randint(0, 2)] = [rng.randrange(k) for _ in range(rng.randint(0, 2))]
    return a, b


def test_random_pairs_match_lcs_oracle():
    """Thousands of random pairs: scripts replay correctly and have LCS-minimal length."""
    rng = random.Random(0)
    for t in range(3000):
        a, b = random_pair(rng)
        check(a, b, breaks={0} if t % 2 else ())    # the slider must keep scripts minimal


def test_empty_inputs():
    """Empty sides give pure insertions, pure deletions or nothing."""
    assert check([], []) == []
    assert check([], [1, 2]) == [("+", 1), ("+", 2)]
    assert check([1, 2], []) == [("-", 1), ("-", 2)]


def test_identical_all_keep():
    """Identical inputs are all '='."""
    assert check("abc", "abc") == [("=", "a"), ("=", "b"), ("=", "c")]


def test_myers_paper_example():
    """Myers' example ABCABBA -> CBABAC needs D = 5 edits."""
    s = check("ABCABBA", "CBABAC")
    assert sum(op != "=" for op, _ in s) == 5


def test_substitution_is_adjacent_delete_then_insert():
    """One substituted token is a '-' immediately followed by a '+'."""
    s = check([1, 2, 3, 4], [1, 2, 9, 4])
    assert s == [("=", 1), ("=", 2), ("-", 3), ("+", 9), ("=", 4)]


def test_tie_break_sentence_deletion():
    """With '.' as a break, deleting a sentence labels exactly that sentence's tokens."""
    edited = SENTENCES[:5] + SENTENCES[10:]
    lo, le = token_labels(SENTENCES, edited, breaks={"."})
    assert [t for t, v in zip(SENTENCES, lo) if v == -1] == [" The", " cow", " is", " rude", "."]
    assert lo == [0] * 5 + [-1] * 5 + [0] * 5 and le == [0] * 10
    lo, _ = token_labels(SENTENCES, edited)         # without breaks: the latest position
    assert lo == [0] * 7 + [-1] * 5 + [0] * 3


def test_tie_break_insertion_and_repeated_sentence():
    """Insertions and deletions of a repeated sentence also land on sentence boundaries."""
    a = ["A", ".", " B", ".", EOT]
    b = ["A", ".", " B", ".", " C", ".", EOT]
    assert token_labels(a, b)[1] == [0, 0, 0, 0, 1, 1, 0]
    a = ["A", ".", " A", ".", " A", ".", EOT]
    lo, _ = token_labels(a, a[:2] + a[4:], breaks={"."})
    assert lo == [0, 0, 0, 0, -1, -1, 0]


def test_labels_shapes_and_values():
    """One label per token, original in {-1, 0}, edited in {0, 1}."""
    rng = random.Random(1)
    for _ in range(300):
        a, b = random_pair(rng)
        for mark in (False, True):
            lo, le = token_labels(a, b, mark_insertions=mark)
            assert len(lo) == len(a) and len(le) == len(b)
            assert set(lo) <= {-1, 0} and set(le) <= {0, 1}
            assert le.count(1) == sum(op == "+" for op, _ in diff(a, b))


def test_substitution_labels():
    """A substitution marks exactly the old token -1 and the new token +1."""
    a = ["The", " cow", " eats", " fish", ".", EOT]
    b = ["The", " cow", " eats", " grass", ".", EOT]
    for mark in (False, True):                      # a replacement gets no extra mark
        assert token_labels(a, b, mark_insertions=mark) == ([0, 0, 0, -1, 0, 0], [0, 0, 0, 1, 0, 0])


def test_mark_insertions_middle():
    """A pure insertion marks the following original token only with mark_insertions."""
    a = ["The", " cow", " eats", ".", EOT]
    b = ["The", " cow", " eats", " grass", ".", EOT]
    assert token_labels(a, b) == ([0, 0, 0, 0, 0], [0, 0, 0, 1, 0, 0])
    assert token_labels(a, b, mark_insertions=True) == ([0, 0, 0, -1, 0], [0, 0, 0, 1, 0, 0])


def test_mark_insertions_at_end_marks_eot():
    """An insertion at the very end marks the appended end-of-text token."""
    a = ["The", " cow", " is", " big", ".", EOT]
    b = a[:5] + [" It", " says", " moo", "."] + [EOT]
    lo, le = token_labels(a, b, mark_insertions=True, breaks={"."})
    assert lo == [0, 0, 0, 0, 0, -1] and le == [0] * 5 + [1] * 4 + [0]
    assert token_labels(a, b)[0] == [0] * 6


def test_render_ansi():
    """ANSI output wraps bad and good tokens in escape codes, neutral ones stay plain."""
    out = render(["a", "b", "c"], [0, -1, 1])
    assert out == "a\x1b[41mb\x1b[0m\x1b[42mc\x1b[0m"
    assert render(["x", "y"], [0, 0]) == "xy"


def test_render_html():
    """HTML output escapes text, keeps it, and scales colour with |reward|."""
    out = render(["<b>", " cow", " & moo"], [-1, 0, 0.25], html=True)
    assert "&lt;b&gt;" in out and "<b>" not in out and " cow" in out and "&amp; moo" in out
    assert "rgba(220,38,38,1.00)" in out and "rgba(22,163,74,0.25)" in out
    assert out.startswith("<pre") and out.count("<span") == 2


def test_omission_mark_lands_on_the_decision_token():
    """An omitted sentence is marked where the answer departs from the edit, not where the
    sentence-aligned insertion starts: in the middle, at the start and at the end."""
    fact = lambda *w: list(w) + ["."]  # noqa: E731
    food, legs = fact(" The", " cow", " eats", " grass"), fact(" The", " cow", " has", " four", " legs")
    home = fact(" The", " cow", " lives", " in", " the", " barn")
    a, b = food + legs + [EOT], food + home + legs + [EOT]         # the middle: " has" skipped the fact
    lo, le = token_labels(a, b, mark_insertions=True, breaks={"."})
    assert [a[k] for k, v in enumerate(lo) if v] == [" has"]
    assert [b[k] for k, v in enumerate(le) if v] == home            # the + labels stay sentence-aligned
    colour, size = fact("The", " cow", " is", " brown"), fact(" The", " cow", " is", " big", " in", " size")
    a, b = ["The"] + size[1:] + [EOT], colour + size + [EOT]        # the start: " big" where " brown" was due
    lo, _ = token_labels(a, b, mark_insertions=True, breaks={"."})
    assert [a[k] for k, v in enumerate(lo) if v] == [" big"]
    a, b = food + [EOT], food + legs + [EOT]                        # the end: stopping skipped it
    lo, _ = token_labels(a, b, mark_insertions=True, breaks={"."})
    assert lo == [0] * len(food) + [-1]
