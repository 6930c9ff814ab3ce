"""
Speed and memory of this implementation beside the reference stack (transformers + artemis-vlm), as one table.

    python bench.py                                  # CPU: the 'small' preset, against the reference if installed
    python bench.py --preset=tiny --only=decode,train
    python bench.py --preset=a3 --n_layer=8          # GPU: A2 (Mistral-Nemo 12B) + Qwen3-VL-2B vision shapes
    python bench.py --only=quantize                  # int8 decoder (quantize.py) against the bench dtype
    python bench.py --only=padding                   # train.py's length-grouped micro-batches against drawn order

Both stacks get the same random weights (copied in memory) and the same inputs, in this one process. A time is
the median of `repeat` runs after one warmup run. Decode tokens/s is batch x (n - 1) / (time(n new tokens) -
time(1 new token)): the prefill is excluded. Training steps are forward + backward on a fixed batch, weights in
`dtype`. The padding section trains on 8 micro-batches of rows with 100-400-token captions and 64-256 image
tokens, cut in drawn order and length-grouped as train.py cuts them: padding fraction and real tokens/s. Peak
memory is the model's parameters plus the most tensor memory the step holds above what was allocated
before it (CUDA: the caching allocator's peak; CPU: the profiler's memory timeline). The decode bandwidth bound is
the fastest read of a 1 GiB tensor (4 GiB on CUDA) by a sum: a read-only kernel, as decode only reads its weights.
The quantize section runs last: it quantizes the model in place.
Prints the table; writes nothing.
"""
import gc
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from functools import partial

import numpy as np
import torch
from PIL import Image
from tokenizers import Tokenizer, models

from checkpoint import save_pretrained
from configurator import configure, die
from dataset import length_grouped
from model import ArtemisConfig, ArtemisVLM, TextConfig
from processor import CLIP_MEAN, CLIP_STD, Processor
from quantize import quantize_int8
from vision import VisionConfig

# -----------------------------------------------------------------------------
preset = "a3" if torch.cuda.is_available() else "small"  # 'tiny' | 'small' (CPU) | 'a3' (the real shapes)
n_layer = 0  # decoder layers; 0: the preset's (a3 has 40: fewer fit a 12B beside its reference copy)
only = ""  # comma-separated subset of processor,vision,prefill,decode,train,padding,serve,quantize; '': all
reference = True  # also run transformers + artemis-vlm (when installed) on the same weights and inputs
compile = True  # also time a torch.compile'd decode step (CUDA: with CUDA graphs)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = ""  # '': bfloat16 on CUDA, float32 on CPU
batch_size = 0  # training rows per step; 0: the preset's
new_tokens = 32  # decode length
repeat = 5
peak_flops = 989e12 if torch.cuda.is_available() else 0.0  # for MFU (H100 SXM dense bf16); 0: no MFU
seed = 0
configure(globals())

# -----------------------------------------------------------------------------

PRESETS = {  # decoder, vision tower, and one training row: image side (px), prompt and answer tokens
    "tiny": dict(text=dict(vocab_size=131072, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=16),
                 vision=dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64),
                 image=224, prompt=16, answer=48, batch=4),
    "small": dict(text=dict(vocab_size=131072, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=64),
                  vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, out_hidden_size=512),
                  image=384, prompt=16, answer=96, batch=4),
    "a3": dict(text=dict(vocab_size=131072, hidden_size=5120, intermediate_size=14336, num_hidden_layers=40,  # A2
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=1e6),
               vision=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,  # Qwen3-VL-2B
                           out_hidden_size=2048, deepstack_visual_indexes=[5, 11, 17]),
               image=512, prompt=16, answer=128, batch=2),
}
if preset not in PRESETS:
    die(f"--preset={preset!r}, expected one of {', '.join(PRESETS)}")
SECTIONS = ("processor", "vision", "prefill", "decode", "train", "padding", "serve", "quantize")
sections = set(only.split(",")) if only else set(SECTIONS)
if sections - set(SECTIONS):
    die(f"--only={only!r}, expected a comma-separated subset of {','.join(SECTIONS)}")
if device.startswith("cuda") and not torch.cuda.is_available():
    die(f"--device={device}: CUDA is not available here")
cuda = device.startswith("cuda")
ptdtype = getattr(torch, dtype or ("bfloat16" if cuda else "float32"))
P = PRESETS[preset]
batch_size = batch_size or P["batch"]
IMG = 22  # <|image_pad|>
if reference:
    try:
        from artemis_vlm import ArtemisVLMConfig, ArtemisVLMForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError as e:
        print(f"reference stack not installed ({e}); timing this implementation only")
        reference = False


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn, n=None):
    """Median seconds of n (default `repeat`) calls after one warmup call."""
    fn()
    ts = []
    for _ in range(n or repeat):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def peak_bytes(fn):
    """The most tensor memory fn holds above what was allocated when it started: the CUDA allocator's peak on a
    GPU; on a CPU the same quantity from the profiler's memory timeline (the process's resident size would add
    what malloc keeps after a free)."""
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # export_memory_timeline: deprecated for CUDA, CPU's only one
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True,
                                    record_shapes=True, with_stack=True) as prof:
            torch.zeros(1)  # the timeline starts at its first event: before fn allocates anything
            fn()
        prof.export_memory_timeline(os.path.join(d, "memory.json"), device="cpu")
        with open(os.path.join(d, "memory.json")) as f:
            _, sizes = json.load(f)  # bytes per category at each event
    total = [sum(s) for s in sizes]
    return max(total) - total[0]


def param_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def read_bandwidth():
    """Bytes per second of the fastest of 10 sums over a 1 GiB tensor (4 GiB on CUDA): a read-only stream, the
    bound for batch-1 decode, which reads every weight once and writes next to nothing. (A copy moves twice the
    bytes and runs at a different rate, so decode could show above 100% of a copy bound.)"""
    x = torch.ones((4 if cuda else 1) * 2**30 // 4, device=device)  # fp32, written once so its pages exist
    x.sum()
    ts = []
    for _ in range(10):
        sync()
        t0 = time.perf_counter()
        x.sum()
        sync()
        ts.append(time.perf_counter() - t0)
    return x.numel() * x.element_size() / min(ts)


def decode_rate(gen, B=1):
    """Tokens/s of gen(n), a greedy generate of n new tokens for B rows, the prefill excluded."""
    with torch.inference_mode():
        t1, tn = timed(lambda: gen(1)), timed(lambda: gen(new_tokens))
    return B * (new_tokens - 1) / (tn - t1)


def kv_read_bytes(T):
    """KV-cache bytes a batch-1 decode step reads after a T-token prompt, on average over new_tokens steps."""
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * ptdtype.itemsize * (T + new_tokens // 2)


# models -------------------------------------------------------------------------------------------------------
text = dict(P["text"], sliding_window=None, tie_word_embeddings=False)
if n_layer:
    text["num_hidden_layers"] = n_layer
config = ArtemisConfig(TextConfig(**text), VisionConfig(**P["vision"], num_position_embeddings=2304), IMG)
torch.manual_seed(seed)
torch.set_default_dtype(ptdtype)  # built in the bench dtype on the device: a 12B never exists in fp32
with torch.device(device):
    model = ArtemisVLM(config).eval()
torch.set_default_dtype(torch.float32)
ref = None
if reference and sections - {"processor", "padding", "serve", "quantize"}:
    torch.set_default_dtype(ptdtype)
    with torch.device(device):
        ref = ArtemisVLMForConditionalGeneration(ArtemisVLMConfig(**config.to_dict())).eval()
    torch.set_default_dtype(torch.float32)
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(".deepstack_merger_list." not in k for k in missing):
        die(f"weights do not map onto the reference: {(missing + unexpected)[:3]}")
    ref.generation_config.update(eos_token_id=None, pad_token_id=0)  # random weights: always n new tokens

c = config.text
n_dec = sum(p.numel() for p in model.language_model.parameters())
print(f"bench: {device} ({torch.get_num_threads()} threads)" if not cuda else f"bench: {torch.cuda.get_device_name()}",
      f"torch {torch.__version__}, {str(ptdtype).removeprefix('torch.')}, preset {preset}: decoder "
      f"{c.num_hidden_layers} x {c.hidden_size} ({n_dec / 1e6:.0f}M, vocab {c.vocab_size}), vision "
      f"{config.vision.depth} x {config.vision.hidden_size}" + (", reference: transformers + artemis-vlm" if ref else ""))

# inputs: one row = [bos, prompt/2, image pads, prompt/2, answer]; labels only on the answer
g = torch.Generator().manual_seed(seed)
side = P["image"] // config.vision.patch_size
n_img = side * side // config.vision.spatial_merge_size ** 2
half = P["prompt"] // 2


def inputs(n, answer=True):
    body = lambda k: torch.randint(100, c.vocab_size, (n, k), generator=g)  # noqa: E731
    parts = [torch.ones(n, 1, dtype=torch.long), body(half), torch.full((n, n_img), IMG), body(half)]
    ids = torch.cat(parts + ([body(P["answer"])] if answer else []), 1).to(device)
    pixels = torch.randn(n * side * side, config.vision.in_channels * config.vision.temporal_patch_size
                         * config.vision.patch_size ** 2, generator=g).to(device, ptdtype)
    grid = torch.tensor([[1, side, side]] * n, device=device)
    return ids, pixels, grid


results = []  # (what, ours, theirs, unit, higher_is_better, note)


def row(what, ours, theirs, unit, higher=True, note=""):
    results.append((what, ours, theirs, unit, higher, note))


# processor ----------------------------------------------------------------------------------------------------
if "processor" in sections:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>"))
    tok.add_special_tokens(["<|image_pad|>"])
    proc = Processor(tok, special_tokens={"eos_token": "</s>"})
    rng = np.random.default_rng(seed)
    sizes = [(640, 480), (480, 640), (500, 375), (800, 600), (1024, 768), (512, 512), (640, 427), (375, 500)] * 2
    photos = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    ours = len(photos) / timed(lambda: proc.preprocess(photos), 4 * repeat)  # cheap, and noisy on a shared machine
    theirs = None
    if reference:
        hf = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=proc.min_pixels,
                                      max_pixels=proc.max_pixels, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
        theirs = len(photos) / timed(lambda: hf(images=photos, return_tensors="pt"), 4 * repeat)
        if not torch.equal(proc.preprocess(photos)[0], hf(images=photos, return_tensors="pt")["pixel_values"]):
            print("warning: processor outputs differ from the reference")
    row(f"processor, {len(photos)} photos 375-1024 px", ours, theirs, "img/s")

# vision tower -------------------------------------------------------------------------------------------------
if "vision" in sections:
    _, pixels, grid = inputs(batch_size)
    with torch.inference_mode():
        ours = batch_size / timed(lambda: model.visual(pixels, grid))
        theirs = ref and batch_size / timed(lambda: ref.visual(pixels, grid_thw=grid))
    row(f"vision tower, {batch_size} images {P['image']} px", ours, theirs, "img/s")

# prefill: one image + prompt into the cache, the last position's logits -------------------------------------------
if "prefill" in sections:
    ids, pixels, grid = inputs(1, answer=False)
    T = ids.shape[1]

    def our_prefill():
        S = model.setup_caches(1, T + new_tokens)
        key_valid = torch.ones(1, S, dtype=torch.bool, device=device)
        model.prefill(ids, torch.arange(T, device=device)[None], key_valid, pixels, grid)

    with torch.inference_mode():
        ours = timed(our_prefill) * 1e3
        theirs = ref and timed(lambda: ref(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, use_cache=True,
                                           logits_to_keep=1)) * 1e3
    row(f"prefill, 1 image + {P['prompt']} tokens (T={T})", ours, theirs, "ms", higher=False)

# decode: batch 1 and 8, greedy ------------------------------------------------------------------------------------
if "decode" in sections:
    ids1, pixels1, grid1 = inputs(1, answer=False)
    step = model.compile_decode() if compile else None
    weight_bytes = param_bytes(model.language_model) - param_bytes(model.language_model.model.embed_tokens)
    for B in (1, 8):
        ids, pixels, grid = ids1.repeat(B, 1), pixels1.repeat(B, 1), grid1.repeat(B, 1)

        rate = partial(decode_rate, B=B)
        eager = rate(lambda n: model.generate(ids, n, temperature=0, pixel_values=pixels, image_grid_thw=grid))
        theirs = ref and rate(lambda n: ref.generate(input_ids=ids, pixel_values=pixels, image_grid_thw=grid,
                                                     max_new_tokens=n, do_sample=False))
        row(f"decode, batch {B}, eager (reference: generate())", eager, theirs, "tok/s")
        compiled = None
        if step is not None:
            try:
                compiled = rate(lambda n: model.generate(ids, n, temperature=0, pixel_values=pixels,
                                                         image_grid_thw=grid, decode_one=step))
                row(f"decode, batch {B}, compiled (reference: generate())", compiled, theirs, "tok/s")
            except Exception as e:  # no C++ compiler, an unsupported op: report it and go on
                print(f"compiled decode failed: {type(e).__name__}: {str(e).splitlines()[0]}")
                step = None
        model.clear_caches()
        if B == 1:  # batch 1 reads every weight once per token: memory bandwidth is the bound
            bw = read_bandwidth()
            per_token = weight_bytes + kv_read_bytes(ids.shape[1])
            best = max(r for r in (eager, compiled) if r)
            bandwidth_note = (f"decode, batch 1: {best * per_token / 1e9:.1f} GB/s of a measured {bw / 1e9:.1f} GB/s "
                              f"read bandwidth = {100 * best * per_token / bw:.0f}% of the bound "
                              f"({bw / per_token:.1f} tok/s at {per_token / 1e9:.2f} GB read per token)")

# training steps: forward + backward -------------------------------------------------------------------------------
if "train" in sections:
    ids, pixels, grid = inputs(batch_size)
    labels = ids.clone()
    labels[:, :-P["answer"]] = -100  # the prompt and the image: no loss
    mask = torch.ones_like(ids)
    T = ids.shape[1]

    def ours_step():
        _, loss = model(ids, pixels, grid, labels=labels, attention_mask=mask)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def ref_step():
        ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=grid, labels=labels).loss.backward()
        ref.zero_grad(set_to_none=True)

    stacks = [(model, ours_step)] + ([(ref, ref_step)] if ref is not None else [])
    times, mems = {}, {}
    for measure, out in ((timed, times), (peak_bytes, mems)):  # every time first: the profiler slows what it watches
        for stage in ("stage1", "stage2"):
            for m, fn in stacks:
                m.train().set_training_stage(stage)
                try:
                    out[stage, m] = measure(fn)
                except torch.OutOfMemoryError:  # a 12B stage 2 beside its reference copy: pass fewer --n_layer
                    print(f"{stage}: out of memory in {'ours' if m is model else 'the reference'}")
                    m.zero_grad(set_to_none=True)
                m.eval()
    for stage in ("stage1", "stage2"):
        t, t_ref = times.get((stage, model)), times.get((stage, ref))
        if t is None:
            continue
        model.set_training_stage(stage)
        note = f"; ours {batch_size / t:.2f} samples/s, {batch_size * T / t:,.0f} tok/s" + (
            f", MFU {100 * model.flops_per_token(T) * batch_size * T / t / peak_flops:.1f}%" if peak_flops else "")
        row(f"{stage} step, {batch_size} x {T} tokens ({P['answer']} labelled)", t * 1e3, t_ref and t_ref * 1e3, "ms",
            higher=False, note=note)
        mem, mem_ref = ((mems[stage, m] + param_bytes(m)) / 2**20 if (stage, m) in mems else None  # with the weights
                        for m in (model, ref))
        row(f"{stage} step peak memory", mem, mem_ref, "MiB", higher=False)

# padding: the same rows cut into micro-batches in drawn order, and length-grouped as train.py cuts them ------------
if "padding" in sections:
    rng = np.random.default_rng(seed)
    n_rows, f = 8 * batch_size, config.vision.patch_size * config.vision.spatial_merge_size
    sides = rng.integers(256 // f, 512 // f + 1, (n_rows, 2)) * f  # 256-512 px a side: 64-256 image tokens at f=32
    n_imgs, caps = sides.prod(1) // f**2, rng.integers(100, 401, n_rows)  # image tokens, caption tokens
    lengths = 1 + P["prompt"] + n_imgs + caps

    def micro_batch(rows):
        ids = torch.zeros(len(rows), int(lengths[rows].max()), dtype=torch.long)
        labels, mask = torch.full_like(ids, -100), torch.zeros_like(ids)
        for i, r in enumerate(rows):
            a, b = 1 + P["prompt"] + n_imgs[r], lengths[r]
            ids[i, :b] = torch.randint(100, c.vocab_size, (b,), generator=g)
            ids[i, 1 + half:a - half] = IMG
            labels[i, a:b], mask[i, :b] = ids[i, a:b], 1
        grid = torch.tensor([(1, h // config.vision.patch_size, w // config.vision.patch_size) for h, w in sides[rows]])
        pixels = torch.randn(int(grid.prod(-1).sum()), config.vision.in_channels * config.vision.temporal_patch_size
                             * config.vision.patch_size ** 2, generator=g)
        return [t.to(device) for t in (ids, pixels.to(ptdtype), grid, labels, mask)]

    model.train().set_training_stage("stage2")
    rate, padding = {}, {}
    for order, batches in (("drawn order", np.arange(n_rows).reshape(-1, batch_size)),
                           ("length-grouped", length_grouped(np.arange(n_rows), lengths, batch_size, rng))):
        padding[order] = 1 - lengths.sum() / sum(int(lengths[b].max()) * len(b) for b in batches)
        data = [micro_batch(b) for b in batches]

        def steps():
            for ids, pixels, grid, labels, mask in data:
                model(ids, pixels, grid, labels=labels, attention_mask=mask)[1].backward()
            model.zero_grad(set_to_none=True)

        rate[order] = lengths.sum() / timed(steps, 1)  # the real tokens (padding excluded) per second
    model.eval()
    row(f"stage2 steps, {len(batches)} length-grouped micro-batches of {batch_size} (reference: drawn order)",
        rate["length-grouped"], rate["drawn order"], "tok/s",
        note=f"; padding {100 * padding['length-grouped']:.1f}% vs {100 * padding['drawn order']:.1f}%")

# serving: serve.py's tokens/s with 1 and with 8 concurrent clients -------------------------------------------------
if "serve" in sections:
    import re
    import subprocess
    import threading
    import urllib.request
    from tokenizers import AddedToken, pre_tokenizers

    serve_tokens = 4 * new_tokens  # a request's max_tokens: decode dominates, as in captioning
    with tempfile.TemporaryDirectory() as d:
        # the bench model with a word-level tokenizer over its whole vocabulary; the chat tokens sit inside it
        special = {"<unk>": 0, "</s>": 1, "<|image_pad|>": IMG, "<|im_start|>": IMG + 2, "<|im_end|>": IMG + 3}
        vocab = {f"w{i}": i for i in range(c.vocab_size)} | special
        vocab = {t: i for t, i in vocab.items() if t in special or i not in special.values()}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
        save_pretrained(model, d)
        side_px = P["image"]
        Processor(tok, special_tokens={"eos_token": "</s>"}, max_pixels=side_px * side_px).save_pretrained(d)
        photo = os.path.join(d, "photo.png")
        Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side_px, side_px, 3), dtype=np.uint8)).save(photo)
        log = open(os.path.join(d, "log"), "w+")
        server = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "serve.py"),
                                   f"--init_from={d}", f"--device={device}", f"--dtype={str(ptdtype)[6:]}", "--port=0",
                                   "--max_batch=8"], stdout=log, stderr=subprocess.STDOUT)
        try:
            while not (m := re.search(r"on (http://\S+)/v1 ", open(log.name).read())):
                if server.poll() is not None:
                    die(f"serve.py exited: {open(log.name).read()[-500:]}")
                time.sleep(0.2)
            body = json.dumps({"model": "bench", "max_tokens": serve_tokens, "temperature": 0, "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                             {"type": "image_url", "image_url": {"url": photo}}]}]}).encode()

            def ask():  # one request as curl sends it; returns its completion tokens
                req = urllib.request.Request(m[1] + "/v1/chat/completions", body, {"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as r:
                    return json.load(r)["usage"]["completion_tokens"]

            for clients in (1, 8):
                done = [0] * clients

                def client(k):
                    for _ in range(max(2, repeat // 2)):
                        done[k] += ask()

                threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
                ask()  # warmup: the first batch allocates the cache
                time.sleep(0.5)  # a batch's log line comes after its answers
                start = open(log.name).read().count("batch of")
                t0 = time.perf_counter()
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                dt = time.perf_counter() - t0
                time.sleep(0.5)  # a batch's log line comes after its answers
                sizes = [int(b) for b in re.findall(r"batch of (\d+):", open(log.name).read())[start:]]
                row(f"serve.py, {clients} concurrent client{'s' if clients > 1 else ''}, 1 image + {serve_tokens} "
                    f"new tokens per request", sum(done) / dt, None, "tok/s",
                    note=f"; {sum(done)} tokens in {dt:.1f} s, batches of {'/'.join(map(str, sizes))}")
        finally:
            server.terminate()
            server.wait()

# int8 decoder (quantize.py) against the bench dtype: weight bytes, batch-1 decode --------------------------------
if "quantize" in sections:
    def read_bytes(m):  # what batch-1 decode reads per token: every decoder tensor but the embedding table
        return sum(t.numel() * t.element_size() for k, t in m.language_model.state_dict().items()
                   if not k.startswith("model.embed_tokens."))

    def state_bytes(m):
        return sum(t.numel() * t.element_size() for t in m.state_dict().values())

    a3 = PRESETS["a3"]  # on the meta device: shapes and dtypes, no memory, so always the full 40 layers
    with torch.device("meta"):
        big = ArtemisVLM(ArtemisConfig(TextConfig(**a3["text"]), VisionConfig(**a3["vision"],
                                       num_position_embeddings=2304), IMG)).to(torch.bfloat16)
    a3_bytes = state_bytes(big), state_bytes(quantize_int8(big))
    del big
    ids1, pixels1, grid1 = inputs(1, answer=False)
    kv = kv_read_bytes(ids1.shape[1])

    def step_rate(step):  # batch-1 tokens/s of model.generate with this decode step
        r = decode_rate(lambda n: model.generate(ids1, n, temperature=0, pixel_values=pixels1, image_grid_thw=grid1,
                                                 decode_one=step))
        model.clear_caches()
        return r

    kinds = ["eager"] + (["compiled" + (" (CUDA graphs)" if cuda else "")] if compile else [])
    rates, per_token = {}, {}
    for q in ("full", "int8"):  # back to back, so a shared machine's load falls on both alike
        if q == "int8":
            quantize_int8(model)
        per_token[q] = read_bytes(model) + kv
        for kind in kinds:
            rates[q, kind] = step_rate(None if kind == "eager" else model.compile_decode())
    bw = read_bandwidth()
    full = str(ptdtype).removeprefix("torch.")
    qrows = [("weights of the A3 shape (40 layers, meta device), GB", a3_bytes[1] / 1e9, a3_bytes[0] / 1e9, "bf16"),
             (f"decoder bytes read per decode token ({preset}), GB", per_token["int8"] / 1e9,
              per_token["full"] / 1e9, full)]
    qrows += [(f"decode, batch 1, {kind}, tok/s", rates["int8", kind], rates["full", kind], full) for kind in kinds]
    quantize_note = "\n".join(
        f"decode, batch 1, {kind}, {name}: {rates[q, kind] * per_token[q] / 1e9:.1f} GB/s read = "
        f"{100 * rates[q, kind] * per_token[q] / bw:.0f}% of the measured {bw / 1e9:.1f} GB/s read bandwidth"
        for kind in kinds for q, name in (("full", full), ("int8", "int8")))

# table --------------------------------------------------------------------------------------------------------
print(f"\n| what | ours | reference | ours vs reference |\n|---|---|---|---|" if results else "")
for what, ours, theirs, unit, higher, note in results:
    fmt = lambda v: "-" if v is None else f"{v:,.1f} {unit}" if v < 100 else f"{v:,.0f} {unit}"  # noqa: E731
    if ours is None or not theirs:
        ratio = "-"
    elif unit == "MiB":
        ratio = f"{ours / theirs:.2f}x the memory"
    else:
        ratio = f"{ours / theirs if higher else theirs / ours:.2f}x faster"
    print(f"| {what}{note} | {fmt(ours)} | {fmt(theirs)} | {ratio} |")
if "decode" in sections:
    print(f"\n{bandwidth_note}")
if "quantize" in sections:
    print(f"\n| int8 decoder (quantize.py) | int8 | full precision | int8 vs full |\n|---|---|---|---|")
    for what, q, f, name in qrows:
        print(f"| {what} | {q:,.2f} | {f:,.2f} ({name}) | {q / f:.2f}x |")
    print(f"\n{quantize_note}")
