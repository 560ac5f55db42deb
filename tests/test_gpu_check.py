"""machinery/gpu_check.py, the one command a GPU session runs, checked on the CPU: its GPT-2-shaped
random checkpoint (an encoding of exactly the model's vocabulary), the recipe's every stage and
the export read back by transformers (--smoke), and the figures it derives from a run folder."""

import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import tokenizer as tok  # noqa: E402
from machinery import gpu_check  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANIMALS = ["cow", "duck", "horse", "goat", "sheep", "pig", "cat", "dog", "hen", "fox", "owl", "bee"]


def qa_items():
    """QA-Feedback-shaped items (examples/qa_feedback.py's input), one per animal, each with an edit."""
    return [{"question": f"What does the {a} eat?", "passages": [[a.title(), f"The {a} eats grass.", "It is old."]],
             "gold": "", "prediction 1": f"The {a} eats fish. It is old.", "prediction 2": f"The {a} eats grass.",
             "prediction 3": "I do not know.", "prediction 4": f"The {a} eats.", "preference": [2, 1, 1, 0, 0, 0],
             "feedback": {"errors": [{"error type": "Wrong-Grounding", "explanation": "", "start": 12, "end": 16}],
                          "missing-info": [], "corrected-prediction": f"The {a} eats grass. It is old."}}
            for a in ANIMALS]


def test_write_gpt2_fills_the_vocabulary_with_valid_merges(tmp_path):
    """A BPE too small for the vocabulary is filled up to exactly vocab - 1 tokens (then
    <|endoftext|>), and the directory's vocab.json + merges.txt read back to the same ranks."""
    pytest.importorskip("transformers")
    texts = [f"The {a} eats grass." for a in ANIMALS]
    path = gpu_check.write_gpt2(str(tmp_path / "g"), texts, n_layer=1, n_head=1, n_embd=8, n_positions=32, vocab=700)
    ranks = tok.gpt2_ranks(path)
    assert len(ranks) == 699 and sorted(ranks.values()) == list(range(699))
    assert len(json.load(open(os.path.join(path, "vocab.json")))) == 700
    assert json.load(open(os.path.join(path, "config.json")))["vocab_size"] == 700


def test_throughput_and_stage_windows_by_hand(tmp_path):
    """SFT tokens / training seconds; rollout tokens (mean length x batch, summed) / rollout seconds;
    stage times laid back to back up to the end."""
    os.makedirs(tmp_path / "sft"), os.makedirs(tmp_path / "policies")
    json.dump({"real_tokens": 1000, "train_s": 4.0}, open(tmp_path / "sft" / "metrics.json", "w"))
    json.dump({"rollout_batch": 8}, open(tmp_path / "config.json", "w"))
    json.dump({"log": [{"length": 10, "t_rollout": 2.0}, {"length": 30, "t_rollout": 2.0}]},
              open(tmp_path / "policies" / "ppo_seed1.eval.json", "w"))
    assert gpu_check.throughput(str(tmp_path)) == {"sft_tokens_per_s": 250.0, "rollout_tokens_per_s_ppo_seed1": 80.0}
    assert gpu_check.stage_windows({"sft": 3.0, "rm_policies": 5.0, "report": 1.0}, 100.0) == {
        "report": (99.0, 100.0), "rm_policies": (94.0, 99.0), "sft": (91.0, 94.0)}


def test_smoke_runs_the_gpt2_recipe_and_the_export_on_the_cpu(tmp_path):
    """--smoke: every stage of the GPT-2 recipe (SFT, the judge and the reward models, PPO with its
    critic, fine-grained PPO, DPO) on a GPT-2-shaped random checkpoint and QA-Feedback-shaped data,
    and the fine-grained PPO policy exported and read by GPT2LMHeadModel: the same logits."""
    pytest.importorskip("transformers")
    qa = tmp_path / "dev_feedback.json"
    json.dump(qa_items(), open(qa, "w"))
    p = subprocess.run([sys.executable, "-m", "machinery.gpu_check", "--smoke", f"--qa={qa}", f"--out={tmp_path / 'o'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    parts = json.load(open(tmp_path / "o" / "summary.json"))["parts"]
    assert set(parts) == {"gpt2", "export"}
    assert parts["gpt2"]["rc"] == 0, open(tmp_path / "o" / "gpt2.log").read()[-2000:]
    res = json.load(open(tmp_path / "o" / "gpt2" / "results.json"))
    assert set(res["methods"]) == {"sft", "ppo", "fg_ppo", "dpo_edits"}
    assert parts["export"]["rc"] == 0 and parts["export"]["max_abs_logit_diff"] < 1e-5


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is here")
    p = subprocess.run([sys.executable, "-m", "machinery.gpu_check", f"--out={tmp_path}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode != 0 and p.stderr.strip().splitlines() == [
        "error: no CUDA GPU here; machinery.gpu_check measures one (--smoke runs at test scale on the CPU)"]
