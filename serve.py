"""
Serve an Artemis graft behind the OpenAI chat-completions API, as the A3 card's vLLM/SGLang snippet calls it.

    python serve.py --init_from=schneewolflabs/A3
    python serve.py --init_from=out-stage1 --port=8080 --max_batch=16 --api_key=secret
    python serve.py --allowed_local_media_path=/data/photos   # clients may name images under /data/photos

The standard library's ThreadingHTTPServer, as mlx-lm's server: no dependency beyond the model's own. Endpoints:
POST /v1/chat/completions (messages, max_tokens or max_completion_tokens, temperature, top_p, top_k, seed, stop,
stream, stream_options.include_usage, tools, tool_choice, chat_template_kwargs), GET /v1/models and GET /health.
Content is a string or a list of parts: text, {"type": "image_url", "image_url": {"url": ...}} and {"type": "image",
"url"/"image": ...}; a URL is a data: URL (base64), an http(s) URL (a deadline and a size limit for the download), or
a local path or file:// URL, read only under --allowed_local_media_path. One thread per connection parses a request
and preprocesses its images; engine.py's continuous batching decodes them all (a request joins the running batch at
the next step and leaves it when it ends). Replies split <think>...</think> into reasoning_content and
<tool_call>...</tool_call> into tool_calls, as vLLM's Qwen3 reasoning and Hermes tool parsers do. Bad requests get an
OpenAI-style JSON error naming the field, as does every unknown method or path. Binds 127.0.0.1 unless --host says
otherwise.
"""
import base64
import binascii
import io
import json
import os
import queue
import select
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from configurator import configure, die
from checkpoint import demo
from engine import Engine, Request, held, load
from processor import load_image

# -----------------------------------------------------------------------------
init_from = ""  # an artemis checkpoint dir, a training out_dir (checkpoint in <out_dir>/ckpt) or a hub repo id
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = ""  # '': bfloat16 on CUDA, float32 on CPU
compile = False  # torch.compile the one-token decode step, at startup; its shapes never change after
quantize = ""  # 'int8': the decoder's linear layers in int8 (quantize.py writes such a checkpoint)
min_pixels = None  # None: the checkpoint's preprocessor_config.json
max_pixels = None
thinking = "off"  # a request's default: 'on' lets the model reason in <think>...</think> first; 'off' pre-fills an
# empty think block. A request's chat_template_kwargs {"enable_thinking": ...} wins
host = "127.0.0.1"  # '0.0.0.0' to listen on every interface
port = 8000
max_batch = 8  # KV-cache slots: requests decoded together
max_model_len = 4096  # a request's prompt + max_tokens at most (and at most the model's context); every slot's cache
# holds this many tokens, and each step attends over all of them (vLLM's --max-model-len)
batching = "continuous"  # 'static': a new batch only once every row of the last has ended (request-level batching,
# serve.py's before engine.py; for bench.py's comparison)
batch_window = 0.05  # static batching: seconds a new batch waits for max_batch requests
api_key = ""  # '': no key; else clients send 'Authorization: Bearer <api_key>'
max_tokens = 512  # a request's max_tokens when it gives none (capped by the context)
max_image_bytes = 20 * 2**20  # an image (data: URL, file or download) larger than this is refused
fetch_timeout = 10.0  # seconds an http(s) image may take to download, all of it
request_timeout = 30.0  # seconds a client may stall while it sends a request (its headers or body) or reads a stream
allowed_local_media_path = ""  # '': local paths and file:// URLs are refused; a directory: images under it may be read
configure(globals())
# -----------------------------------------------------------------------------
MAX_BODY = 4 * max_image_bytes  # a request body larger than this is refused before it is read
TEMPLATE_ARGS = ("messages", "tools", "documents", "add_generation_prompt", "tokenize", "chat_template")


class BadRequest(Exception):
    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def read_url(url, where):
    """The bytes of an http(s) URL, within fetch_timeout for the whole download and max_image_bytes."""
    deadline, data = time.monotonic() + fetch_timeout, bytearray()
    try:
        with urllib.request.urlopen(url, timeout=fetch_timeout) as r:  # each read waits fetch_timeout at most
            while chunk := r.read1(2**16):
                data += chunk
                if len(data) > max_image_bytes:
                    raise BadRequest(f"{where}: the image is over the {max_image_bytes} byte limit", where)
                if time.monotonic() > deadline:
                    raise BadRequest(f"{where}: fetching {url} took over fetch_timeout={fetch_timeout} s", where)
    except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
        raise BadRequest(f"{where}: fetching {url} failed ({e})", where) from None
    return data


def read_local(url, where):
    """The bytes of a path or file:// URL under allowed_local_media_path. A refusal never says whether a path outside
    it exists."""
    if not allowed_local_media_path:
        raise BadRequest(f"{where}: expected a data: or http(s) URL; this server reads no local files (start it with "
                         "--allowed_local_media_path=DIR to let clients name images under DIR)", where)
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file:") else url
    path, root = os.path.realpath(path), os.path.realpath(allowed_local_media_path)
    if os.path.commonpath([path, root]) != root:
        raise BadRequest(f"{where}: {url} is not under --allowed_local_media_path", where)
    if not os.path.isfile(path):
        raise BadRequest(f"{where}: {url} is not a file under --allowed_local_media_path", where)
    if os.path.getsize(path) > max_image_bytes:
        raise BadRequest(f"{where}: {url} is over the {max_image_bytes} byte limit", where)
    with open(path, "rb") as f:
        return f.read()


def fetch_image(url, where):
    """A PIL image from a data: URL, an http(s) URL or an allowed local path (or file:// URL)."""
    if not isinstance(url, str) or not url:
        raise BadRequest(f"{where}: expected an image URL string", where)
    if url.startswith("data:"):
        head, comma, payload = url.partition(",")
        if not comma or not head.endswith(";base64"):
            raise BadRequest(f"{where}: expected a base64 data URL, 'data:image/<type>;base64,<data>'", where)
        if len(payload) * 3 // 4 > max_image_bytes:
            raise BadRequest(f"{where}: the image is over the {max_image_bytes} byte limit", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadRequest(f"{where}: the data URL is not valid base64 ({e})", where) from None
    else:
        data = read_url(url, where) if url.startswith(("http://", "https://")) else read_local(url, where)
    if len(data) > max_image_bytes:
        raise BadRequest(f"{where}: the image is over the {max_image_bytes} byte limit", where)
    try:
        return load_image(io.BytesIO(data))
    except ValueError:
        raise BadRequest(f"{where}: {len(data)} bytes that are not a decodable image", where) from None


def parse_messages(messages):
    """OpenAI messages -> (messages as the chat template takes them, images in order)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {'role': ..., 'content': ...}", "messages")
    out, images = [], []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise BadRequest(f"messages[{i}]: expected an object with a 'role' string", f"messages[{i}]")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                where = f"messages[{i}].content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    parts.append({"type": "text", "text": part["text"]})
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    images.append(fetch_image(url, where + ".image_url.url"))
                    parts.append({"type": "image"})
                elif kind == "image":
                    images.append(fetch_image(part.get("url") or part.get("image"), where + ".url"))
                    parts.append({"type": "image"})
                else:
                    raise BadRequest(f"{where}: expected a text, image_url or image part", where)
            content = parts
        elif content is not None and not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content: expected a string or a list of parts", f"messages[{i}].content")
        calls = m.get("tool_calls")
        if calls is not None and not (functions(calls) and all(
                isinstance(c["function"].get("arguments", ""), (str, dict)) for c in calls)):
            raise BadRequest(f"messages[{i}].tool_calls: expected a list of {{'id', 'type': 'function', 'function': "
                             "{'name', 'arguments'}}", f"messages[{i}].tool_calls")
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out, images


def functions(x):
    """Whether x is a list of {"function": {"name": <string>, ...}, ...}, as tools and tool_calls both are."""
    return isinstance(x, list) and all(isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(
        t["function"].get("name"), str) for t in x)


def parse_tools(body):
    """The request's tools as the chat template takes them, or None: none given, or tool_choice 'none'."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise BadRequest(f"tool_choice: expected 'auto' or 'none', got {choice!r} (a named or required call needs "
                         "constrained decoding, which serve.py does not do)", "tool_choice")
    if tools is not None and not (functions(tools) and all(t.get("type") == "function" for t in tools)):
        raise BadRequest("tools: expected a list of {'type': 'function', 'function': {'name', 'description', "
                         "'parameters'}}", "tools")
    return tools if tools and choice != "none" else None


def number(body, key, default, lo, hi, whole=False):
    v = body.get(key)
    if v is None:
        return default
    ok = isinstance(v, int) if whole else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or not lo <= v <= hi:
        raise BadRequest(f"{key}: expected {'a whole number' if whole else 'a number'} in [{lo}, {hi}], got {v!r}",
                         key)
    return v


def parse_request(body):
    """A chat-completions body -> (engine Request, how to answer it), or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("request body: expected a JSON object")
    messages, images = parse_messages(body.get("messages"))
    tools = parse_tools(body)
    if body.get("n", 1) != 1:
        raise BadRequest("n: only 1 choice per request is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop: expected a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream: expected true or false", "stream")
    options, kwargs = body.get("stream_options") or {}, body.get("chat_template_kwargs") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options: expected an object", "stream_options")
    if not isinstance(kwargs, dict) or set(kwargs) & set(TEMPLATE_ARGS):
        raise BadRequest(f"chat_template_kwargs: expected an object of template variables other than "
                         f"{', '.join(TEMPLATE_ARGS)}", "chat_template_kwargs")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = number(body, key, None, 1, context, whole=True)
    sampling = dict(temperature=number(body, "temperature", 1.0, 0, 2), top_p=number(body, "top_p", 1.0, 0, 1),
                    top_k=max(number(body, "top_k", 0, -1, 2**31, whole=True), 0),  # vLLM's -1 or 0: every token
                    seed=number(body, "seed", None, -2**63, 2**64 - 1, whole=True))
    if sampling["top_p"] == 0:
        raise BadRequest("top_p: expected a number in (0, 1], got 0", "top_p")
    where = "the model's context" if context == model.config.text.max_position_embeddings else "--max_model_len"
    try:
        kw = {"enable_thinking": thinking == "on", **kwargs}
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, tools=tools, **kw)
        if len(chat) > max_token_chars * context:  # too long for any tokenization: refused before a slow tokenizing
            raise BadRequest(f"messages: {len(chat)} characters of prompt, more than {where} of {context} tokens "
                             "can hold", "messages", code="context_length_exceeded")
        inputs = processor(chat, images=images)
        prompt = chat[len(processor.apply_chat_template(messages, tools=tools, **kw)):]  # the generation prompt alone
    except ValueError as e:
        raise BadRequest(f"messages: {e}", "messages") from None
    T = inputs["input_ids"].shape[1]
    n = limit or min(max_tokens, context - T)
    if T + n > context:
        param = key if limit and T < context else "messages"
        raise BadRequest(f"{param}: the prompt is {T} tokens and {key} {n}, together more than {where} of {context}",
                         param, code="context_length_exceeded")
    r = Request(inputs["input_ids"][0], n, inputs.get("pixel_values"), inputs.get("image_grid_thw"), stop=stop,
                **sampling)
    opened = prompt.rfind("<think>") > prompt.rfind("</think>")  # it opens the reasoning (Qwen3's thinking models do)
    return r, dict(stream=body.get("stream", False), usage=bool(options.get("include_usage")),
                   reply=Reply(opened, tools is not None), prompt_tokens=T)


# -----------------------------------------------------------------------------
# the answer's parts: reasoning, content and tool calls

class Reply:
    """The model's text split as vLLM's Qwen3 reasoning parser and Hermes tool parser split it: what is inside
    <think>...</think> (at the start of the answer, or opened by the prompt) is reasoning; each <tool_call>{"name",
    "arguments"}</tool_call> (when the request gave tools) a tool call; the rest the content, exactly as generated.
    feed() turns the text as it comes into OpenAI chunk deltas, holding back what may still become a tag; the whole
    answer is the same deltas joined, so a stream and a reply always agree."""

    def __init__(self, opened, tools):  # opened: the prompt ends inside a <think> block
        self.state, self.buf = "start", "<think>" if opened else ""
        self.tools, self.newlines, self.calls = tools, "", 0

    def feed(self, text, final=False):
        self.buf += text
        out = []
        while True:
            if self.state == "start":  # is this the start of a reasoning block?
                s = self.buf.lstrip()
                if s.startswith("<think>"):
                    self.state, self.buf = "reasoning", s[len("<think>"):].lstrip("\n")
                elif "<think>".startswith(s) and not final:
                    return out
                else:
                    self.state = "content"
            elif self.state == "reasoning":
                i = self.buf.find("</think>")
                if i < 0:
                    keep = 0 if final else held(self.buf, ["</think>"])
                    return self.emit(out, "reasoning_content", len(self.buf) - keep)
                self.emit(out, "reasoning_content", i, skip=len("</think>"))
                self.state, self.newlines = "after", ""  # the newlines before </think> and after it are the format's
            elif self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if not self.buf and not final:
                    return out
                self.state = "content"
            elif self.state == "content":
                i = self.buf.find("<tool_call>") if self.tools else -1
                if i < 0:
                    keep = 0 if final or not self.tools else held(self.buf, ["<tool_call>"])
                    return self.emit(out, "content", len(self.buf) - keep, final)
                self.emit(out, "content", i, skip=len("<tool_call>"))
                self.state, self.newlines = "call", ""
            else:  # inside a tool call
                i = self.buf.find("</tool_call>")
                if i < 0 and not final:
                    return out
                call = tool_call(self.buf[:i]) if i >= 0 else None
                if call is None:  # not a call after all: its text is content, tags and all
                    n = len("<tool_call>") + (i + len("</tool_call>") if i >= 0 else len(self.buf))
                    self.state, self.buf = "content", "<tool_call>" + self.buf
                    self.emit(out, "content", n, final)
                    continue
                out += [{"tool_calls": [{"index": self.calls, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                         "function": {"name": call["name"], "arguments": ""}}]},
                        {"tool_calls": [{"index": self.calls, "function": {"arguments": call["arguments"]}}]}]
                self.calls += 1
                self.state, self.buf = "after", self.buf[i + len("</tool_call>"):]

    def emit(self, out, kind, n, final=False, skip=0):
        """The next n characters of the buffer as a delta of this kind, less the buffer's skip characters after them;
        trailing newlines wait for what follows (a closing tag drops them), unless final."""
        text, self.buf = self.newlines + self.buf[:n], self.buf[n + skip:]
        body = text if final else text.rstrip("\n")
        self.newlines = "" if skip else text[len(body):]
        if body:
            out.append({kind: body, "reasoning": body} if kind == "reasoning_content" else {kind: body})
        return out

    def finish(self, finish):
        return "tool_calls" if self.calls and finish == "stop" else finish


def tool_call(text):
    """{"name", "arguments" (a JSON string)} from the JSON inside <tool_call>...</tool_call>, or None."""
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return None
    args = call.get("arguments", {})
    return {"name": call["name"], "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}


def message(deltas):
    """A non-streamed reply's message: the stream's deltas joined."""
    content, reasoning, calls = "", "", []
    for d in deltas:
        content += d.get("content", "")
        reasoning += d.get("reasoning_content", "")
        for c in d.get("tool_calls", []):
            if "id" in c:
                calls.append({"id": c["id"], "type": "function", "function": dict(c["function"])})
            else:
                calls[c["index"]]["function"]["arguments"] += c["function"]["arguments"]
    m = {"role": "assistant", "content": content or (None if calls else "")}
    if reasoning:
        m.update(reasoning_content=reasoning, reasoning=reasoning)
    return {**m, "tool_calls": calls} if calls else m


# -----------------------------------------------------------------------------
# HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the openai client expects

    def log_message(self, fmt, *args):  # one short line per request on stderr
        print(f"{self.address_string()} {fmt % args}", file=sys.stderr, flush=True)

    def send_json(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, message, param=None, code=None):
        kind = {401: "authentication_error", 404: "not_found_error"}.get(status, "invalid_request_error")
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}})

    def send_error(self, code, message=None, explain=None):  # the base class's HTML error pages, as JSON
        self.close_connection = True
        self.error(code, message or HTTPStatus(code).phrase)

    def not_allowed(self):
        self.error(405, f"{self.command} {self.path}: method not allowed; POST /v1/chat/completions, GET /v1/models "
                        "or GET /health")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = not_allowed

    def authorized(self):
        if not api_key or self.headers.get("Authorization") == f"Bearer {api_key}":
            return True
        self.error(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return False

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok", "running": engine.running(), "waiting": len(engine.waiting),
                                 "steps": engine.steps, "generated_tokens": engine.generated})
        elif self.path == "/v1/models":
            if self.authorized():
                self.send_json(200, {"object": "list", "data": [
                    {"id": model_id, "object": "model", "created": started, "owned_by": "artemis"}]})
        else:
            self.error(404, f"{self.path}: no such endpoint; try /v1/chat/completions, /v1/models or /health")

    def do_POST(self):
        size = self.headers.get("Content-Length") or "0"
        if not size.isdigit():
            self.close_connection = True
            return self.error(400, f"Content-Length: expected a byte count, got {size!r}")
        if int(size) > MAX_BODY:
            self.close_connection = True  # the body stays unread
            return self.error(413, f"request body: {size} bytes, over the {MAX_BODY} byte limit")
        try:
            raw = self.rfile.read(int(size))
        except TimeoutError:
            self.close_connection = True
            return self.error(408, f"request body: not all {size} bytes came within {request_timeout} s")
        if len(raw) < int(size):  # the client closed its side: nobody to answer
            self.close_connection = True
            return
        if self.path != "/v1/chat/completions":
            return self.error(404, f"{self.path}: no such endpoint; POST to /v1/chat/completions")
        if not self.authorized():
            return
        try:
            try:
                body = json.loads(raw)
            except ValueError as e:  # a UnicodeDecodeError too
                raise BadRequest(f"request body: not valid JSON ({e})") from None
            r, how = parse_request(body)
        except BadRequest as e:
            return self.error(e.status, str(e), e.param, e.code)
        except Exception as e:  # a case the checks above missed: the client hears of it, the server goes on
            return self.error(500, f"{type(e).__name__}: {e}")
        engine.submit(r)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if how["stream"]:
            return self.stream(r, how, rid, created)
        deltas, reply = [], how["reply"]
        for event in self.events(r):
            if event[0] == "text":
                deltas += reply.feed(event[1])
            elif event[0] == "error":
                return self.error(500, f"generation failed: {event[1]}")
        deltas += reply.feed("", final=True)
        self.send_json(200, {
            "id": rid, "object": "chat.completion", "created": created, "model": model_id,
            "choices": [{"index": 0, "message": message(deltas), "logprobs": None,
                         "finish_reason": reply.finish(r.finish)}],
            "usage": usage(how, r)})

    def events(self, r):
        """The engine's events for r as they come, up to its 'done' or 'error'. A client that leaves cancels r."""
        checked = time.monotonic()
        while True:
            try:
                event = r.events.get(timeout=0.5)
            except queue.Empty:
                event = None
            if time.monotonic() - checked > 0.5:
                checked = time.monotonic()
                if self.gone():
                    r.cancelled = True  # its row stops at the next step
                    raise ConnectionAbortedError("the client left")
            if event is not None:
                yield event
                if event[0] != "text":
                    return

    def gone(self):
        """Whether the client closed its connection: while it waits for an answer it sends nothing, so a readable
        socket with nothing to read is its end."""
        try:
            return bool(select.select([self.connection], [], [], 0)[0]) and not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def stream(self, r, how, rid, created):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does: no length to give
        self.end_headers()
        self.close_connection = True
        reply = how["reply"]

        def send(delta=None, finish=None, **extra):
            chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_id,
                     "choices": [] if delta is None else [
                         {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            send({"role": "assistant", "content": ""})
            for event in self.events(r):
                if event[0] == "text":
                    for delta in reply.feed(event[1]):
                        send(delta)
                elif event[0] == "done":
                    for delta in reply.feed("", final=True):
                        send(delta)
                    send({}, reply.finish(event[1]))
                    if how["usage"]:
                        send(usage=usage(how, r))
                else:
                    self.wfile.write(f"data: {json.dumps({'error': {'message': event[1]}})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError):  # the client left, or stopped reading for request_timeout
            r.cancelled = True


def usage(how, r):
    n = len(r.tokens)
    return {"prompt_tokens": how["prompt_tokens"], "completion_tokens": n, "total_tokens": how["prompt_tokens"] + n}


class Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the listen backlog: a burst of new clients waits to be accepted, none is reset
    daemon_threads = True

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # a client that left: no traceback
            super().handle_error(request, client_address)


if __name__ == "__main__":
    for k, v in dict(max_batch=max_batch, max_tokens=max_tokens, max_image_bytes=max_image_bytes,
                     max_model_len=max_model_len).items():
        if v < 1:
            die(f"--{k}={v}: expected at least 1")
    for k, v in dict(fetch_timeout=fetch_timeout, request_timeout=request_timeout).items():
        if v <= 0:
            die(f"--{k}={v}: expected a number of seconds above 0")
    if not 0 <= port < 65536:
        die(f"--port={port}: expected 0 (any free port) to 65535")
    if thinking not in ("on", "off"):
        die(f"--thinking={thinking}: expected on or off")
    if batching not in ("continuous", "static"):
        die(f"--batching={batching}: expected continuous or static")
    if allowed_local_media_path and not os.path.isdir(allowed_local_media_path):
        die(f"--allowed_local_media_path={allowed_local_media_path}: not a directory")
    try:
        model, processor, decode_one = load(init_from, device, dtype, min_pixels, max_pixels, quantize, compile)
    except ValueError as e:
        die(e)
    context = min(max_model_len, model.config.text.max_position_embeddings)
    max_token_chars = max(map(len, processor.tokenizer.get_vocab()))  # the most text one token can stand for
    engine = Engine(model, processor, decode_one, max_batch, context, batching == "static", batch_window,
                    every_row=compile)
    if compile:  # the step compiles now, not in the first client's request
        engine.submit(Request(torch.tensor([processor.pad_id]), 2))
        while engine.busy():
            engine.step()
    model_id, started = init_from or demo(), int(time.time())  # what load() took
    threading.Thread(target=engine.serve, daemon=True).start()
    Handler.timeout = request_timeout  # on every read and write of a connection's socket
    try:
        server = Server((host, port), Handler)
    except OSError as e:
        die(f"--host={host} --port={port}: cannot listen there ({e.strerror})")
    print(f"serving {model_id} on http://{host}:{server.server_address[1]}/v1 (max_batch {max_batch}, {batching} "
          f"batching, {context} tokens a request)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
