"""
Describe images with a trained Artemis graft, streaming the answer to stdout as it is generated.

    python sample.py --image=cat.jpg
    python sample.py --image=a.jpg,b.jpg --prompt="What differs between these two?"
    python sample.py --init_from=out-shapes --image=shape.png --temperature=0
    python sample.py --init_from=<hub repo id> --image=photo.jpg --compile=True --thinking=on
    python sample.py --prompt="Hello"   # text only

Options are the globals below; override them on the command line or in a config file (configurator.py).
With no --init_from it uses the shapes demo's checkpoint, out-shapes/ckpt. A summary line (prompt and image
tokens, time to first token, decode speed) goes to stderr after each sample, so stdout holds only the text.
"""
import os
import sys
import time

import torch

from model import ArtemisVLM, resolve
from processor import Processor, load_image
from quantize import quantize_int8

# -----------------------------------------------------------------------------
image = None  # one or more image files: 'a.jpg', 'a.jpg,b.jpg' or ['a.jpg', 'b.jpg']; None: text only
prompt = "Describe this image in detail."
system = ""  # a system message, when given
init_from = ""  # an artemis checkpoint dir, a training out_dir (checkpoint in <out_dir>/ckpt) or a hub repo id
max_new_tokens = 256
temperature = 0.7  # 0: greedy
top_k = None
top_p = None
seed = 1337
num_samples = 1
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = ""  # '': bfloat16 on CUDA, float32 on CPU
compile = False  # torch.compile the one-token decode step; the first sample pays for the compilation
quantize = ""  # 'int8': the decoder's linear layers in int8 for this run (quantize.py writes such a checkpoint)
min_pixels = None  # None: the checkpoint's preprocessor_config.json
max_pixels = None
thinking = "off"  # 'on' lets the model reason in <think>...</think> first; 'off' pre-fills an empty think block
exec(open(os.path.join(os.path.dirname(__file__), "configurator.py")).read())
# -----------------------------------------------------------------------------


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


if device.startswith("cuda") and not torch.cuda.is_available():
    die(f"--device={device}: CUDA is not available here (torch {torch.__version__}); use --device=cpu")
dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
if dtype not in ("float32", "bfloat16", "float16"):
    die(f"--dtype={dtype}: expected float32, bfloat16 or float16")
if max_new_tokens < 1:
    die(f"--max_new_tokens={max_new_tokens}: expected at least 1")
if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    die(f"--top_k={top_k}: expected a whole number of at least 1")
if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
    die(f"--top_p={top_p}: expected a number in (0, 1]")
if thinking not in ("on", "off"):
    die(f"--thinking={thinking}: expected on or off")
if quantize not in ("", "int8"):
    die(f"--quantize={quantize}: expected int8, or nothing for the checkpoint's own weights")
if not init_from:
    if not os.path.isdir(os.path.join("out-shapes", "ckpt")):
        die("no model: train the shapes demo with `python prepare.py --dataset=shapes && python train.py "
            "config/shapes.py`, or pass --init_from=<checkpoint dir or hub id>")
    init_from = "out-shapes"
if os.path.isdir(os.path.join(init_from, "ckpt")) and not os.path.exists(os.path.join(init_from, "config.json")):
    init_from = os.path.join(init_from, "ckpt")  # a training out_dir
paths = image if isinstance(image, (list, tuple)) else [] if image is None else str(image).split(",")
try:  # before the weights load, so a mistyped path costs no wait
    images = [load_image(str(p).strip()) for p in paths]
except ValueError as e:
    die(f"--image: {e}")

try:
    path = resolve(init_from)  # a hub id is downloaded once, for both loaders
    model = ArtemisVLM.from_pretrained(path, dtype=getattr(torch, dtype), device=device).eval()
    model = quantize_int8(model) if quantize else model
    processor = Processor.from_pretrained(path, min_pixels=min_pixels, max_pixels=max_pixels)
except (ValueError, FileNotFoundError) as e:
    die(f"--init_from: {e}")
try:
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    chat = processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking == "on")
    inputs = processor(chat, images=images)
except ValueError as e:
    die(e)

ids = inputs["input_ids"].to(device)  # (1, T)
T = ids.shape[1]
n_img = int((ids == processor.image_token_id).sum())
ctx = model.config.text.max_position_embeddings
if T + max_new_tokens > ctx:
    die(f"the prompt is {T} tokens ({n_img} of them image tokens) and --max_new_tokens={max_new_tokens}, "
        f"together more than the model's context of {ctx} (text_config.max_position_embeddings); shorten the "
        "prompt, lower --max_new_tokens or --max_pixels")
pixels = inputs.get("pixel_values")
pixels = None if pixels is None else pixels.to(device)
grid = inputs.get("image_grid_thw")
decode_one = model.compile_decode() if compile else model.decode_one
torch.manual_seed(seed)


@torch.inference_mode()
def stream():
    """One sample, its text printed as it grows. Returns (new tokens, time to first token s, decode s)."""
    out, times, shown = [], [], 0
    t0 = time.perf_counter()

    def show(tok):
        nonlocal shown
        out.append(tok.item())  # .item() waits for the device, so the clock is honest
        times.append(time.perf_counter())
        text = processor.decode(out)  # the whole answer: one token alone may split a UTF-8 character
        if not text.endswith("\ufffd"):  # hold back a character whose bytes are still coming
            print(text[shown:], end="", flush=True)
            shown = len(text)

    model.generate(ids, max_new_tokens, temperature, top_k, top_p, pixels, grid, stop_ids=processor.stop_ids,
                   decode_one=decode_one, callback=show)  # the image is encoded once, at prefill
    print(processor.decode(out)[shown:], flush=True)  # the held-back rest, if any
    return len(out), times[0] - t0, times[-1] - times[0]


for k in range(num_samples):
    if k:
        print("---------------", flush=True)
    n, ttft, dt = stream()
    print(f"{T} prompt tokens ({n_img} image), {n} new tokens, time to first token {ttft:.3f} s, "
          f"decode {(n - 1) / max(dt, 1e-9):.1f} tokens/s", file=sys.stderr)
