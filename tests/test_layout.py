"""The layout a learner relies on: the method's files at the root never import machinery/ (the
pipeline, train.py and sft.py, is where the two meet), and the method stays within the
budget a reader can hold."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE = {"train.py", "sft.py"}
METHOD = ["model.py", "diff_labels.py", "reward.py", "ppo.py", "dpo.py", "train.py", "sft.py"]


def imports(path):
    """The top-level package of every import in a file."""
    tree = ast.parse(open(path).read())
    return {(n.module if isinstance(n, ast.ImportFrom) else a.name).split(".")[0]
            for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
            for a in (n.names if isinstance(n, ast.Import) else [n])}


def test_the_method_never_imports_the_machinery():
    roots = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))]
    assert {"model.py", "ppo.py", "reward.py", "train.py"} <= set(roots)
    for name in roots:
        if name not in PIPELINE:
            assert "machinery" not in imports(os.path.join(ROOT, name)), f"{name} imports machinery/"


def test_machinery_never_imports_the_pipeline_entry():
    for path in glob.glob(os.path.join(ROOT, "machinery", "*.py")):
        assert "train" not in imports(path), f"{os.path.basename(path)} imports train.py"


def test_the_method_fits_its_budget():
    """Each of the method's files at most 350 lines, together at most 2,000 (DESIGN.md §3)."""
    lines = {f: sum(1 for _ in open(os.path.join(ROOT, f))) for f in METHOD}
    assert all(n <= 350 for n in lines.values()), lines
    assert sum(lines.values()) <= 2000, lines
