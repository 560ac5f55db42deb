"""
The configuration of a run and its command line. The dataclasses are the single source of
truth: one per concern (Config here for the pipeline; data.WorldConfig, reward.RMConfig,
ppo.PPOConfig, dpo.DPOConfig beside the code they configure); presets are data; the parser and `--help`
are generated from the fields, their types and their comments. Each method's tuned PPO
settings (TUNED), the grid of a --sweep (sweep_grid) and the check that an output folder
holds a run of the same config (prepare_out) live here too.

    python train.py --help                         # every flag, by section, with its default
    python train.py --preset=tiny --beta=0.1       # --key=value ...
    python train.py --preset tiny --beta 0.1       # ... or --key value
"""

import argparse
import dataclasses
import glob
import inspect
import itertools
import json
import os
import re
import shutil
import sys
from dataclasses import dataclass

import data
import dpo
import ppo
import reward

# -----------------------------------------------------------------------------
# Config: one dataclass for the pipeline; the world, reward models and PPO have their own.


@dataclass
class Config:
    out: str = "out"             # output directory of every stage
    seed: int = 1337
    device: str = "auto"         # auto = cuda -> mps -> cpu
    # corpus and tokenizer
    n_sft: int = 20000           # (prompt, noisy response) examples in the SFT corpus
    vocab_size: int = 512        # of the trained BPE, specials included
    init: str = ""               # a GPT-2 checkpoint directory to start from: its weights, sizes and
                                 # encoding replace n_layer, n_head, n_embd, vocab_size (docs/real-data.md)
    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 160        # prompt + response; the longest toy answers are ~110 tokens
    # SFT
    sft_steps: int = 600
    sft_batch: int = 64
    sft_lr: float = 3e-3
    warmup: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_new_tokens: int = 110    # response length limit when sampling
    n_judge: int = 500           # SFT samples judged (sft/metrics.json) and used to fit reward scales
    # preference data: the annotation budget, the same for every method
    n_pairs: int = 1000
    data: str = ""               # your own preference JSONL instead of the toy world (docs/real-data.md)
    # RL and evaluation
    methods: str = "ppo,fg_ppo,ppo_edits"  # comma-separated; also fg_ppo_seq, oracle_ppo, oracle_fg, rloo, rloo_fg,
                                           # dpo, dpo_edits
    seeds: int = 1               # reward-model and PPO seeds (SFT and preference data are shared)
    n_eval: int = 500            # evaluation prompts, drawn with their own seed
    k_ref: int = 4               # SFT reference samples per evaluation prompt
    n_curve: int = 100           # prompts for the learning curves during PPO
    eval_every: int = 10         # PPO iterations between learning-curve points
    ckpt_every: int = 5          # PPO iterations between checkpoints
    stop_after: int = 0          # stop each PPO run after this many iterations (0: never); to test resuming
    # processes and threads (results are bit-for-bit the same for the same threads per process)
    jobs: int = 0                # worker processes for the independent RM and PPO runs (0: a CPU core each; 1 on a GPU)
    threads: int = 0             # torch threads per process (0: OMP_NUM_THREADS if set, else the cores shared by the jobs)
    sweep: str = ""              # "key:v1,v2 key2:v1,v2 ..." runs the pipeline once per point of the
                                 # grid (train.sweep): the tuning grid, a beta frontier, an ablation


SECTIONS = [Config, data.WorldConfig, reward.RMConfig, ppo.PPOConfig, dpo.DPOConfig]
PRESETS = {
    "default": {},
    # the first run: fine-grained PPO against PPO on the default model, with a third of its data
    # and budgets (docs/results.md: "The quick run")
    "quick": dict(methods="ppo,fg_ppo", sft_steps=300, n_judge=200, n_pairs=500, rm_steps=150, ppo_iters=50,
                  n_eval=200, k_ref=2, n_curve=50),
    "tiny": dict(n_sft=3000, n_layer=2, n_head=2, n_embd=64, sft_steps=400, sft_batch=32,
                 sft_lr=1e-2, warmup=20, n_judge=100, n_pairs=150, rm_steps=40, ppo_iters=6,
                 rollout_batch=32, minibatch=16, n_eval=100, k_ref=2, n_curve=32, eval_every=3,
                 dpo_steps=0),  # DPO: PPO's policy steps at this scale, not the default preset's tuned ones
    "gpu": dict(n_sft=50000, n_layer=6, n_head=6, n_embd=384, sft_steps=3000, sft_batch=128,
                sft_lr=1e-3, warmup=200),
}
# Each method's PPO settings (DPOConfig fields for dpo, dpo_edits), chosen by the tuning protocol
# of docs/results.md ("A fair comparison"): the same grid for every method (ppo_lr {1e-5, 3e-5} x lam
# {0.95, 1} x beta {0.02, 0.05}, 80 iterations) on tuning seed 7, never reported; the best win
# rate on its 500 evaluation prompts. DPO's grid: dpo_lr {5e-6, 2e-5} x beta_dpo {0.1, 0.5} x
# dpo_steps {64, 192}, whose best sat at its corner (and beta_dpo hardly mattered), extended by
# dpo_lr {2e-5, 4e-5} x dpo_steps {192, 384}: 11 settings on the same seed. RLOO's grid is PPO's
# with rloo_k {2, 4} in place of lam, which it does not use.
# They sit between the dataclass defaults and the preset's keys (a preset names a scale: its
# budgets win), and then the flags: a flag given on the command line applies to every
# method. Methods not listed were not tuned and run with the flat settings. results.json
# records what each method ran with (config["settings_by_method"]).
TUNED = {"ppo": dict(ppo_lr=1e-5, lam=1.0, beta=0.02),
         "fg_ppo": dict(ppo_lr=3e-5, lam=0.95, beta=0.05),
         "fg_ppo_seq": dict(ppo_lr=3e-5, lam=0.95, beta=0.05, seq_weight=1.0),  # fg_ppo's, and seq_weight {0.5, 1, 2}
                                                                               # on seed 7 (docs/results.md: KL budgets)
         "ppo_edits": dict(ppo_lr=1e-5, lam=1.0, beta=0.02),
         "oracle_ppo": dict(ppo_lr=3e-5, lam=1.0, beta=0.05),
         "oracle_fg": dict(ppo_lr=3e-5, lam=0.95, beta=0.05),
         "rloo": dict(ppo_lr=1e-5, beta=0.02, rloo_k=4),
         "rloo_fg": dict(ppo_lr=3e-5, beta=0.02, rloo_k=4),
         "dpo": dict(dpo_lr=2e-5, beta_dpo=0.1, dpo_steps=384),
         "dpo_edits": dict(dpo_lr=2e-5, beta_dpo=0.1, dpo_steps=192)}
SHOWN_PPO, SHOWN_DPO = ["ppo_iters", "ppo_lr", "lam", "beta", "rloo_k", "seq_weight"], ["dpo_steps", "dpo_lr", "beta_dpo"]  # settings_table
CHOICES = {"device": ["auto", "cpu", "cuda", "mps"], "rm_scheme": list(reward.SCHEMES)}
MINIMUM = {"seed": None, "warmup": 0, "vf_warmup": 0, "stop_after": 0, "n_judge": 2, "jobs": 0, "threads": 0,
           "rloo_k": 2, "dpo_steps": 0}  # other ints: >= 1


def field_comments(cls):
    """({field: its trailing comment, continuation lines included}, {field: the section it sits
    in}) of a config dataclass: the --help text. A comment on a line of its own, at the fields'
    indentation, heads a section; one indented further continues the comment above it."""
    comments, sections, name, section = {}, {}, None, ""
    for line in inspect.getsource(cls).splitlines():
        indent = len(line) - len(line.lstrip())
        if m := re.match(r"\s+(\w+): [^#]*#?\s*(.*)$", line):
            name, field_indent, comments[m[1]], sections[m[1]] = m[1], indent, m[2], section
        elif name and line.strip().startswith("#") and indent > field_indent:
            comments[name] += " " + line.strip("# ")
        elif name and line.strip().startswith("#"):
            name, section = None, line.strip("# ")
    return comments, sections


def tuned_note(field):
    """What config.TUNED sets a field to, per method, for its --help."""
    per = [f"{m} {t[field]:g}" if isinstance(t[field], float) else f"{m} {t[field]}"
           for m, t in TUNED.items() if field in t]
    return f"; tuned per method (config.TUNED): {', '.join(per)}" if per else ""


def shown_settings(m):
    """The settings of SHOWN_PPO or SHOWN_DPO that method m runs with: DPO has its own; RLOO has
    no lam, and only RLOO an rloo_k; only a method that adds two rewards a seq_weight."""
    method = reward.METHODS[m]
    if method.algo == "dpo":
        return list(SHOWN_DPO)
    return [k for k in SHOWN_PPO if (k != "rloo_k" or method.algo == "rloo") and (k != "lam" or method.algo == "ppo")
            and (k != "seq_weight" or "+" in method.reward)]


def settings_table(rows):
    """Markdown lines: each method's algorithm, what it learns from, and the settings it runs
    with, from rows {method: {setting: value}} (its PPOConfig's or DPOConfig's fields)."""
    used = lambda m, k: k in shown_settings(m)
    keys = [k for k in SHOWN_PPO + SHOWN_DPO if any(used(m, k) for m in rows)]
    lines = ["| method | algorithm | learns from | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 3) + "|"]
    for m, r in rows.items():
        method = reward.METHODS[m]
        source = " + ".join(f"{r} RM" for r in method.rms) or method.reward or f"{method.better} > rejected"
        cells = [f"{r[k]:g}" if used(m, k) else "-" for k in keys]
        lines.append(f"| {m} | {method.algo} | {source}{', dense' if method.dense else ''} | " + " | ".join(cells) + " |")
    return lines


def flag_type(name, typ):
    """How a flag's text becomes a field's value: its type, ints at least MINIMUM (1 unless
    listed), a value of CHOICES, methods checked against reward.METHODS."""
    def parse(s):
        try:
            v = typ(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not a valid {typ.__name__}") from None
        lo = MINIMUM.get(name, 1) if typ is int else None
        if lo is not None and v < lo:
            raise argparse.ArgumentTypeError(f"--{name}={s} must be at least {lo}")
        if name in CHOICES and v not in CHOICES[name]:
            raise argparse.ArgumentTypeError(f"{s!r} is not allowed; allowed values: {', '.join(CHOICES[name])}")
        bad = [m for m in v.split(",") if m not in reward.METHODS] if name == "methods" else []
        if bad:
            raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(bad)}; allowed: {', '.join(reward.METHODS)}")
        return v
    return parse


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and a non-zero exit, instead of usage + message
        if message.startswith("unrecognized") or "expected one argument" in message:
            message += ("; flags are --key=value or --key value; valid keys: --preset, --force, "
                        + ", ".join(f"--{f.name}" for c in SECTIONS for f in dataclasses.fields(c)))
        sys.exit(f"error: {message}")


def parse_args(argv):
    """Flags onto the fields of SECTIONS, on top of --preset (default: default).
    Returns ({section class: instance}, force, preset)."""
    p = Parser(usage="python train.py [--preset=NAME] [--force] [--key=value | --key value ...]",
               description="Fine-grained RLHF from minimal edits: the whole pipeline. A flag applies to every "
                           "method, in place of a method's tuned setting (config.TUNED); a run prints the "
                           "settings each method runs with, and results.md tables them.", allow_abbrev=False)
    p.add_argument("--preset", default="default", choices=list(PRESETS),
                   help="default: the experiment (the dataclass defaults); quick: the first run, ppo against "
                        "fg_ppo in about 4.5 minutes on 2 cores; tiny: for tests; gpu: one CUDA GPU (the keys each "
                        "sets: config.PRESETS)")
    p.add_argument("--force", action="store_true", help="delete this folder's outputs and redo every stage")
    for cls in SECTIONS:
        comments, sections = field_comments(cls)
        groups = {s: p.add_argument_group(f"{cls.__name__}: {s}" if s else cls.__name__)
                  for s in dict.fromkeys(sections.values())}
        for f in dataclasses.fields(cls):
            groups[sections[f.name]].add_argument(
                f"--{f.name}", type=flag_type(f.name, type(f.default)),
                metavar="{" + ",".join(CHOICES[f.name]) + "}" if f.name in CHOICES else type(f.default).__name__.upper(),
                help=f"{comments[f.name]} (default: {f.default!r}{tuned_note(f.name)})".strip())
    args = vars(p.parse_args(argv))
    force, preset = args.pop("force"), args.pop("preset")
    given = {**PRESETS[preset], **{k: v for k, v in args.items() if v is not None}}  # the preset's keys, then the flags
    cfgs = {cls: make(cls, given) for cls in SECTIONS}
    if cfgs[Config].max_new_tokens >= cfgs[Config].block_size:
        sys.exit("error: --max_new_tokens must be smaller than --block_size (the prompt needs room)")
    settings = by_method(cfgs, given)
    check_rloo(cfgs[Config].methods, settings)
    return cfgs, settings, force, preset


def check_rloo(methods, settings):
    """One line and an exit where an RLOO method's rollout_batch is not a multiple of its
    rloo_k: it samples as many responses as PPO, rollout_batch / rloo_k prompts rloo_k times."""
    for m in (m for m in methods.split(",") if reward.METHODS[m].algo == "rloo"):
        if settings[m].rollout_batch % settings[m].rloo_k:
            sys.exit(f"error: {m}: --rollout_batch={settings[m].rollout_batch} must be a multiple of "
                     f"--rloo_k={settings[m].rloo_k}")


def make(cls, values):
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def by_method(cfgs, given):
    """{method: its settings}: the PPOConfig (ppo, rloo) or DPOConfig (dpo) of cfgs (preset and
    flags) with the method's TUNED settings, except those given (by the preset or as flags)."""
    return {m: dataclasses.replace(cfgs[dpo.DPOConfig if method.algo == "dpo" else ppo.PPOConfig],
                                   **{k: v for k, v in TUNED.get(m, {}).items() if k not in given})
            for m, method in reward.METHODS.items()}


# -----------------------------------------------------------------------------
# The config an output folder was made with

OUTPUTS = ["sft", "prefs", "prefs.jsonl", "rm", "policies", "eval", "tokenizer.tiktoken", "config.json",
           "results.json", "results.md", "ppo_diagnostics.png", "learning_curves.png", "token_rewards.html"]
UNCHECKED = {"out", "device", "seeds", "stop_after", "methods", "sweep", "jobs", "threads"}  # may change between runs of the same folder


def prepare_out(out, config, force):
    """--force empties the folder of a run's outputs; otherwise a folder holding a run with
    another config is refused. Then config.json records this run's config."""
    os.makedirs(out, exist_ok=True)
    cpath = os.path.join(out, "config.json")
    if force:
        for name in OUTPUTS:
            p = os.path.join(out, name)
            shutil.rmtree(p) if os.path.isdir(p) else os.remove(p) if os.path.exists(p) else None
    elif os.path.exists(cpath):
        old = json.load(open(cpath))
        # a key the folder's config lacks did not exist when it ran; tuned settings are compared
        # for the methods that have a run in the folder (the others' may change freely)
        ran = {os.path.basename(p).rsplit("_seed", 1)[0] for p in glob.glob(os.path.join(out, "policies", "*_seed*"))}
        same = {"settings_by_method": lambda a, b: all(a.get(m, {}) == b.get(m, {}) for m in ran)}
        changed = [k for k in config if k not in UNCHECKED and k in old
                   and not same.get(k, lambda a, b: a == b)(old[k], config[k])]
        if changed:
            sys.exit(f"error: {out} holds a run with a different config ("
                     + ", ".join(f"{k}: {old.get(k)!r} -> {config[k]!r}" for k in changed)
                     + "); use another --out, or --force to start over")
    data.write_json(config, cpath)


def sweep_grid(cfgs, settings):
    """The points of --sweep="key:v1,v2 key2:v1,v2 ...": [(name, cfgs, settings)] of the grid,
    name like "lam=1,beta=0.05"; the swept keys are set like flags (for every method). One
    line and an exit on a key that changes SFT (a sweep shares its SFT model) or a bad value."""
    sft_keys = {f.name for c in (Config, data.WorldConfig) for f in dataclasses.fields(c)} - {
        "n_pairs", "methods", "seeds", "n_curve", "eval_every", "ckpt_every", "stop_after", "jobs", "threads",
        "p_annotator_miss"}
    axes = []
    for item in cfgs[Config].sweep.split():
        key, _, text = item.partition(":")
        texts = [v for v in text.split(",") if v]
        section = next((c for c in SECTIONS if key in {f.name for f in dataclasses.fields(c)}), None)
        if section is None or key in sft_keys or not texts:
            sys.exit(f"error: --sweep=\"key:v1,v2 ...\" with keys that leave SFT alone (not {', '.join(sorted(sft_keys))})")
        try:
            axes.append([(section, key, t, flag_type(key, type(getattr(cfgs[section], key)))(t)) for t in texts])
        except argparse.ArgumentTypeError as e:
            sys.exit(f"error: --sweep={cfgs[Config].sweep}: {e}")
    points = []
    for combo in itertools.product(*axes):
        one, name = dict(cfgs), ",".join(f"{key}={t}" for _, key, t, _ in combo)
        for section, key, _, v in combo:
            one[section] = dataclasses.replace(one[section], **{key: v})
        one[Config] = dataclasses.replace(one[Config], out=os.path.join(cfgs[Config].out, name), sweep="")
        points.append((name, one, {m: dataclasses.replace(sc, **{key: v for section, key, _, v in combo
                                                                  if isinstance(sc, section)}) for m, sc in settings.items()}))
        check_rloo(cfgs[Config].methods, points[-1][2])  # a swept rloo_k or rollout_batch, point by point
    return points
