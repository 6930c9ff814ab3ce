"""serve.py as a client sees it: one server subprocess per module on a free loopback port, a tiny random checkpoint,
driven by the official openai client and by raw JSON POSTs shaped like the A3 card's curl. Every answer is checked
against the greedy text model.generate gives for the same messages in this process."""
import base64
import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from PIL import Image

from checkpoint import from_pretrained
from processor import Processor
from test_sample import CTX, REPO, checkpoint

KEY = "test-key"
LIMIT = 8192  # --max_image_bytes


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "a.png")  # 4 image tokens
    Image.radial_gradient("L").resize((96, 64)).save(d / "b.png")  # 6 image tokens
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "big.png")  # ~12 KB of incompressible pixels: over LIMIT
    (d / "notes.txt").write_text("not an image")
    ckpt = checkpoint(d / "random")
    log = open(d / "log", "w+")
    # a batch window wide enough that the concurrent requests below surely share batches on a loaded machine
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--init_from={ckpt}", "--device=cpu",
                          "--port=0", f"--api_key={KEY}", f"--max_image_bytes={LIMIT}", "--batch_window=0.3"],
                         cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 120
        while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", (d / "log").read_text())):
            assert p.poll() is None and time.time() < deadline, (d / "log").read_text()
            time.sleep(0.1)
        url = f"http://127.0.0.1:{m[1]}"
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert json.load(r) == {"status": "ok"}
        yield dict(dir=d, url=url, log=d / "log", a=str(d / "a.png"), b=str(d / "b.png"), big=str(d / "big.png"),
                   txt=str(d / "notes.txt"), client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0),
                   model=from_pretrained(ckpt), proc=Processor.from_pretrained(ckpt), greedy={})
    finally:
        p.terminate()
        p.wait(10)


def data_url(path):
    with open(path, "rb") as f:
        return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def user(text, *urls):
    """The seeds' message shape: a text part, then image_url parts."""
    return [{"role": "user", "content": [{"type": "text", "text": text}] +
             [{"type": "image_url", "image_url": {"url": u}} for u in urls]}]


def greedy(srv, text, paths, n):
    """(text, prompt tokens, completion tokens) of model.generate at temperature 0 with the processor's stop ids."""
    key = (text, tuple(paths), n)
    if key not in srv["greedy"]:
        proc, model = srv["proc"], srv["model"]
        msgs = [{"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image"} for _ in paths]}]
        inputs = proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False), images=paths)
        out = model.generate(inputs["input_ids"], n, temperature=0, pixel_values=inputs.get("pixel_values"),
                             image_grid_thw=inputs.get("image_grid_thw"), stop_ids=proc.stop_ids)[0]
        new = out[inputs["input_ids"].shape[1]:].tolist()
        k = next((i + 1 for i, t in enumerate(new) if t in proc.stop_ids), len(new))  # a stop token counts, as served
        srv["greedy"][key] = proc.decode(new[:k]), inputs["input_ids"].shape[1], k
    return srv["greedy"][key]


def post(srv, body, key=KEY, raw=None):
    """A raw POST as curl sends it: (status, JSON body)."""
    req = urllib.request.Request(srv["url"] + "/v1/chat/completions", data=raw or json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def chat(srv, text, paths, n, stream=False, as_data=True, **kw):
    """One request through the openai client: (text, finish_reason, usage)."""
    msgs = user(text, *[data_url(p) if as_data else p for p in paths])
    c = srv["client"].chat.completions.create(model="schneewolflabs/A3", messages=msgs, max_tokens=n, temperature=0,
                                              stream=stream, **({"stream_options": {"include_usage": True}}
                                                                if stream else {}), **kw)
    if not stream:
        return c.choices[0].message.content, c.choices[0].finish_reason, c.usage
    parts, finish, usage = [], None, None
    for chunk in c:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    return "".join(parts), finish, usage


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("as_data", [True, False], ids=["data-url", "path"])
def test_openai_client_gets_the_greedy_text(srv, stream, as_data):
    want, T, k = greedy(srv, "Describe this image.", [srv["a"]], 12)
    text, finish, usage = chat(srv, "Describe this image.", [srv["a"]], 12, stream=stream, as_data=as_data)
    assert want and text == want
    assert finish == ("length" if k == 12 else "stop")
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (T, k, T + k)


def test_seeds_curl_shape_and_pipeline_parts(srv):
    body = {"model": "schneewolflabs/A3", "temperature": 0, "max_tokens": 10,
            "messages": user("Describe this image in one sentence.", srv["b"])}
    status, r = post(srv, body)
    assert status == 200 and r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
    assert r["choices"][0]["message"]["role"] == "assistant"
    assert r["choices"][0]["message"]["content"] == greedy(srv, "Describe this image in one sentence.", [srv["b"]], 10)[0]
    # the pipeline snippet's part, {"type": "image", "url": ...}, is the same image
    body["messages"][0]["content"][1] = {"type": "image", "url": data_url(srv["b"])}
    assert post(srv, body)[1]["choices"][0]["message"] == r["choices"][0]["message"]
    models = srv["client"].models.list().data
    assert [m.id for m in models] == [str(srv["dir"] / "random")]


def test_http_image_is_fetched(srv):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(srv["dir"]))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{files.server_address[1]}"
        status, r = post(srv, {"temperature": 0, "max_tokens": 8, "messages": user("Hi.", base + "/a.png")})
        assert status == 200 and r["choices"][0]["message"]["content"] == greedy(srv, "Hi.", [srv["a"]], 8)[0]
        for name in ("big.png", "missing.png"):  # over the size limit, and a 404
            status, r = post(srv, {"messages": user("Hi.", f"{base}/{name}")})
            assert status == 400 and r["error"]["param"] == "messages[0].content[1].image_url.url", r
    finally:
        files.shutdown()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_stop_string(srv, stream):
    full, _, _ = greedy(srv, "Tell me.", [], 16)
    stop = full[6:8]
    text, finish, _ = chat(srv, "Tell me.", [], 16, stream=stream, stop=[stop, "\x00never"])
    assert text == full[:full.index(stop)] and finish == "stop"


def test_eight_concurrent_clients_get_what_they_get_alone(srv):
    """Different images, prompts, lengths and stream modes at once: each answer is its greedy answer alone, and the
    server's log shows they were decoded in shared batches."""
    jobs = [(f"Picture {i}?", [[srv["a"]], [srv["b"]], [], [srv["a"], srv["b"]]][i % 4], 6 + i, i % 2 == 1)
            for i in range(8)]
    want = [greedy(srv, text, paths, n) for text, paths, n, _ in jobs]
    start = srv["log"].read_text().count("batch of")
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: chat(srv, j[0], j[1], j[2], stream=j[3]), jobs))
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2].completion_tokens for g in got] == [w[2] for w in want]
    deadline = time.time() + 10  # a batch's line is logged after its rows' answers have gone out
    while sum(sizes := [int(s) for s in re.findall(r"batch of (\d+):", srv["log"].read_text())[start:]]) < 8 \
            and time.time() < deadline:
        time.sleep(0.05)
    assert sum(sizes) == 8 and max(sizes) > 1, sizes


def test_sampling_with_a_seed_repeats(srv):
    """temperature > 0 samples (here: differently from greedy), and the same seed gives the same text, also while
    other requests with other settings are decoded around it."""
    def sampled(seed):
        return srv["client"].chat.completions.create(model="m", messages=user("Tell me."), max_tokens=12,
                                                     temperature=1.5, top_p=0.9, seed=seed).choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(sampled, [7, 7, 8, None]))
    assert got[0] == got[1] == sampled(7) and got[0] != greedy(srv, "Tell me.", [], 12)[0]


BAD = [  # (request body or raw bytes, status, the field the error names)
    (b"{not json", 400, None),
    ({"model": "x"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": user("Hi.", "data:image/png;base64,aGVsbG8gd29ybGQ=")}, 400, "messages[0].content[1].image_url.url"),
    ({"messages": user("Hi.", "data:image/png;base64,@@@")}, 400, "messages[0].content[1].image_url.url"),
    ({"messages": user("Hi.", "{txt}")}, 400, "messages[0].content[1].image_url.url"),
    ({"messages": user("Hi.", "{big_data}")}, 400, "messages[0].content[1].image_url.url"),
    ({"messages": user("Hi.", "{big}")}, 400, "messages[0].content[1].image_url.url"),
    ({"max_tokens": CTX, "messages": user("Hi.", "{a}")}, 400, "max_tokens"),
    ({"max_tokens": 4, "messages": user("Hi." * 100)}, 400, "messages"),
    ({"temperature": "hot", "messages": user("Hi.")}, 400, "temperature"),
    ({"messages": user("Hi."), "stop": 3}, 400, "stop"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[
    "malformed-json", "no-messages", "empty-messages", "not-an-image", "bad-base64", "text-file", "big-data-url",
    "big-file", "prompt-plus-max-tokens", "prompt-over-context", "bad-temperature", "bad-stop"])
def test_bad_request_then_next_succeeds(srv, body, status, param):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{txt}", srv["txt"]).replace("{big_data}", data_url(srv["big"]))
                          .replace("{big}", srv["big"]).replace("{a}", srv["a"]))
    got, r = post(srv, body if isinstance(body, dict) else None, raw=body if isinstance(body, bytes) else None)
    assert got == status and r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error", r
    assert param is None or r["error"]["message"].startswith(param), r  # the message opens with the field
    assert chat(srv, "Describe this image.", [srv["a"]], 3)[0] == greedy(srv, "Describe this image.", [srv["a"]], 3)[0]


def test_wrong_key_is_401_and_the_client_raises(srv):
    got, r = post(srv, {"messages": user("Hi.")}, key="wrong")
    assert got == 401 and r["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=srv["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=user("Hi."), max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        srv["client"].chat.completions.create(model="m", messages=user("Hi.", srv["a"]), max_tokens=CTX)
    assert chat(srv, "Hi.", [], 3)[0] == greedy(srv, "Hi.", [], 3)[0]
