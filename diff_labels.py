"""
Token labels from a minimal edit: diff the original response against the annotator's
edited one and mark what the edit removed (-1, bad) and what it added (+1, good).

The diff is Myers (1986), "An O(ND) Difference Algorithm and Its Variations". In the edit
graph, a grid of points (x, y) with 0 <= x <= N = len(a), 0 <= y <= M = len(b), a step
right deletes a[x], a step down inserts b[y], and a diagonal step, which exists only where
a[x] == b[y], is a free match. A path from (0, 0) to (N, M) is an edit script; a D-path
has D non-diagonal edges; the shortest has D = N + M - 2 * LCS(a, b). A maximal run of
diagonal steps is a "snake". Points with x - y = k lie on diagonal k, and a D-path ends
on a diagonal in {-D, -D+2, .., D}. The furthest-reaching D-path on diagonal k extends the
furthest (D-1)-path on k-1 (step right) or k+1 (step down), whichever reaches further,
then follows its snake. So the greedy forward search keeps only V[k] = furthest x on
diagonal k, for D = 0, 1, 2, ... until a path reaches (N, M). A copy of V is saved before
each round (the "trace"), so a backtrack from (N, M) can redo each choice and read off
the script. Time O((N + M) * D), space O((N + M) * D) for the trace: cheap when the edit
is small, which is the whole point of minimal edits.

Tie-breaking. A minimal diff is not unique: with sentence tokens
    a = [The, cow, is, brown, ., The, cow, is, rude, ., The, cow, eats, grass, .]
    b = [The, cow, is, brown, ., The, cow, eats, grass, .]
any 5 consecutive tokens starting at index 4, 5, 6 or 7 of `a` may be the deletion,
e.g. [. The cow is rude] or [cow is rude . The]. Neither extreme is the sentence, so
sliding always early or always late is not enough. Our rule: each pure run of '-' (or
'+') is slid, like git's diff slider, to the LATEST position whose last token is in
`breaks` (sentence ends such as the id of "."); if no position ends on a break, to the
latest position. With breaks={'.'} the example deletes exactly [The cow is rude .]
(without breaks: [is rude . The cow]). Late also suits insertions before the closing
<|endoftext|>: "A. B." -> "A. B. C." inserts [C .], not [. C]. A replacement block
(adjacent '-' and '+') is not slid; its '-' ops are put before its '+' ops.

Run `python diff_labels.py` for a coloured example in the terminal.
"""

import html as _html


def _trace(a, b):
    """Greedy forward search; returns the saved V arrays, one per D."""
    n, m = len(a), len(b)
    off = n + m + 1                      # V[k] is stored at v[k + off], k in [-D-1, D+1]
    v, trace = [0] * (2 * off + 1), []
    for d in range(n + m + 1):
        trace.append(v[:])
        for k in range(-d, d + 1, 2):
            # come down from k+1 (insert) if it reaches further, else right from k-1 (delete)
            down = k == -d or (k != d and v[off + k - 1] < v[off + k + 1])
            x = v[off + k + 1] if down else v[off + k - 1] + 1
            y = x - k
            while x < n and y < m and a[x] == b[y]:   # follow the snake, it is free
                x, y = x + 1, y + 1
            v[off + k] = x
            if x >= n and y >= m:
                return trace, off
    raise AssertionError("unreachable: D <= N + M always reaches (N, M)")


def _backtrack(a, b, trace, off):
    """Walk from (N, M) back to (0, 0), redoing the choice made at each D."""
    x, y, ops = len(a), len(b), []
    for d in range(len(trace) - 1, -1, -1):
        v, k = trace[d], x - y
        pk = k + 1 if k == -d or (k != d and v[off + k - 1] < v[off + k + 1]) else k - 1
        px, py = v[off + pk], v[off + pk] - pk
        while x > px and y > py:                       # the snake at the end of this D-step
            ops.append(("=", a[x - 1]))
            x, y = x - 1, y - 1
        if d > 0:
            ops.append(("+", b[y - 1]) if x == px else ("-", a[x - 1]))
        x, y = px, py
    return ops[::-1]


def _slide(s, breaks):
    """Put each block of changes in canonical position, in place (see the docstring)."""
    i = 0
    while i < len(s):
        if s[i][0] == "=":
            i += 1
            continue
        j = i
        while j < len(s) and s[j][0] != "=":
            j += 1
        # '-' before '+' inside a block: a block's a-tokens and b-tokens keep their order
        s[i:j] = sorted(s[i:j], key=lambda o: o[0] == "+")
        op, n = s[i][0], j - i
        if any(o != op for o, _ in s[i:j]):            # a replacement stays where it is
            i = j
            continue
        # window [p, p+n) may move up/down by one through an '=' holding the same token
        # as the one it leaves; only the ops change, the tokens stay where they are.
        lo, hi = i, i
        while lo > 0 and s[lo - 1][0] == "=" and s[lo - 1][1] == s[lo + n - 1][1]:
            lo -= 1
        while hi + n < len(s) and s[hi + n][0] == "=" and s[hi + n][1] == s[hi][1]:
            hi += 1
        best = max((p for p in range(lo, hi + 1) if s[p + n - 1][1] in breaks), default=hi)
        for p in range(lo, hi + n):
            s[p] = (op if best <= p < best + n else "=", s[p][1])
        i = best + n


def diff(a, b, breaks=()):
    """Minimal edit script from a to b as (op, token) pairs, op in '=', '-', '+'.
    `breaks`: tokens that end a sentence (e.g. the id of "."), used to break ties."""
    a, b = list(a), list(b)
    script = _backtrack(a, b, *_trace(a, b))
    _slide(script, set(breaks))
    return script


def apply(a, script):
    """Replay a script on a: '=' and '-' consume a's tokens, '=' and '+' emit."""
    out, i = [], 0
    for op, tok in script:
        if op != "+":
            assert a[i] == tok, f"script does not match a at {i}"
            i += 1
        if op != "-":
            out.append(tok)
    assert i == len(a), "script does not consume all of a"
    return out


def token_labels(original, edited, mark_omissions=False, breaks=()):
    """Per-token labels: original in {-1, 0} (deleted = -1), edited in {0, +1} (inserted).

    mark_omissions: also label -1, for each pure run of '+' (not directly after a '-': a
    replacement's removed tokens are already -1), the original token where the answer
    decided to leave the inserted text out: the first original token after the run once
    the run is slid as LATE as it can go. The sentence-aligned run (see _slide) may sit
    before tokens that the inserted text also starts with; the original only departs from
    the edit after them. Omitting " The cow lives in the barn." before " The cow has four
    legs." departs at " has", not at " The": " The cow" still agrees with the edit, and
    " has" is the token that skipped the fact. Marking it lets the reward reach the decision
    itself (GAE passes reward backwards only). An insertion at the very end has no such
    token: callers append <|endoftext|> to both, so the eot, the decision to stop, is marked.
    """
    lo, le = [0] * len(original), [0] * len(edited)
    script = diff(original, edited, breaks)
    i = j = 0                                           # next token of original / edited
    for t, (op, _) in enumerate(script):
        if op != "+":
            lo[i] = -1 if op == "-" else lo[i]             # keep an insertion mark
            i, j = i + 1, j + (op == "=")
            continue
        le[j], j = 1, j + 1
        if t == 0 or script[t - 1][0] != "+":          # a '+' run starts here
            start, replaced = t, t > 0 and script[t - 1][0] == "-"
        run_ends = t + 1 == len(script) or script[t + 1][0] != "+"
        if mark_omissions and run_ends and not replaced:
            k = 0  # slide the run [start, t] right past each '=' that repeats its first token
            while t + 1 + k < len(script) and script[t + 1 + k] == ("=", script[start + k][1]):
                k += 1
            if i + k < len(lo):
                lo[i + k] = -1                          # the first token that departs from the edit
    return lo, le


def render(tokens, labels, html=False):
    """Colour decoded tokens by label: red bad (< 0), green good (> 0), plain neutral.

    ANSI colours labels with |value| >= 0.5; HTML accepts floats in [-1, 1] (e.g. a reward
    model's per-token reward) and sets the colour's opacity to |value|.
    """
    if not html:  # ANSI backgrounds: 41 red, 42 green, 0 reset
        code = lambda v: "\x1b[41m" if v <= -0.5 else "\x1b[42m" if v >= 0.5 else ""
        return "".join(code(v) + t + "\x1b[0m" if code(v) else t for t, v in zip(tokens, labels))
    out = []
    for t, v in zip(tokens, labels):
        t, a = _html.escape(t), min(1.0, abs(float(v)))
        rgb = "220,38,38" if v < 0 else "22,163,74"
        out.append(f'<span style="background:rgba({rgb},{a:.2f})">{t}</span>' if a > 0 else t)
    return '<pre style="white-space:pre-wrap">' + "".join(out) + "</pre>"


if __name__ == "__main__":
    words = lambda s: s.replace(".", " .").split(" ") + ["<|endoftext|>"]
    a = words("The cow is brown. The cow is rude. The cow eats fish.")
    b = words("The cow is big. The cow eats grass and hay.")
    for name, toks, labels in zip(("original", "edited"), (a, b), token_labels(a, b, True, {"."})):
        print(f"{name:>9}:", render([t + " " for t in toks], labels))
