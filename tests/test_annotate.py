"""Tests for annotate.py, the annotation page's server, through HTTP on 127.0.0.1: its labels are
the method's own, its records are what train.py --data reads, a kill loses nothing saved, bad
requests get a 4xx and one line; and one real browser (headless Chromium) annotates a pair."""
import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import annotate  # noqa: E402
import data  # noqa: E402
import diff_labels  # noqa: E402
import reward  # noqa: E402
import tokenizer as T  # noqa: E402
from conftest import tiny  # noqa: E402
from test_train import ENV, ROOT  # noqa: E402

PROMPT = "Tell me about the cow."
GOOD = data.ideal_response(PROMPT)
BAD = GOOD.replace("grass", "fish")  # one wrong value
PAIRS = [{"prompt": PROMPT, "a": GOOD, "b": BAD}, {"prompt": "What does the cow eat?", "a": "The cow eats fish.",
                                                    "b": "The cow eats grass."}]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder with what the page reads: the tokenizer, config.json, an SFT model and a token RM."""
    d = tmp_path_factory.mktemp("run")
    rng = random.Random(0)
    texts = [p + " " + data.noisy_response(p, rng) for p in (data.sample_prompt(rng) for _ in range(500))]
    ranks = T.train_bpe(texts, 512)
    T.save_ranks(ranks, str(d / "tokenizer.tiktoken"))
    json.dump({"seed": 1, "block_size": 160, "max_new_tokens": 30, "data": ""}, open(d / "config.json", "w"))
    gpt = tiny(0, vocab_size=T.build_encoding(ranks).n_vocab, block_size=160)
    os.makedirs(d / "sft")
    torch.save({"model": gpt.state_dict(), "model_args": dataclasses.asdict(gpt.config)}, d / "sft" / "model.pt")
    reward.save_rm(reward.TokenRM(gpt, "bad_vs_rest"), {"center": 0.0, "scale": 1.0}, str(d / "rm" / "seed1" / "token.pt"))
    return str(d)


@pytest.fixture
def server(run, tmp_path):
    """The page's server on a free port of 127.0.0.1, in this process: (base URL, annotator)."""
    a = annotate.Annotator(run, str(tmp_path / "edits.jsonl"), [dict(p) for p in PAIRS])
    s = annotate.serve(a, port=0)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{s.server_address[1]}", a
    s.shutdown()


def call(url, body=None, raw=None):
    """(status, JSON reply) of a GET, or of a POST of body (as JSON) or raw bytes."""
    req = urllib.request.Request(url, data=raw if raw is not None else None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_labels_are_the_methods_own(server):
    """/api/labels: the tokens of the original and the edit with token_labels of their ids (omission
    marks on), the changed-token count, and the token RM's p(bad) on every token of the original."""
    url, a = server
    edited = BAD.replace("fish", "grass")
    status, r = call(url + "/api/labels", {"i": 0, "better": "a", "original": BAD, "edited": edited})
    ids = [T.response_ids(a.enc, t) for t in (BAD, edited)]
    breaks = {a.enc.encode_ordinary(c)[0] for c in ".?!"}
    lo, le = diff_labels.token_labels(*ids, mark_omissions=True, breaks=breaks)
    assert status == 200 and r["original_labels"] == lo and r["edited_labels"] == le
    assert r["original"] == [a.enc.decode([t]) for t in ids[0]] and "".join(r["original"][:-1]) == BAD
    assert [t for t, v in zip(r["original"], lo) if v] == [" fish"] and r["changed"] == 2 and r["warning"] is None
    assert len(r["p_bad"]) == len(lo) and all(0 <= p <= 1 for p in r["p_bad"])
    omitted = BAD[:BAD.index(" The cow eats")] + BAD[BAD.index(".", BAD.index(" The cow eats")) + 1:]  # a fact left out
    status, r = call(url + "/api/labels", {"i": 0, "better": "a", "original": omitted, "edited": BAD})
    assert sum(r["omission"]) == 1 and sum(v < 0 for v in r["original_labels"]) == 1  # the mark alone is bad
    status, r = call(url + "/api/labels", {"i": 0, "better": "a", "original": BAD, "edited": "Cows are nice animals."})
    assert r["share"] > annotate.REWRITE_WARNING and "minimal edit" in r["warning"]


def test_saved_records_are_what_train_reads_and_a_restart_resumes(server, run, tmp_path):
    """Two saves append two records {"prompt", "chosen", "rejected", "edited"} that data.read_jsonl
    (train.py --data) reads; a new server on the same file starts after them."""
    url, a = server
    assert call(url + "/api/state") == (200, {"n": 2, "saved": 0, "next": 0})
    assert call(url + "/api/save", {"i": 0, "better": "a", "original": BAD, "edited": GOOD})[0] == 200
    status, s = call(url + "/api/save", {"i": 1, "better": "b", "original": "The cow eats fish.",
                                         "edited": "The cow eats grass."})
    assert status == 200 and s == {"n": 2, "saved": 2, "next": 2}
    records = data.read_jsonl(a.out)
    assert records[0] == {"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "edited": GOOD}
    assert records[1]["chosen"] == "The cow eats grass." and records[1]["rejected"] == "The cow eats fish."
    assert annotate.Annotator(run, a.out, [dict(p) for p in PAIRS]).state() == {"n": 2, "saved": 2, "next": 2}


def test_a_kill_loses_nothing_saved(run, tmp_path):
    """The server killed (SIGKILL) after a save, and a record cut short as a kill mid-write leaves
    it: the restarted server keeps the whole records, drops the cut one, and saves on."""
    pairs, out = tmp_path / "pairs.jsonl", str(tmp_path / "edits.jsonl")
    data.write_jsonl(str(pairs), [{"prompt": p["prompt"], "chosen": p["a"], "rejected": p["b"]} for p in PAIRS])

    def start():
        p = subprocess.Popen([sys.executable, "annotate.py", f"--run={run}", f"--pairs={pairs}", f"--out={out}",
                              "--port=0"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
        lines = [p.stdout.readline()]
        while not lines[-1].startswith("annotating"):  # a note about a record cut short may come first
            lines.append(p.stdout.readline())
        return p, lines[-1].strip().rsplit(" ", 1)[-1]
    p, url = start()
    assert call(url + "/api/save", {"i": 0, "better": "a", "original": BAD, "edited": GOOD})[0] == 200
    p.send_signal(signal.SIGKILL), p.wait()
    with open(out, "a") as f:
        f.write('{"prompt": "What does the cow eat?", "chosen": "The co')  # half a record
    p, url = start()
    try:
        assert call(url + "/api/state")[1] == {"n": 2, "saved": 1, "next": 1}
        assert call(url + "/api/save", {"i": 1, "better": "b", "original": "The cow eats fish.",
                                        "edited": "The cow eats grass."})[0] == 200
        assert [r["prompt"] for r in data.read_jsonl(out)] == [PROMPT, "What does the cow eat?"]
    finally:
        p.kill(), p.wait()


def test_bad_requests_get_a_4xx_and_one_line(server):
    """Malformed, oversized, non-UTF-8, empty or misdirected requests: a 4xx with a one-line error
    and nothing written; the server binds 127.0.0.1 unless told otherwise."""
    url, a = server
    ok = {"i": 0, "better": "a", "original": BAD, "edited": GOOD}
    cases = [(url + "/api/save", None, b"{not json", 400), (url + "/api/save", {"i": 0}, None, 400),
             (url + "/api/save", {**ok, "i": 7}, None, 400), (url + "/api/save", {**ok, "better": "c"}, None, 400),
             (url + "/api/labels", None, b'{"i": 0, "better": "a", "original": "\xff", "edited": "x"}', 400),
             (url + "/api/save", None, json.dumps({**ok, "edited": "\ud83d"}).encode(), 400),
             (url + "/api/save", None, b"x" * (annotate.MAX_BODY + 1), 413),
             (url + "/api/save", {**ok, "edited": "  "}, None, 409),          # an empty edit
             (url + "/api/save", {**ok, "original": GOOD}, None, 409),        # an edit of the better response
             (url + "/api/nothing", ok, None, 404), (url + "/api/pair/9", None, None, 404), (url + "/x", None, None, 404)]
    for target, body, raw, code in cases:
        status, r = call(target, body, raw)
        assert status == code and "\n" not in r["error"] and "Traceback" not in r["error"], (target, body, raw, r)
    assert not os.path.exists(a.out)
    assert annotate.serve(a, port=0).server_address[0] == "127.0.0.1"


def test_pairs_sampled_from_the_runs_sft_model(run, tmp_path):
    """Without --pairs: two SFT samples for each of n toy-world prompts."""
    a = annotate.Annotator(run, str(tmp_path / "e.jsonl"), n=3)
    assert len(a.pairs) == 3 and all(p["prompt"].endswith(("?", ".")) and {"a", "b"} <= set(p) for p in a.pairs)


CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless Chromium and chromedriver (Debian: chromium chromium-driver)")
def test_a_browser_annotates_a_pair(server, tmp_path):
    """Headless Chromium loads the page, picks A with its key, types an edit, sees the coloured
    labels, saves with Ctrl+Enter, and the JSONL holds the record."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    url, a = server
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,1000"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=webdriver.ChromeService(executable_path=DRIVER), options=options)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, 20)
        wait.until(lambda b: b.find_element(By.ID, "prompt").text == PROMPT)
        browser.find_element(By.TAG_NAME, "body").send_keys("1")  # A is better: B opens in the editor
        edit = wait.until(lambda b: b.find_element(By.ID, "edit") if b.find_element(By.ID, "edit").is_displayed() else None)
        assert edit.get_attribute("value") == BAD
        edit.clear()
        edit.send_keys(GOOD)
        wait.until(lambda b: [s.text.strip() for s in b.find_elements(By.CSS_SELECTOR, "#original-labels .bad")] == ["fish"])
        assert [s.text.strip() for s in browser.find_elements(By.CSS_SELECTOR, "#edited-labels .good")] == ["grass"]
        if os.environ.get("FINEGRAIN_SCREENSHOT"):  # the README's picture: FINEGRAIN_SCREENSHOT=docs/annotate.png
            browser.save_screenshot(os.environ["FINEGRAIN_SCREENSHOT"])
        edit.send_keys(Keys.CONTROL, Keys.ENTER)
        wait.until(lambda b: b.find_element(By.ID, "prompt").text == PAIRS[1]["prompt"])
    finally:
        browser.quit()
    assert data.read_jsonl(a.out) == [{"prompt": PROMPT, "chosen": GOOD, "rejected": BAD, "edited": GOOD}]
