"""
The world a run lives in: where prompts, the SFT corpus and the preference pairs come
from, and who judges the policy's answers. train.py builds one at the start and never
changes it, so no stage asks which world it is in.

- ToyWorld (the default): the toy world of data.py. SFT learns a noisy corpus; preference
  pairs are two SFT samples per prompt, the gold judge picks, the minimal-edit annotator
  edits the rejected one; the gold judge scores and counts errors.
- RecordsWorld (--data=FILE): your own preference records. There is no gold judge, so a
  quarter of the pairs trains a *judge RM* (a sequence RM that no other model sees) which
  stands in for it, and evaluation prompts come from that quarter. The judge RM shares the
  SFT trunk and the annotators' taste and can be exploited by the policies it judges;
  the report says so.

`gold` says whether a gold judge and annotator exist: the oracle methods and the gold
diagnostics (fact flips, errors by type, gold token labels) need them. `has_edits` says
whether every pair has an edit: the token RM and the sequence RM on edits need one.
"""

import functools
import os
import random
import sys

import torch
from tqdm import tqdm

import data
import reward
import tokenizer as tok
from model import GPT


class ToyWorld:
    gold = True
    has_edits = True

    def __init__(self, cfg: data.WorldConfig):
        self.cfg = cfg

    def sample_prompt(self, rng):
        return data.sample_prompt(rng, self.cfg)

    eval_prompt = sample_prompt  # the prompt space is small: evaluation prompts recur in training

    def sft_corpus(self, n, rng):
        """n (prompt, noisy response) pairs."""
        prompts = [self.sample_prompt(rng) for _ in range(n)]
        return [(p, data.noisy_response(p, rng, self.cfg)) for p in prompts]

    def tokenizer_texts(self, n, seed):
        """What the BPE trains on: the SFT corpus (the same draw as the SFT stage's)."""
        return [p + " " + r for p, r in self.sft_corpus(n, random.Random(seed))]

    def preference_pairs(self, chat, sft_path, n, seed, device):
        """n records {"prompt", "chosen", "rejected", "edited"} from pairs of SFT samples at
        temperature 1; returns (records, number of pairs dropped as ties)."""
        sft = GPT.from_checkpoint(sft_path, device)
        rng = random.Random(seed)
        # The annotator's misses draw from their own stream, so that the pairs are the same at
        # every p_annotator_miss and only the edits differ (with p = 0 it never draws).
        miss_rng = random.Random(seed + 1)
        gen = torch.Generator(device=device).manual_seed(seed)
        records, ties = [], 0
        pbar = tqdm(total=n, desc="prefs", dynamic_ncols=True)
        while len(records) < n:
            prompts = [self.sample_prompt(rng) for _ in range(32)]
            samples = chat.sample(sft, prompts + prompts, gen)
            for p, a, b in zip(prompts, samples[:32], samples[32:]):
                sa, sb = data.score(p, a), data.score(p, b)
                if sa == sb or not a.strip() or not b.strip():  # ties (and rare empty samples) are dropped
                    ties += 1
                    continue
                chosen, rejected = (a, b) if sa > sb else (b, a)
                edited = data.annotate(p, rejected, self.cfg.p_annotator_miss, miss_rng)
                records.append({"prompt": p, "chosen": chosen, "rejected": rejected, "edited": edited})
            pbar.update(min(len(records), n) - pbar.n)
        pbar.close()
        return records[:n], ties

    def scores(self, prompts, responses):
        return [data.score(p, r) for p, r in zip(prompts, responses)]

    def rates(self, prompts, responses):
        """The judge's mean score and error rates (see data.error_rates)."""
        return data.error_rates(prompts, responses)

    def notes(self):
        return ["wrong = wrong facts per stated fact; missing = per requested fact; unparseable = per sentence;",
                "the others per response. Evaluation prompts come from the same small prompt space as training",
                "prompts (24 animals x 18 templates), so prompts recur across stages by design."]


class RecordsWorld:
    gold = False

    def __init__(self, records, cfg, device):
        """records read from cfg.data; cfg (config.Config) says where the run's tokenizer and
        judge RM are and the length limits its chat format uses."""
        self.records, self.cfg, self.device = records, cfg, device
        shuffled = random.Random(cfg.seed).sample(records, len(records))
        n = max(len(records) // 4, 1)  # a quarter of the pairs train only the judge RM
        self.judge_records, self.train_records = shuffled[:n], shuffled[n:]
        self.has_edits = all("edited" in r for r in records)

    def __getstate__(self):  # to a worker process: without the loaded judge, which it loads itself
        return {k: v for k, v in self.__dict__.items() if k != "judge"}

    def sample_prompt(self, rng):
        return rng.choice(self.train_records)["prompt"]

    def eval_prompt(self, rng):
        return rng.choice(self.judge_records)["prompt"]  # prompts no other RM trained on

    def sft_corpus(self, n, rng):
        """SFT on the chosen (and edited) responses of the training pairs; n and rng unused."""
        return [(r["prompt"], r[k]) for r in self.train_records for k in ("chosen", "edited") if k in r]

    def tokenizer_texts(self, n, seed):
        return [r[k] for r in self.records for k in data.FIELDS if k in r]

    def preference_pairs(self, chat, sft_path, n, seed, device):
        return self.train_records, 0

    def count_too_long(self, chat):
        """How many records run past the context (their prompt or a response is truncated)."""
        room = chat.block_size - chat.max_new_tokens
        return sum(len(tok.prompt_ids(chat.enc, r["prompt"])) > room
                   or len(chat.prompt(r["prompt"])) + max(len(chat.response(r[k])) for k in data.FIELDS[1:] if k in r)
                   > chat.block_size for r in self.records)

    @functools.cached_property
    def judge(self):
        """(judge RM, Chat), loaded once, when first needed (after the judge stage wrote it)."""
        c = self.cfg
        chat = tok.Chat(tok.get_tokenizer(os.path.join(c.out, "tokenizer.tiktoken")),
                        c.block_size, c.max_new_tokens)
        return reward.load_rm(os.path.join(c.out, "rm", "judge.pt"), self.device)[0], chat

    def scores(self, prompts, responses):
        rm, chat = self.judge
        return reward.response_scores(rm, chat, prompts, responses, self.device)

    def rates(self, prompts, responses):
        s = self.scores(prompts, responses)
        return {"judge_score": sum(s) / len(s)}

    def notes(self):
        return ["", f"Judge: a sequence RM trained on {len(self.judge_records)} held-out pairs of {self.cfg.data}, not a "
                "gold judge. It is biased (same SFT trunk, same annotators) and can be exploited by the policies it "
                "judges; treat these win rates as a sanity check, not a result."]


def runnable(world, methods):
    """The methods of the list that world can run: one line and an exit for the oracle methods
    without a gold judge; without an edit in every pair, those that need none (the token RM, the
    RM on edits and DPO on edits need one), with a note."""
    if not world.gold and any(m.startswith("oracle") for m in methods):
        sys.exit("error: the oracle methods need the toy world's gold judge; drop them with --data")
    if world.has_edits:
        return methods
    kept = [m for m in methods if not reward.METHODS[m].needs_edits]
    if not kept:
        sys.exit(f"error: --methods={','.join(methods)} all need an 'edited' field in every record of {world.cfg.data}")
    print(f"note: not every record has an 'edited' field, so only the methods without edits run: {', '.join(kept)}")
    return kept


def make_world(cfg, world_cfg, device):
    """The toy world, or the records of cfg.data (raises data.DataError on bad input)."""
    if not cfg.data:
        return ToyWorld(world_cfg)
    records = data.read_jsonl(cfg.data)
    if len(records) < 8:
        raise data.DataError(f"{cfg.data}: {len(records)} record(s); at least 8 are needed "
                             "(a quarter trains the judge RM)")
    return RecordsWorld(records, cfg, device)
