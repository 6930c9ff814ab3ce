"""
Speed and memory of this implementation beside the reference stack (transformers + artemis-vlm), as one table.

    python bench.py                                  # CPU: the 'small' preset, against the reference if installed
    python bench.py --preset=tiny --only=decode,train
    python bench.py --preset=a3 --n_layer=8          # GPU: A2 (Mistral-Nemo 12B) + Qwen3-VL-2B vision shapes
    python bench.py --only=quantize                  # int8 decoder (quantize.py) against the bench dtype

Both stacks run in this one process, on the same random weights (copied in memory) and inputs. Writes nothing but
--out. The run for a lent GPU (about 8 minutes on one H100/H200; each section stops at its budget and the results so far
are in $OUT/*/bench.json and bench.md):

    python bench.py --preset=a3 --reference=False --only=prefill,decode,stage1,e2e,quantize --budget=150 --out=$OUT/a3
    python bench.py --preset=a3 --n_layer=8 --only=decode,train --budget=90 --out=$OUT/ref8   # against the reference

Run it first on the CPU at --preset=tiny (a few minutes) so that it is known to work end to end.
"""
import base64
import dataclasses
import gc
import io
import itertools
import json
import os
import re
import runpy
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import namedtuple
from contextlib import ExitStack
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from checkpoint import nbytes, save_pretrained
from configurator import configure, die
from dataset import length_grouped
from lora import apply_lora
from model import ArtemisConfig, ArtemisVLM, LinearCrossEntropy, TextConfig
from processor import CLIP_MEAN, CLIP_STD, Processor
from quantize import quantize_int8
from vision import VisionConfig

# -----------------------------------------------------------------------------
preset = "a3" if torch.cuda.is_available() else "small"  # 'tiny' | 'small' (CPU) | 'a3' (the real shapes)
n_layer = 0  # decoder layers; 0: the preset's (a3 has 40: fewer fit a 12B beside its reference copy)
only = ""  # comma-separated sections (SECTIONS); '': all but the device run's stage1 and e2e
reference = True  # also run transformers + artemis-vlm (when installed) on the same weights and inputs
compile = True  # also time a torch.compile'd decode step (CUDA: with CUDA graphs)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = ""  # '': bfloat16 on CUDA, float32 on CPU
batch_size = 0  # training rows per step; 0: the preset's
new_tokens = 32  # decode length
repeat = 5
peak_flops = 989e12 if torch.cuda.is_available() else 0.0  # for MFU (H100 SXM dense bf16); 0: no MFU
seed = 0
out = ""  # a directory: each section's rows go to bench.json and the printed table to bench.md as they come
budget = 0  # seconds a section may run before it is stopped and the run goes on to the next; 0: no limit
configure(globals())
# -----------------------------------------------------------------------------

PRESETS = {  # decoder, vision tower, and one training row: image side (px), prompt and answer tokens; the memory
    # section's: probe, the factor by which it divides every width to measure activations (all divide evenly), and
    # row, the tokens of its rows (tiny: a smoke test's)
    "tiny": dict(text=dict(vocab_size=131072, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64),
                 image=224, prompt=16, answer=48, batch=4, probe=1, row=128),
    "small": dict(text=dict(vocab_size=131072, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64),
                  vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512),
                  image=384, prompt=16, answer=96, batch=4, probe=2, row=1000),
    "a3": dict(text=dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,  # A2
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=1e6),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,  # Qwen3-VL-2B
                           out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17]),
               image=512, prompt=32, answer=128, batch=2, probe=16, row=1000),
}
IMG = 22  # <|image_pad|>
Row = namedtuple("Row", "what ours theirs unit note", defaults=("",))  # theirs: the reference's figure or None


class Bench(namedtuple("Bench", "model ref ref_processor preset P device cuda dtype batch_size new_tokens repeat "
                                "compile peak_flops seed")):
    """A section's whole input: the models (ref, ref_processor: None without the reference), options, measures."""

    def timed(self, fn, n=None, of=statistics.median):
        """The median (or `of`) seconds of n (default `repeat`) calls after one warmup call."""
        sync, ts = torch.cuda.synchronize if self.cuda else lambda: None, []
        for _ in range(1 + (n or self.repeat)):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return of(ts[1:])

    def batch(self, sides, caps):
        """ids, pixels, grid, labels, mask of right-padded rows [bos, prompt/2, image, prompt/2, caption (labelled)]."""
        g, v, P = torch.Generator().manual_seed(self.seed), self.model.config.vision, self.P
        f, half = v.patch_size * v.spatial_merge_size, P["prompt"] // 2
        starts = [1 + P["prompt"] + h * w // f**2 for h, w in sides]  # where each caption starts
        ids = torch.zeros(len(sides), max(a + k for a, k in zip(starts, caps)), dtype=torch.long)
        labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
        for i, (a, k) in enumerate(zip(starts, caps)):
            ids[i, :a + k] = torch.randint(100, self.model.config.text.vocab_size, (a + k,), generator=g)
            ids[i, 0], ids[i, 1 + half:a - half] = 1, IMG
            labels[i, a:a + k], mask[i, :a + k] = ids[i, a:a + k], 1
        grid = torch.tensor([(1, h // v.patch_size, w // v.patch_size) for h, w in sides])
        patch = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
        pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=g).to(self.dtype)
        return [t.to(self.device) for t in (ids, pixels, grid, labels, mask)]

    def inputs(self, n, answer=True):  # n rows of the preset's shape
        return self.batch([(self.P["image"],) * 2] * n, [self.P["answer"] if answer else 0] * n)

    def peak_bytes(self, fn):
        """The most tensor memory fn holds above what was allocated when it started: the CUDA allocator's peak, or on
        a CPU the running sum of the profiler's allocation events (the process's resident size would add what malloc
        keeps after a free)."""
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")  # + an allocation's bytes, - a free's
        return max(itertools.accumulate((n for _, n in events), initial=0))

    def read_bandwidth(self):
        """Bytes/s of the fastest of 10 sums over 1 GiB (4 GiB on CUDA): a read-only stream, the bound of batch-1
        decode, which reads every weight once and writes next to nothing (a copy moves twice the bytes)."""
        x = torch.ones((4 if self.cuda else 1) * 2**30 // 4, device=self.device)  # fp32, written once: pages exist
        return x.numel() * x.element_size() / self.timed(x.sum, 10, min)

    def prefill(self, ids, pixels, grid):  # ours, into a cache with room for new_tokens more
        (B, T), m = ids.shape, self.model
        key_valid = torch.ones(B, m.setup_caches(B, T + self.new_tokens), dtype=torch.bool, device=ids.device)
        return key_valid, m.prefill(ids, torch.arange(T, device=ids.device).expand(B, T), key_valid, pixels, grid)

    def decode_rate(self, step, ids, pixels, grid):
        """Tokens/s of new_tokens greedy calls of `step` (model.decode_one or a compiled one) after an untimed prefill.
        The warmup run makes the same calls at the same shapes, so a compiled step is compiled (CUDA: captured)."""
        (B, T), dev = ids.shape, ids.device
        with torch.inference_mode():
            key_valid, logits = self.prefill(ids, pixels, grid)

            def steps():  # every run writes the same cache slots
                tok = logits.argmax(-1)
                for i in range(self.new_tokens):
                    pos = torch.full((B, 1), T + i, device=dev)
                    tok = step(tok[:, None], pos, torch.tensor([T + i], device=dev), key_valid).argmax(-1)
            rate = B * self.new_tokens / self.timed(steps)
        self.model.clear_caches()
        return rate

    def decode_read_bytes(self, T):
        """What a batch-1 decode step reads after a T-token prompt: every decoder tensor but the embedding table (a
        lookup of one row), and the KV cache, on average over new_tokens steps."""
        c, sd, slots = self.model.config.text, self.model.language_model.state_dict(), T + self.new_tokens // 2
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * self.dtype.itemsize * slots
        return nbytes(t for k, t in sd.items() if not k.startswith("model.embed_tokens.")) + kv

    def flops(self, ids, labels, grid):  # what one training step on this batch runs (model.flops)
        return self.model.flops(ids.numel(), ids.shape[1], int((labels[:, 1:] != -100).sum()), grid)


def word_processor(vocab_size, side):
    """A Processor for the bench model: a word-level tokenizer over its whole vocabulary ("w123" is id 123), the chat
    tokens inside it, images up to side x side px."""
    special = {"<unk>": 0, "</s>": 1, "<|image_pad|>": IMG, "<|im_start|>": IMG + 2, "<|im_end|>": IMG + 3}
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in special.values()} | special
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    return Processor(tok, special_tokens={"eos_token": "</s>"}, max_pixels=side * side)


def processor(b):
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    tok.add_special_tokens(["<|image_pad|>"])
    proc = Processor(tok, special_tokens={"eos_token": "</s>"})
    rng = np.random.default_rng(b.seed)
    sizes = [(640, 480), (480, 640), (500, 375), (800, 600), (1024, 768), (512, 512), (640, 427), (375, 500)] * 2
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ours = len(photos) / b.timed(lambda: proc.preprocess(photos), 4 * b.repeat)  # cheap, and noisy when shared
    hf = b.ref_processor and b.ref_processor(
        patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=proc.min_pixels, max_pixels=proc.max_pixels,
        image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    theirs = hf and len(photos) / b.timed(lambda: hf(images=photos, return_tensors="pt"), 4 * b.repeat)
    if hf and not torch.equal(proc.preprocess(photos)[0], hf(images=photos, return_tensors="pt")["pixel_values"]):
        print("warning: processor outputs differ from the reference")
    return [Row(f"processor, {len(photos)} photos 375-1024 px", ours, theirs, "img/s")]


def vision(b):
    _, pixels, grid, _, _ = b.inputs(b.batch_size)
    with torch.inference_mode():
        ours = b.batch_size / b.timed(lambda: b.model.visual(pixels, grid))
        theirs = b.ref and b.batch_size / b.timed(lambda: b.ref.visual(pixels, grid_thw=grid))
    return [Row(f"vision tower, {b.batch_size} images {b.P['image']} px", ours, theirs, "img/s")]


def prefill(b):  # batch 1: vision tower, projector and decoder over the prompt, into the cache, the last logits
    ids, pixels, grid, _, _ = b.inputs(1, answer=False)
    with torch.inference_mode():
        t = b.timed(lambda: b.prefill(ids, pixels, grid))
        t_ref = b.ref and b.timed(lambda: b.ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                                                use_cache=True, logits_to_keep=1))
    b.model.clear_caches()
    return [Row(f"prefill (time to first token), 1 image {b.P['image']} px + {b.P['prompt']} tokens (T={ids.shape[1]})",
                t * 1e3, t_ref and t_ref * 1e3, "ms")]


@torch.inference_mode()
def decode(b):
    """Greedy decode at batch 1 and 8, eager and compiled; batch 1 against the read-bandwidth bound."""
    step, n, out, best = b.model.compile_decode() if b.compile else None, b.new_tokens, [], {}
    for B in (1, 8):
        ids, pixels, grid, _, _ = b.inputs(B, answer=False)
        # the reference's generate(n) is a prefill and n - 1 decode steps: those take its time less a prefill's
        t = b.ref and b.timed(lambda: b.ref.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                                                     max_new_tokens=n, do_sample=False)) - b.timed(
            lambda: b.ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True, logits_to_keep=1))
        theirs = B * (n - 1) / t if b.ref and t > 0 else None  # noise can outrun a short decode: no figure then
        note = "; reference: generate() timed no slower than its prefill" if b.ref and theirs is None else ""
        rates = {"eager": b.decode_rate(b.model.decode_one, ids, pixels, grid)}
        try:
            if step is not None:
                rates["compiled"] = b.decode_rate(step, ids, pixels, grid)
        except Exception as e:  # no C++ compiler, an unsupported op: report it and go on
            print(f"compiled decode failed: {type(e).__name__}: {str(e).splitlines()[0]}")
            step = None
        out += [Row(f"decode, batch {B}, {k} (reference: generate())", r, theirs, "tok/s", note=note)
                for k, r in rates.items()]
        best[B] = max(rates.values())
    bw, per_token, best = b.read_bandwidth(), b.decode_read_bytes(ids.shape[1]), best[1]
    return out + [f"decode, batch 1: {best * per_token / 1e9:.1f} GB/s of a measured {bw / 1e9:.1f} GB/s read "
                  f"bandwidth = {100 * best * per_token / bw:.0f}% of the bound ({bw / per_token:.1f} tok/s at "
                  f"{per_token / 1e9:.2f} GB read per token)"]


def train(b):
    """Forward + backward on one fixed batch, weights in the bench dtype, stage 1 and stage 2: time, then memory."""
    model, B = b.model, b.batch_size
    ids, pixels, grid, labels, mask = b.inputs(B)  # labels on the answer only
    T = ids.shape[1]

    def step(m):  # no output held through backward: the reference's has fp32 logits at every position
        kw = dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, labels=labels, attention_mask=mask)
        (m(**kw)[1] if m is model else m(**kw).loss).backward()
        m.zero_grad(set_to_none=True)

    got = {}  # (measure, stage, model): seconds or bytes
    for measure in (b.timed, b.peak_bytes):  # every time first: the profiler slows what it watches
        for stage in ("stage1", "stage2"):
            for m in filter(None, (model, b.ref)):
                m.train().set_training_stage(stage)
                try:
                    got[measure, stage, m] = measure(lambda: step(m))
                except torch.OutOfMemoryError:  # a 12B stage 2 beside its reference copy: pass fewer --n_layer
                    print(f"{stage}: out of memory in {'ours' if m is model else 'the reference'}")
                    m.zero_grad(set_to_none=True)
                m.eval()
    out = []
    for stage in ("stage1", "stage2"):
        (t, t_ref), mem = ([got.get((how, stage, m)) for m in (model, b.ref)] for how in (b.timed, b.peak_bytes))
        if t is None:
            continue
        model.set_training_stage(stage)  # what model.flops counts the backward of
        note = f"; ours {B / t:.2f} samples/s, {B * T / t:,.0f} tok/s" + (
            f", MFU {100 * b.flops(ids, labels, grid) / t / b.peak_flops:.1f}%" if b.peak_flops else "")
        mem = [None if x is None else (x + nbytes(m.parameters())) / 2**20 for x, m in zip(mem, (model, b.ref))]
        out += [Row(f"{stage} step, {B} x {T} tokens ({b.P['answer']} labelled)", t * 1e3, t_ref and t_ref * 1e3, "ms",
                    note), Row(f"{stage} step peak memory", *mem, "MiB")]  # memory: the weights and the peak above them
    return out


def padding(b):
    """Stage-2 steps over 8 micro-batches of mixed lengths, in drawn order and length-grouped as train.py cuts them."""
    model, v, B, rate, pad = b.model, b.model.config.vision, b.batch_size, {}, {}
    rng, n, f = np.random.default_rng(b.seed), 8 * B, v.patch_size * v.spatial_merge_size
    sides = rng.integers(256 // f, 512 // f + 1, (n, 2)) * f  # 256-512 px a side: 64-256 image tokens at f=32
    caps = rng.integers(100, 401, n)
    lengths = 1 + b.P["prompt"] + sides.prod(1) // f**2 + caps
    model.train().set_training_stage("stage2")
    for order, batches in (("drawn order", np.arange(n).reshape(-1, B)),
                           ("length-grouped", length_grouped(np.arange(n), lengths, B, rng))):
        pad[order] = 1 - lengths.sum() / sum(int(lengths[rows].max()) * len(rows) for rows in batches)
        data = [b.batch(sides[rows], caps[rows]) for rows in batches]

        def steps():
            for ids, pixels, grid, labels, mask in data:
                model(ids, pixels, grid, labels=labels, attention_mask=mask)[1].backward()
            model.zero_grad(set_to_none=True)
        rate[order] = lengths.sum() / b.timed(steps, 1)
    model.eval()
    return [Row(f"stage2 steps, {len(batches)} length-grouped micro-batches of {B} (reference: drawn order)",
                rate["length-grouped"], rate["drawn order"], "tok/s",
                note=f"; padding {100 * pad['length-grouped']:.1f}% vs {100 * pad['drawn order']:.1f}%")]


def streamed(url, body):
    """One streamed chat request: (seconds to its first content, or its finish if it has none; seconds to the end of
    the stream; completion tokens, from usage; finish_reason), on the client's clock."""
    t0, first, usage, finish = time.perf_counter(), None, None, None
    req = urllib.request.Request(url + "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:  # server-sent events: 'data: {chunk}' lines, then 'data: [DONE]'
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                die(f"serve.py failed a request: {chunk['error']['message']}")
            for c in chunk["choices"]:
                if first is None and (c["delta"].get("content") or c["finish_reason"]):
                    first = time.perf_counter() - t0
                finish = c["finish_reason"] or finish
            usage = chunk.get("usage") or usage
    return first, time.perf_counter() - t0, usage["completion_tokens"], finish


def serve(b):
    """serve.py under one seeded mixed workload at 1, 8 and 32 concurrent clients, continuous against static batching,
    both with 32 slots: output tokens/s, time to first token (TTFT) and request latency, from streamed responses on
    the client's clock. A client sends its next request when the last ends; each client's first request is left out
    of TTFT and latency: they all arrive at once, and the last waits for every other's prefill, which no steady load
    does. Natural stops: the bench model's <|im_end|> head row is scaled up, so random weights end a reply after a
    few dozen tokens more often than not, at the same token in both modes (greedy)."""
    counts, per, v = (1, 8, 32), {1: 16, 8: 6, 32: 3}, b.model.config.vision  # per: requests per client
    rng, f = np.random.default_rng(b.seed), v.patch_size * v.spatial_merge_size
    bodies = []
    for _ in range(max(c * per[c] for c in counts)):
        words = rng.integers(100, b.model.config.text.vocab_size, rng.integers(8, 65))  # 8-64 words, one token each
        content = [{"type": "text", "text": " ".join(f"w{k}" for k in words)}]
        if rng.random() < 0.5:  # half with a photo 256-512 px a side (64-256 image tokens), first, as lmms-eval sends
            png = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (*rng.integers(256 // f, 512 // f + 1, 2) * f, 3), dtype=np.uint8)
                            ).save(png, "PNG")
            content.insert(0, {"type": "image_url", "image_url": {
                "url": "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()}})
        bodies.append(json.dumps({"model": "bench", "messages": [{"role": "user", "content": content}],
                                  "max_tokens": int(rng.integers(16, 257)), "temperature": 0, "stream": True,
                                  "stream_options": {"include_usage": True}}).encode())
    got = {}  # (mode, clients): (each client's [(ttft, latency, tokens, finish)], seconds for them all)
    with tempfile.TemporaryDirectory() as d, ExitStack() as servers:
        sd = b.model.state_dict()  # the bench model, its <|im_end|> head row scaled in the saved copy alone
        head = sd["language_model.lm_head.weight"].clone()
        head[IMG + 3] *= 2.4
        save_pretrained(b.model, d, state_dict=sd | {"language_model.lm_head.weight": head},
                        write_extra=word_processor(b.model.config.text.vocab_size, 512).save_pretrained)
        cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"), f"--init_from={d}",
               f"--device={b.device}", f"--dtype={str(b.dtype)[6:]}", "--port=0", "--max_batch=32",
               "--max_model_len=1024"]  # what the workload needs: each step attends over every slot's columns
        logs, urls = {}, {}
        for mode in ("continuous", "static"):
            logs[mode] = servers.enter_context(open(os.path.join(d, mode + ".log"), "w+"))
            server = servers.enter_context(subprocess.Popen(cmd + [f"--batching={mode}"], stdout=logs[mode],
                                                            stderr=logs[mode]))
            servers.callback(server.terminate)
            while not (url := re.search(r" on (http://\S+)/v1 ", open(logs[mode].name).read())):  # its line on being up
                if server.poll() is not None:
                    die(f"serve.py --batching={mode} exited: {open(logs[mode].name).read()[-500:]}")
                time.sleep(0.2)
            urls[mode] = url[1]
            streamed(urls[mode], next(x for x in bodies if b"image_url" in x))  # warmup: vision tower and decoder
        for c in counts:
            for mode, url in urls.items():  # back to back at each count, so a shared machine's load falls on both
                def client(i):  # client i sends requests i, i + c, i + 2c, ...
                    return [streamed(url, bodies[i + c * k]) for k in range(per[c])]
                t0 = time.perf_counter()
                with ThreadPoolExecutor(c) as pool:
                    got[mode, c] = list(pool.map(client, range(c))), time.perf_counter() - t0
    lines = ["| serve.py, mixed workload, 32 slots | clients | requests (timed) | output tok/s | TTFT p50 / p95 | "
             "latency p50 / p95 | natural stops |", "|---|---|---|---|---|---|---|"]
    p95 = {}
    for (mode, c), (runs, dt) in got.items():
        done, later = [r for run in runs for r in run], [r for run in runs for r in run[1:]]
        (t50, p95[mode, c]), (l50, l95) = (np.percentile([r[k] for r in later], [50, 95]) for k in (0, 1))
        lines.append(f"| {mode} | {c} | {len(done)} ({len(later)}) | {sum(r[2] for r in done) / dt:,.1f} | "
                     f"{t50 * 1e3:,.0f} / {p95[mode, c] * 1e3:,.0f} ms | {l50:.2f} / {l95:.2f} s | "
                     f"{sum(r[3] == 'stop' for r in done)} of {len(done)} |")
    rate = {k: sum(r[2] for run in runs for r in run) / dt for k, (runs, dt) in got.items()}
    same = sum(x[2] == y[2] for c in counts for a, z in zip(got["continuous", c][0], got["static", c][0])
               for x, y in zip(a, z))
    return ["\n".join(lines), "continuous vs static batching, output tokens/s: " + ", ".join(
        f"{rate['continuous', c] / rate['static', c]:.2f}x at {c} clients" for c in counts[1:]) +
        "; TTFT p95 under load vs 1 client: " + ", ".join(
        f"{p95[m, c] / p95[m, 1]:.2f}x ({m}, {c} clients)" for m in urls for c in counts[1:]) +
        f"; requests with the same completion tokens in both modes: {same} of {sum(c * per[c] for c in counts)}"]


def quantize(b):
    """The int8 decoder (quantize.py) against the bench dtype. Last in the run order: it quantizes the model."""
    with torch.device("meta"):  # shapes and dtypes, no memory: always the full 40 layers
        big = ArtemisVLM(preset_config("a3")).to(torch.bfloat16)
    a3_bf16, a3_int8 = nbytes(big.state_dict().values()), nbytes(quantize_int8(big).state_dict().values())
    ids, pixels, grid, _, _ = b.inputs(1, answer=False)
    kinds = ["eager"] + (["compiled" + (" (CUDA graphs)" if b.cuda else "")] if b.compile else [])
    rates, per_token = {}, {}
    for q in ("full", "int8"):  # back to back, so a shared machine's load falls on both alike
        if q == "int8":
            quantize_int8(b.model)
        per_token[q] = b.decode_read_bytes(ids.shape[1])
        for k in kinds:  # compiled again once quantized: the first compile froze the float weights into its graph
            step = b.model.decode_one if k == "eager" else b.model.compile_decode()
            rates[q, k] = b.decode_rate(step, ids, pixels, grid)
    bw, full = b.read_bandwidth(), str(b.dtype).removeprefix("torch.")
    rows = [("weights of the A3 shape (40 layers, meta device), GB", a3_int8 / 1e9, a3_bf16 / 1e9, "bf16"),
            (f"decoder bytes read per decode token ({b.preset}), GB", per_token["int8"] / 1e9, per_token["full"] / 1e9,
             full)] + [(f"decode, batch 1, {k}, tok/s", rates["int8", k], rates["full", k], full) for k in kinds]
    return ["\n".join(["| int8 decoder (quantize.py) | int8 | full precision | int8 vs full |", "|---|---|---|---|"] +
                      [f"| {what} | {q:,.2f} | {f:,.2f} ({name}) | {q / f:.2f}x |" for what, q, f, name in rows]),
            "\n".join(f"decode, batch 1, {k}, {name}: {rates[q, k] * per_token[q] / 1e9:.1f} GB/s read = "
                      f"{100 * rates[q, k] * per_token[q] / bw:.0f}% of the measured {bw / 1e9:.1f} GB/s read bandwidth"
                      for k in kinds for q, name in (("full", full), ("int8", "int8")))]


def stage1(b):
    """The Stage-1 step (projector trained, tower and decoder frozen in the bench dtype) at the largest batch that fits
    (doubling from batch_size until out of memory; on a CPU, batch_size), without and with gradient checkpointing:
    samples/s, tokens/s, MFU (the FLOPs that run: model.flops) and peak memory."""
    model, rows = b.model, []
    model.train().set_training_stage("stage1")
    for ckpt in (False, True):
        model.language_model.gradient_checkpointing, fits = ckpt, None

        def step(ids, pixels, grid, labels, mask):
            model(ids, pixels, grid, labels=labels, attention_mask=mask)[1].backward()
            model.zero_grad(set_to_none=True)
        for B in [b.batch_size * 2**k for k in range(8 if b.cuda else 1)]:
            try:
                step(*b.inputs(B))
                fits = B
            except torch.OutOfMemoryError:
                model.zero_grad(set_to_none=True)
                break
        if fits is None:
            continue
        batch = b.inputs(fits)
        t, peak, (ids, _, grid, labels, _) = b.timed(lambda: step(*batch)), b.peak_bytes(lambda: step(*batch)), batch
        mfu = f", MFU {100 * b.flops(ids, labels, grid) / t / b.peak_flops:.1f}%" if b.peak_flops else ""
        on = "on" if ckpt else "off"
        rows += [Row(f"stage1 step, batch {fits} x {ids.shape[1]} tokens, checkpointing {on}; {fits / t:.2f} "
                     f"samples/s, {ids.numel() / t:,.0f} tok/s{mfu}", t * 1e3, None, "ms"),
                 Row(f"stage1 step peak memory, checkpointing {on}", (peak + nbytes(model.parameters())) / 2**20,
                     None, "MiB")]
    model.language_model.gradient_checkpointing = False
    model.eval()
    return rows


# what fits where -----------------------------------------------------------------------------------------------------
LORA = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "config", "stage2_lora.py"))
RUNS = {  # the memory section's rows: what train.py trains, its master weights and optimizer, over how many GPUs
    "stage 1": dict(stage="stage1"),
    "stage 2 full, FSDP over 8 GPUs (fp32 master, AdamW)": dict(stage="stage2", world=8),
    "stage 2 full, one device (bf16 master, 8-bit AdamW)": dict(stage="stage2", master="bf16", optimizer="adamw8bit"),
    f"stage 2 LoRA r={LORA['lora_rank']}": dict(stage="stage2", lora=LORA["lora_rank"]),
    f"stage 2 LoRA r={LORA['lora_rank']}, int8 base": dict(stage="stage2", lora=LORA["lora_rank"], int8=True),
    "stage 2 LoRA r=16, int8 base (the README's QLoRA command)": dict(stage="stage2", lora=16, int8=True),
}
FULL, SINGLE, LORA_ROW, INT8_ROW, INT8_16 = list(RUNS)[1:]
GB = 1e9


def graft(config, run, device, ckpt=False, k=1):
    """The model as train.py sets it up for `run` on CUDA (dtype bfloat16): frozen weights in bf16, the decoder in
    int8 under LoRA's int8 base, LoRA adapters (rank / k), trainable weights in the master dtype (fp32 or bf16)."""
    with torch.device(device):
        m = ArtemisVLM(dataclasses.replace(config, quantization=None)).to(torch.bfloat16).train()
    m.set_training_stage(run["stage"])
    if run.get("int8"):
        quantize_int8(m)
    if run.get("lora"):
        apply_lora(m, run["lora"] // k, LORA["lora_alpha"], LORA["lora_dropout"])
    for p in m.parameters():
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16 if run.get("master") == "bf16" else torch.float32)
    m.language_model.gradient_checkpointing = ckpt
    return m


def make_optimizer(params, run, cuda):  # train.py's
    if run.get("optimizer") == "adamw8bit":
        import torchao.optim
        return torchao.optim.AdamW8bit(params, bf16_stochastic_round=run.get("master") == "bf16")
    return torch.optim.AdamW(params, fused=cuda)


def state_bytes(opt):  # a tensor subclass (torchao's 8-bit state) by its inner tensors
    inner = lambda t: [getattr(t, n) for n in t.__tensor_flatten__()[0]] if hasattr(t, "__tensor_flatten__") else [t]
    return nbytes(x for s in opt.state.values() for v in s.values() if torch.is_tensor(v) for x in inner(v))


def answer_len(b):
    """The labelled answer tokens that fill a row of the preset's `row` tokens after bos, the prompt and one image of
    the preset's side."""
    v = b.model.config.vision
    return b.P["row"] - 1 - b.P["prompt"] - (b.P["image"] // (v.patch_size * v.spatial_merge_size)) ** 2


def micro_step(b, model, B):
    """One micro-step of train.py under bf16 autocast, on B rows of the preset's `row` tokens: bos, the prompt, one
    image of the preset's side, and the labelled answer that fills the row."""
    ids, pixels, grid, labels, mask = b.batch([(b.P["image"],) * 2] * B, [answer_len(b)] * B)
    with torch.autocast(b.device.split(":")[0], dtype=torch.bfloat16):
        loss = model(ids, pixels, grid, labels=labels, attention_mask=mask)[1]
    loss.backward()


def optimizer_constants(b):
    """{optimizer: (state bytes per parameter, the step's temporaries per value of the tensor it steps)}, measured
    on one 1024 x 1024 weight: torch's AdamW on fp32 (fused on CUDA), torchao's AdamW8bit on bf16."""
    out = {}
    for name, dt in (("adamw", torch.float32), ("adamw8bit", torch.bfloat16)):
        p = torch.nn.Parameter(torch.randn(1024, 1024, dtype=dt, device=b.device))
        p.grad, opt = torch.randn_like(p), make_optimizer([p], dict(optimizer=name, master="bf16"), b.cuda)
        opt.step()  # its state exists from the first step
        out[name] = state_bytes(opt) / p.numel(), b.peak_bytes(opt.step) / p.numel()
    return out


def activation_constants(b, run, ckpt):
    """Activation bytes of one micro-step, measured on the preset's graft with every width divided by k (probe) at 1
    and 2 decoder layers and batch 1 and 2: the peak above what was allocated before the step (weights, gradients of
    an earlier micro-step). Solved from the four peaks m[L, B] as m = fixed + B rest + L (B layer + cast):
    layer, per row and decoder layer; cast, per decoder layer and independent of the batch (autocast's bf16 copies of
    fp32 weights, kept for the backward); rest and fixed, the embedding, tower, projector and loss (loss_chunk's
    part of fixed included)."""
    c, k, m = b.model.config, b.P["probe"], {}
    v = c.vision
    for L in (1, 2):
        text = dataclasses.replace(c.text, num_hidden_layers=L, hidden_size=c.text.hidden_size // k,
                                   intermediate_size=c.text.intermediate_size // k, head_dim=c.text.head_dim // k)
        vision = dataclasses.replace(v, hidden_size=v.hidden_size // k, intermediate_size=v.intermediate_size // k,
                                     out_hidden_size=v.out_hidden_size // k)
        torch.manual_seed(b.seed)
        model = graft(dataclasses.replace(c, text=text, vision=vision), run, b.device, ckpt, k)
        for p in model.parameters():  # gradients exist, as from a run's second micro-step on
            p.grad = torch.zeros_like(p) if p.requires_grad else None
        for B in (1, 2):
            m[L, B] = b.peak_bytes(lambda: micro_step(b, model, B))
    layer = m[2, 2] - m[1, 2] - m[2, 1] + m[1, 1]
    cast = m[2, 1] - m[1, 1] - layer
    rest = m[1, 2] - m[1, 1] - layer
    return dict(fixed=m[1, 1] - rest - layer - cast, rest=rest, layer=layer, cast=cast)


def loss_chunk(b):
    """The part of a micro-step's fixed activations that does not grow with the width: the loss's (rows, vocab)
    logits chunk and its gradient, measured alone with a 1-wide head over a row's labelled tokens, the same for every
    run (scaled by the probe's factor with the rest, it made the small preset's modelled peaks 2-23% high)."""
    n, vocab = answer_len(b), b.model.config.text.vocab_size
    h = torch.randn(n, 1, dtype=torch.bfloat16, device=b.device, requires_grad=True)
    w = torch.randn(vocab, 1, dtype=torch.bfloat16, device=b.device)
    t = torch.randint(vocab, (n,), device=b.device)
    return b.peak_bytes(lambda: LinearCrossEntropy.apply(h, w, t, True).backward())


def by_dtype(model):  # [(dtype, bytes)] of its parameters and buffers
    out = {}
    for t in list(model.parameters()) + list(model.buffers()):
        out[t.dtype] = out.get(t.dtype, 0) + t.numel() * t.element_size()
    return sorted(out.items(), key=lambda x: -x[1])


def modelled(b, run, opt, a, B):
    """(weights, gradients, optimizer state, activations, the optimizer step's temporaries) per GPU, bytes, at the
    preset's shape. Weights are counted on the meta device; the rest are the measured constants scaled by k (every
    width, but not the loss's logits chunk; k**2 for the per-layer weight copies, whose size goes with width squared)
    and the number of layers."""
    c, k = b.model.config, b.P["probe"]
    model = graft(c, run, "meta")
    trainable = [p for p in model.parameters() if p.requires_grad]
    weights, grads = nbytes(list(model.parameters()) + list(model.buffers())), nbytes(trainable)
    n, largest = sum(p.numel() for p in trainable), max(p.numel() for p in trainable)
    acts = (a["chunk"] + k * (a["fixed"] - a["chunk"] + B * a["rest"])
            + c.text.num_hidden_layers * (k * B * a["layer"] + k * k * a["cast"]))
    world = run.get("world", 1)
    if world > 1:  # FSDP2 (train.py: each decoder layer, then the root): every tensor in world shards; the root's
        # own (embedding, head, tower, projector) stay gathered from forward to backward, and two layers at a time
        # (the one computing, the one prefetched) are gathered too; the root's gradients are gathered until they are
        # reduce-scattered after the backward
        layers = model.language_model.model.layers
        in_layers = {id(p) for p in layers.parameters()}
        root = [p for p in model.parameters() if id(p) not in in_layers]
        weights = weights / world + nbytes(root) + 2 * nbytes(layers[0].parameters())
        grads = grads / world + nbytes(p for p in root if p.requires_grad)
        n, largest = n / world, largest / world
    name = run.get("optimizer", "adamw")
    return weights, grads, n * opt[name][0], acts, largest * opt[name][1]


def measured_peak(preset, n_layer, device, seed, run, B, ckpt):
    """In a fresh process (bench.py's memory section starts it): a run's third micro-step at the preset's shape, after
    a micro-step, an optimizer step and a micro-step, so weights, gradients and optimizer state all exist. Prints
    (those three, counted; the rise above them during the step, measured: the CPU's resident high-water mark, reset
    just before, or the CUDA allocator's peak; the seconds of a micro-step and optimizer step)."""
    config, P = preset_config(preset, n_layer), PRESETS[preset]
    cuda = device.startswith("cuda")
    b = Bench(None, None, None, preset, P, device, cuda, torch.float32, 1, 0, 1, False, 0.0, seed)
    torch.manual_seed(seed)
    model = graft(config, run, device, ckpt)
    b = b._replace(model=model)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], run, cuda)
    micro_step(b, model, B)
    opt.step()
    opt.zero_grad(set_to_none=True)
    micro_step(b, model, B)
    static = [nbytes(list(model.parameters()) + list(model.buffers())),
              nbytes(p.grad for p in model.parameters() if p.grad is not None), state_bytes(opt)]
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the high-water mark back to the resident size now
        base = rss("VmRSS")
    t0 = time.perf_counter()
    micro_step(b, model, B)
    rise = torch.cuda.max_memory_allocated() - base if cuda else rss("VmHWM") - base
    opt.step()
    if cuda:
        torch.cuda.synchronize()
    print(json.dumps(dict(static=static, rise=rise, seconds=time.perf_counter() - t0)))


def rss(field):  # bytes of /proc/self/status's VmRSS or VmHWM
    with open("/proc/self/status") as f:
        return 1024 * int(next(line.split()[1] for line in f if line.startswith(field + ":")))


def child_peak(b, run, B, ckpt):
    """measured_peak in a fresh process, whose large tensors glibc maps and unmaps one by one (a fixed mmap
    threshold), so that its resident size follows the tensors it holds."""
    code = (f"import bench; bench.measured_peak({b.preset!r}, {n_layer}, {b.device!r}, {b.seed}, {run!r}, {B}, "
            f"{ckpt})")
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       cwd=os.path.dirname(os.path.abspath(__file__)))
    if p.returncode:
        raise RuntimeError(f"measured_peak exited {p.returncode}: {p.stderr[-800:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def memory(b):
    """What fits where: per-GPU memory of each of RUNS at batch 1 and 2 of rows of the preset's `row` tokens, with and
    without gradient checkpointing, at the preset's shape. Off the A3 shape, the modelled peak beside the one measured
    in a fresh process, and a LoRA step against a full fine-tune's."""
    k, T, check = b.P["probe"], b.P["row"], b.preset != "a3"
    opt = optimizer_constants(b)
    chunk = loss_chunk(b)
    acts = {(name, ckpt): activation_constants(b, run, ckpt) | {"chunk": chunk}
            for name, run in RUNS.items() for ckpt in (False, True)}
    cols = ["run", "batch", "checkpointing", "weights", "gradients", "optimizer state", "activations",
            "optimizer step", "peak"]
    table, peak, parts = ["| " + " | ".join(cols) + " |", "|---" * len(cols) + "|"], {}, {}
    checked = ["| run, one process | batch | checkpointing | peak, modelled | peak, measured | modelled / measured |",
               "|---|---|---|---|---|---|"]
    steps = {}  # name: [(seconds, measured peak)] of a step at batch 2 with checkpointing, as config/stage2_lora.py
    for name, run in RUNS.items():
        for B in (1, 2):
            for ckpt in (False, True):
                parts[name, B, ckpt] = x = modelled(b, run, opt, acts[name, ckpt], B)
                peak[name, B, ckpt] = sum(x[:3]) + max(x[3:])  # the step runs once the activations are gone
                table.append(f"| {name} | {B} | {'on' if ckpt else 'off'} | "
                             + " | ".join(f"{v / GB:.2f}" for v in (*x, peak[name, B, ckpt])) + " |")
                if check and (b.preset != "tiny" or B == 2 and ckpt):  # tiny, a smoke test: one each
                    # the measured step is a micro-step: the modelled one without the optimizer's step
                    one = sum(modelled(b, dict(run, world=1), opt, acts[name, ckpt], B)[:4])
                    for _ in range(3 if B == 2 and ckpt and name in (FULL, LORA_ROW) and b.preset != "tiny" else 1):
                        got = child_peak(b, dict(run, world=1), B, ckpt)
                        real = sum(got["static"]) + got["rise"]
                        steps.setdefault(name, []).append((got["seconds"], real)) if B == 2 and ckpt else None
                    checked.append(f"| {name.split(',')[0] if run.get('world') else name} | {B} | "
                                   f"{'on' if ckpt else 'off'} | {one / GB:.3f} | {real / GB:.3f} | {one / real:.2f} |")
    notes = [f"per-GPU memory, GB, modelled at the {b.preset} shape (rows of {T} tokens)\n" + "\n".join(table)]
    if check:
        notes.append("\n".join(checked))
        rng = lambda xs: f"{min(xs):.2f}-{max(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"  # noqa: E731
        notes.append("\n".join(f"{name}, batch 2, checkpointing on, {torch.get_num_threads()} threads, "
                                f"{len(v)} runs: micro-step + optimizer step {rng([t for t, _ in v])} s, peak "
                                f"{rng([m / GB for _, m in v])} GB" for name, v in steps.items()
                                if name in (FULL, LORA_ROW)))
    notes.append("\n".join(
        ["optimizer state, bytes per parameter (one 1024 x 1024 weight, after a step): " + ", ".join(
            f"{n} {st:.3f}, its step's temporaries {t:.2f} per value of the tensor stepped" for n, (st, t) in opt.items())]
        + [f"activations, {name}, checkpointing {'on' if ckpt else 'off'} (measured at widths / {k}; x {k} for this "
           f"shape): {a['layer'] / T:,.0f} B per token and layer, weight copies {a['cast'] / 2**20:.2f} MiB per layer "
           f"(x {k * k}), outside the layers {a['rest'] / T:,.0f} B per token and {a['fixed'] / 2**20:.1f} MiB, of "
           f"which the loss's logits chunk {a['chunk'] / 2**20:.1f} MiB (not scaled)"
           for (name, ckpt), a in acts.items()]))
    notes.append("\n".join(f"weights of {name} by dtype (meta device): " + ", ".join(
        f"{str(dt).removeprefix('torch.')} {n / GB:.2f} GB" for dt, n in by_dtype(graft(b.model.config, run, "meta")))
        for name, run in RUNS.items()))
    if b.preset == "a3":
        what = ("weights", "gradients", "optimizer state", "activations", "optimizer step")
        goals = [(LORA_ROW, 2, 80), (INT8_ROW, 1, 24), (INT8_16, 1, 24), (SINGLE, 1, 128)]
        for (name, B, card), ckpt in itertools.product(goals, (True, False)):
            x, got = parts[name, B, ckpt], peak[name, B, ckpt] / GB
            held = max(range(5), key=lambda i: x[i])
            notes.append(f"goal: {name}, batch {B}, checkpointing {'on' if ckpt else 'off'}, in {card} GB: "
                         f"{got:.1f} GB, " + (f"fits with {card - got:.1f} GB to spare" if got <= card else
                                              f"misses by {got - card:.1f} GB; the largest part: {what[held]} "
                                              f"{x[held] / GB:.1f} GB"))
    return notes


def e2e(b):
    """What a user runs, end to end, on files: the bench model saved as an artemis checkpoint with a word-level
    tokenizer, prepare.py on webdataset shards of generated images with 150-300-token captions, 20 steps of
    `train.py config/stage1.py` from that checkpoint (init_from=pretrained, as from_parts would assemble it; batch 2,
    accumulation 2), its save, then `sample.py --compile=True` on what it saved. Each script's own lines give the
    figures: train.py's log and save, sample.py's summary line."""
    import tarfile
    root, rng = os.path.dirname(os.path.abspath(__file__)), np.random.default_rng(b.seed)
    side, dev = b.P["image"], [f"--device={b.device}", f"--dtype={str(b.dtype)[6:]}"]
    with tempfile.TemporaryDirectory() as d:
        ckpt, shards, data, run = (os.path.join(d, x) for x in ("ckpt", "shards", "data", "run"))
        t0 = time.perf_counter()
        save_pretrained(b.model, ckpt, write_extra=word_processor(b.model.config.text.vocab_size, side).save_pretrained)
        t_write = time.perf_counter() - t0
        os.makedirs(shards)
        for k in range(4):  # 4 shards of 16 samples
            with tarfile.open(os.path.join(shards, f"{k:05d}.tar"), "w") as tar:
                for i in range(16):
                    photo = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(photo, "JPEG")
                    caption = " ".join(f"w{w}" for w in rng.integers(100, 30000, rng.integers(150, 301))).encode()
                    for ext, data_ in (("jpg", photo.getvalue()), ("txt", caption)):
                        info = tarfile.TarInfo(f"{k}-{i}.{ext}")
                        info.size = len(data_)
                        tar.addfile(info, io.BytesIO(data_))

        def run_script(*args):  # (seconds, [(seconds since start, line)] of its stdout and stderr)
            t, lines = time.perf_counter(), []
            with subprocess.Popen([sys.executable, os.path.join(root, args[0]), *args[1:]], cwd=d, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as p:
                for line in p.stdout:
                    lines.append((time.perf_counter() - t, line.rstrip()))
            if p.returncode:
                raise RuntimeError(f"{args[0]} exited {p.returncode}: {lines[-1][1] if lines else ''}")
            return time.perf_counter() - t, lines

        t_prep, _ = run_script("prepare.py", "--dataset=tars", f"--src={shards}", f"--tokenizer={ckpt}",
                               f"--out_dir={data}", "--val_frac=0.15", f"--max_pixels={side * side}")
        t_train, log = run_script("train.py", os.path.join(root, "config", "stage1.py"), "--init_from=pretrained",
                                  f"--pretrained={ckpt}", f"--dataset={data}", f"--out_dir={run}", "--max_iters=20",
                                  "--gradient_accumulation_steps=2", "--eval_interval=20", "--eval_iters=2",
                                  "--eval_samples=1", "--log_interval=1", "--num_workers=2", *dev)
        steps = [ln for _, ln in log if ln.startswith("iter ") and "ms/iter" in ln]
        saved = next(t for t, ln in log if ln.startswith("saved checkpoint"))
        t_save = saved - max(t for t, ln in log if t < saved and not ln.startswith("saved"))
        size = sum(os.path.getsize(os.path.join(run, "ckpt", f)) for f in os.listdir(os.path.join(run, "ckpt")))
        photo = os.path.join(d, "photo.jpg")
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(photo)
        t_sample, said = run_script("sample.py", f"--init_from={run}", f"--image={photo}", "--compile=True",
                                    "--temperature=0", "--max_new_tokens=64", *dev)
    summary = next(ln for _, ln in reversed(said) if "time to first token" in ln)
    return [Row("e2e: bench model saved as an artemis checkpoint (+ tokenizer)", t_write, None, "s"),
            Row("e2e: prepare.py, 64 images with 150-300-token captions", t_prep, None, "s"),
            Row(f"e2e: train.py config/stage1.py, 20 steps + eval + save; last step: {steps[-1]}", t_train, None, "s"),
            Row(f"e2e: its checkpoint save, {size / 1e9:.2f} GB", t_save, None, "s"),
            Row(f"e2e: sample.py --compile=True on it: {summary}", t_sample, None, "s")]


SECTIONS = {f.__name__: f for f in (processor, vision, prefill, decode, train, padding, serve, stage1, e2e,
                                    memory, quantize)}  # the run order: quantize, last, quantizes the model in place
DEVICE_RUN = ("stage1", "e2e", "memory")  # only when named: minutes each on a CPU


def table(rows):
    fmt = lambda v, unit: "-" if v is None else f"{v:,.1f} {unit}" if v < 100 else f"{v:,.0f} {unit}"  # noqa: E731
    lines = ["| what | ours | reference | ours vs reference |", "|---|---|---|---|"]
    for what, ours, theirs, unit, note in rows:
        ratio = "-" if ours is None or not theirs else f"{ours / theirs:.2f}x the memory" if unit == "MiB" else (
            f"{ours / theirs if unit.endswith('/s') else theirs / ours:.2f}x faster")  # a rate, or a time in ms
        lines.append(f"| {what}{note} | {fmt(ours, unit)} | {fmt(theirs, unit)} | {ratio} |")
    return "\n".join(lines)


def preset_config(name, n_layer=0):
    P = PRESETS[name]
    text = dict(P["text"], sliding_window=None, tie_word_embeddings=False) | (
        dict(num_hidden_layers=n_layer) if n_layer else {})
    return ArtemisConfig(TextConfig(**text), VisionConfig(**P["vision"], num_position_embeddings=2304), IMG)


def main():
    names, cuda = only.split(",") if only else [n for n in SECTIONS if n not in DEVICE_RUN], device.startswith("cuda")
    if preset not in PRESETS:
        die(f"--preset={preset!r}, expected one of {', '.join(PRESETS)}")
    if set(names) - set(SECTIONS):
        die(f"--only={only!r}, expected a comma-separated subset of {','.join(SECTIONS)}")
    if cuda and not torch.cuda.is_available():
        die(f"--device={device}: CUDA is not available here")
    ref_processor = None
    if reference:
        try:
            from artemis_vlm import ArtemisVLMConfig, ArtemisVLMForConditionalGeneration
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
            ref_processor = Qwen2VLImageProcessorPil
        except ImportError as e:
            print(f"reference stack not installed ({e}); timing this implementation only")
    P, ptdtype = PRESETS[preset], getattr(torch, dtype or ("bfloat16" if cuda else "float32"))
    config = preset_config(preset, n_layer)
    torch.manual_seed(seed)
    torch.set_default_dtype(ptdtype)  # built in the bench dtype on the device: a 12B never exists in fp32
    with torch.device(device if set(names) - {"memory"} else "meta"):  # memory builds its own models
        model = ArtemisVLM(config).eval()
        ref = ArtemisVLMForConditionalGeneration(ArtemisVLMConfig(**config.to_dict())).eval() if ref_processor and (
            {"vision", "prefill", "decode", "train"} & set(names)) else None  # the sections that run it
    torch.set_default_dtype(torch.float32)
    if ref is not None:
        missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
        if unexpected or any(".deepstack_merger_list." not in k for k in missing):
            die(f"weights do not map onto the reference: {(missing + unexpected)[:3]}")
        ref.generation_config.update(eos_token_id=None, pad_token_id=0)  # random weights: always n new tokens
    c, v, n_dec = config.text, config.vision, sum(p.numel() for p in model.language_model.parameters())
    header = (f"bench: {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}" if cuda else
              f"bench: {device} ({torch.get_num_threads()} threads)") + (
        f", torch {torch.__version__}, {str(ptdtype)[6:]}, preset {preset}: decoder {c.num_hidden_layers} x "
        f"{c.hidden_size} ({n_dec / 1e6:.0f}M, vocab {c.vocab_size}), vision {v.depth} x {v.hidden_size}"
        + (", reference: transformers + artemis-vlm" if ref else "") + f"; {' '.join(sys.argv)}")
    print(header, flush=True)
    b = Bench(model, ref, ref_processor, preset, P, device, cuda, ptdtype, batch_size or P["batch"], new_tokens,
              repeat, compile, peak_flops, seed)
    got = []
    for name in (n for n in SECTIONS if n in names):
        got += run_section(b, name)
        rows, notes = [r for r in got if isinstance(r, Row)], [s for s in got if isinstance(s, str)]
        report = "\n\n".join(([table(rows)] if rows else []) + notes)
        if out:  # after every section: a run cut short keeps what it measured
            os.makedirs(out, exist_ok=True)
            with open(os.path.join(out, "bench.json"), "w") as f:
                json.dump({"header": header, "rows": [r._asdict() for r in rows], "notes": notes}, f, indent=1)
            with open(os.path.join(out, "bench.md"), "w") as f:
                f.write(header + "\n\n" + report + "\n")
    print("\n" + report)


def run_section(b, name):
    """The section's rows; one that runs past `budget` seconds is stopped (SIGALRM) and says so."""
    def stop(signum, frame):
        raise TimeoutError
    signal.signal(signal.SIGALRM, stop)
    signal.alarm(budget)
    try:
        return SECTIONS[name](b)
    except TimeoutError:
        return [f"{name}: stopped after its budget of {budget} s"]
    finally:
        signal.alarm(0)


if __name__ == "__main__":
    main()
