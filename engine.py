"""
Continuous batching for generation, as Orca and vLLM schedule it: the inference engine behind serve.py and sample.py's
folder run. A file of its own because two scripts share it, and a script must not double as a library (nanochat keeps
its engine.py beside its model the same way; mlx-vlm's server schedules alike).

    model, processor, decode_one = load("out-shapes", "cpu", quantize="", compile=False)
    engine = Engine(model, processor, decode_one, max_batch=8, max_len=2048)
    r = engine.submit(Request(ids, max_tokens=64, temperature=0.7, seed=1))  # from any thread
    engine.serve()                    # a worker thread's loop; r.events gets ("text", delta), then ("done", finish)
    while engine.busy(): ended = engine.step()   # or step it by hand (sample.py)

The KV cache is a fixed pool of max_batch rows (slots) of S columns. At each step boundary a waiting request takes a
free slot, the lowest: its prompt is prefilled alone (its images encoded once) and joins the running decode; a row
leaves as soon as it ends (a stop token, a stop string, max_tokens, or cancelled) and frees its slot for the next. The
decode step runs over the rows up to the last live one: on a CPU a step costs about its rows (a 32-row step of the
bench's small model is 4-5x a 1-row one), so a few requests in a big pool cost a few rows' step. With every_row (a
compiled step) it runs over all max_batch rows every time, so it sees the same shapes whichever rows come and go, and
never recompiles (CUDA graphs: captured once; on a GPU a step reads its weights once, whatever its rows).

Where a row's tokens sit: every row writes its decode token at one shared cache column per step, as model.generate's
left-padded batch does; key_valid marks each row's own columns, from its start to the end. A new prompt of T tokens
is prefilled into the T columns just left of the shared column, with RoPE positions 0..T-1, as alone, so a row is
always one unbroken run of columns [start, column): causality and the sliding window read column distances as token
distances. When the shared column reaches the end, the whole cache rolls left by the earliest live row's start
(attention finds a row's keys by key_valid, not by place); a prompt longer than the columns left of the shared column
rolls it right first. A roll copies the cache; after a roll left the next comes no sooner than S minus the longest
live row's length steps later. The engine holds the model's KV cache (model.setup_caches): model.generate on the same
model meanwhile would replace it.

Each row samples with its own temperature, top_k, top_p and torch.Generator (seeded by its request, else at random),
so a seeded request gets the same text alone and in any batch, and a greedy one its solo greedy text.
"""
import queue
import random
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from checkpoint import load as load_checkpoint
from quantize import quantize_int8


def load(init_from, device="cpu", dtype="", min_pixels=None, max_pixels=None, quantize="", compile=False):
    """(model, processor, decode_one) as sample.py and serve.py run them: checkpoint.load, then int8 when quantize is
    'int8', and the decode step compiled when asked. A bad option is a ValueError that names it."""
    if quantize not in ("", "int8"):
        raise ValueError(f"--quantize={quantize}: expected int8, or nothing for the checkpoint's own weights")
    model, processor = load_checkpoint(init_from, device, dtype, min_pixels, max_pixels)
    model = quantize_int8(model) if quantize else model
    return model, processor, model.compile_decode() if compile else model.decode_one


@dataclass(eq=False)
class Request:
    """A prompt to continue, with its sampling options. The engine appends to tokens and text as they come, puts
    ("text", delta) on events for each new piece of text, then ("done", finish) with finish 'stop', 'length' or
    'cancelled', or ("error", message); finish stays set. Setting cancelled (from any thread) ends it at the next
    step."""
    ids: torch.Tensor  # (T,) prompt token ids, image pads expanded
    max_tokens: int
    pixels: torch.Tensor | None = None  # the processor's pixel_values and image_grid_thw
    grid: torch.Tensor | None = None
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: all tokens
    seed: int | None = None
    stop: list = field(default_factory=list)  # strings that end the text, left out of it
    tokens: list = field(default_factory=list)  # the new token ids, a stop token included
    text: str = ""  # the text sent on events so far; all of it once finished
    finish: str | None = None  # 'stop', 'length', 'cancelled' or 'error'
    error: str = ""  # what failed, when finish is 'error'
    cancelled: bool = False
    events: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)
    gen: torch.Generator | None = None  # its sampling noise, seeded at submit


def held(text, stops):
    """How much of the end of text to hold back: a character whose bytes are still coming, or a stop string's start."""
    if text.endswith("\ufffd"):
        return 1
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def sample(logits, rows):
    """One token per row of logits (n, vocab), each at its request's temperature, top_k and top_p, its noise from its
    own generator: argmax(p / E) with E ~ Exp(1) draws from p as torch.multinomial does (gpt-fast's race)."""
    t = torch.tensor([r.temperature for r in rows], device=logits.device)[:, None]
    p, idx = (logits.float() / t).softmax(-1).sort(-1, descending=True)  # (n, vocab), most likely first
    top_p = torch.tensor([r.top_p for r in rows], device=logits.device)[:, None]
    top_k = torch.tensor([r.top_k or p.shape[-1] for r in rows], device=logits.device)[:, None]
    keep = (p.cumsum(-1) - p <= top_p) & (torch.arange(p.shape[-1], device=p.device) < top_k)  # the smallest prefix
    noise = torch.stack([torch.empty_like(p[0]).exponential_(generator=r.gen) for r in rows])  # whose mass is top_p
    return idx.gather(-1, (p * keep / noise).argmax(-1, keepdim=True))[:, 0]


class Engine:
    def __init__(self, model, processor, decode_one, max_batch, max_len, static=False, window=0.0, every_row=False):
        """max_len: the cache columns a prompt and its new tokens share (rounded up to a multiple of 256). static: a
        new batch only once every row of the last has ended, after waiting up to window seconds for max_batch
        requests: request-level batching, kept for bench.py's comparison. every_row: decode all max_batch rows at
        every step, one shape for a compiled decode_one."""
        self.model, self.processor, self.decode_one = model, processor, decode_one
        self.B, self.static, self.window, self.every_row = max_batch, static, window, every_row
        self.S = model.setup_caches(max_batch, max_len)
        self.dev = dev = model.language_model.model.embed_tokens.weight.device
        self.cols = torch.arange(self.S, device=dev)
        self.rows = [None] * max_batch  # the request in each slot
        self.start = [0] * max_batch  # the first cache column of each row
        self.column = 0  # the shared column the next decode step writes
        self.tok = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # each row's last token, its next input
        self.pos = torch.zeros(max_batch, 1, dtype=torch.long, device=dev)  # its RoPE position
        self.key_valid = torch.ones(max_batch, self.S, dtype=torch.bool, device=dev)
        self.stop_ids = set(processor.stop_ids)
        self.waiting, self.arrived = deque(), threading.Condition()
        self.steps = self.generated = 0  # decode steps run and tokens sampled, for serve.py's /health

    def submit(self, r):
        """Queue r for the next step boundary (from any thread); returns it."""
        if len(r.ids) + r.max_tokens > self.S:
            raise ValueError(f"the prompt's {len(r.ids)} tokens and max_tokens {r.max_tokens} are more than the "
                             f"cache's {self.S} columns")
        r.gen = None if r.temperature == 0 else torch.Generator(self.dev).manual_seed(
            random.getrandbits(63) if r.seed is None else r.seed)
        with self.arrived:
            self.waiting.append(r)
            self.arrived.notify()
        return r

    def busy(self):
        return bool(self.waiting) or any(self.rows)

    def running(self):
        return sum(r is not None for r in self.rows)

    def serve(self):
        """Step whenever a request waits or a row is live; never returns (serve.py's worker thread)."""
        while True:
            with self.arrived:
                self.arrived.wait_for(self.busy)
                if self.static and not any(self.rows):  # a new batch: the requests close behind get a place in it
                    self.arrived.wait_for(lambda: len(self.waiting) >= self.B, self.window)
            self.step()

    @torch.inference_mode()
    def step(self):
        """Prefill waiting requests into the free slots, then one decode step for every live row. Returns the requests
        that ended in it."""
        ended = []
        for b, r in enumerate(self.rows):
            if r is not None and r.cancelled:
                self.rows[b] = None
                self.end(r, "cancelled", ended)
        with self.arrived:
            for r in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(r)
                self.end(r, "cancelled", ended)
            free = [b for b, r in enumerate(self.rows) if r is None]
            admit = [] if self.static and len(free) < self.B else [
                (b, self.waiting.popleft()) for b in free[:len(self.waiting)]]
        for b, r in admit:
            try:
                self.prefill(b, r, ended)
            except Exception as e:  # a request that fails fails alone
                self.rows[b] = None
                self.fail(r, e, ended)
        live = [b for b, r in enumerate(self.rows) if r is not None]
        if not live:
            return ended
        if self.column == self.S:
            self.roll(-min(self.start[b] for b in live))
        n = self.B if self.every_row else live[-1] + 1
        try:
            logits = self.decode_one(self.tok[:n], self.pos[:n], self.cols[self.column:self.column + 1],
                                     self.key_valid[:n])
        except Exception as e:  # the step failed its rows, never the engine
            for b in live:
                self.fail(self.rows[b], e, ended)
                self.rows[b] = None
            return ended
        self.column += 1
        self.pos += 1
        self.steps += 1
        for b, t in zip(live, self.pick(logits[live], live)):
            self.advance(b, t, ended)
        return ended

    def prefill(self, b, r, ended):
        T = len(r.ids)
        if not any(self.rows):
            self.column = T  # an empty cache: the prompt starts at column 0
        elif self.column < T:
            self.roll(T - self.column)
        self.start[b] = self.column - T
        self.key_valid[b] = self.cols >= self.start[b]
        pixels = None if r.pixels is None else r.pixels.to(self.dev)
        logits = self.model.prefill(r.ids[None].to(self.dev), self.cols[None, :T], self.key_valid[b:b + 1], pixels,
                                    r.grid, row=b, start=self.start[b])
        self.rows[b] = r
        self.pos[b] = T
        self.advance(b, self.pick(logits, [b])[0], ended)

    def roll(self, d):
        """Move every row's cache columns d to the right (left when negative); columns that wrap around are no row's.
        The cache is the model's own, filled in place, so a compiled step (CUDA graphs) keeps reading it."""
        for layer in self.model.language_model.model.layers:
            kv = layer.self_attn.kv_cache
            kv.k.copy_(kv.k.roll(d, 2))
            kv.v.copy_(kv.v.roll(d, 2))
        self.column += d
        self.start = [s + d for s in self.start]
        self.key_valid.copy_(self.cols[None] >= torch.tensor(self.start, device=self.dev)[:, None])

    def pick(self, logits, slots):
        """The next token of each slot's row from its logits (n, vocab): greedy at temperature 0, else sampled."""
        rows = [self.rows[b] for b in slots]
        tok = logits.argmax(-1)  # (n,)
        hot = [i for i, r in enumerate(rows) if r.temperature > 0]
        if hot:
            tok[hot] = sample(logits[hot], [rows[i] for i in hot])
        self.tok[slots, 0] = tok
        return tok.tolist()

    def advance(self, b, t, ended):
        """Row b sampled token t: its new text goes out, and the row ends at a stop or at its length."""
        r = self.rows[b]
        r.tokens.append(t)
        self.generated += 1
        text = self.processor.decode(r.tokens)  # the whole answer: one token alone may split a UTF-8 character
        cut = min((k for k in (text.find(s) for s in r.stop) if k >= 0), default=-1)
        finish = "stop" if t in self.stop_ids or cut >= 0 else "length" if len(r.tokens) == r.max_tokens else None
        text = text[:cut] if cut >= 0 else text
        end = len(text) if finish else len(text) - held(text, r.stop)
        if end > len(r.text):
            r.events.put(("text", text[len(r.text):end]))
            r.text = text[:end]
        if finish:
            self.rows[b] = None
            self.end(r, finish, ended)

    def end(self, r, finish, ended):
        r.finish = finish
        r.events.put(("done", finish))
        ended.append(r)

    def fail(self, r, e, ended):
        r.finish, r.error = "error", f"{type(e).__name__}: {e}"
        r.events.put(("error", r.error))
        ended.append(r)
