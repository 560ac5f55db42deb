"""
Grade the exercises: run the project's own oracle checks (exercises/checks.py) on the
functions you wrote in exercises/diff_labels.py, exercises/reward.py, exercises/ppo.py and
exercises/dpo.py.

    python -m exercises.grade                  # every exercise
    python -m exercises.grade gae ppo_loss     # some of them
    python -m exercises.grade --impl=project   # the same checks on the project's files: all pass

Run it from the repository root. One line per check: PASS, TODO (still raises
NotImplementedError) or FAIL with the first line of the error; exit status 0 when all pass.
"""

import argparse
import importlib
import sys

from exercises import checks

EXERCISES = {  # name: (the file, the functions you write in exercises/<file>.py, the checks)
    "myers": ("diff_labels", "_trace, _backtrack", checks.MYERS),
    "token_labels": ("diff_labels", "token_labels", checks.TOKEN_LABELS),
    "token_loss": ("reward", "token_loss", checks.TOKEN_LOSS),
    "reward_tensor": ("reward", "final_token_rewards, normalise", checks.REWARD_TENSOR),
    "gae": ("ppo", "compute_gae", checks.GAE),
    "ppo_loss": ("ppo", "ppo_loss", checks.PPO_LOSS),
    "dpo_loss": ("dpo", "dpo_loss", checks.DPO_LOSS),
}


def module(file, impl="exercises"):
    """The implementation a check runs on: the project's file, or its blank in exercises/."""
    return importlib.import_module(file if impl == "project" else f"exercises.{file}")


def grade(name, impl="exercises"):
    """[(check, None if it passed, else the exception)] of one exercise."""
    file, _, cs = EXERCISES[name]
    m, out = module(file, impl), []
    for check in cs:
        try:
            check(m)
            out.append((check, None))
        except Exception as e:  # a failed assertion, NotImplementedError, or a bug in the code under test
            out.append((check, e))
    return out


def main(argv):
    p = argparse.ArgumentParser(description="Grade the exercises with the project's oracle checks.")
    p.add_argument("names", nargs="*", help=f"exercises to grade (default: all): {', '.join(EXERCISES)}")
    p.add_argument("--impl", choices=["exercises", "project"], default="exercises",
                   help="exercises: your blanks in exercises/; project: the project's own files")
    args = p.parse_args(argv)
    if unknown := [n for n in args.names if n not in EXERCISES]:
        p.error(f"unknown exercise(s) {', '.join(unknown)}; there are: {', '.join(EXERCISES)}")
    passed = total = 0
    for name in args.names or EXERCISES:
        file, funcs, _ = EXERCISES[name]
        print(f"{name}: {funcs} in {'' if args.impl == 'project' else 'exercises/'}{file}.py")
        for check, e in grade(name, args.impl):
            status = "PASS" if e is None else "TODO" if isinstance(e, NotImplementedError) else "FAIL"
            why = "" if e is None or status == "TODO" else f": {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"  {status} {check.__name__}{why}")
            passed, total = passed + (e is None), total + 1
    print(f"{passed}/{total} checks pass")
    return 0 if passed == total else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
