"""
Be the annotator: a local web page on which a person picks the better of two responses and
minimally edits the worse one, and sees, while typing, the token labels the method will learn
from (diff_labels on the run's tokenizer: bad red, inserted green, the omission mark outlined),
how many tokens the edit changes, and where the run's token RM puts p(bad). Each saved record
{"prompt", "chosen", "rejected", "edited"} is appended to a JSONL file that
`python train.py --data=FILE` reads unchanged.

    python annotate.py --run=runs/quick --out=my_edits.jsonl          # pairs sampled from the run's SFT model
    python annotate.py --run=runs/quick --pairs=mine.jsonl --out=...  # your own {"prompt", "chosen", "rejected"}

then open http://127.0.0.1:8000. Keys: 1 / 2 pick A / B as the better, s skips (a tie: dropped,
as stage 2 drops ties), Ctrl+Enter saves. The standard library's HTTP server and one page
(annotate.html), nothing fetched from the internet. It binds 127.0.0.1 unless --host says
otherwise, bounds request bodies, answers a bad request with a 4xx and one line, and writes
nothing but the output file: each record in one write, flushed and fsynced under a lock, so a
kill loses at most the record being saved and two tabs never interleave one; a restart resumes
after the pairs already saved.
"""

import argparse
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

import data
import reward
import tokenizer as tok
from model import GPT
from world import ToyWorld

MAX_BODY = 64 * 1024  # bytes of a request body
REWRITE_WARNING = 0.5  # the share of the tokens an edit touches above which the page warns


class Annotator:
    """The pairs to annotate, the run's encoding and token RM, and the output file."""

    def __init__(self, run, out, pairs=None, n=20, seed=0, device="cpu"):
        self.enc = tok.build_encoding(tok.load_ranks(os.path.join(run, "tokenizer.tiktoken")))
        self.pairs = pairs if pairs is not None else sample_pairs(run, self.enc, n, seed, device)
        seed = json.load(open(os.path.join(run, "config.json")))["seed"]  # the run's first seed has its token RM
        rm_path = os.path.join(run, "rm", f"seed{seed}", "token.pt")
        self.rm = reward.load_rm(rm_path, device)[0] if os.path.exists(rm_path) else None
        self.chat = tok.Chat(self.enc, self.rm.gpt.config.block_size, 0) if self.rm else None
        self.out, self.lock = out, threading.Lock()
        self.saved = keep_whole_records(out)

    def is_saved(self, i):
        p = self.pairs[i]
        return any(r["prompt"] == p["prompt"] and {r["chosen"], r["rejected"]} == {p["a"], p["b"]} for r in self.saved)

    def state(self):
        return {"n": len(self.pairs), "saved": len(self.saved),
                "next": next((i for i in range(len(self.pairs)) if not self.is_saved(i)), len(self.pairs))}

    def labels(self, prompt, original, edited):
        """What the edit teaches: the original's and the edit's tokens with their labels
        (bad_vs_rest: -1 bad, omission marks included; the edit's +1 inserted), which -1s are
        omission marks, the tokens changed, the share of the tokens touched, and the token RM's
        p(bad) on the original."""
        ids = [tok.response_ids(self.enc, t) for t in (original, edited)]
        lo, le = reward.label_pair(self.enc, *ids, "bad_vs_rest")
        plain, _ = reward.label_pair(self.enc, *ids, "bad_neutral_good")  # without the omission marks
        changed = sum(v != 0 for v in plain) + sum(v != 0 for v in le)
        share = changed / (len(lo) + len(le))
        out = {"original": [self.enc.decode([t]) for t in ids[0]], "original_labels": lo,
               "omission": [a != b for a, b in zip(lo, plain)], "edited": [self.enc.decode([t]) for t in ids[1]],
               "edited_labels": le, "changed": changed, "share": share,
               "warning": (f"this edit touches {changed} of {len(lo) + len(le)} tokens: a minimal edit changes only "
                           "what is wrong and keeps the rest") if share > REWRITE_WARNING else None, "p_bad": None}
        if self.rm is not None:
            idx, real = self.chat.batch([prompt], [original])
            with torch.no_grad():
                p_bad = torch.softmax(self.rm(idx, real).float(), -1)[0, :, 0]  # (T,) class 0 is bad
            out["p_bad"] = p_bad[self.chat.response_mask(idx, real)[0]].tolist()[:len(lo)]
        return out

    def save(self, i, better, original, edited):
        """Append the record of pair i; one line, one write, flushed and fsynced under the lock."""
        p = self.pairs[i]
        chosen, rejected = (p["a"], p["b"]) if better == "a" else (p["b"], p["a"])
        if original != rejected:
            raise ValueError("the edit must start from the worse response (pick again: the page and the server disagree)")
        if not edited.strip():
            raise ValueError("the edit is empty: edit the worse response into a good one, or skip the pair")
        record = {"prompt": p["prompt"], "chosen": chosen, "rejected": rejected, "edited": edited}
        with self.lock:
            with open(self.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
            self.saved.append(record)
        return record


def sample_pairs(run, enc, n, seed, device):
    """n pairs of two SFT samples per prompt at temperature 1, as stage 2 draws them."""
    cfg = json.load(open(os.path.join(run, "config.json")))
    chat = tok.Chat(enc, cfg["block_size"], cfg["max_new_tokens"])
    sft = GPT.from_checkpoint(os.path.join(run, "sft", "model.pt"), device)
    rng = random.Random(seed)
    prompts = ([r["prompt"] for r in rng.sample(data.read_jsonl(cfg["data"]), n)] if cfg.get("data")
               else [ToyWorld(data.WorldConfig()).sample_prompt(rng) for _ in range(n)])
    gen = torch.Generator(device=device).manual_seed(seed)
    a, b = chat.sample(sft, prompts, gen), chat.sample(sft, prompts, gen)
    return [{"prompt": p, "a": x, "b": y} for p, x, y in zip(prompts, a, b)]


def keep_whole_records(path):
    """The records already saved in path; a last line cut short by a kill is dropped from the file."""
    if not os.path.exists(path):
        return []
    raw = open(path, "rb").read()
    if raw and not raw.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(raw.rfind(b"\n") + 1)
        print(f"{path}: dropped a record cut short by an interruption")
    return data.read_jsonl(path, required=data.FIELDS, optional=()) if os.path.getsize(path) else []


class Handler(BaseHTTPRequestHandler):
    annotator: Annotator = None
    page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "annotate.html")

    def reply(self, code, body, kind="application/json"):
        body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def fail(self, code, message):
        self.reply(code, {"error": message})

    def do_GET(self):
        a = self.annotator
        if self.path == "/":
            return self.reply(200, open(self.page, "rb").read(), "text/html; charset=utf-8")
        if self.path == "/api/state":
            return self.reply(200, a.state())
        if self.path.startswith("/api/pair/") and self.path[10:].isdigit() and int(self.path[10:]) < len(a.pairs):
            return self.reply(200, {"i": int(self.path[10:]), **a.pairs[int(self.path[10:])]})
        self.fail(404, f"no such page: {self.path[:100]}")

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > MAX_BODY:
            return self.fail(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(self.rfile.read(n).decode("utf-8"))
            i, better, original, edited = (body[k] for k in ("i", "better", "original", "edited"))
            if not (isinstance(i, int) and 0 <= i < len(self.annotator.pairs) and better in ("a", "b")
                    and isinstance(original, str) and isinstance(edited, str)):
                raise ValueError("expected {i: a pair's index, better: a or b, original: text, edited: text}")
            (original + edited).encode("utf-8")  # JSON may carry half a surrogate pair
        except UnicodeError:
            return self.fail(400, "the text is not valid UTF-8")
        except (ValueError, KeyError, TypeError) as e:
            return self.fail(400, f"malformed request: {e}" if str(e) else "malformed request")
        try:
            if self.path == "/api/labels":
                return self.reply(200, self.annotator.labels(self.annotator.pairs[i]["prompt"], original, edited))
            if self.path == "/api/save":
                self.annotator.save(i, better, original, edited)
                return self.reply(200, self.annotator.state())
        except ValueError as e:
            return self.fail(409, str(e))
        self.fail(404, f"no such endpoint: {self.path[:100]}")

    def log_message(self, *args):  # quiet: one line per request is noise for a person typing
        pass


def serve(annotator, host="127.0.0.1", port=8000):
    """The server (not yet serving: call serve_forever); port 0 takes a free one."""
    handler = type("BoundHandler", (Handler,), {"annotator": annotator})
    return ThreadingHTTPServer((host, port), handler)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Be the annotator: pick the better response, minimally edit the worse.")
    ap.add_argument("--run", required=True, help="a run folder: its tokenizer, SFT model and token RM")
    ap.add_argument("--out", required=True, help="the JSONL the records are appended to (train.py --data reads it)")
    ap.add_argument("--pairs", help='a JSONL of {"prompt", "chosen", "rejected"} to annotate, instead of SFT samples')
    ap.add_argument("--n", type=int, default=20, help="pairs sampled from the SFT model")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", default="127.0.0.1", help="127.0.0.1: this machine only")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args()
    try:
        pairs = None if not args.pairs else [{"prompt": r["prompt"], "a": r["chosen"], "b": r["rejected"]}
                                             for r in data.read_jsonl(args.pairs, optional=())]
        server = serve(Annotator(args.run, args.out, pairs, args.n, args.seed), args.host, args.port)
    except (OSError, data.DataError, KeyError) as e:
        raise SystemExit(f"error: {e}")
    print(f"annotating {args.run} into {args.out}: http://{args.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()
