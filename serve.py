"""
Serve an Artemis graft behind the OpenAI chat-completions API, as the A3 card's vLLM/SGLang snippet calls it.

    python serve.py --init_from=schneewolflabs/A3
    python serve.py --init_from=out-stage1 --port=8080 --max_batch=16 --api_key=secret

The standard library's ThreadingHTTPServer, as mlx-lm's server: no dependency beyond the model's own. Endpoints:
POST /v1/chat/completions (messages, max_tokens or max_completion_tokens, temperature, top_p, seed, stop, stream,
stream_options.include_usage), GET /v1/models and GET /health. Content is a string or a list of parts: text,
{"type": "image_url", "image_url": {"url": ...}} and {"type": "image", "url"/"image": ...}; a URL is a data: URL
(base64), a local path or file:// URL, or an http(s) URL fetched with a timeout and a size limit. One thread per
connection parses a request and preprocesses its images; one worker thread decodes: it takes the waiting requests
(up to max_batch, those whose sampling can share one batch) and runs them as one left-padded batch through
model.generate, each row ending at its own stop token, stop string or max_tokens. Bad requests get an OpenAI-style
error body naming the field. Binds 127.0.0.1 unless --host says otherwise: a client can make it read local images.
"""
import base64
import binascii
import io
import json
import os
import sys
import threading
import time
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from torch.nn.utils.rnn import pad_sequence

from checkpoint import load
from configurator import configure, die
from processor import load_image
from quantize import quantize_int8

# -----------------------------------------------------------------------------
init_from = ""  # an artemis checkpoint dir, a training out_dir (checkpoint in <out_dir>/ckpt) or a hub repo id
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = ""  # '': bfloat16 on CUDA, float32 on CPU
compile = False  # torch.compile the one-token decode step (compiled again for each new batch size)
quantize = ""  # 'int8': the decoder's linear layers in int8 (quantize.py writes such a checkpoint)
min_pixels = None  # None: the checkpoint's preprocessor_config.json
max_pixels = None
thinking = "off"  # 'on' lets the model reason in <think>...</think> first; 'off' pre-fills an empty think block
host = "127.0.0.1"  # '0.0.0.0' to listen on every interface
port = 8000
max_batch = 8  # requests decoded together
batch_window = 0.05  # seconds the worker waits for more requests after the first, while fewer than max_batch wait
api_key = ""  # '': no key; else clients send 'Authorization: Bearer <api_key>'
max_tokens = 512  # a request's max_tokens when it gives none (capped by the context)
max_image_bytes = 20 * 2**20  # an image (data: URL, file or download) larger than this is refused
fetch_timeout = 10.0  # seconds for an http(s) image
configure(globals())
# -----------------------------------------------------------------------------
MAX_BODY = 4 * max_image_bytes  # a request body larger than this is refused before it is read


class BadRequest(Exception):
    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def fetch_image(url, where):
    """A PIL image from a data: URL, an http(s) URL or a local path (or file:// URL)."""
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
    elif url.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(url, timeout=fetch_timeout) as r:
                data = r.read(max_image_bytes + 1)
        except (OSError, ValueError) as e:  # URLError, HTTPError and timeouts are OSErrors
            raise BadRequest(f"{where}: fetching {url} failed ({e})", where) from None
    else:
        path = url.removeprefix("file://")
        if not os.path.isfile(path):
            raise BadRequest(f"{where}: {path} is not a data: URL, an http(s) URL or an existing file", where)
        if os.path.getsize(path) > max_image_bytes:
            raise BadRequest(f"{where}: {path} is over the {max_image_bytes} byte limit", where)
        with open(path, "rb") as f:
            data = f.read()
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
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out, images


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
    """A chat-completions body -> a request ready for the worker, or BadRequest naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("request body: expected a JSON object")
    messages, images = parse_messages(body.get("messages"))
    ctx = model.config.text.max_position_embeddings
    if body.get("n", 1) != 1:
        raise BadRequest("n: only 1 choice per request is supported", "n")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise BadRequest("stop: expected a string or a list of up to 4 non-empty strings", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise BadRequest("stream: expected true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise BadRequest("stream_options: expected an object", "stream_options")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = number(body, key, None, 1, ctx, whole=True)
    r = dict(stop=stop, stream=body.get("stream", False), usage=bool(options.get("include_usage")),
             temperature=number(body, "temperature", 1.0, 0, 2), top_p=number(body, "top_p", 1.0, 0, 1),
             seed=number(body, "seed", None, -2**63, 2**64 - 1, whole=True))
    if r["top_p"] == 0:
        raise BadRequest("top_p: expected a number in (0, 1], got 0", "top_p")
    try:
        chat = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking == "on")
        inputs = processor(chat, images=images)
    except ValueError as e:
        raise BadRequest(f"messages: {e}", "messages") from None
    T = inputs["input_ids"].shape[1]
    n = limit or min(max_tokens, ctx - T)
    if T + n > ctx:
        param = key if limit and T < ctx else "messages"
        raise BadRequest(f"{param}: the prompt is {T} tokens and {key} {n}, together more than the model's context "
                         f"of {ctx}", param, code="context_length_exceeded")
    r.update(ids=inputs["input_ids"][0], pixels=inputs.get("pixel_values"), grid=inputs.get("image_grid_thw"),
             max_tokens=n, prompt_tokens=T, events=[], ready=threading.Condition(), cancelled=False)
    # rows of one batch share a temperature and top_p; a seeded sample runs alone, so its seed alone decides it
    r["group"] = (0,) if r["temperature"] == 0 else (r["temperature"], r["top_p"], r["seed"] is None or id(r))
    return r


# -----------------------------------------------------------------------------
# the worker: one batch at a time through model.generate

waiting, arrived = [], threading.Condition()
preparing = 0  # requests read but still being parsed (their images decoded) by their connection's thread


def prepared(r=None):
    """A request that was being prepared joins the waiting ones (r), or failed (None)."""
    global preparing
    with arrived:
        preparing -= 1
        if r is not None:
            waiting.append(r)
        arrived.notify()


def take():
    """The next batch: the oldest waiting request and those that can share its batch, up to max_batch. Requests that
    arrive within batch_window get a place in it, and so do those already being prepared, for up to a second more:
    the clients of the previous batch send their next requests at about the same time, but not at the same instant."""
    with arrived:
        arrived.wait_for(lambda: waiting)
        end = time.monotonic() + batch_window
        while sum(r["group"] == waiting[0]["group"] for r in waiting) < max_batch and (
                time.monotonic() < end or preparing and time.monotonic() < end + 1):
            arrived.wait(max(end - time.monotonic(), 0.01))
        batch = [r for r in waiting if r["group"] == waiting[0]["group"]][:max_batch]
        for r in batch:
            waiting.remove(r)
    return batch


def emit(r, event):
    with r["ready"]:
        r["events"].append(event)
        r["ready"].notify()


def held(text, stops):
    """How much of the end of text to hold back: a character whose bytes are still coming, or a stop string's start."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


@torch.inference_mode()
def run(batch):
    stop_ids = set(processor.stop_ids)
    for r in batch:
        r.update(tokens=[], sent=0, finish=None)

    def step(tok):  # (B,): one token per row; returns the rows now finished
        for r, t in zip(batch, tok.tolist()):
            if r["finish"] is not None:
                continue
            r["tokens"].append(t)
            text = processor.decode(r["tokens"])
            cut = min((k for k in (text.find(s) for s in r["stop"]) if k >= 0), default=-1)
            if t in stop_ids or cut >= 0:
                r["finish"] = "stop"
                text = text[:cut] if cut >= 0 else text
            elif len(r["tokens"]) == r["max_tokens"] or r["cancelled"]:
                r["finish"] = "length"
            end = len(text) if r["finish"] else len(text) - held(text, r["stop"])
            if end > r["sent"]:
                emit(r, ("text", text[r["sent"]:end]))
                r["sent"] = end
            if r["finish"]:
                emit(r, ("done", r["finish"], len(r["tokens"])))
        return torch.tensor([r["finish"] is not None for r in batch])

    ids = pad_sequence([r["ids"] for r in batch], True, processor.pad_id, padding_side="left")  # (B, T)
    mask = pad_sequence([torch.ones_like(r["ids"]) for r in batch], True, 0, padding_side="left")
    pixels = [r["pixels"] for r in batch if r["pixels"] is not None]
    grid = torch.cat([r["grid"] for r in batch if r["grid"] is not None]) if pixels else None
    pixels = torch.cat(pixels).to(device) if pixels else None
    seed = batch[0]["seed"]
    if seed is not None and batch[0]["temperature"] > 0:
        torch.manual_seed(seed)
    t0 = time.perf_counter()
    model.generate(ids.to(device), max(r["max_tokens"] for r in batch), batch[0]["temperature"], None,
                   batch[0]["top_p"] if batch[0]["top_p"] < 1 else None, pixels, grid, mask.to(device),
                   processor.stop_ids, decode_one, step)
    n = sum(len(r["tokens"]) for r in batch)
    print(f"batch of {len(batch)}: {n} new tokens in {time.perf_counter() - t0:.2f} s", file=sys.stderr, flush=True)


def worker():
    while True:
        batch = take()
        try:
            run(batch)
        except Exception as e:  # a failed batch fails its requests, never the server
            for r in batch:
                emit(r, ("error", f"{type(e).__name__}: {e}"))


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

    def authorized(self):
        if not api_key or self.headers.get("Authorization") == f"Bearer {api_key}":
            return True
        self.error(401, "Incorrect API key provided: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        return False

    def do_GET(self):
        if self.path == "/health":
            self.send_json(200, {"status": "ok"})
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
        size = int(size)
        if self.path != "/v1/chat/completions":
            self.rfile.read(size)
            return self.error(404, f"{self.path}: no such endpoint; POST to /v1/chat/completions")
        if size > MAX_BODY:
            self.close_connection = True  # the body stays unread
            return self.error(413, f"request body: {size} bytes, over the {MAX_BODY} byte limit")
        global preparing
        with arrived:
            preparing += 1
        raw = self.rfile.read(size)
        r = None
        try:
            if not self.authorized():
                return
            try:
                body = json.loads(raw)
            except ValueError as e:  # a UnicodeDecodeError too
                raise BadRequest(f"request body: not valid JSON ({e})") from None
            r = parse_request(body)
        except BadRequest as e:
            return self.error(e.status, str(e), e.param, e.code)
        except Exception as e:  # a case the checks above missed: the client hears of it, the server goes on
            return self.error(500, f"{type(e).__name__}: {e}")
        finally:
            prepared(r)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if r["stream"]:
            self.stream(r, rid, created)
        else:
            text, finish, n = [], None, 0
            for event in self.events(r):
                if event[0] == "text":
                    text.append(event[1])
                elif event[0] == "done":
                    finish, n = event[1], event[2]
                else:
                    return self.error(500, f"generation failed: {event[1]}")
            self.send_json(200, {
                "id": rid, "object": "chat.completion", "created": created, "model": model_id,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                             "logprobs": None, "finish_reason": finish}],
                "usage": usage(r, n)})

    def events(self, r):
        """The worker's events for r as they come, up to its 'done' or 'error'."""
        while True:
            with r["ready"]:
                r["ready"].wait_for(lambda: r["events"])
                got, r["events"] = r["events"], []
            for event in got:
                yield event
                if event[0] != "text":
                    return

    def stream(self, r, rid, created):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does: no length to give
        self.end_headers()
        self.close_connection = True

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
                    send({"content": event[1]})
                elif event[0] == "done":
                    send({}, event[1])
                    if r["usage"]:
                        send(usage=usage(r, event[2]))
                else:
                    self.wfile.write(f"data: {json.dumps({'error': {'message': event[1]}})}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            r["cancelled"] = True  # the client left: its row stops at the next token


def usage(r, n):
    return {"prompt_tokens": r["prompt_tokens"], "completion_tokens": n, "total_tokens": r["prompt_tokens"] + n}


if __name__ == "__main__":
    for k, v in dict(max_batch=max_batch, max_tokens=max_tokens, max_image_bytes=max_image_bytes).items():
        if v < 1:
            die(f"--{k}={v}: expected at least 1")
    if not 0 <= port < 65536:
        die(f"--port={port}: expected 0 (any free port) to 65535")
    if thinking not in ("on", "off"):
        die(f"--thinking={thinking}: expected on or off")
    if quantize not in ("", "int8"):
        die(f"--quantize={quantize}: expected int8, or nothing for the checkpoint's own weights")
    try:
        model, processor = load(init_from, device, dtype, min_pixels, max_pixels)
    except ValueError as e:
        die(e)
    model = quantize_int8(model) if quantize else model
    decode_one = model.compile_decode() if compile else model.decode_one
    model_id, started = init_from or "out-shapes", int(time.time())
    threading.Thread(target=worker, daemon=True).start()
    try:
        server = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        die(f"--host={host} --port={port}: cannot listen there ({e.strerror})")
    server.daemon_threads = True
    print(f"serving {model_id} on http://{host}:{server.server_address[1]}/v1 (max_batch {max_batch})",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
