"""Exact-match caption accuracy of a trained shapes demo on drawings it never saw the like of: a set drawn here by
another routine than prepare.py's, as a newcomer draws in a paint program (a script, not a test: it needs the
demo's trained checkpoint).

Nothing is shared with prepare.py's drawing: the shapes are rasterized from their implicit equations (a true circle,
not a polygon) with numpy, by point sampling (hard edges) or 4x4 supersampling (anti-aliased); colors come from
paint-program palettes (MS Paint's and the CSS named ones), backgrounds are their plain white, black and grays;
canvases have the common sizes of such programs; a third are saved as JPEG at quality 50-90. Each file is then
read and captioned as sample.py does: the raw canvas goes through the checkpoint's own processor.

    python tests/shapes_drawn.py                         # out-shapes/ckpt, 400 drawings
    python tests/shapes_drawn.py out-shapes/ckpt 1000
"""
import io
import math
import os
import random
import sys
import time
from collections import Counter

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import from_pretrained  # noqa: E402
from processor import Processor, load_image  # noqa: E402

PALETTE = {  # MS Paint's swatches, CSS named colors and a darker shade of each
    "red": [(237, 28, 36), (255, 0, 0), (200, 0, 0)],
    "orange": [(255, 127, 39), (255, 165, 0), (255, 140, 0)],
    "yellow": [(255, 242, 0), (255, 255, 0), (255, 215, 0)],
    "green": [(34, 177, 76), (0, 128, 0), (0, 200, 0)],
    "blue": [(63, 72, 204), (0, 0, 255), (0, 112, 192)],
    "purple": [(163, 73, 164), (128, 0, 128), (112, 48, 160)],
}
GROUNDS = {"white": [(255, 255, 255)], "black": [(0, 0, 0)],
           "gray": [(128, 128, 128), (112, 112, 112), (150, 150, 150)]}
CANVASES = [(160, 160), (200, 200), (256, 256), (512, 512), (320, 240), (400, 300), (640, 480), (480, 640), (500, 300),
            (300, 450), (800, 600)]
EXTENT = {"small": (0.36, 0.48), "large": (0.72, 0.9)}  # of the canvas's short side


def inside(shape, x, y, sx, sy, arm):
    """Whether points (x, y), relative to the shape's center and unrotated, fall in the shape of half-extents sx, sy."""
    if shape == "circle":
        return (x / sx) ** 2 + (y / sy) ** 2 <= 1
    if shape == "square":
        return (abs(x) <= sx) & (abs(y) <= sy)
    if shape == "triangle":  # apex up, base at the bottom
        return (y <= sy) & (abs(x) <= sx * (y + sy) / (2 * sy))
    return ((abs(x) <= arm * sx) & (abs(y) <= sy)) | ((abs(y) <= arm * sy) & (abs(x) <= sx))  # cross


def draw(r):
    """(encoded image file, caption) of one drawing, from the random.Random r."""
    shape = r.choice(["circle", "square", "triangle", "cross"])
    color, ground, size = r.choice(list(PALETTE)), r.choice(list(GROUNDS)), r.choice(list(EXTENT))
    W, H = r.choice(CANVASES)
    s = r.uniform(*EXTENT[size]) * min(W, H) / 2
    sx, sy = s, s * (math.sqrt(3) / 2 if shape == "triangle" else r.uniform(0.9, 1))  # equilateral triangles
    if r.random() < 0.5:
        sx, sy = sy, sx
    turn = math.radians(r.uniform(-8, 8)) if shape != "circle" else 0.0
    reach = math.hypot(sx, sy) if turn else max(sx, sy)  # the shape stays on the canvas, turned or not
    reach = min(reach, min(W, H) / 2 - 1)
    cx = min(max(W / 2 + r.uniform(-0.25, 0.25) * W, reach), W - reach)  # off the middle, whole on the canvas
    cy = min(max(H / 2 + r.uniform(-0.25, 0.25) * H, reach), H - reach)
    n = 4 if r.random() < 0.5 else 1  # samples per pixel side: 1 is a hard-edged drawing
    offs = (np.arange(n) + 0.5) / n
    ys = (np.arange(H)[:, None] + offs[None, :]).reshape(-1) - cy
    xs = (np.arange(W)[:, None] + offs[None, :]).reshape(-1) - cx
    X, Y = np.meshgrid(xs, ys)  # (H*n, W*n)
    c, si = math.cos(turn), math.sin(turn)
    cover = inside(shape, c * X + si * Y, -si * X + c * Y, sx, sy, r.uniform(0.33, 0.4))
    cover = cover.reshape(H, n, W, n).mean((1, 3))[..., None]  # (H, W, 1) in [0, 1]
    fg, bg = np.array(r.choice(PALETTE[color]), float), np.array(r.choice(GROUNDS[ground]), float)
    im = Image.fromarray(np.round(cover * fg + (1 - cover) * bg).astype(np.uint8))
    b = io.BytesIO()
    if r.random() < 1 / 3:
        im.save(b, format="JPEG", quality=r.choice([50, 75, 90]))
    else:
        im.save(b, format="PNG")
    return b.getvalue(), f"a {size} {color} {shape} on a {ground} background."


def score(draw, ckpt, n, seed, what):
    """Caption n drawings of draw(random.Random(seed)) as sample.py does, with the checkpoint ckpt; print the share
    exactly right, the words missed and a few misses."""
    model = from_pretrained(ckpt, dtype=torch.float32).eval()
    proc = Processor.from_pretrained(ckpt)
    r = random.Random(seed)  # another seed space than prepare.py's
    t0, right, wrong, words = time.time(), 0, [], Counter()
    for start in range(0, n, 32):
        drawn = [draw(r) for _ in range(start, min(start + 32, n))]
        chat = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {
            "type": "text", "text": "Describe this image."}]}], add_generation_prompt=True)
        batch = proc([chat] * len(drawn), images=[load_image(io.BytesIO(f)) for f, _ in drawn], padding_side="left")
        with torch.inference_mode():
            out = model.generate(batch["input_ids"], 24, temperature=0, pixel_values=batch["pixel_values"],
                                 image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                                 stop_ids=proc.stop_ids)
        T = batch["input_ids"].shape[1]
        for (_, want), ids in zip(drawn, out[:, T:].tolist()):
            got = proc.decode(ids).strip()
            right += got == want
            if got != want:
                wrong.append((want, got))
                w, g = want.split(), got.split()
                for k, word in ((1, "size"), (2, "color"), (3, "shape"), (6, "background")):
                    words[word] += len(g) != len(w) or w[k] != g[k]
    misses = f"; wrong: {', '.join(f'{v} {k}' for k, v in words.items())}" if wrong else ""
    print(f"{right}/{n} = {100 * right / n:.1f}% exact captions of {what} ({time.time() - t0:.1f} s){misses}")
    for want, got in wrong[:5]:
        print(f"  want {want!r}\n  got  {got!r}")


if __name__ == "__main__":
    score(draw, sys.argv[1] if len(sys.argv) > 1 else "out-shapes/ckpt", int(sys.argv[2]) if len(sys.argv) > 2 else 400,
          "drawn", "drawings made by another routine")
