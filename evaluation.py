"""
Evaluation: how good a policy is, and how good a reward model is.

- Win rate against the SFT model: each policy sample is compared with K fixed SFT samples
  of the same prompt under the world's judge (win 1, tie 0.5, loss 0), on an evaluation
  set drawn with its own seed; 95% CIs by a bootstrap over seeds and then prompts, paired
  when two methods are compared on the same seeds and prompts. Beside it the judge's error
  rates and the KL to the SFT model, on the same samples.
- Reward-model diagnostics: held-out pairwise accuracy, and with a gold judge the
  fact-flip accuracy (a correct answer against the same answer with one value changed),
  Spearman against the judge, and the token RM's bad-class recall per error type.

Stage 5 of `python train.py` evaluates each finished policy here; machinery/report.py writes
the files a reader looks at (results.json, results.md, plots).
"""

import copy
import json
import os
import random
import time

import torch

import data
import reward
from model import GPT, token_logprobs

# -----------------------------------------------------------------------------
# Statistics


def bootstrap_ci(x, n_boot=2000, seed=0):
    """95% CI of the mean of x (S seeds, P prompts), resampling seeds and then prompts, so
    that both sources of variance are in the interval (with one seed: prompts only)."""
    x = torch.as_tensor(x, dtype=torch.float64)  # (S, P)
    g = torch.Generator().manual_seed(seed)
    S, P = x.shape
    si = torch.randint(S, (n_boot, S, 1), generator=g)
    pi = torch.randint(P, (n_boot, 1, P), generator=g)
    means = x[si, pi].mean((1, 2))  # (n_boot,)
    return [means.quantile(0.025).item(), means.quantile(0.975).item()]


def pooled(wins):
    """(mean, 95% CI) of per-seed lists of per-prompt values (S seeds, P prompts): a win rate."""
    return sum(map(sum, wins)) / sum(map(len, wins)), bootstrap_ci(wins)


def paired(wins_a, wins_b):
    """pooled() of a - b, prompt by prompt within each seed: the same seeds and prompts, in order."""
    return pooled([[x - y for x, y in zip(u, v)] for u, v in zip(wins_a, wins_b)])


def prf(pred, gold, k):
    """Precision, recall and F1 of class k."""
    tp = ((pred == k) & (gold == k)).sum().item()
    p = tp / max((pred == k).sum().item(), 1)
    r = tp / max((gold == k).sum().item(), 1)
    return {"precision": p, "recall": r, "f1": 2 * p * r / max(p + r, 1e-12)}


def spearman(x, y):
    """Spearman's rank correlation, ties given their average rank."""
    def ranks(v):
        v = torch.as_tensor(v, dtype=torch.float64)
        order = v.argsort()
        r = torch.empty_like(v)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for u in v.unique():  # average the ranks of ties
            r[v == u] = r[v == u].mean()
        return r
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return (rx * ry).sum().item() / max((rx.norm() * ry.norm()).item(), 1e-12)


# -----------------------------------------------------------------------------
# Win rate against the SFT model

EVAL_BATCH = 256  # prompts sampled at once: small models are overhead-bound, so a big batch is faster

def eval_set(path, world, chat, sft_path, cfg, device):
    """Evaluation prompts (their own seed) with K judged SFT reference samples each; cached at path."""
    if os.path.exists(path):
        return json.load(open(path))
    rng = random.Random(cfg.seed + 1000)
    prompts = [world.eval_prompt(rng) for _ in range(cfg.n_eval)]
    sft = GPT.from_checkpoint(sft_path, device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed + 1000)
    refs = [chat.sample(sft, prompts, gen, batch=EVAL_BATCH) for _ in range(cfg.k_ref)]
    out = {"prompts": prompts, "refs": refs, "ref_scores": [world.scores(prompts, rs) for rs in refs]}
    data.write_json(out, path)
    return out


@torch.no_grad()
def evaluate(model, ev, world, chat, seed, n=None, ref=None):
    """Per-prompt win values against the K reference samples (win 1, tie 0.5, loss 0), the
    judge's error rates of the policy's samples (one per prompt, temperature 1), the samples,
    and with ref (the SFT model) the KL to it per response on these same samples,
    sum_t log pi(y_t) - log pi_ref(y_t) (ppo.py's k1; None without ref)."""
    prompts = ev["prompts"][:n]
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    responses, kl = [], 0.0
    for idx, resp, logp in chat.generate(model, prompts, gen, batch=EVAL_BATCH):  # logp (B, T) of the sampled tokens
        responses += chat.responses(idx, resp)
        if ref is not None:
            ref_logp = token_logprobs(ref(idx, real=(idx != chat.pad) | resp)[0], idx)  # (B, T)
            kl += torch.where(resp, logp - ref_logp, 0.0).sum().item()
    wins = []
    for i, s in enumerate(world.scores(prompts, responses)):
        refs = [rs[i] for rs in ev["ref_scores"]]
        wins.append(sum(1.0 if s > q else 0.5 if s == q else 0.0 for q in refs) / len(refs))
    return wins, sample_stats(world, chat, prompts, responses), responses, kl / len(prompts) if ref is not None else None


def curve(model, ev, world, chat, cfg, unit):
    """point(x) -> the learning-curve point of model at x, a PPO or RLOO "iter" or a DPO "step"
    (unit): the win rate and judge score on the first n_curve evaluation prompts."""
    def point(x):
        wins, rates, _, _ = evaluate(model, ev, world, chat, cfg.seed + 2000, cfg.n_curve)
        return {unit: x, "win_rate": sum(wins) / len(wins), "judge_score": rates["judge_score"]}
    return point


def sample_stats(world, chat, prompts, responses):
    """The judge's error rates of responses, and their mean length in tokens (eot included)."""
    return {**world.rates(prompts, responses), "mean_length": sum(map(len, map(chat.response, responses))) / len(responses)}


def final_eval(path, ppo_path, sft, ev, world, chat, seed, device):
    """Win values, error rates and KL to SFT of a finished policy (PPO, RLOO or DPO: the policy's
    weights of its checkpoint, on a copy of the SFT model sft) on the full evaluation set; cached at path."""
    if os.path.exists(path):
        return json.load(open(path))
    ck = torch.load(ppo_path, map_location=device, weights_only=True)
    policy = copy.deepcopy(sft).to(device)
    policy.load_state_dict(ck["policy"])
    t0 = time.perf_counter()
    wins, rates, responses, kl = evaluate(policy, ev, world, chat, seed, ref=sft)
    out = {"wins": wins, "rates": rates, "kl_eval": kl,
           "log": ck["log"], "curve": ck["curve"], "examples": responses[:8],
           "t_curve0": ck.get("t_curve0", 0.0), "t_warmup": ck.get("t_warmup", 0.0),
           "warmup_explained_var": ck.get("warmup_explained_var", []), "t_final_eval": time.perf_counter() - t0}
    data.write_json(out, path)
    return out


# -----------------------------------------------------------------------------
# Reward-model diagnostics, and what their training data looks like

def label_stats(enc, records):
    """What the preference data's edits look like (prefs/stats.json): the fraction of each
    label (-1/0/+1, as bad_neutral_good labels them) over all tokens, the mean token edit distance and the mean
    rejected-response length."""
    counts, dist, length = {-1: 0, 0: 0, 1: 0}, 0, 0
    edited = [r for r in records if "edited" in r]
    for r in edited:
        lo, le = reward.label_pair(enc, r["rejected"], r["edited"], "bad_neutral_good")
        for v in lo + le:
            counts[v] += 1
        dist += sum(v != 0 for v in lo + le)  # token edit distance = deleted + inserted tokens
        length += len(lo)
    n_tok, n = max(sum(counts.values()), 1), max(len(edited), 1)
    return {"label_fraction": {"-1": counts[-1] / n_tok, "0": counts[0] / n_tok, "+1": counts[1] / n_tok},
            "mean_edit_distance_tokens": dist / n, "mean_response_tokens": length / n}


def fact_flips(n, seed):
    """(prompt, correct answer, the same answer with one fact's value changed, the third of
    the answer the changed fact sits in: 0, 1, 2, or None for a one-fact answer) tuples."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        p = data.sample_prompt(rng)
        e, attrs = data.parse_prompt(p)
        a = rng.choice(attrs)
        wrong = rng.choice([v for v in data.VALUES[a] if v != data.KB[e][a]])
        good = data.ideal_response(p)
        out.append((p, good, good.replace(data.FACT[a].format(e=e, v=data.KB[e][a]), data.FACT[a].format(e=e, v=wrong)),
                    3 * attrs.index(a) // len(attrs) if len(attrs) > 1 else None))
    return out


def error_types(enc, record, labels):
    """For each bad-labelled token of a rejected response: the judge's category of the
    sentence it sits in, or "missing" for an omission mark (a bad label on a kept token)."""
    deleted, _ = reward.label_pair(enc, record["rejected"], record["edited"], "bad_neutral_good")
    text, offsets = enc.decode_with_offsets(enc.encode_ordinary(record["rejected"]))
    ends = offsets[1:] + [len(text)]  # a token's last character is at ends[i] - 1
    verdicts, _ = data.classify(record["prompt"], record["rejected"])
    types = []
    for i, v in enumerate(labels):
        if v != -1:
            types.append(None)
        elif deleted[i] != -1:
            types.append("missing")
        else:
            c = ends[i] - 1
            types.append(next((k for (s, t), k, _, _ in verdicts if s <= c < t), "unparseable"))
    return types


@torch.no_grad()
def token_metrics(trm, chat, val, scheme, gold, device, batch=32):
    """Held-out per-class precision/recall/F1 of the token RM; with a gold judge also the
    bad-class recall by error type (which errors the RM catches)."""
    vex = reward.rm_examples(chat, val, scheme)
    pred, true, by_type = [], [], {}
    for i in range(0, len(vex), batch):
        idx, real, cls = reward.token_batch(chat, [x for pair in vex[i:i + batch] for x in pair], device)
        p = trm(idx, real).argmax(-1)  # (B, T), rows 2k (rejected) and 2k+1 (edited) of pair i+k
        pred.append(p[cls != -1])
        true.append(cls[cls != -1])
        for k, r in enumerate(val[i:i + batch] if gold else []):  # the rejected responses
            labels, _ = reward.label_pair(chat.enc, r["rejected"], r["edited"], scheme)
            for t, h in zip(error_types(chat.enc, r, labels), p[2 * k][cls[2 * k] != -1].tolist()):
                if t is not None:
                    by_type.setdefault(t, []).append(h == 0)
    pred, true = torch.cat(pred), torch.cat(true)
    names = ["bad", "neutral", "good"] if scheme == "bad_neutral_good" else ["bad", "rest"]
    out = {"scheme": scheme, **{f"{n}_{k}": v for c, n in enumerate(names) for k, v in prf(pred, true, c).items()}}
    if gold:
        out["bad_recall_by_type"] = {t: sum(h) / len(h) for t, h in sorted(by_type.items())}
    return out


def rm_metrics(rms, norms, samples, val, world, chat, scheme, seed, device):
    """Metrics of every RM: held-out pairwise accuracy of the scores PPO sees; with a gold
    judge also fact-flip accuracy and Spearman against the judge on the SFT samples."""
    vp = [r["prompt"] for r in val]
    flips = fact_flips(300, seed + 7) if world.gold else []
    gold_sft = world.scores(samples["prompts"], samples["responses"]) if world.gold else None
    metrics = {}
    for name, rm in rms.items():
        def score(prompts, texts):  # what PPO sees, one number per response
            return [x - norms[name]["center"] for x in reward.response_scores(rm, chat, prompts, texts, device)]
        hi = score(vp, [r["chosen"] for r in val])
        lo = score(vp, [r["rejected"] for r in val])
        m = metrics[name] = {"pairwise_acc": sum(h > l for h, l in zip(hi, lo)) / len(val)}
        if world.gold:
            ok = [g > b for g, b in zip(score([f[0] for f in flips], [f[1] for f in flips]),
                                        score([f[0] for f in flips], [f[2] for f in flips]))]
            m["fact_flip_acc"] = sum(ok) / len(flips)
            for k, part in enumerate(("first", "middle", "last")):  # of a long answer: is an early fact weaker?
                hits = [h for h, f in zip(ok, flips) if f[3] == k]
                m[f"fact_flip_acc_{part}"] = sum(hits) / max(len(hits), 1)
            m["spearman_vs_judge"] = spearman(score(samples["prompts"], samples["responses"]), gold_sft)
    if "seq_edits" in rms:
        e = reward.response_scores(rms["seq_edits"], chat, vp, [r["edited"] for r in val], device)
        r = reward.response_scores(rms["seq_edits"], chat, vp, [r["rejected"] for r in val], device)
        metrics["seq_edits"]["pairwise_acc_edited_vs_rejected"] = sum(a > b for a, b in zip(e, r)) / len(val)
    if "token" in rms:
        metrics["token"].update(token_metrics(rms["token"], chat, val, scheme, world.gold, device))
    return metrics


def rm_lines(metrics, seed):
    """rm_metrics as log lines: each RM's figures, and which errors the token RM catches."""
    lines = [f"rm {name} seed {seed}: " + " | ".join(f"{k} {v:.3f}" for k, v in m.items() if isinstance(v, float))
             for name, m in metrics.items() if name != "norm"]
    if "bad_recall_by_type" in metrics.get("token", {}):
        lines.append("rm token bad recall by error type: " + " | ".join(
            f"{k} {v:.2f}" for k, v in metrics["token"]["bad_recall_by_type"].items()))
    return lines
