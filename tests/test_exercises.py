"""Tests for exercises/: every oracle check of the graders passes on the project's own files
(these are the project's tests of Myers' diff, the token labels, the token loss, the reward
tensor, GAE and the PPO loss), and every untouched blank fails them."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from exercises import grade  # noqa: E402

CHECKS = [(name, check) for name, (_, _, checks) in grade.EXERCISES.items() for check in checks]


@pytest.mark.parametrize("name,check", CHECKS, ids=[f"{n}-{c.__name__}" for n, c in CHECKS])
def test_check_passes_on_the_project(name, check):
    """The project's function passes the grader's check (the check is its oracle test)."""
    check(grade.module(grade.EXERCISES[name][0], "project"))


@pytest.mark.parametrize("name", list(grade.EXERCISES))
def test_untouched_blank_fails_every_check(name):
    """Each blank raises NotImplementedError in every check of its exercise."""
    results = grade.grade(name, "exercises")
    assert results and all(isinstance(e, NotImplementedError) for _, e in results), results


def test_grade_command(capsys):
    """The command's exit status: 0 on the project's files, 1 on the blanks (each check TODO)."""
    assert grade.main(["token_loss", "--impl=project"]) == 0
    assert grade.main(["token_loss"]) == 1
    out = capsys.readouterr().out
    assert "PASS token_loss_hand_computed" in out and "TODO token_loss_hand_computed" in out
    assert "0/3 checks pass" in out
    with pytest.raises(SystemExit):
        grade.main(["no_such_exercise"])
