"""Tests for config.py: flags onto the dataclasses (both --key=value and --key value), presets,
types, bounds and choices, one-line errors, and --help generated from the fields."""
import dataclasses
import inspect
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import config  # noqa: E402
import data  # noqa: E402
import dpo  # noqa: E402
import ppo  # noqa: E402
import reward  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_args_types_sections_and_presets():
    """--key=value lands on the right dataclass with the right type, on top of the preset."""
    cfgs, _, force, preset = config.parse_args(["--preset=tiny", "--n_layer=3", "--sft_lr=1", "--beta=0.5",
                                               "--methods=ppo,fg_ppo", "--p_wrong=0.5", "--rm_steps=7", "--force"])
    cfg, world, rmc, pc = (cfgs[c] for c in (config.Config, data.WorldConfig, reward.RMConfig, ppo.PPOConfig))
    assert force is True and preset == "tiny"
    assert cfg.n_layer == 3 and type(cfg.n_layer) is int
    assert cfg.sft_lr == 1.0 and type(cfg.sft_lr) is float
    assert cfg.methods == "ppo,fg_ppo" and type(cfg.methods) is str
    assert pc.beta == 0.5 and type(pc.beta) is float
    assert rmc.rm_steps == 7
    assert world.p_wrong == 0.5
    # the rest of the tiny preset, in whichever section each key lives
    tiny = config.PRESETS["tiny"]
    assert cfg.n_embd == tiny["n_embd"] and cfg.sft_steps == tiny["sft_steps"] and cfg.n_sft == tiny["n_sft"]
    assert pc.ppo_iters == tiny["ppo_iters"] and pc.rollout_batch == tiny["rollout_batch"]
    # untouched keys keep the dataclass defaults
    assert pc.ppo_lr == ppo.PPOConfig().ppo_lr and world.p_rude == data.WorldConfig().p_rude


def test_parse_args_defaults_and_errors():
    """No flags gives every dataclass's defaults and no force; bad values exit with the expected type."""
    cfgs, _, force, preset = config.parse_args([])
    assert force is False and preset == "default"
    for cls in config.SECTIONS:
        assert cfgs[cls] == cls()
    for flag, word in [("--n_layer=2.5", "int"), ("--beta=abc", "float"),
                       ("n_layer=2", "--key=value"), ("--n_layer", "--key=value")]:
        with pytest.raises(SystemExit) as e:
            config.parse_args([flag])
        assert word in str(e.value.code), (flag, e.value.code)


def test_space_separated_flags_equal_the_equals_form():
    """--key value and --preset tiny parse exactly like --key=value and --preset=tiny."""
    a = config.parse_args(["--preset", "tiny", "--beta", "0.5", "--rm_scheme", "bad_neutral_good", "--force"])
    b = config.parse_args(["--preset=tiny", "--beta=0.5", "--rm_scheme=bad_neutral_good", "--force"])
    assert a == b and a[0][ppo.PPOConfig].beta == 0.5 and a[3] == "tiny"


@pytest.mark.parametrize("flag, words", [
    ("--seeds=0", ["--seeds=0 must be at least 1"]),
    ("--n_judge=1", ["--n_judge=1 must be at least 2"]),
    ("--device=tpu", ["--device", "tpu", "auto", "cpu", "cuda", "mps"]),
    ("--rm_scheme=xyz", ["--rm_scheme", "bad_vs_rest", "bad_neutral_good"]),
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


def test_tuned_settings_per_method_and_flags_override_them(monkeypatch):
    """Each method runs with its TUNED settings on top of the preset; a flag given on the
    command line wins for every method; a method without tuned settings keeps the flat ones."""
    monkeypatch.setattr(config, "TUNED", {"ppo": {"lam": 1.0, "beta": 0.1}, "fg_ppo": {"ppo_lr": 7e-5}})
    cfgs, pcs, _, _ = config.parse_args(["--preset=tiny", "--beta=0.02"])
    assert set(pcs) == set(reward.METHODS)
    assert pcs["ppo"].lam == 1.0 and pcs["ppo"].beta == 0.02  # beta was a flag
    assert pcs["fg_ppo"].ppo_lr == 7e-5 and pcs["fg_ppo"].lam == ppo.PPOConfig().lam
    assert pcs["ppo_edits"] == cfgs[ppo.PPOConfig] and pcs["ppo"].ppo_iters == config.PRESETS["tiny"]["ppo_iters"]
    # a key the preset sets is its scale's, and beats TUNED (tiny's DPO budget: PPO's policy steps)
    monkeypatch.setattr(config, "TUNED", {"dpo": {"dpo_steps": 384, "dpo_lr": 3e-5}})
    _, pcs, _, _ = config.parse_args(["--preset=tiny"])
    assert pcs["dpo"].dpo_steps == 0 and pcs["dpo"].dpo_lr == 3e-5
    _, pcs, _, _ = config.parse_args([])
    assert pcs["dpo"].dpo_steps == 384


def test_each_method_gets_its_algorithms_settings_and_rloo_sizes_are_checked(monkeypatch):
    """dpo and dpo_edits get a DPOConfig (TUNED may hold its fields), the others a PPOConfig;
    a sweep key of one section reaches only the methods it configures; RLOO needs
    rollout_batch to be a multiple of rloo_k (>= 2), else one line."""
    monkeypatch.setattr(config, "TUNED", {"dpo": {"beta_dpo": 0.3}})
    cfgs, pcs, _, _ = config.parse_args(["--preset=tiny", "--dpo_lr=1e-4", "--sweep=beta_dpo:0.2 beta:0.1"])
    assert pcs["dpo"] == dpo.DPOConfig(beta_dpo=0.3, dpo_lr=1e-4) and pcs["dpo_edits"].beta_dpo == 0.1
    assert isinstance(pcs["rloo"], ppo.PPOConfig) and pcs["rloo_fg"].rloo_k == 4
    (_, _, one_pcs), = config.sweep_grid(cfgs, pcs)
    assert one_pcs["dpo"].beta_dpo == 0.2 and one_pcs["ppo"].beta == 0.1 and one_pcs["rloo"].beta == 0.1
    for argv, words in ((["--methods=ppo,rloo", "--rollout_batch=10"], ["rloo", "--rollout_batch=10", "--rloo_k=4"]),
                        (["--rloo_k=1"], ["--rloo_k=1 must be at least 2"])):
        with pytest.raises(SystemExit) as e:
            config.parse_args(argv)
        assert "\n" not in str(e.value.code) and all(w in str(e.value.code) for w in words), e.value.code
    cfgs, pcs, _, _ = config.parse_args(["--methods=rloo", "--sweep=rloo_k:2,3"])  # 64 responses: k = 3 does not divide
    with pytest.raises(SystemExit, match="--rollout_batch=64 must be a multiple of --rloo_k=3"):
        config.sweep_grid(cfgs, pcs)


def test_sweep_grid_points():
    """--sweep="lam:0.9,1 beta:0.01,0.1,0.2" is the 6 points of the grid, each in its own folder,
    the swept keys set for every method; a key that changes SFT is refused in one line."""
    cfgs, pcs, _, _ = config.parse_args(["--out=o", "--sweep=lam:0.9,1 beta:0.01,0.1,0.2"])
    points = config.sweep_grid(cfgs, pcs)
    assert [n for n, _, _ in points] == [f"lam={a},beta={b}" for a in ("0.9", "1") for b in ("0.01", "0.1", "0.2")]
    name, one, one_pcs = points[4]
    assert one[config.Config].out == os.path.join("o", name) and one[config.Config].sweep == ""
    assert one[ppo.PPOConfig].lam == 1.0 and all(pc.lam == 1.0 and pc.beta == 0.1 for pc in one_pcs.values()
                                                 if isinstance(pc, ppo.PPOConfig))
    for bad in ("n_layer:2,3", "beta:abc", "nope:1"):
        cfgs, pcs, _, _ = config.parse_args([f"--sweep={bad}"])
        with pytest.raises(SystemExit) as e:
            config.sweep_grid(cfgs, pcs)
        assert str(e.value.code).startswith("error:") and "\n" not in str(e.value.code)


def test_stop_after_and_warmup_may_be_zero():
    """The few int fields with a lower bound other than 1 accept it."""
    cfgs, _, _, _ = config.parse_args(["--stop_after=0", "--warmup=0", "--seed=-3"])
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
    assert "--beta FLOAT weight of the per-token KL penalty to the SFT reference (default: 0.05;" in text
    assert "class weight of \"bad\" in the token loss; 1 keeps p(bad) calibrated" in text  # a comment on two lines
    assert "--preset {default,quick,tiny,gpu}" in text


def test_prepare_out_passes_new_keys_and_settings_of_methods_not_run(tmp_path):
    """A folder's config.json without a key that was added since passes, as do new tuned
    settings of methods with no run in the folder; a changed value, or a changed setting of a
    method that has a run there (policies/<method>_seed*), is refused."""
    out = str(tmp_path)
    os.makedirs(os.path.join(out, "policies"))
    open(os.path.join(out, "policies", "ppo_seed1.pt"), "w").close()
    old = {"beta": 0.05, "settings_by_method": {"ppo": {"lam": 1.0}}}
    config.data.write_json(old, os.path.join(out, "config.json"))
    config.prepare_out(out, {**old, "rloo_k": 4, "settings_by_method": {"ppo": {"lam": 1.0}, "rloo": {"lam": 0.9}}}, False)
    for changed in ({"beta": 0.1}, {"settings_by_method": {"ppo": {"lam": 0.95}}}, {"settings_by_method": {}}):
        config.data.write_json(old, os.path.join(out, "config.json"))
        with pytest.raises(SystemExit, match=next(iter(changed))):
            config.prepare_out(out, {**old, **changed}, False)


def test_help_keeps_section_comments_out_of_the_fields_help():
    """A comment on a line of its own heads a section of --help, and never ends up in the help of
    the field above it; the flags config.TUNED sets say so, with each method's value."""
    text = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True).stdout
    flat, all_heads = " ".join(text.split()), []
    for cls in config.SECTIONS:
        src = inspect.getsource(cls).splitlines()
        heads = [ln.strip("# ").strip() for ln in src if ln.strip().startswith("#") and ln.index("#") == 4]
        all_heads += heads
        comments, sections = config.field_comments(cls)
        assert set(sections) == {f.name for f in dataclasses.fields(cls)}
        for head in heads:
            assert not any(c.endswith(" " + head) for c in comments.values()), head  # the old bug appended it
            assert f"{cls.__name__}: {head}:" in text, head  # the section's group in --help
    assert all_heads and "--device {auto,cpu,cuda,mps} auto = cuda -> mps -> cpu (default: 'auto')" in flat
    assert "tuned per method (config.TUNED): ppo 1e-05, fg_ppo 3e-05" in flat
    assert "{'" not in text  # no dict dumped for --preset
