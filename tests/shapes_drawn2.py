"""Exact-match caption accuracy of a trained shapes demo on a second set of drawings made by a routine of its own,
independent of prepare.py's and of tests/shapes_drawn.py's (a script, not a test: it needs the demo's trained
checkpoint). The demo is never trained on this routine: it measures, it does not teach.

Each shape is a signed distance field in numpy (the distance of every pixel center to the shape's edge, negative
inside), so a filled shape is d <= 0 and an outline a band |d + w/2| <= w/2 inside the edge; edges are hard (the
pixel is in or out) or anti-aliased by the fraction of a pixel the edge leaves inside (0.5 - d, clipped), not by
supersampling. Proportions vary (ellipses and rectangles of 0.8-1 aspect, triangles of 0.8-1 height to base with the
apex off center, crosses of 0.25-0.4 arm width), and so do canvases (40x30 to 1024x768, square or up to 2:1),
stroke widths (2.5-6% of the short side), the Material Design palette's shades, backgrounds of white, near-black or
gray, a fifth of the white ones a transparent PNG (composited on white by the processor), a quarter of all saved as
JPEG at quality 60-90. Sizes follow the README's rule: small is at most half the canvas's short side (here 28-47%),
large at least 65% (here 65-90%), the shape's extent being the larger of its width and height before it is turned.
Scored as tests/shapes_drawn.py scores: each file read and captioned as sample.py does.

    python tests/shapes_drawn2.py out-drawings/ckpt          # 400 drawings
    python tests/shapes_drawn2.py out-drawings/ckpt 1000
"""
import io
import math
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes_drawn import score  # noqa: E402

PALETTE = {  # Material Design's 600, 500 and 800 shades (yellow's 400: its 800, #F9A825 at hue 37, is amber)
    "red": [(229, 57, 53), (244, 67, 54), (198, 40, 40)],
    "orange": [(251, 140, 0), (255, 152, 0), (239, 108, 0)],
    "yellow": [(253, 216, 53), (255, 235, 59), (255, 238, 88)],
    "green": [(67, 160, 71), (76, 175, 80), (46, 125, 50)],
    "blue": [(30, 136, 229), (33, 150, 243), (21, 101, 192)],
    "purple": [(142, 36, 170), (156, 39, 176), (106, 27, 154)],
}
GROUNDS = {"white": [255, 250, 244], "black": [0, 17, 24], "gray": [117, 128, 150]}
CANVASES = [(40, 30), (48, 48), (64, 64), (100, 100), (128, 96), (96, 128), (150, 150), (240, 160), (160, 240),
            (300, 300), (480, 360), (600, 400), (400, 800), (1024, 768)]
EXTENT = {"small": (0.28, 0.47), "large": (0.65, 0.9)}  # of the canvas's short side


def box(x, y, a, b):  # distance to a rectangle of half-sides a, b
    qx, qy = np.abs(x) - a, np.abs(y) - b
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def field(shape, x, y, a, b, r):
    """Signed distance (px) of points x, y (the shape's frame) to a shape of half-width a and half-height b."""
    if shape == "circle":  # an ellipse, its distance scaled from the unit circle's (near enough for 0.8-1 aspects)
        return (np.hypot(x / a, y / b) - 1) * min(a, b)
    if shape == "square":
        return box(x, y, a, b)
    if shape == "cross":
        t = r.uniform(0.25, 0.4)
        return np.minimum(box(x, y, a, t * b), box(x, y, t * a, b))
    apex = r.uniform(-0.15, 0.15) * a  # a triangle: the most outside of its three edges
    corners = [(apex, -b), (a, b), (-a, b)]
    d = None
    for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
        nx, ny = y1 - y0, x0 - x1  # the outward normal of a clockwise edge (y down)
        n = math.hypot(nx, ny)
        e = ((x - x0) * nx + (y - y0) * ny) / n
        d = e if d is None else np.maximum(d, e)
    return d


def draw(r):
    """(encoded image file, caption) of one drawing, from the random.Random r."""
    shape = r.choice(["circle", "square", "triangle", "cross"])
    color, ground, size = r.choice(list(PALETTE)), r.choice(list(GROUNDS)), r.choice(list(EXTENT))
    W, H = r.choice(CANVASES)
    extent = r.uniform(*EXTENT[size]) * min(W, H)
    ratio = r.uniform(0.8, 1)
    a, b = extent / 2, extent / 2 * ratio
    if r.random() < 0.5:
        a, b = b, a
    turn = math.radians(r.uniform(-10, 10)) if shape != "circle" else 0.0
    reach_x = a * abs(math.cos(turn)) + b * abs(math.sin(turn))  # half the turned bounding box
    reach_y = a * abs(math.sin(turn)) + b * abs(math.cos(turn))
    cx = W / 2 + r.uniform(-1, 1) * max(0.0, W / 2 - reach_x - 1)  # anywhere, whole on the canvas
    cy = H / 2 + r.uniform(-1, 1) * max(0.0, H / 2 - reach_y - 1)
    X, Y = np.meshgrid(np.arange(W) + 0.5 - cx, np.arange(H) + 0.5 - cy)
    c, s = math.cos(turn), math.sin(turn)
    d = field(shape, c * X + s * Y, -s * X + c * Y, a, b, r)
    if r.random() < 0.4:  # an outline: a stroke of width w inside the edge
        w = max(1.0, r.uniform(0.025, 0.06) * min(W, H))
        d = np.abs(d + w / 2) - w / 2
    cover = (d <= 0).astype(float) if r.random() < 0.5 else np.clip(0.5 - d, 0, 1)  # hard, or anti-aliased
    fg, bg = np.array(r.choice(PALETTE[color]), float), float(r.choice(GROUNDS[ground]))
    f = io.BytesIO()
    if ground == "white" and r.random() < 0.2:  # a transparent canvas, the shape's coverage its alpha
        rgba = np.concatenate([np.broadcast_to(fg, (H, W, 3)), 255 * cover[..., None]], -1)
        Image.fromarray(np.round(rgba).astype(np.uint8), "RGBA").save(f, format="PNG")
    else:
        im = Image.fromarray(np.round(cover[..., None] * fg + (1 - cover[..., None]) * bg).astype(np.uint8))
        if r.random() < 0.25:
            im.save(f, format="JPEG", quality=r.choice([60, 75, 90]))
        else:
            im.save(f, format="PNG")
    return f.getvalue(), f"a {size} {color} {shape} on a {ground} background."


if __name__ == "__main__":
    score(draw, sys.argv[1] if len(sys.argv) > 1 else "out-drawings/ckpt",
          int(sys.argv[2]) if len(sys.argv) > 2 else 400, "drawn2", "drawings made by a second, independent routine")
