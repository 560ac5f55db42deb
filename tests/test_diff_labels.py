"""Tests for diff_labels.py: the slider keeps scripts minimal, the order of a replacement, the viewer."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from diff_labels import diff, render  # noqa: E402
from exercises.checks import random_pairs_minimal, valid_minimal  # noqa: E402

# Myers' minimality against an LCS dynamic program and the labels on hand-made cases are the
# graders' checks (exercises/checks.py), run on this project's diff_labels by tests/test_exercises.py.


def test_slider_keeps_scripts_minimal():
    """diff with its slider (sentence breaks or none) still gives valid LCS-minimal scripts."""
    random_pairs_minimal(lambda a, b: diff(a, b, breaks={0}), n=1500, seed=1)
    random_pairs_minimal(diff, n=1500, seed=2)


def test_substitution_is_adjacent_delete_then_insert():
    """One substituted token is a '-' immediately followed by a '+'."""
    s = valid_minimal(diff, [1, 2, 3, 4], [1, 2, 9, 4])
    assert s == [("=", 1), ("=", 2), ("-", 3), ("+", 9), ("=", 4)]


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
