"""
Exercises on diff_labels.py: Myers' diff of two token lists, and the labels of a minimal
edit. Replace each `raise NotImplementedError`, then grade (from the repository root):

    python -m exercises.grade myers token_labels

The edit graph of a -> b: points (x, y) with 0 <= x <= N = len(a), 0 <= y <= M = len(b).
A step right deletes a[x], a step down inserts b[y], and a diagonal step, which exists
only where a[x] == b[y], keeps the token for free. A path from (0, 0) to (N, M) is an edit
script; the shortest one has D = N + M - 2 * LCS(a, b) non-diagonal steps. The points
with x - y = k lie on diagonal k. Myers (1986): the furthest-reaching path with d
non-diagonal steps on diagonal k extends the furthest (d-1)-path on k-1 (one step right)
or on k+1 (one step down), then follows the free diagonal steps (the "snake").
"""

from diff_labels import diff  # the project's diff, used by token_labels: the two exercises are graded apart


def _trace(a, b):
    """Myers' greedy forward search from (0, 0) until a path reaches (N, M).

    Keep v, a flat list of 2 * off + 1 zeros with off = N + M + 1: v[off + k] is V[k], the
    furthest x reached on diagonal k so far. For d = 0, 1, 2, ...:
      - append a copy of v to `trace` (the state before round d; the backtrack redoes
        each round's choices from it);
      - for k = -d, -d+2, ..., d:
          come *down* from k+1 (x = V[k+1]) if k == -d, or if k != d and V[k-1] < V[k+1];
          else come *right* from k-1 (x = V[k-1] + 1);
          y = x - k; then, while x < N and y < M and a[x] == b[y], step diagonally;
          V[k] = x; if x >= N and y >= M, return (trace, off).
    Cost O((N + M) * D): small when the edit is small, the point of minimal edits.
    Hint: d never needs to exceed N + M.
    """
    raise NotImplementedError


def _backtrack(a, b, trace, off):
    """The edit script from the trace: a list of (op, token), op '=' (keep a token of a),
    '-' (delete a token of a) or '+' (insert a token of b), in order from the start.

    Walk back from (x, y) = (N, M). For d = len(trace) - 1 down to 0, with v = trace[d] and
    k = x - y: the diagonal pk that round d came from is k+1 if it came down (the same test
    as in _trace, on v), else k-1; that path ended at (px, py) = (v[off + pk], v[off + pk] - pk).
      - while x > px and y > py: the snake, emit ('=', a[x-1]) and step back diagonally;
      - if d > 0: emit ('+', b[y-1]) if x == px (a step down), else ('-', a[x-1]);
      - (x, y) = (px, py).
    You emit the script backwards: reverse it at the end.
    Check: applying the script to a gives b (diff_labels.apply), with the fewest '-' and '+'.
    """
    raise NotImplementedError


def token_labels(original, edited, mark_omissions=False, breaks=()):
    """Per-token labels of a minimal edit: (labels of original, labels of edited), one int
    per token: original in {-1, 0} (-1: the edit deletes or replaces the token: bad), edited
    in {0, +1} (+1: the edit inserted it: good); 0 for the kept tokens.

    Walk the script s = diff(original, edited, breaks) with i, j = the next token of
    original and of edited: '=' moves both on, '-' labels original[i] and moves i, '+'
    labels edited[j] and moves j.

    mark_omissions (the bad_vs_rest scheme): an omission must have a token to blame. For
    each run of '+' that does not directly follow a '-' (a replacement's tokens are already
    -1), also label -1 the original token where the answer left the inserted text out:
    after the run ends at s[t] (started at s[start]), slide past the '=' ops that repeat the
    run's first tokens (k = 0; while s[t+1+k] == ('=', s[start+k][1]): k += 1), then label
    original[i + k], if it exists. Example: " The cow lives in the barn." omitted before
    " The cow has four legs." is blamed on " has", not on " The": " The cow" still agrees
    with the edit. Callers append <|endoftext|> to both, so an omission at the end marks
    the eot: the decision to stop.
    """
    raise NotImplementedError
