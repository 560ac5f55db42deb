"""Tests for config.py: flags onto the dataclasses (both --key=value and --key value), presets,
types, bounds and choices, one-line errors, and --help generated from the fields."""
import dataclasses
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_args_types_sections_and_presets():
    """--key=value lands on the right dataclass with the right type, on top of the preset."""
    cfgs, force, preset = config.parse_args(["--preset=tiny", "--n_layer=3", "--sft_lr=1", "--beta=0.5",
                                            "--methods=ppo,fg_ppo", "--rm_center=false", "--p_wrong=0.5",
                                            "--rm_steps=7", "--force"])
    cfg, world, rmc, pc = (cfgs[c] for c in (config.Config, data.WorldConfig, reward.RMConfig, ppo.PPOConfig))
    assert force is True and preset == "tiny"
    assert cfg.n_layer == 3 and type(cfg.n_layer) is int
    assert cfg.sft_lr == 1.0 and type(cfg.sft_lr) is float
    assert cfg.methods == "ppo,fg_ppo" and type(cfg.methods) is str
    assert pc.beta == 0.5 and type(pc.beta) is float
    assert rmc.rm_center is False and rmc.rm_steps == 7
    assert world.p_wrong == 0.5
    # the rest of the tiny preset, in whichever section each key lives
    tiny = config.PRESETS["tiny"]
    assert cfg.n_embd == tiny["n_embd"] and cfg.sft_steps == tiny["sft_steps"] and cfg.n_sft == tiny["n_sft"]
    assert pc.ppo_iters == tiny["ppo_iters"] and pc.rollout_batch == tiny["rollout_batch"]
    # untouched keys keep the dataclass defaults
    assert pc.ppo_lr == ppo.PPOConfig().ppo_lr and world.p_rude == data.WorldConfig().p_rude
    for s, v in [("true", True), ("1", True), ("False", False), ("0", False)]:
        assert config.parse_args([f"--rm_center={s}"])[0][reward.RMConfig].rm_center is v


def test_parse_args_defaults_and_errors():
    """No flags gives every dataclass's defaults and no force; bad values exit with the expected type."""
    cfgs, force, preset = config.parse_args([])
    assert force is False and preset == "default"
    for cls in config.SECTIONS:
        assert cfgs[cls] == cls()
    for flag, word in [("--n_layer=2.5", "int"), ("--rm_center=maybe", "bool"), ("--beta=abc", "float"),
                       ("n_layer=2", "--key=value"), ("--n_layer", "--key=value")]:
        with pytest.raises(SystemExit) as e:
            config.parse_args([flag])
        assert word in str(e.value.code), (flag, e.value.code)


def test_space_separated_flags_equal_the_equals_form():
    """--key value and --preset tiny parse exactly like --key=value and --preset=tiny."""
    a = config.parse_args(["--preset", "tiny", "--beta", "0.5", "--rm_center", "false", "--force"])
    b = config.parse_args(["--preset=tiny", "--beta=0.5", "--rm_center=false", "--force"])
    assert a == b and a[0][ppo.PPOConfig].beta == 0.5 and a[2] == "tiny"


@pytest.mark.parametrize("flag, words", [
    ("--seeds=0", ["--seeds=0 must be at least 1"]),
    ("--n_judge=1", ["--n_judge=1 must be at least 2"]),
    ("--device=tpu", ["--device", "tpu", "auto", "cpu", "cuda", "mps"]),
    ("--rm_scheme=xyz", ["--rm_scheme", "bad_vs_rest", "paper"]),
    ("--methods=ppo,nope", ["nope", "fg_ppo", "oracle_fg"]),
    ("--max_new_tokens=500", ["--max_new_tokens must be smaller than --block_size"]),
    ("--bet=0.1", ["--bet=0.1", "valid keys", "--beta"]),  # no abbreviations
])
def test_bad_values_exit_with_one_line(flag, words):
    """Bounds, choices and unknown keys each give one line naming what is allowed."""
    with pytest.raises(SystemExit) as e:
        config.parse_args([flag])
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg, msg
    for w in words:
        assert w in msg, (w, msg)


def test_stop_after_and_warmup_may_be_zero():
    """The few int fields with a lower bound other than 1 accept it."""
    cfgs, _, _ = config.parse_args(["--stop_after=0", "--warmup=0", "--seed=-3"])
    assert cfgs[config.Config].stop_after == 0 and cfgs[config.Config].warmup == 0 and cfgs[config.Config].seed == -3


def test_help_lists_every_field_by_section_with_default_and_comment():
    """python train.py --help exits 0 and shows each section, each flag, its default and its comment."""
    p = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = " ".join(p.stdout.split())  # argparse wraps lines
    for cls in config.SECTIONS:
        assert f"{cls.__name__}:" in text, cls.__name__
        for f in dataclasses.fields(cls):
            assert f"--{f.name}" in text, f.name
    assert "--beta FLOAT weight of the per-token KL penalty to the SFT reference (default: 0.05)" in text
    assert "class weight of \"bad\" in the token loss; 1 keeps p(bad) calibrated" in text  # a comment on two lines
    assert "--preset {default,tiny,gpu}" in text
