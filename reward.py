"""
Reward models, and the reward each RL method optimises.

- TokenRM: a per-token classifier on a GPT trunk (initialised from SFT), trained on the
  Myers-diff labels of minimal edits (diff_labels.py). Two label schemes, both this project's:
    bad_neutral_good  3 classes, from token_labels; r_t = p(good) - p(bad): our reading of
                      Xu et al. (ACL 2024), whose public abstract gives no labels, loss or reward.
    bad_vs_rest       2 classes, bad = the tokens the edit deletes or replaces, plus an omission
                      mark on the token where the answer departs from an edit that inserts text
                      (the eot when it appends); r_t = -p(bad). The default: an inserted correct
                      token looks like an unchanged one, so "good" is close to unlearnable (a
                      prototype measured F1 ~ 0); without the mark an omission has no token to blame.
- SeqRM: a scalar head read at the last response token (<|endoftext|>), trained with the
  Bradley-Terry loss -log sigma(r_chosen - r_rejected) (Ouyang et al., 2022): on (chosen,
  rejected) the standard RLHF baseline; on (edited, rejected) the edits as one number.

The reward of RL, written once (ppo.py and the README point here). For a response y_1..y_n
to a prompt x (y_n the eot, or the last token of an answer cut at max_new_tokens), every
response token t gets, as a (B, T) tensor over prompt + response (0 off the response):

    r_t = -beta * (log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))     KL penalty (ppo.py)
          + (u_t - c * [t = n]) / s                                        task reward
          + trunc_penalty * [t = n and y has no eot]                       truncation

where u_t is the method's unnormalised reward (METHODS):
    dense  (fg_ppo, rloo_fg)        u_t = the token RM's r_t above, on every response token
    final  (ppo, ppo_edits, rloo)   u_t = [t = n] * the sequence RM's score of (x, y)
    oracle (oracle_ppo, oracle_fg)  the gold judge's score at n, or its verdicts at the tokens
                                    that decide them (gold_rewards)
    both   (fg_ppo_seq)             u_t = fg_ppo's task reward + seq_weight * ppo's: the blame, and
                                    pay for a complete answer once, at n (no pay for length)
and c, s are the mean and standard deviation of sum_t u_t over the SFT samples (fit_norm): a
response's summed task reward is (sum_t u_t - c) / s, mean 0 and std 1 on SFT answers for
every method. The centre c is taken once per response, at its last token, never per token: a
per-token centre c < 0 would pay |c| for every token, so padding an answer with harmless text
would raise its reward, a length bonus that the sequence methods do not get. `reward_fn`
computes the task reward; the KL penalty and the truncation term are added by ppo.rollout.

Labels use -1 for "ignore" (prompt, padding), as nanoGPT's targets do. Run as stage 3 of
`python train.py`; tests/test_reward.py checks it.
"""

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn as nn
from torch.nn import functional as F
from tqdm import tqdm

import data
import diff_labels
import tokenizer as tok
from model import GPT, GPTConfig, autocast


@dataclass
class RMConfig:
    rm_scheme: str = "bad_vs_rest"  # bad_vs_rest | bad_neutral_good (see the module docstring)
    rm_steps: int = 300         # optimisation steps of every RM, whatever the number of pairs
    rm_batch: int = 32          # preference pairs per step
    rm_lr: float = 3e-4
    rm_bad_weight: float = 1.0  # class weight of "bad" in the token loss; 1 keeps p(bad)
                                # calibrated, which is what PPO reads as a reward


SCHEMES = {  # gold label (-1 / 0 / +1) -> class index; class 0 is always "bad"
    "bad_neutral_good": {-1: 0, 0: 1, 1: 2},
    "bad_vs_rest": {-1: 0, 0: 1, 1: 1},
}


def last_index(mask):
    """Index of the last real token of each row of mask (B, T) -> (B,)."""
    return mask.size(1) - 1 - mask.flip(1).int().argmax(1)


class TokenRM(nn.Module):
    def __init__(self, gpt, scheme="bad_vs_rest"):
        super().__init__()
        assert scheme in SCHEMES, f"rm_scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}"
        self.gpt, self.scheme = gpt, scheme
        self.head = nn.Linear(gpt.config.n_embd, len(set(SCHEMES[scheme].values())))

    def forward(self, idx, real):
        return self.head(self.gpt.hidden(idx, real))  # (B, T, n_classes)

    def token_rewards(self, idx, real, resp_mask):
        """r_t (B, T) on response tokens, 0 elsewhere: -p(bad), or p(good) - p(bad) (bad_neutral_good).
        Alignment: the class at position t is read from the hidden state of token t (which
        has seen token t), and judges token t itself: no shift, unlike the LM's logits."""
        p = F.softmax(self(idx, real).float(), dim=-1)  # (B, T, K)
        r = -p[..., 0] if self.scheme == "bad_vs_rest" else p[..., 2] - p[..., 0]
        return r * resp_mask


class SeqRM(nn.Module):
    def __init__(self, gpt):
        super().__init__()
        self.gpt = gpt
        self.head = nn.Linear(gpt.config.n_embd, 1)

    def forward(self, idx, real):
        h = self.gpt.hidden(idx, real)  # (B, T, C)
        last = h[torch.arange(idx.size(0), device=idx.device), last_index(real)]  # (B, C): the eot token
        return self.head(last).squeeze(-1).float()  # (B,)


def token_loss(logits, classes, bad_weight=1.0, reduction="mean"):
    """Cross-entropy per token, (weighted) mean or sum over the labelled tokens; classes
    (B, T) are class indices, -1 where ignored."""
    w = torch.ones(logits.size(-1), device=logits.device)
    w[0] = bad_weight
    return F.cross_entropy(logits.float().flatten(0, 1), classes.flatten(), weight=w, ignore_index=-1,
                           reduction=reduction)


def bt_loss(r_chosen, r_rejected):
    """Bradley-Terry: -log σ(r_chosen - r_rejected), averaged over pairs."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


# -----------------------------------------------------------------------------
# From a minimal edit to per-token classes: the supervision of the token RM.

def label_pair(enc, original, edited, scheme):
    """Token labels (-1/0/+1) of an original response and its edit, from the Myers diff of
    their token ids (eot included, so an insertion at the end has a token to mark). Either
    may be given as text or, for sampled responses, as the token ids actually generated."""
    ids = [x if isinstance(x, list) else tok.response_ids(enc, x) for x in (original, edited)]
    breaks = {enc.encode_ordinary(c)[0] for c in ".?!"}  # sentence ends: deletions snap to sentences
    return diff_labels.token_labels(*ids, mark_omissions=(scheme == "bad_vs_rest"), breaks=breaks)


def rm_examples(chat, records, scheme):
    """Per record, two token-level examples (ids, classes), the rejected original and its
    edit: ids are prompt + response + eot, classes[t] is the class of token ids[t] itself
    (no shift: the RM judges the token it reads) and -1 on the prompt. Cut to block_size."""
    out, m = [], SCHEMES[scheme]
    for r in records:
        p = chat.prompt(r["prompt"])
        lo, le = label_pair(chat.enc, r["rejected"], r["edited"], scheme)
        out.append([((p + chat.response(text))[:chat.block_size],
                     ([-1] * len(p) + [m[v] for v in labels])[:chat.block_size])
                    for text, labels in ((r["rejected"], lo), (r["edited"], le))])
    return out


def token_batch(chat, examples, device):
    """(idx, real, classes), each (B, T), of a list of (ids, classes) examples."""
    idx, real = tok.pad_left([x for x, _ in examples], chat.pad)
    cls, _ = tok.pad_left([y for _, y in examples], -1)
    return idx.to(device), real.to(device), cls.to(device)


# -----------------------------------------------------------------------------
# Training: every RM gets rm_steps AdamW steps, whatever the number of pairs.

def train_rm(model, loss_of, lengths, rmc, desc, seed, device):
    """rm_steps AdamW steps on random batches of rm_batch pairs. loss_of(pair indices) -> (summed
    loss, count) of a micro-batch of similar lengths (lengths[i]: tokens of pair i's longer
    sequence; tok.split_by_length); the step's loss is their summed losses over their summed
    counts, as for the whole batch at once. A non-finite loss raises FloatingPointError before
    anything is saved. Under torchrun each process draws its own batches of its share of rm_batch."""
    g, n = random.Random(seed), len(lengths)
    opt = torch.optim.AdamW(model.parameters(), lr=rmc.rm_lr, weight_decay=0.0)
    model.train()
    pbar = tqdm(range(rmc.rm_steps), desc=desc, dynamic_ncols=True)
    for it in pbar:
        for group in opt.param_groups:  # short warmup, then constant
            group["lr"] = rmc.rm_lr * min(1.0, (it + 1) / 20)
        batch = g.sample(range(n), min(rmc.rm_batch, n))
        with autocast(device):
            sums, counts = zip(*(loss_of([batch[i] for i in run])
                                 for run in tok.split_by_length([lengths[i] for i in batch])))
            loss = sum(sums) / sum(counts)
        if it % 10 == 0 or it + 1 == rmc.rm_steps:  # the host reads the loss (a sync on a GPU) every 10 steps
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{desc} stopped at step {it}: loss is {loss.item()}; no checkpoint written")
            pbar.set_postfix(loss=f"{loss.item():.4f}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return model.eval()


def train_token_rm(chat, sft_path, pairs, rmc, seed, device, wrap=lambda rm: rm):
    """Token RM: per-token cross-entropy on the diff labels of (rejected, edited), both sequences
    of each pair. wrap(rm): what it trains through (train.py: DDP under torchrun)."""
    ex = rm_examples(chat, pairs, rmc.rm_scheme)
    rm = TokenRM(GPT.from_checkpoint(sft_path, device), rmc.rm_scheme).to(device)
    net = wrap(rm)
    w = torch.tensor([rmc.rm_bad_weight] + [1.0] * (len(set(SCHEMES[rmc.rm_scheme].values())) - 1), device=device)

    def loss(batch):  # summed (class-weighted) cross-entropy and the summed weights it is a mean over
        idx, real, cls = token_batch(chat, [x for i in batch for x in ex[i]], device)
        return token_loss(net(idx, real), cls, rmc.rm_bad_weight, reduction="sum"), w[cls[cls != -1]].sum()
    return train_rm(rm, loss, [max(len(x) for x, _ in pair) for pair in ex], rmc, "rm token", seed, device)


def train_seq_rm(chat, sft_path, pairs, better, rmc, seed, device, desc, wrap=lambda rm: rm):
    """Sequence RM: Bradley-Terry on (pair[better], pair["rejected"]); wrap as train_token_rm's."""
    rm = SeqRM(GPT.from_checkpoint(sft_path, device)).to(device)
    net = wrap(rm)
    lengths = [max(len(chat.prompt(p["prompt"]) + chat.response(p[k])) for k in (better, "rejected")) for p in pairs]

    def loss(batch):  # one forward of the better and the rejected responses together
        prompts = [pairs[i]["prompt"] for i in batch]
        r = net(*chat.batch(prompts * 2, [pairs[i][k] for k in (better, "rejected") for i in batch], device))
        return bt_loss(r[:len(batch)], r[len(batch):]) * len(batch), len(batch)  # summed over the pairs
    return train_rm(rm, loss, lengths, rmc, desc, seed, device)


def save_rm(rm, norm, path):
    scheme = rm.scheme if isinstance(rm, TokenRM) else ""
    data.save_atomic({"model": rm.state_dict(), "model_args": dataclasses.asdict(rm.gpt.config), "norm": norm,
                      "scheme": scheme}, path)


def load_rm(path, device):
    """(RM in eval mode, its norm) of a checkpoint written by save_rm: a TokenRM if it names a
    label scheme, else a SeqRM."""
    ck = torch.load(path, map_location=device, weights_only=True)
    gpt = GPT(GPTConfig(**ck["model_args"]))
    rm = TokenRM(gpt, ck["scheme"]) if ck["scheme"] else SeqRM(gpt)
    rm.load_state_dict(ck["model"])
    return rm.to(device).eval(), ck["norm"]


# -----------------------------------------------------------------------------
# One number per response, and the reward scale fitted on SFT samples.

@torch.no_grad()
def response_scores(rm, chat, prompts, responses, device, batch=128):
    """One number per response: the sequence RM's score, or the token RM's summed reward."""
    out = []
    for i in range(0, len(prompts), batch):
        idx, real = chat.batch(prompts[i:i + batch], responses[i:i + batch], device)
        if isinstance(rm, TokenRM):
            out += rm.token_rewards(idx, real, chat.response_mask(idx, real)).sum(1).tolist()
        else:
            out += rm(idx, real).tolist()
    return out


def fit_norm(sums):
    """A method's reward scale, fitted on each SFT sample's summed raw reward so that every
    method starts on equal footing: centre = mean, scale = std of the sums. The centre is paid
    once per response (normalise), never per token: the module docstring says why."""
    sums = torch.as_tensor(sums, dtype=torch.float)
    return {"center": sums.mean().item(), "scale": sums.std().item()}


def normalise(r, resp_mask, norm):
    """(r - center at the last response token) / scale, for (B, T) task rewards r; a
    response's summed reward is then (its raw sum - center) / scale."""
    ones = torch.ones(r.size(0), device=r.device)
    return (r - norm["center"] * final_token_rewards(ones, resp_mask.float())) / norm["scale"]


# -----------------------------------------------------------------------------
# What each RL method reads: a (B, T) reward tensor over prompt + response.

class Method(NamedTuple):
    """What a --methods name means: the loop that trains the policy and what it learns from."""
    algo: str          # ppo (clipped PPO with a critic) | rloo (the same clipped loss, no critic) | dpo (no RL)
    reward: str = ""   # ppo, rloo: an RM of rm/seed*/ (seq, token, seq_edits; two joined by +) or the judge
    dense: bool = False  # ppo, rloo: the reward on every response token, or one score at the eot
    better: str = ""   # dpo: the field of a pair that DPO prefers to "rejected" (chosen or edited)

    @property
    def rms(self):  # the reward models it reads
        return [r for r in self.reward.split("+") if r in ("seq", "token", "seq_edits")]

    @property
    def needs_edits(self):
        return bool({"token", "seq_edits"} & set(self.rms)) or self.better == "edited"


METHODS = {
    "ppo": Method("ppo", "seq"),                 # sequence RM on (chosen > rejected), at the eot
    "fg_ppo": Method("ppo", "token", True),      # token RM on the edits, on every response token
    "fg_ppo_seq": Method("ppo", "token+seq", True),  # fg_ppo's blame + seq_weight x ppo's score at the eot
    "ppo_edits": Method("ppo", "seq_edits"),     # sequence RM on (edited > rejected): same data, one number
    "oracle_ppo": Method("ppo", "judge"),        # gold judge score at the end (control, beyond the paper)
    "oracle_fg": Method("ppo", "judge", True),   # the same judge score, paid where each verdict is decided
    "rloo": Method("rloo", "seq"),               # ppo's reward, no critic: leave-one-out baseline (ppo.rloo_advantages)
    "rloo_fg": Method("rloo", "token", True),    # fg_ppo's reward, no critic: per-token return-to-go minus the baseline
    "dpo": Method("dpo", better="chosen"),       # DPO on (chosen > rejected), the pairs ppo's RM learns from (dpo.py)
    "dpo_edits": Method("dpo", better="edited"), # DPO on (edited > rejected): the edits, implicitly token-level
}


def final_token_rewards(scores, resp_mask):
    """A (B, T) tensor with scores (B,) placed on the last response token (the eot itself)."""
    last = last_index(resp_mask)  # (B,)
    out = torch.zeros(resp_mask.shape, device=scores.device)
    out[torch.arange(resp_mask.size(0)), last] = scores
    return out * resp_mask


def gold_rewards(chat, idx, real, resp_mask, dense):
    """Oracle rewards, unnormalised: the gold judge's score on the last response token
    (final), or the same score spread over the tokens that decide it (dense,
    data.judge_token_rewards). The two oracles optimise one objective at two densities."""
    prompts, responses = chat.split(idx, resp_mask)
    if not dense:
        scores = [data.score(p, tok.decode_response(chat.enc, r)) for p, r in zip(prompts, responses)]
        return final_token_rewards(torch.tensor(scores, dtype=torch.float, device=idx.device), resp_mask.float())
    out = torch.zeros(idx.shape, device=idx.device)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        cols = resp_mask[i].nonzero().squeeze(1)  # reward k belongs to the k-th response token
        out[i, cols] = torch.tensor(data.judge_token_rewards(chat.enc, p, r), device=idx.device)
    return out


def reward_fn(method, rm_dir, chat, samples, device, seq_weight=1.0):
    """(idx, real, resp_mask) -> (B, T) task rewards of a method: (u_t - c * [t = n]) / s of the
    module docstring, with c and s fitted on the SFT samples {"prompts", "responses"}."""
    source, dense = METHODS[method].reward, METHODS[method].dense
    if source in ("seq", "token", "seq_edits"):
        rm, norm = load_rm(os.path.join(rm_dir, f"{source}.pt"), device)

        def unnormalised(idx, real, resp_mask):  # dense: the token RM's r_t; final: the score at the eot
            return (rm.token_rewards(idx, real, resp_mask) if dense
                    else final_token_rewards(rm(idx, real), resp_mask.float()))
    else:  # the judge, or two RMs' task rewards added: c and s fitted here, on the SFT samples
        if source == "token+seq":
            blame, score = (reward_fn(m, rm_dir, chat, samples, device) for m in ("fg_ppo", "ppo"))

            def unnormalised(idx, real, resp_mask):
                return blame(idx, real, resp_mask) + seq_weight * score(idx, real, resp_mask)
        else:
            def unnormalised(idx, real, resp_mask):
                return gold_rewards(chat, idx, real, resp_mask, dense)
        with torch.no_grad():
            batches = [chat.batch(samples["prompts"][i:i + 128], samples["responses"][i:i + 128], device)
                       for i in range(0, len(samples["prompts"]), 128)]
            norm = fit_norm(torch.cat([unnormalised(idx, real, chat.response_mask(idx, real)).sum(1)
                                       for idx, real in batches]))

    def fn(idx, real, resp_mask):
        with autocast(device):
            u = unnormalised(idx, real, resp_mask).float()
        return normalise(u, resp_mask, norm)  # a response's summed task reward: mean 0, std 1 on SFT samples
    return fn
