"""
Describe images with a trained Artemis graft: one prompt streamed to stdout as it is generated, or one caption per
image of a folder written as JSON lines.

    python sample.py --image=cat.jpg
    python sample.py --image=a.jpg,b.jpg --prompt="What differs between these two?"
    python sample.py --init_from=out-shapes --image=shape.png --temperature=0
    python sample.py --init_from=<hub repo id> --image=photo.jpg --compile=True --thinking=on
    python sample.py --prompt="Hello"   # text only
    python sample.py --image=photos/ --out=captions.jsonl --temperature=0   # a folder run: one caption per image
    python sample.py --image="photos/*.jpg" --batch_size=16                 # a glob is a folder run too

Options are the globals below; override them on the command line or in a config file (configurator.py).
No --init_from: out-drawings/ckpt (README's first command), else out-shapes/ckpt. A prompt run prints a summary line
(prompt and image tokens, time to first token, decode speed) to stderr after each sample, so stdout holds only the
text. A folder run (--image names a directory or a glob; a file or a comma-separated list of files is one prompt)
captions each image on its own, --batch_size at a time through engine.py's continuous batching (an image takes the
row of a caption that ended, at once), with a progress bar on stderr. It writes one line {"image": path, "caption":
text} per image as its caption ends to --out (stdout when not given), skips the images --out already holds, and names
an unreadable image on stderr and goes on. Sampled captions draw from seed + the image's place in the folder.
"""
import glob
import json
import os
import sys
import time

import torch
from tqdm import tqdm

from configurator import configure, die
from engine import Engine, Request, load
from processor import load_image

# -----------------------------------------------------------------------------
image = None  # one prompt's images: 'a.jpg', 'a.jpg,b.jpg' or ['a.jpg', 'b.jpg']; None: text only. A folder
# run: a directory or a glob ('photos/', 'photos/*.jpg'), each image captioned on its own
out = ""  # a folder run's JSON-lines file, appended to; '': stdout
batch_size = 8  # a folder run's images decoded together
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
configure(globals())
# -----------------------------------------------------------------------------
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


def image_paths(image):
    """(paths, folder run?). A directory or a glob is a folder run; a file or a comma-separated list is one prompt."""
    if image is None or isinstance(image, (list, tuple)):
        return [str(p) for p in image or []], False
    image = str(image)
    if os.path.isdir(image):
        found = sorted(os.path.join(image, f) for f in os.listdir(image) if f.lower().endswith(IMAGE_EXTENSIONS))
        if not found:
            die(f"--image={image}: a directory with no {', '.join(IMAGE_EXTENSIONS)} files")
        return found, True
    if not os.path.exists(image) and any(c in image for c in "*?["):
        found = sorted(p for p in glob.glob(image, recursive=True) if os.path.isfile(p))
        if not found:
            die(f"--image={image}: no files match this glob")
        return found, True
    return [p.strip() for p in image.split(",")], False


def skip(msg):
    tqdm.write(f"skipped {msg}", file=sys.stderr)  # above the progress bar


def caption_folder(model, processor, decode_one, paths):
    """Caption each image on its own through engine.py's continuous batching, batch_size rows at a time: a caption
    that ends frees its row for the next image at once, so one long caption never holds back the others. Lines are
    written as captions end."""
    captioned = set()
    if out and os.path.exists(out):
        with open(out, "rb") as f:
            text = f.read()
        whole = text[:text.rfind(b"\n") + 1]
        if len(whole) < len(text):  # a last line an interrupted run cut short goes; its image is done again
            if not text[len(whole):].startswith(b'{"image": '):
                die(f"--out={out}: ends in a line that is not one of this command's captions; expected the JSON "
                    "lines a folder run writes, or a new file")
            os.truncate(out, len(whole))
        for line in whole.decode("utf-8", errors="replace").splitlines():
            try:
                captioned.add(os.path.abspath(json.loads(line)["image"]))
            except (ValueError, KeyError, TypeError):  # not one of ours: left as it is
                pass
    seeds = {p: seed + k for k, p in enumerate(paths)}  # an image's own: its caption is the same in any batch
    todo = [p for p in paths if os.path.abspath(p) not in captioned]
    sink = open(out, "a", encoding="utf-8") if out else sys.stdout
    chat = chat_prompt(processor, 1)
    ctx = model.config.text.max_position_embeddings
    image_tokens = processor.max_pixels // (processor.patch_size * processor.merge_size) ** 2  # the most an image gives
    longest = len(processor.tokenizer.encode(chat).ids) - 1 + image_tokens + max_new_tokens
    engine = Engine(model, processor, decode_one, batch_size, min(longest, ctx), every_row=compile)

    def request(p):  # p's prompt for the engine, or None: named on stderr and skipped
        try:
            image = load_image(p)
        except ValueError as e:  # its message names the file
            return skip(e)
        try:
            inputs = processor(chat, images=[image])
        except ValueError as e:
            return skip(f"{p}: {e}")
        T = inputs["input_ids"].shape[1]
        if T + max_new_tokens > min(engine.S, ctx):
            return skip(f"{p}: its prompt is {T} tokens, with --max_new_tokens={max_new_tokens} more than the model's "
                        f"context of {ctx}; lower --max_pixels or --max_new_tokens")
        return Request(inputs["input_ids"][0], max_new_tokens, inputs["pixel_values"], inputs["image_grid_thw"],
                       temperature, top_p or 1.0, top_k or 0, seeds[p])

    pending, left = {}, iter(todo)
    with tqdm(total=len(todo), unit="img", file=sys.stderr, desc="captions") as bar:
        while True:
            while len(engine.waiting) < batch_size and (p := next(left, None)) is not None:  # the next rows, ready
                if (r := request(p)) is None:
                    bar.update(1)
                else:
                    pending[engine.submit(r)] = p
            if not engine.busy():
                break
            for r in engine.step():
                if r.finish == "error":
                    skip(f"{pending[r]}: {r.error}")
                else:
                    sink.write(json.dumps({"image": pending[r], "caption": r.text}, ensure_ascii=False) + "\n")
                    sink.flush()  # a line per image as it comes: an interrupted run keeps what it finished
                del pending[r]
                bar.update(1)
    if out:
        sink.close()


def chat_prompt(processor, n_images):
    """The templated user turn: n_images images, then --prompt, after --system when given."""
    content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=thinking == "on")


def sample_prompt(model, processor, decode_one, images):
    try:
        inputs = processor(chat_prompt(processor, len(images)), images=images)
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

    @torch.inference_mode()
    def stream():
        """One sample, its text printed as it grows. Returns (new tokens, time to first token s, decode s)."""
        toks, times, shown = [], [], 0
        t0 = time.perf_counter()

        def show(tok):
            nonlocal shown
            toks.append(tok.item())  # .item() waits for the device, so the clock is honest
            times.append(time.perf_counter())
            text = processor.decode(toks)  # the whole answer: one token alone may split a UTF-8 character
            if not text.endswith("\ufffd"):  # hold back a character whose bytes are still coming
                print(text[shown:], end="", flush=True)
                shown = len(text)

        model.generate(ids, max_new_tokens, temperature, top_k, top_p, pixels, grid, stop_ids=processor.stop_ids,
                       decode_one=decode_one, callback=show)  # the image is encoded once, at prefill
        print(processor.decode(toks)[shown:], flush=True)  # the held-back rest, if any
        return len(toks), times[0] - t0, times[-1] - times[0]

    for k in range(num_samples):
        if k:
            print("---------------", flush=True)
        n, ttft, dt = stream()
        print(f"{T} prompt tokens ({n_img} image), {n} new tokens, time to first token {ttft:.3f} s, "
              f"decode {(n - 1) / max(dt, 1e-9):.1f} tokens/s", file=sys.stderr)


def main():
    if max_new_tokens < 1:
        die(f"--max_new_tokens={max_new_tokens}: expected at least 1")
    if not temperature >= 0:  # a number, by its default's type; NaN fails too
        die(f"--temperature={temperature}: expected 0 (greedy) or more")
    if num_samples < 1:
        die(f"--num_samples={num_samples}: expected at least 1")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        die(f"--top_k={top_k}: expected a whole number of at least 1")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        die(f"--top_p={top_p}: expected a number in (0, 1]")
    if batch_size < 1:
        die(f"--batch_size={batch_size}: expected at least 1")
    paths, folder = image_paths(image)
    if out and not folder:
        die(f"--out={out}: only a folder run writes a file; give --image a directory or a glob")
    if out and not os.path.isdir(os.path.dirname(os.path.abspath(out))):
        die(f"--out={out}: its directory does not exist")
    try:  # before the weights load, so a mistyped path costs no wait
        images = [] if folder else [load_image(p) for p in paths]
    except ValueError as e:
        die(f"--image: {e}")
    if thinking not in ("on", "off"):
        die(f"--thinking={thinking}: expected on or off")
    try:
        model, processor, decode_one = load(init_from, device, dtype, min_pixels, max_pixels, quantize, compile)
    except ValueError as e:
        die(e)
    torch.manual_seed(seed)
    if folder:
        caption_folder(model, processor, decode_one, paths)
    else:
        sample_prompt(model, processor, decode_one, images)


if __name__ == "__main__":
    main()
