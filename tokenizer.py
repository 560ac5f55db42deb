"""
Byte-level BPE tokenizer, trained on our toy corpus and served by tiktoken.

Split text into chunks with GPT-2's regex (merges never cross a word / number /
punctuation boundary), start from the 256 single bytes, repeatedly merge the most
frequent adjacent pair into a new token. Training is the short loop below; encoding
is done by tiktoken (Rust) from the learned {token_bytes: rank} table, with four
special tokens appended after the merges.
References: Sennrich et al. 2016 (BPE for subwords); Radford et al. 2019 (GPT-2:
byte-level BPE + split pattern); Karpathy's minbpe.

Usage:
    enc = get_tokenizer("out/tokenizer.tiktoken", texts=corpus)   # or init=a GPT-2 checkpoint dir
    ids = enc.encode_ordinary(user_text)    # plain text: specials are NOT parsed
    sp = special_ids(enc)                   # callers insert special ids directly:
    # [sp["<|user|>"]] + ids(prompt) + [sp["<|assistant|>"]] + ids(response) + [sp["<|endoftext|>"]]

A run reads and writes text through a `Chat` (bottom of the file): the chat format with the
run's length limits, from texts to left-padded (B, T) batches and from sampled ids back.

Why encode_ordinary: user text may literally contain "<|endoftext|>". Parsing it
as a special would let data inject control tokens; tiktoken's plain `encode`
would raise. encode_ordinary treats it as ordinary bytes, and decode round-trips.
"""
import base64
import json
import os
from collections import Counter, defaultdict

import regex
import tiktoken
import torch

# chat format: <|user|>prompt<|assistant|>response<|endoftext|>
# <|pad|> is distinct from <|endoftext|> so PPO can mask padding without hiding real EOS.
SPECIALS = ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|pad|>"]
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _merge_chunk(parts: list[bytes], ranks: dict[bytes, int]) -> list[bytes]:
    # tiktoken's algorithm: repeatedly merge the adjacent pair whose concatenation has
    # the lowest rank (leftmost on ties) until no adjacent pair forms a known token.
    while len(parts) > 1:
        r, i = min((ranks.get(a + b, float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:])))
        if r == float("inf"):
            break
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]
    return parts


def train_bpe(texts: list[str], vocab_size: int = 512) -> dict[bytes, int]:
    """Learn vocab_size - 256 - len(SPECIALS) merges (fewer if no pair repeats); returns {token_bytes: rank}."""
    n_merges = vocab_size - 256 - len(SPECIALS)
    assert n_merges >= 0, f"vocab_size must be >= {256 + len(SPECIALS)}"
    # work on unique chunks with counts: even 1 MB of English has only ~10^4 distinct chunks
    counts = Counter(c for t in texts for c in regex.findall(GPT2_PAT, t))
    chunks = [[[bytes([b]) for b in c.encode("utf-8")], n] for c, n in counts.items()]
    ranks = {bytes([i]): i for i in range(256)}
    # pair -> weighted count, and pair -> indices of chunks containing it; both are
    # updated incrementally so each merge only touches the chunks it changes.
    stats, where = Counter(), defaultdict(set)
    def count(i, sign):
        parts, n = chunks[i]
        for pair in zip(parts, parts[1:]):
            stats[pair] += sign * n
            if sign > 0:
                where[pair].add(i)
            elif stats[pair] == 0:
                del stats[pair]  # keep stats small: the argmax below scans it every step
    for i in range(len(chunks)):
        count(i, +1)
    for _ in range(n_merges):
        top = max(stats.values(), default=0)
        if top < 2:
            break  # no pair repeats: further merges would only memorise single chunks
        # most frequent pair; ties -> smallest (rank_a, rank_b), so training is deterministic
        pair = min((p for p, c in stats.items() if c == top), key=lambda p: (ranks[p[0]], ranks[p[1]]))
        # each chunk is always fully merged under the current ranks, so no adjacent pair
        # is already a token: the new bytes are new, and they get the highest rank.
        ranks[pair[0] + pair[1]] = len(ranks)
        for i in where.pop(pair):  # may hold stale indices; re-merging those is a no-op
            count(i, -1)
            # re-merge with tiktoken's rule (not just "replace the pair"): after merging, a
            # neighbour may combine with the new token into an older one. This keeps our
            # training state identical to what tiktoken will produce at encode time.
            chunks[i][0] = _merge_chunk(chunks[i][0], ranks)
            count(i, +1)
    return ranks


def build_encoding(ranks: dict[bytes, int], name: str = "finegrain") -> tiktoken.Encoding:
    """Wrap mergeable ranks + our specials (ids right after the merges) as a tiktoken Encoding."""
    specials = {s: len(ranks) + i for i, s in enumerate(SPECIALS)}
    return tiktoken.Encoding(name, pat_str=GPT2_PAT, mergeable_ranks=ranks, special_tokens=specials)


def save_ranks(ranks: dict[bytes, int], path: str) -> None:
    """Write tiktoken's .tiktoken format ("base64(token) rank" per line), atomically."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")
    os.replace(path + ".tmp", path)  # a crash mid-write never leaves a truncated file


def load_ranks(path: str) -> dict[bytes, int]:
    """Read a file written by save_ranks."""
    # Same parsing as tiktoken.load.load_tiktoken_bpe, which we avoid on purpose: it caches
    # files by *path* in a temp dir, so re-training to the same path would load stale ranks.
    with open(path, "rb") as f:
        return {base64.b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 bytes to printable characters, in which vocab.json and
    merges.txt spell byte-level tokens: printable Latin-1 bytes stand for themselves, the
    other 68 (control bytes, space, ...) become chr(256), chr(257), ... in byte order (so
    the space byte is "Ġ")."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


def gpt2_ranks(path: str) -> dict[bytes, int]:
    """{token bytes: id} of a Hugging Face GPT-2 tokenizer directory (vocab.json + merges.txt),
    <|endoftext|> left out: build_encoding() puts it back at the id after the last token.

    tiktoken ranks a merge by the id of the merged token, Hugging Face by the merge's line in
    merges.txt; the two give the same tokens when ids increase along merges.txt, as GPT-2's
    do (a vocabulary trained by BPE numbers its tokens in the order they were made)."""
    byte = {c: b for b, c in bytes_to_unicode().items()}
    spell = lambda s: bytes(byte[c] for c in s)
    with open(os.path.join(path, "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    ranks = {spell(s): i for s, i in vocab.items() if s != "<|endoftext|>"}
    with open(os.path.join(path, "merges.txt"), encoding="utf-8") as f:
        merges = [line.split() for line in f if line.strip() and not line.startswith("#version")]
    made = [vocab[a + b] for a, b in merges]
    if sorted(ranks.values()) != list(range(len(ranks))) or vocab.get("<|endoftext|>", len(ranks)) != len(ranks) \
            or made != sorted(made):
        raise ValueError(f"{path}: vocab.json/merges.txt are not laid out as GPT-2's (ids 0..n-1, <|endoftext|> = n, "
                         "ids increasing along merges.txt)")
    return ranks


def save_gpt2_files(ranks: dict[bytes, int], path: str) -> None:
    """The inverse of gpt2_ranks: vocab.json and merges.txt of ranks, each merge the two parts
    that the tokens made before it leave of the merged token, and our specials after
    <|endoftext|> as added tokens (added_tokens.json, special_tokens_map.json)."""
    table = bytes_to_unicode()  # once: built per byte, it made a 50,257-token export take minutes
    spell = lambda b: "".join(table[x] for x in b)
    vocab, merges, made = {spell(t): r for t, r in ranks.items()} | {"<|endoftext|>": len(ranks)}, [], {}
    for t, r in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(t) > 1:
            a, b = _merge_chunk([bytes([x]) for x in t], made)
            merges.append(f"{spell(a)} {spell(b)}")
        made[t] = r
    os.makedirs(path, exist_ok=True)
    json.dump(vocab, open(os.path.join(path, "vocab.json"), "w", encoding="utf-8"), ensure_ascii=False)
    open(os.path.join(path, "merges.txt"), "w", encoding="utf-8").write("#version: 0.2\n" + "\n".join(merges) + "\n")
    json.dump({s: len(ranks) + i for i, s in enumerate(SPECIALS) if i}, open(os.path.join(path, "added_tokens.json"), "w"))
    json.dump({"bos_token": SPECIALS[0], "eos_token": SPECIALS[0], "unk_token": SPECIALS[0], "pad_token": "<|pad|>",
               "additional_special_tokens": SPECIALS[1:3]}, open(os.path.join(path, "special_tokens_map.json"), "w"))


def get_tokenizer(path: str, texts: list[str] | None = None, vocab_size: int = 512,
                  init: str = "") -> tiktoken.Encoding:
    """The encoding of a run: read from path if it exists (delete it to retrain); else GPT-2's
    (from the checkpoint directory init, see gpt2_ranks) or a BPE trained on texts, saved to path."""
    if os.path.exists(path):
        return build_encoding(load_ranks(path))
    assert init or texts is not None, "a new BPE needs texts to train on"
    ranks = gpt2_ranks(init) if init else train_bpe(texts, vocab_size)
    save_ranks(ranks, path)
    return build_encoding(ranks)


def special_ids(enc: tiktoken.Encoding) -> dict[str, int]:
    """Ids of the four special tokens in enc."""
    return {s: enc.encode_single_token(s) for s in SPECIALS}


# Chat format: <|user|>prompt<|assistant|>response<|endoftext|>
def prompt_ids(enc, prompt):
    sp = special_ids(enc)
    return [sp["<|user|>"]] + enc.encode_ordinary(prompt) + [sp["<|assistant|>"]]


def response_ids(enc, response):
    """Response tokens with the closing <|endoftext|>, the sequence the policy generates."""
    return enc.encode_ordinary(response) + [special_ids(enc)["<|endoftext|>"]]


def decode_response(enc, ids):
    """Text of generated response tokens: stops at <|endoftext|>, drops other specials."""
    sp = special_ids(enc)
    ids = ids[:ids.index(sp["<|endoftext|>"])] if sp["<|endoftext|>"] in ids else ids
    return enc.decode([t for t in ids if t not in sp.values()])


# -----------------------------------------------------------------------------
# The chat format of a run, on tensors: texts in, left-padded batches out, and back.

def pad_left(seqs, pad):
    """List of token lists -> (idx, real), both (B, T): left-padded so that every row ends
    at the last column (where generation appends), real True at the tokens of seqs."""
    T = max(len(s) for s in seqs)
    idx = torch.full((len(seqs), T), pad, dtype=torch.long)
    real = torch.zeros((len(seqs), T), dtype=torch.bool)
    for i, s in enumerate(seqs):
        idx[i, T - len(s):] = torch.tensor(s, dtype=torch.long)
        real[i, T - len(s):] = True
    return idx, real


def pad_first(real, *rows):
    """Each row's padding moved in front of its real tokens (a stable sort of its columns by
    real), then the columns that are padding in every row dropped: generate's layout (prompts
    padded on the left, responses on the right) becomes Chat.batch's, every row ending at the
    last column. real (B, T) bool and each of rows (B, T) -> the same, re-laid alike, (B, T')
    with T' the longest row."""
    order = torch.argsort(real.int(), dim=1, stable=True)  # (B, T) padding first, each part in order
    n = int(real.sum(1).max())
    return [x.gather(1, order)[:, -n:] for x in (real, *rows)]


def split_by_length(lengths, max_parts=4):
    """A batch's indices sorted by length and cut into at most max_parts runs, the cuts
    placed to minimise the padded area sum(len(run) * longest in run) (a small dynamic
    program). Run as micro-batches whose summed losses make one step, a batch then costs
    about its real tokens, not len(batch) times its longest sequence."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    L = [lengths[i] for i in order]
    n = len(L)
    best = {(0, 0): (0, None)}  # (parts used, items covered) -> (area, previous cut)
    parts = range(1, min(max_parts, n) + 1)
    for k in parts:
        for j in range(k, n + 1):  # k non-empty runs cover the j shortest items, the last run is i..j-1
            best[k, j] = min((best[k - 1, i][0] + (j - i) * L[j - 1], i)
                             for i in range(k - 1, j) if (k - 1, i) in best)
    k = min(parts, key=lambda k: (best[k, n][0], k))  # the fewest runs among the best
    runs, j = [], n
    while k:
        i = best[k, j][1]
        runs.append(order[i:j])
        k, j = k - 1, i
    return runs[::-1]


class Chat:
    """The chat format of one run: its encoding and special ids, and the length limits
    (block_size tokens in all, max_new_tokens of them for the response)."""

    def __init__(self, enc, block_size, max_new_tokens):
        self.enc, self.sp = enc, special_ids(enc)
        self.eot, self.pad = self.sp["<|endoftext|>"], self.sp["<|pad|>"]
        self.block_size, self.max_new_tokens = block_size, max_new_tokens

    def prompt(self, prompt):
        """Chat-formatted prompt ids, cut from the left to leave room for the response."""
        return prompt_ids(self.enc, prompt)[-(self.block_size - self.max_new_tokens):]

    def response(self, response):
        return response_ids(self.enc, response)

    def batch(self, prompts, responses, device="cpu"):
        """(idx, real) (B, T) of prompt + response + <|endoftext|>, the prompt cut first, then
        the end of a response longer than block_size."""
        ids = [(self.prompt(p) + self.response(r))[:self.block_size] for p, r in zip(prompts, responses)]
        idx, real = pad_left(ids, self.pad)
        return idx.to(device), real.to(device)

    def response_mask(self, idx, real):
        """(B, T) True at response tokens (the eot included): real tokens after <|assistant|>."""
        start = (idx == self.sp["<|assistant|>"]).int().argmax(1, keepdim=True) + 1  # (B, 1)
        return real & (torch.arange(idx.size(1), device=idx.device)[None] >= start)

    def split(self, idx, resp_mask):
        """Prompt texts and response token ids (eot included) of a batch of sequences."""
        prompts, responses = [], []
        for row, m in zip(idx.tolist(), resp_mask.tolist()):
            a = row.index(self.sp["<|assistant|>"])
            prompts.append(self.enc.decode([t for t in row[:a] if t not in self.sp.values()]))
            responses.append([t for t, k in zip(row, m) if k])
        return prompts, responses

    def responses(self, idx, resp_mask):
        """The decoded responses (eot stripped) of a batch of sequences."""
        return [decode_response(self.enc, [t for t, k in zip(row, m) if k])
                for row, m in zip(idx.tolist(), resp_mask.tolist())]

    def generate(self, model, prompts, generator, temperature=1.0, batch=64):
        """model's responses to prompts, sampled batch by batch with the KV cache: yields each
        batch's (idx, resp_mask, logprobs) of model.GPT.generate."""
        model.eval()
        for i in range(0, len(prompts), batch):  # GPT.generate runs without autograd
            yield model.generate([self.prompt(p) for p in prompts[i:i + batch]], self.max_new_tokens, self.eot,
                                 self.pad, temperature=temperature, generator=generator)

    def sample(self, model, prompts, generator, temperature=1.0, batch=64):
        """Decoded responses (eot stripped) of model to prompts."""
        return [r for idx, resp_mask, _ in self.generate(model, prompts, generator, temperature, batch)
                for r in self.responses(idx, resp_mask)]
