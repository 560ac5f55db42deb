"""The ablation patches (ablations/*.patch, docs/results.md "A fair comparison") each revert one fix of
the fair protocol; they must keep applying to the code as it changes, or the ablation's
command in docs/results.md no longer reproduces."""
import glob
import os
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("patch", sorted(glob.glob(os.path.join(ROOT, "ablations", "*.patch"))), ids=os.path.basename)
def test_ablation_patch_applies(patch):
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    r = subprocess.run(["git", "apply", "--check", patch], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"{os.path.basename(patch)} no longer applies: {r.stderr}"
