"""serve.py as a client sees it: server subprocesses on free loopback ports, driven by the official openai client, by
raw JSON POSTs shaped like the A3 card's curl and by raw sockets. One serves a tiny random checkpoint, and every answer
is checked against the greedy text model.generate gives for the same messages in this process; the other a scripted
one that always answers with reasoning, content and a tool call, so the parsing of each is checked exactly."""
import base64
import functools
import http.client
import http.server
import json
import os
import re
import select
import socket
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
from test_sample import REPO, checkpoint

KEY = "test-key"
LIMIT = 8192  # --max_image_bytes
CTX = 1024  # the random model's context: room for a request that decodes for seconds
LONG = 900  # max_tokens of such a request; the random model never stops on its own after "Tell me."
REASON, ANSWER = "I should look it up.", "Let me check."
CALL = '\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
PLAIN = ANSWER + "<tool_call>" + CALL + "</tool_call>"  # the content of the scripted answer to a request with no tools
# the scripted model's answer to any prompt, which the chat template ends with a newline
SCRIPT = ["Ċ", "<think>", REASON, "</think>", ANSWER, "<tool_call>", CALL, "</tool_call>", "<|im_end|>"]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


def start(d, ckpt, *args):
    """serve.py on ckpt in a subprocess: (process, base URL, log path)."""
    log = open(d / "log", "w+")
    p = subprocess.Popen([sys.executable, os.path.join(REPO, "serve.py"), f"--init_from={ckpt}", "--device=cpu",
                          "--port=0", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (m := re.search(r"on http://127\.0\.0\.1:(\d+)/v1", (d / "log").read_text())):
        assert p.poll() is None and time.time() < deadline, (d / "log").read_text()
        time.sleep(0.1)
    url = f"http://127.0.0.1:{m[1]}"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert json.load(r)["status"] == "ok"
    return p, url, d / "log"


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "a.png")  # 4 image tokens
    Image.radial_gradient("L").resize((96, 64)).save(d / "b.png")  # 6 image tokens
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(d / "big.png")  # ~12 KB of incompressible pixels: over LIMIT
    (d / "notes.txt").write_text("not an image")
    ckpt = checkpoint(d / "random", ctx=CTX)
    p, url, log = start(d, ckpt, f"--api_key={KEY}", f"--max_image_bytes={LIMIT}", f"--allowed_local_media_path={d}")
    try:
        yield dict(dir=d, url=url, log=log, a=str(d / "a.png"), b=str(d / "b.png"), big=str(d / "big.png"),
                   txt=str(d / "notes.txt"), client=openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0),
                   model=from_pretrained(ckpt), proc=Processor.from_pretrained(ckpt), greedy={})
    finally:
        p.terminate()
        p.wait(10)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    """No key, no local files, and short timeouts: a stalled upload is cut after 3 s, and so is an image download."""
    d = tmp_path_factory.mktemp("scripted")
    ckpt = checkpoint(d / "scripted", scripted=SCRIPT, ctx=CTX)
    p, url, log = start(d, ckpt, "--request_timeout=3", "--fetch_timeout=3")
    try:
        yield dict(url=url, log=log, client=openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0),
                   proc=Processor.from_pretrained(ckpt))
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


def greedy(srv, text, paths, n, messages=None, tools=None):
    """(text, prompt tokens, completion tokens) of model.generate at temperature 0 with the processor's stop ids, for
    a user turn of text and images, or for messages as the chat template takes them."""
    key = (text, tuple(paths), n, json.dumps(messages), json.dumps(tools))
    if key not in srv["greedy"]:
        proc, model = srv["proc"], srv["model"]
        msgs = messages or [{"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image"}] * len(
            paths)}]
        inputs = proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tools=tools),
                      images=paths)
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


def health(srv):
    with urllib.request.urlopen(srv["url"] + "/health", timeout=10) as r:
        return json.load(r)


def until(srv, ready, what):
    """/health once ready(/health) holds; fails after 20 s, naming what it waited for."""
    deadline = time.time() + 20
    while not ready(h := health(srv)):
        assert time.time() < deadline, f"waited 20 s for {what}: {h}"
        time.sleep(0.02)
    return h


def idle(srv):
    return until(srv, lambda h: h["running"] == h["waiting"] == 0, "an idle engine")


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


def test_a_short_request_finishes_while_a_long_one_decodes(srv):
    """Continuous batching: a request that comes while another decodes joins it at the next step and leaves when it
    ends, where a static batch would make it wait for all LONG tokens; the long one goes on, and stops once its
    client closes the stream."""
    idle(srv)
    long = srv["client"].chat.completions.create(model="m", messages=user("Tell me."), max_tokens=LONG, temperature=0,
                                                 stream=True)
    for chunk in long:  # until it is decoding
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert chat(srv, "Hi.", [srv["a"]], 4)[0] == greedy(srv, "Hi.", [srv["a"]], 4)[0]
    assert health(srv)["running"] == 1  # the long one, still decoding
    long.close()
    idle(srv)


def test_eight_concurrent_clients_get_what_they_get_alone(srv):
    """Different images, prompts, lengths and stream modes at once: each answer is its greedy answer alone, and the
    engine's step count shows they shared steps: 8 requests decoded one after another need a step per token."""
    jobs = [(f"Picture {i}?", [[srv["a"]], [srv["b"]], [], [srv["a"], srv["b"]]][i % 4], 20 + 5 * i, i % 2 == 1)
            for i in range(8)]
    want = [greedy(srv, text, paths, n) for text, paths, n, _ in jobs]
    before = idle(srv)
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda j: chat(srv, j[0], j[1], j[2], stream=j[3]), jobs))
    after = idle(srv)
    assert [g[0] for g in got] == [w[0] for w in want]
    assert [g[2].completion_tokens for g in got] == [w[2] for w in want]
    decoded = sum(w[2] - 1 for w in want)  # the first token of each comes from its prefill
    assert after["generated_tokens"] - before["generated_tokens"] == decoded + 8
    assert after["steps"] - before["steps"] < decoded


def test_mixed_temperatures_share_a_batch_and_seeds_repeat(srv):
    """Rows sample with their own temperature, top_p and seed in one batch: a seeded request gets the text it gets
    alone, a greedy one its greedy text, and they decode in shared steps."""
    def ask(job):
        seed, temperature, top_p = job
        r = srv["client"].chat.completions.create(model="m", messages=user("Tell me."), max_tokens=24, seed=seed,
                                                  temperature=temperature, top_p=top_p)
        return r.choices[0].message.content, r.usage.completion_tokens
    jobs = [(7, 1.5, 0.9), (7, 1.5, 0.9), (8, 0.8, 1.0), (None, 1.0, 1.0), (None, 0, 1.0)]
    alone = ask(jobs[0])
    before = idle(srv)
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(ask, jobs))
    after = idle(srv)
    want = greedy(srv, "Tell me.", [], 24)[0]
    assert got[0] == got[1] == alone and alone[0] != want and got[4][0] == want
    assert after["steps"] - before["steps"] < sum(n - 1 for _, n in got)  # the first token of each from its prefill


def test_tools_render_into_the_prompt(srv):
    """tools, an assistant's tool_calls and a tool's answer are the checkpoint's chat template's to render: the
    served text is the greedy text of that prompt. tool_choice 'none' leaves the tools out."""
    msgs = [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    want, T, _ = greedy(srv, "", [], 12, messages=msgs, tools=TOOLS)
    r = srv["client"].chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == want and r.usage.prompt_tokens == T
    r = srv["client"].chat.completions.create(model="m", messages=msgs, tools=TOOLS, tool_choice="none", max_tokens=12,
                                              temperature=0)
    assert r.usage.prompt_tokens == greedy(srv, "", [], 12, messages=msgs)[1] < T


def streamed(client, **kw):
    """A stream's parts joined: (reasoning, content, [(name, arguments)], finish_reason)."""
    reasoning, content, calls, finish = "", "", {}, None
    for chunk in client.chat.completions.create(model="m", stream=True, **kw):
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        reasoning += getattr(d, "reasoning_content", None) or ""
        content += d.content or ""
        for c in d.tool_calls or []:
            if c.id:
                assert c.type == "function" and c.function.arguments == "" and c.index not in calls
                calls[c.index] = [c.function.name, ""]
            else:
                calls[c.index][1] += c.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)], finish


def test_reasoning_and_tool_calls_come_apart(scripted):
    """The scripted answer '<think>REASON</think>ANSWER<tool_call>CALL</tool_call>': reasoning_content, content and
    tool_calls as vLLM returns them, whole and streamed; without tools the call is content."""
    c, msgs = scripted["client"], user("Weather in Paris?")
    r = c.chat.completions.create(model="m", messages=msgs, tools=TOOLS, max_tokens=20, temperature=0)
    m, args = r.choices[0].message, {"city": "Paris"}
    assert (m.reasoning_content, m.reasoning, m.content) == (REASON, REASON, ANSWER)
    assert [(t.type, t.function.name, json.loads(t.function.arguments)) for t in m.tool_calls] == [
        ("function", "get_weather", args)] and m.tool_calls[0].id.startswith("call_")
    assert r.choices[0].finish_reason == "tool_calls"
    reasoning, content, calls, finish = streamed(c, messages=msgs, tools=TOOLS, max_tokens=20, temperature=0)
    assert (reasoning, content, finish) == (REASON, ANSWER, "tool_calls")
    assert [(name, json.loads(a)) for name, a in calls] == [("get_weather", args)]
    r = c.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0)
    m = r.choices[0].message
    assert (m.reasoning_content, m.content, m.tool_calls) == (REASON, PLAIN, None)
    assert r.choices[0].finish_reason == "stop"
    assert streamed(c, messages=msgs, max_tokens=20, temperature=0) == (REASON, m.content, [], "stop")


def test_thinking_per_request(scripted):
    """chat_template_kwargs, as vLLM takes them, over the server's thinking=off: enable_thinking true leaves out the
    empty think block the template pre-fills otherwise."""
    proc, msgs = scripted["proc"], user("Weather in Paris?")
    n = {think: len(proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=think))[
        "input_ids"][0]) for think in (False, True)}
    assert n[True] < n[False]
    for think in (None, False, True):
        kw = {} if think is None else {"extra_body": {"chat_template_kwargs": {"enable_thinking": think}}}
        r = scripted["client"].chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0, **kw)
        assert r.usage.prompt_tokens == n[bool(think)] and r.choices[0].message.reasoning_content == REASON
    # a <think> the user wrote opens no reasoning: only one in the template's generation prompt would
    r = scripted["client"].chat.completions.create(model="m", messages=user("What does <think> do?"), max_tokens=20,
                                                   extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert r.choices[0].message.reasoning_content == REASON


def test_local_paths_only_under_the_allowed_directory(srv, scripted):
    """A local path or file:// URL is read only under --allowed_local_media_path, and a refusal says the same whether
    the path exists or not (here, with the path itself left out)."""
    where = "messages[0].content[1].image_url.url"
    missing = str(srv["dir"] / "missing.png")
    refused = [post(scripted, {"messages": user("Hi.", p)}) for p in (srv["a"], missing, "/etc/passwd",
                                                                      "file:///etc/passwd", "file://" + srv["a"])]
    assert all(status == 400 and r["error"]["param"] == where for status, r in refused), refused
    assert len({r["error"]["message"] for _, r in refused}) == 1 and "--allowed_local_media_path" in refused[0][1][
        "error"]["message"]
    os.symlink("/etc/passwd", srv["dir"] / "passwd.png")
    outside = ["/etc/passwd", "/etc/no-such-file", "/proc/self/environ", str(srv["dir"] / "passwd.png"),
               f"{srv['dir']}/../{os.path.basename(srv['dir'])}-elsewhere/a.png", "file:///etc/passwd"]
    refused = [(p, *post(srv, {"messages": user("Hi.", p)})) for p in outside]
    assert all(status == 400 and r["error"]["param"] == where for _, status, r in refused), refused
    assert len({r["error"]["message"].replace(p, "PATH") for p, _, r in refused}) == 1, refused
    # under the directory, as a path (the tests above) and as a file:// URL
    assert chat(srv, "Hi.", ["file://" + srv["a"]], 4, as_data=False)[0] == greedy(srv, "Hi.", [srv["a"]], 4)[0]


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
    ({"max_tokens": 4, "messages": user("Hi." * 400)}, 400, "messages"),
    ({"max_tokens": 4, "messages": user("x" * 20_000)}, 400, "messages"),
    ({"temperature": "hot", "messages": user("Hi.")}, 400, "temperature"),
    ({"messages": user("Hi."), "stop": 3}, 400, "stop"),
    ({"messages": user("Hi."), "tools": [{"type": "function"}]}, 400, "tools"),
    ({"messages": user("Hi."), "tools": TOOLS, "tool_choice": "required"}, 400, "tool_choice"),
    ({"messages": user("Hi.") + [{"role": "assistant", "tool_calls": [{"id": "x"}]}]}, 400, "messages[1].tool_calls"),
    ({"messages": user("Hi."), "chat_template_kwargs": {"tools": []}}, 400, "chat_template_kwargs"),
]


@pytest.mark.parametrize("body, status, param", BAD, ids=[
    "malformed-json", "no-messages", "empty-messages", "not-an-image", "bad-base64", "text-file", "big-data-url",
    "big-file", "prompt-plus-max-tokens", "prompt-over-context", "text-over-context", "bad-temperature", "bad-stop",
    "bad-tools", "tool-choice-required", "bad-tool-calls", "bad-template-kwargs"])
def test_bad_request_then_next_succeeds(srv, body, status, param):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace("{txt}", srv["txt"]).replace("{big_data}", data_url(srv["big"]))
                          .replace("{big}", srv["big"]).replace("{a}", srv["a"]))
    got, r = post(srv, body if isinstance(body, dict) else None, raw=body if isinstance(body, bytes) else None)
    assert got == status and r["error"]["param"] == param and r["error"]["type"] == "invalid_request_error", r
    assert param is None or r["error"]["message"].startswith(param), r  # the message opens with the field
    if param == "messages" and "x" * 100 in json.dumps(body):  # refused by its length, before it is tokenized
        assert "characters" in r["error"]["message"] and r["error"]["code"] == "context_length_exceeded", r
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


def test_every_method_and_path_gets_a_json_error(srv):
    host, port = srv["url"].removeprefix("http://").split(":")
    for method, path, status in [("PUT", "/v1/chat/completions", 405), ("DELETE", "/v1/models", 405),
                                 ("PATCH", "/health", 405), ("GET", "/nowhere", 404), ("POST", "/nowhere", 404),
                                 ("TRACE", "/health", 501)]:
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        c.request(method, path, body=b"{}")
        r = c.getresponse()
        assert (r.status, r.getheader("Content-Type")) == (status, "application/json"), (method, path)
        assert json.load(r)["error"]["message"], (method, path)
        c.close()
    with socket.create_connection((host, int(port)), timeout=10) as s:  # a request line of four words
        s.sendall(b"GET / / HTTP/1.1\r\n\r\n")
        head, _, body = s.makefile("rb").read().partition(b"\r\n\r\n")
        assert b" 400 " in head.split(b"\r\n")[0] and json.loads(body)["error"]["message"], head


def test_a_client_that_leaves_is_cancelled(srv):
    """A non-streamed request's client that closes its connection ends the request at once, as a stream's does."""
    before = idle(srv)
    host, port = srv["url"].removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)), timeout=10)
    body = json.dumps({"messages": user("Tell me."), "max_tokens": LONG, "temperature": 0}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: "
              b"Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    until(srv, lambda h: h["running"] == 1, "the request to decode")
    s.close()
    after = idle(srv)
    assert after["generated_tokens"] - before["generated_tokens"] < LONG


def dripping(seconds):
    """An http server that answers every GET with a 100 kB image's headers, then one byte every 0.25 s."""
    class Drip(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            for _ in range(int(seconds / 0.25)):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.25)

        def log_message(self, *args):
            pass
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Drip)
    files.daemon_threads = True
    threading.Thread(target=files.serve_forever, daemon=True).start()
    return files


def test_a_stalled_client_delays_no_one(scripted):
    """A client that stops halfway through its upload, and an image that downloads a byte at a time, hold up only
    their own requests: others are answered meanwhile. The upload is answered 408 after --request_timeout (3 s), and
    the download is given up after --fetch_timeout (3 s) in all, not per read."""
    host, port = scripted["url"].removeprefix("http://").split(":")
    stalled = socket.create_connection((host, int(port)), timeout=20)
    stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"messages")
    files = dripping(20)
    slow = {}

    def fetch():
        t0 = time.time()
        slow["reply"] = post(scripted, {"messages": user("Hi.", f"http://127.0.0.1:{files.server_address[1]}/a.png")})
        slow["seconds"] = time.time() - t0
    fetching = threading.Thread(target=fetch)
    fetching.start()
    try:
        for _ in range(3):
            m = scripted["client"].chat.completions.create(model="m", messages=user("Hi."), max_tokens=20).choices[0]
            assert m.message.content == PLAIN
        assert not select.select([stalled], [], [], 0)[0] and "reply" not in slow  # both still waiting
        head, _, body = stalled.makefile("rb").read().partition(b"\r\n\r\n")
        assert b" 408 " in head.split(b"\r\n")[0] and json.loads(body)["error"]["message"].startswith("request body")
        fetching.join(30)
        status, r = slow["reply"]
        assert status == 400 and "fetch_timeout" in r["error"]["message"] and slow["seconds"] < 10, slow
    finally:
        stalled.close()
        files.shutdown()


def test_64_concurrent_clients_are_all_answered(scripted):
    """A burst of new connections waits in the listen backlog: none is reset, and each gets its answer."""
    host, port = scripted["url"].removeprefix("http://").split(":")
    body = json.dumps({"messages": user("Hi."), "max_tokens": 20})
    ready = threading.Barrier(64)

    def one(_):
        ready.wait()
        c = http.client.HTTPConnection(host, int(port), timeout=60)
        c.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        r = c.getresponse()
        return r.status, json.load(r)["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(64) as pool:
        assert list(pool.map(one, range(64))) == [(200, PLAIN)] * 64


def test_still_answers_after_all_of_it(srv, scripted):
    idle(srv)
    assert chat(srv, "Describe it.", [srv["b"]], 10)[0] == greedy(srv, "Describe it.", [srv["b"]], 10)[0]
    assert scripted["client"].chat.completions.create(model="m", messages=user("Hi."), max_tokens=20).choices[
        0].message.content == PLAIN
    for log in (srv["log"], scripted["log"]):  # clients that left or stalled are no server error
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
