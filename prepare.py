"""
Turns a corpus into a prepared dataset directory for train.py: rows of chat messages with their images already
resized by Processor.resize (what the model sees, so training never decodes full-size photos), split into train and
a held-out val by a stable hash of each sample's key (re-runs and resumes agree on it).

  python prepare.py --dataset=shapes                  # offline demo: captioned synthetic shapes + its own tokenizer
  python prepare.py --dataset=drawings                # the same captions on shapes varied as people draw them,
                                                      # and captioned "a small circle." in data/drawings-shape
  python prepare.py --dataset=tars --src='blip3o/*.tar' --tokenizer=ckpt/A3        # Stage 1: image + caption shards
  python prepare.py --dataset=chat --src=mix.jsonl --image_root=imgs --tokenizer=ckpt/A3   # Stage 2 chat rows
  python prepare.py --dataset=llava --src=llava_v1_5_mix665k.json --image_root=imgs --tokenizer=ckpt/A3

tars: webdataset shards as BLIP3o-Pretrain-Long-Caption ships them: key.jpg (or .jpeg/.png/.webp) with its caption in
  key.txt, or in key.json's "caption" field (img2dataset-style metadata). Each becomes the one-turn caption row
  user: [image, prompt], assistant: caption -- the Stage-1 row of the seeds' trainer (Merlina).
chat: .json/.jsonl rows with "messages" (a list, or that list as a JSON string) whose content may be a list of
  {"type": "image"} / {"type": "text", "text": ...} items, plus "image" or "images" paths (null: a text-only row).
llava: .json/.jsonl rows with "image" and "conversations" of {"from": human/gpt, "value": ...}; each <image> marker
  becomes an image item in its place.
shapes: "a small red circle on a white background." style captions of generated 96x96 images (9 vision tokens each),
  with a byte-level BPE tokenizer and ChatML template saved next to the data, so Processor.from_pretrained(out_dir)
  works and a tiny model trained from scratch can learn it on a CPU.
drawings: the same captions and tokenizer on shapes varied as people's drawings in a paint program are (filled or
  outlined, proportions, canvas size and aspect, place, shade, size, anti-aliasing, JPEG), stored at most 48x48 px:
  4-px patches, 4-36 vision tokens. One run writes them twice, with the full captions into data/drawings and with size
  and shape alone into data/drawings-shape (--captions=full,shape), for the demo's two training runs: the second set
  the same draws at 32x32 (--shape_image_size), where the first run learns shape in 0.6x the step.

Rows longer than max_seq_len tokens (chat template rendered as Processor.collate renders it, image pads expanded)
are dropped; unreadable images, caption-less samples and malformed rows are skipped; all are counted in the summary,
beside the rows kept and their assistant turns (each one a target when train.py's train_on is 'all').
Work runs on all cores, one piece per source shard (tars) or per chunk_size rows; a re-run skips finished pieces.

Layout of out_dir (default data/<dataset>):
  meta.json            the options it was prepared with (a re-run with other options is refused) and "processor":
                       "." (shapes: out_dir itself) or the --tokenizer checkpoint (PreparedDataset.processor_dir)
  done.jsonl           one line per finished piece with its counts; only pieces listed here are part of the dataset;
                       a piece is one tar shard (NAME = its name) or chunk_size rows (NAME = <file>-<chunk number>)
  {train,val}/NAME.bin      rows back to back, each a JSON line {"key", "messages", "sizes"} then its image bytes
                            (PNG for shapes, JPEG quality 95 for photos)
  {train,val}/NAME.idx.npy  int64 offsets of the rows in NAME.bin (n + 1 of them): O(1) random access
  {train,val}/NAME.len.npy  int32 token count of each row, for length-grouped batches (absent in datasets prepared
                            before it was recorded: those still read, their rows count as length 0)
  tokenizer.json, tokenizer_config.json, chat_template.jinja, preprocessor_config.json   (shapes only)
Pieces are written under .tmp names and renamed when complete, then listed in done.jsonl, so an interrupted run
never leaves a half-written piece that counts. dataset.py reads them: a split with PreparedDataset(out_dir, 'train'),
several prepared datasets drawn by weight with Mixture('data/llava:3,data/a2-text:1', 'train').

The options below are the command line's alone: main() checks them and hands each writer function (the sources,
Piece, work, shapes_processor) the settings it needs as arguments, pool workers theirs through the pool's initializer.
"""
import colorsys
import glob
import hashlib
import io
import json
import math
import os
import random
import sys
import tarfile
from collections import Counter
from functools import partial
from multiprocessing import Pool
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from configurator import configure, die
from dataset import PreparedDataset, read_done
from processor import Processor, load_image

# -----------------------------------------------------------------------------
if __name__ == '__main__':  # the command line's options, read by main() alone
    dataset = 'shapes'  # shapes | drawings | tars | chat | llava
    src = ''  # tars: a directory or glob of .tar shards; chat/llava: a .json/.jsonl file, directory or glob
    image_root = ''  # chat/llava: where relative image paths start ('' = next to the src file)
    tokenizer = ''  # checkpoint dir whose Processor resizes images and counts tokens (shapes makes its own)
    out_dir = ''  # '' = data/<dataset>
    prompt = 'Describe this image.'  # user text of caption rows (tars, shapes): Merlina's default instruction
    max_seq_len = 4096  # longer rows are dropped, as for ArtemisMix
    val_frac = None  # held-out fraction; None = 0.005 (A3 held out ~0.5%), or SYNTHETIC's
    min_pixels = None  # Processor.resize limits; None = the checkpoint's
    max_pixels = None
    num_samples = None  # shapes/drawings: how many images; None = SYNTHETIC's (drawings: 40000, 1.2 epochs of the demo)
    image_size = None  # shapes/drawings: the largest side the processor keeps, max_pixels = image_size**2; None = 96
    #                  for shapes (6x6 patches of 16: 9 merged vision tokens; at 64, 4 tokens, a tiny ViT learned far
    #                  more slowly), 48 for drawings (12x12 patches of 4: 36 tokens; see drawings())
    seed = 1337  # shapes/drawings
    captions = None  # shapes/drawings: 'full', 'shape' ("a small circle.", into <out_dir>-shape) or both in one run,
    #                  'full,shape': the same drawings, for the drawings demo's first run (config/drawings_shape.py);
    #                  None = SYNTHETIC's ('full' for shapes, 'full,shape' for drawings)
    shape_image_size = None  # the 'shape' set's image_size; None = SYNTHETIC's (drawings: 32, where shape is learned
    #                  as well as at 48 in 0.6x the step: docs/experiments.md), else image_size
    chunk_size = 1000  # rows per piece (chat, llava, shapes)
    num_workers = os.cpu_count()
    configure(globals())
    options = {k: v for k, v in globals().items() if not k.startswith('_')
               and isinstance(v, (int, float, str, type(None)))}  # in the order above, as meta.json records them
# -----------------------------------------------------------------------------


def is_val(key, val_frac):
    # sha1, not hash(): Python salts str hashes per process
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], 'big') < val_frac * 2 ** 64


def caption_row(caption, prompt):
    return [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': prompt}]},
            {'role': 'assistant', 'content': caption}]


def shape_caption(size, color, shape, bg):  # the grammar of shapes and drawings, and of their tokenizer
    return f"a {size} {color} {shape} on a {bg} background."


def shape_words(messages):
    """A caption row of the generated datasets recaptioned with size and shape alone ("a small circle."): learned from
    the start, color and background slow the learning of shape (the runs that showed it: docs/experiments.md)."""
    w = messages[-1]['content'].split()  # a small red circle on a white background.
    return messages[:-1] + [{'role': 'assistant', 'content': f"a {w[1]} {w[3]}."}]

# --- sources: each yields (key, messages, images) per sample, or a reason string for one it skips. Images may be
# PIL images, encoded bytes or file paths: decoding happens in work(), where a bad one is counted. The first argument
# is one work unit's payload; source() binds the rest from the options.

SHAPES = ('circle', 'square', 'triangle', 'cross')
COLORS = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (30, 70, 220), 'yellow': (240, 200, 20),
          'purple': (140, 50, 180), 'orange': (250, 130, 20)}
BACKGROUNDS = {'white': (255, 255, 255), 'black': (0, 0, 0), 'gray': (128, 128, 128)}
SIZES = {'small': 0.5, 'large': 0.9}  # extent / image side; smaller shapes were much harder for a tiny ViT to tell apart


def shapes(indices, seed, image_size, prompt):
    n = image_size
    for i in indices:
        r = random.Random(f"{seed}-{i}")
        shape, color = r.choice(SHAPES), r.choice(list(COLORS))
        bg, size = r.choice(list(BACKGROUNDS)), r.choice(list(SIZES))
        s = SIZES[size] * n
        jitter = min(0.1 * n, (n - s) / 2 - 1)  # move it around a little, never off the canvas
        x, y = n / 2 + r.uniform(-jitter, jitter), n / 2 + r.uniform(-jitter, jitter)
        im = Image.new('RGB', (n, n), BACKGROUNDS[bg])
        draw, fill, h = ImageDraw.Draw(im), COLORS[color], s / 2
        if shape == 'circle':
            draw.ellipse((x - h, y - h, x + h, y + h), fill=fill)
        elif shape == 'square':
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif shape == 'triangle':
            draw.polygon([(x, y - h), (x + h, y + h), (x - h, y + h)], fill=fill)
        else:
            draw.rectangle((x - h / 3, y - h, x + h / 3, y + h), fill=fill)
            draw.rectangle((x - h, y - h / 3, x + h, y + h / 3), fill=fill)
        yield f"shapes-{seed}-{i}", caption_row(shape_caption(size, color, shape, bg), prompt), [im]
# drawings: each color word is a hue range in degrees and a lowest HSV value, the shades a paint program's palette
# gives it; each background a range of gray levels; each size word a range of extents: the shape's larger side, before
# it is turned, over the canvas's short side. Small is at most half of it, large at least 65%, nothing in between
SHADES = {'red': (-12, 10, 0.55), 'orange': (20, 40, 0.75), 'yellow': (48, 64, 0.75), 'green': (95, 150, 0.45),
          'blue': (205, 245, 0.5), 'purple': (270, 305, 0.45)}
GRAYS = {'white': (225, 255), 'black': (0, 32), 'gray': (96, 170)}
EXTENTS = {'small': (0.3, 0.5), 'large': (0.65, 0.92)}  # 0.62 left 4 px between them on a 32-px side
CIRCLE = [(math.cos(k * math.pi / 60), math.sin(k * math.pi / 60)) for k in range(120)]


def outline(shape, r):
    """The unit outline of one shape (y down, extent 2 on its larger side), its proportions varied a little."""
    if shape == 'circle':
        return CIRCLE
    if shape == 'square':
        return [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    if shape == 'triangle':  # apex up, anywhere over the middle half of the base
        return [(r.uniform(-0.3, 0.3), -1), (1, 1), (-1, 1)]
    a = r.uniform(0.22, 0.48)  # a cross's arms, of half-width a
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def inset(pts, d):
    """The polygon pts (a simple one) with each edge moved d inward: the inside of a stroke of width d along it."""
    n = len(pts)
    turn = 1 if sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1])) > 0 else -1
    lines = []  # each edge as a point moved inward and a direction
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        ux, uy = x1 - x0, y1 - y0
        u = math.hypot(ux, uy)
        ux, uy = ux / u, uy / u
        lines.append((x0 - turn * uy * d, y0 + turn * ux * d, ux, uy))
    out = []
    for j in range(n):  # vertex j: where the moved edges j-1 and j meet
        (px, py, ux, uy), (qx, qy, vx, vy) = lines[j - 1], lines[j]
        t = ((qx - px) * vy - (qy - py) * vx) / (ux * vy - uy * vx)
        out.append((px + t * ux, py + t * uy))
    return out


def drawings(indices, seed, prompt, image_size):
    """One shape per canvas, varied as people's drawings are: filled, or outlined by a stroke of 1.2-3 px; canvases
    square or up to 2:1 either way, of 0.7-4x the side the processor keeps (image_size**2 pixels), so that its bicubic
    resize blurs and aliases them as it does a person's file; a continuous size within each size word; a shade of the
    color word; a little squashed and turned; anywhere on the canvas; hard-edged or anti-aliased (drawn 2x or 4x and
    reduced); 40% saved as JPEG. Stored at most 48x48 px, a small shape spans 7-24 px: 4-px patches tell its outline
    apart where 8-px ones (at 64 px) left a tiny ViT at half the accuracy after as many steps. Each is drawn at about
    the size it is kept at: never a 1600-px canvas to make 48 px."""
    for i in indices:
        r = random.Random(f"{seed}-{i}")
        shape, color = r.choice(SHAPES), r.choice(list(SHADES))
        bg, size = r.choice(list(GRAYS)), r.choice(list(EXTENTS))
        side = image_size * math.exp(r.uniform(math.log(0.7), math.log(4)))  # of a square of the canvas's area
        aspect = 1 if r.random() < 0.3 else math.exp(r.uniform(0, math.log(2)))
        w, h = round(side * aspect ** 0.5), round(side / aspect ** 0.5)
        w, h = (w, h) if r.random() < 0.5 else (h, w)
        k = max(1, min(r.choice((1, 2, 4)), 400 // max(w, h)))  # supersampling; 1 draws hard, aliased edges
        g = r.uniform(*GRAYS[bg])
        back = tuple(round(min(255, max(0, g + r.uniform(-4, 4)))) for _ in range(3))
        im = Image.new('RGB', (w * k, h * k), back)
        h0, h1, v0 = SHADES[color]
        rgb = colorsys.hsv_to_rgb(r.uniform(h0, h1) / 360 % 1, r.uniform(0.7, 1), r.uniform(v0, 1))
        s = r.uniform(*EXTENTS[size]) * min(w, h) / 2  # half the extent
        q = r.uniform(0.75, 1)
        sx, sy = (s, s * q) if r.random() < 0.5 else (s * q, s)
        unit = outline(shape, r)
        for t in (math.radians(r.uniform(-12, 12)) if shape != 'circle' else 0, 0):  # unturned, if turned won't fit
            c, si = math.cos(t), math.sin(t)
            pts = [(x * sx * c - y * sy * si, x * sx * si + y * sy * c) for x, y in unit]
            xs, ys = [x for x, _ in pts], [y for _, y in pts]
            if max(xs) - min(xs) < w - 2 and max(ys) - min(ys) < h - 2:
                break
        cx = min(max(w / 2 + r.uniform(-0.3, 0.3) * w, 1 - min(xs)), w - 1 - max(xs))  # whole on the canvas
        cy = min(max(h / 2 + r.uniform(-0.3, 0.3) * h, 1 - min(ys)), h - 1 - max(ys))
        pts = [((cx + x) * k, (cy + y) * k) for x, y in pts]
        ink = tuple(round(255 * v) for v in rgb)
        ImageDraw.Draw(im).polygon(pts, fill=ink)
        if r.random() < 0.4:  # an outline: a stroke of 1.2-3 px where the processor keeps it (at most 15% of the
            stroke = k * min(r.uniform(1.2, 3) * side / image_size, 0.3 * s)  # extent), inside the shape's edge
            ImageDraw.Draw(im).polygon(inset(pts, stroke), fill=back)
        im = im.resize((w, h), Image.BOX) if k > 1 else im
        if r.random() < 0.4:
            im = load_image(io.BytesIO(encode(im, dict(format='JPEG', quality=r.randint(30, 95)))))
        yield f"drawings-{seed}-{i}", caption_row(shape_caption(size, color, shape, bg), prompt), [im]


def tar_complete(path):
    """Whether an uncompressed tar shard ends with its end-of-archive marker (two zero blocks): one cut short at a
    member boundary reads without error, as a shard with fewer samples."""
    with open(path, 'rb') as f:
        if f.read(2) == b'\x1f\x8b':
            return True  # gzip: a cut stream fails as it is read
        n = f.seek(0, 2)
        f.seek(max(0, n - 1024))
        return n >= 1024 and n % 512 == 0 and f.read() == bytes(1024)


def tar_samples(path, prompt):
    stem = os.path.splitext(os.path.basename(path))[0]
    if not tar_complete(path):
        raise ValueError(f"{path}: cut short (no end-of-archive marker): a copy or download stopped partway")

    def sample(key, files):
        image = next((files[e] for e in ('jpg', 'jpeg', 'png', 'webp') if e in files), None)
        caption = files['txt'].decode('utf-8', 'replace') if 'txt' in files else ''
        if not caption and 'json' in files:
            try:
                caption = json.loads(files['json']).get('caption')
            except (ValueError, AttributeError):
                pass
        if image is None:
            return 'no image'
        if not isinstance(caption, str) or not caption.strip():
            return 'no caption'
        return f"{stem}/{key}", caption_row(caption.strip(), prompt), [image]

    key, files = None, {}
    with tarfile.open(path, 'r|*') as tf:  # streamed: a sample's files are adjacent in a webdataset shard
        for m in tf:
            if not m.isfile():
                continue
            d, base = os.path.split(m.name)
            k, _, ext = base.partition('.')  # webdataset: the key ends at the first dot of the file name
            if os.path.join(d, k) != key:
                if files:
                    yield sample(key, files)
                key, files = os.path.join(d, k), {}
            files[ext.lower()] = tf.extractfile(m).read()
    if files:
        yield sample(key, files)


def llava_messages(row):
    roles = {'human': 'user', 'gpt': 'assistant', 'system': 'system'}
    out = []
    for turn in row['conversations']:
        role, parts = roles[turn['from']], turn['value'].split('<image>')
        if role != 'user' and len(parts) == 1:
            out.append({'role': role, 'content': turn['value']})
            continue
        content = []
        for j, part in enumerate(parts):
            content += [{'type': 'image'}] if j else []
            content += [{'type': 'text', 'text': part.strip()}] if part.strip() else []
        out.append({'role': role, 'content': content})
    return out


def json_rows(payload, llava):  # llava: rows of "conversations", else of "messages"
    stem, start, rows, root = payload
    for i, row in enumerate(rows, start):
        try:
            row = json.loads(row) if isinstance(row, str) else row  # a .jsonl line, parsed here to spread the work
            messages = llava_messages(row) if llava else row['messages']
            messages = json.loads(messages) if isinstance(messages, str) else messages
            paths = row.get('images', row.get('image'))
            paths = [] if paths is None else [paths] if isinstance(paths, str) else list(paths)
            n = sum(c.get('type') == 'image' for m in messages if isinstance(m['content'], list) for c in m['content'])
            assert n == len(paths), "image items and images differ in number"
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
            yield 'bad row'
            continue
        yield str(row.get('id', f"{stem}:{i}")), messages, [os.path.join(root, p) for p in paths]




DATASETS = ('shapes', 'drawings', 'tars', 'chat', 'llava')
# generated here, with their own tokenizer: their defaults for how many images, the largest side the processor keeps
# (max_pixels = image_size**2), its patch size and the held-out fraction (400-640 images)
SYNTHETIC = {'shapes': dict(num_samples=8000, image_size=96, patch_size=16, val_frac=0.05, captions='full'),
             'drawings': dict(num_samples=40000, image_size=48, patch_size=4, val_frac=0.01, captions='full,shape',
                              shape_image_size=32)}
DRAWN_BY = 3  # drawings(): its routine (2: outlines, proportions, drawn at the kept size; 3: large from 65%, not 62%);
#             meta.json records it, so data drawn by another is never added to


def source(o, image_size):
    """The source of dataset o.dataset as a function of a work unit's payload alone, the options it reads bound
    (a partial of a module function: it travels to the pool's workers, whatever their start method)."""
    if o.dataset == 'shapes':
        return partial(shapes, seed=o.seed, image_size=image_size, prompt=o.prompt)
    if o.dataset == 'drawings':
        return partial(drawings, seed=o.seed, prompt=o.prompt, image_size=image_size)
    if o.dataset == 'tars':
        return partial(tar_samples, prompt=o.prompt)
    return partial(json_rows, llava=o.dataset == 'llava')


class Piece:
    """One split's output of one work unit, appended row by row to a .tmp file and renamed when complete."""

    def __init__(self, out_dir, split, name):
        self.path, self.f, self.offsets, self.lengths = os.path.join(out_dir, split, name), None, [0], []

    def add(self, blob, n_tokens):
        self.f = self.f or open(self.path + '.bin.tmp', 'wb')
        self.f.write(blob)
        self.offsets.append(self.offsets[-1] + len(blob))
        self.lengths.append(n_tokens)

    def close(self, keep=True):
        if self.f is None:
            return
        self.f.close()
        if not keep:
            os.remove(self.path + '.bin.tmp')
            return
        with open(self.path + '.idx.npy.tmp', 'wb') as f:  # a file object, or np.save appends .npy to the name
            np.save(f, np.array(self.offsets, dtype=np.int64))
        with open(self.path + '.len.npy.tmp', 'wb') as f:
            np.save(f, np.array(self.lengths, dtype=np.int32))
        for ext in ('.bin', '.idx.npy', '.len.npy'):
            os.replace(self.path + ext + '.tmp', self.path + ext)


def encode(image, fmt):
    b = io.BytesIO()
    image.save(b, **fmt)
    return b.getvalue()


def work(name, payload, source, proc, views, val_frac, max_seq_len, fmt, lengths=None):
    """Work unit NAME: the samples source(payload) yields, resized by proc, measured, split and written as piece NAME
    of each split under each view's out_dir, images saved as fmt. views: (out_dir, words) pairs, words 'full' (the
    rows as they come) or 'shape' (shape_words). -> (name, counts, None), counts those of the first view (the others
    differ only in lengths), or (name, None, why) when the source itself is unreadable (its pieces are then removed,
    for a re-run to retry). lengths: the rows' lengths by messages and image sizes, kept by a pool worker."""
    counts, lengths = Counter(), {} if lengths is None else lengths
    pieces = [{s: Piece(out_dir, s, name) for s in ('train', 'val')} for out_dir, _ in views]

    def length(messages, images):
        """The row's length as training will see it, None where collate rejects it (training would fail on it too).
        It depends on the messages and the image sizes alone, which the generated datasets repeat: a pool worker
        keeps theirs from unit to unit (the other datasets' rows are each their own: one unit's, then dropped)."""
        key = json.dumps(messages), tuple(im.size for im in images)
        if key not in lengths:
            try:
                lengths[key] = proc.collate([{'messages': messages, 'images': images}])['input_ids'].shape[1]
            except Exception:
                lengths[key] = None
        return lengths[key]
    try:
        for s in source(payload):
            if isinstance(s, str):
                counts[s] += 1
                continue
            key, messages, images = s
            try:  # resize takes PIL images and paths
                images = [proc.resize(load_image(io.BytesIO(x)) if isinstance(x, bytes) else x) for x in images]
            except Exception:
                counts['bad image'] += 1
                continue
            rows = [(messages if words == 'full' else shape_words(messages)) for _, words in views]
            ns = [length(m, images) for m in rows]
            if None in ns:
                counts['bad row'] += 1
                continue
            if max(ns) > max_seq_len:
                counts['too long'] += 1
                continue
            blobs = [encode(im, fmt) for im in images]
            split = 'val' if is_val(key, val_frac) else 'train'
            for p, m, n in zip(pieces, rows, ns):
                head = json.dumps({'key': key, 'messages': m, 'sizes': [len(b) for b in blobs]})
                p[split].add(head.encode() + b'\n' + b''.join(blobs), n)
            counts[split] += 1
            counts[f'{split} turns'] += sum(m['role'] == 'assistant' for m in messages)
    except Exception as e:  # the source itself is unreadable (e.g. a truncated tar): leave it for a re-run
        for p in (p for ps in pieces for p in ps.values()):
            p.close(keep=False)
        return name, None, f"{type(e).__name__}: {e}"
    for p in (p for ps in pieces for p in ps.values()):
        p.close()
    return name, dict(counts), None


job = {}  # in a pool worker: work()'s arguments but the unit's own, set once by init()


def init(processor_dir, min_pixels, max_pixels, settings):
    """Pool initializer: the worker's Processor and work()'s other settings (source, out_dir, val_frac, ...)."""
    torch.set_num_threads(1)  # one process per core already
    job.update(settings, proc=Processor.from_pretrained(processor_dir, min_pixels, max_pixels))


def pool_work(unit):
    return work(*unit, **job)


SPECIAL = ['<|endoftext|>', '<|im_start|>', '<|im_end|>', '<think>', '</think>', '<|vision_start|>', '<|vision_end|>',
           '<|image_pad|>', '<|video_pad|>']
CHATML = ("{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' }}"
          "{%- if m.content is string %}{{- m.content }}{%- else %}{%- for c in m.content %}"
          "{%- if c.type == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
          "{%- elif c.type == 'text' %}{{- c.text }}{%- endif %}{%- endfor %}{%- endif %}"
          "{{- '<|im_end|>\\n' }}{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def shapes_processor(dataset, prompt, image_size, min_pixels=None, max_pixels=None):
    """The generated datasets' Processor: a byte-level BPE trained on every caption, the prompts and the template's
    words (any other text still encodes, byte by byte), the special tokens the graft reads, and a plain ChatML
    template: no <think> block to get wrong between training and sampling. Its patch size is SYNTHETIC[dataset]'s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [shape_caption(z, c, s, b) for z in SIZES for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    texts += [prompt, 'Describe this image in detail.', 'system\nuser\nassistant\n']
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=512, special_tokens=SPECIAL, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    patch = SYNTHETIC[dataset]['patch_size']
    return Processor(tok, CHATML, {'eos_token': '<|im_end|>', 'pad_token': '<|endoftext|>'}, patch_size=patch,
                     min_pixels=min_pixels or (patch * 2) ** 2, max_pixels=max_pixels or image_size ** 2)


# --- the command line: main() and its steps, each option checked before any work starts

def resolve(options):
    """The options checked (a bad one is a one-line error) with their defaults filled in, as a namespace."""
    o = SimpleNamespace(**options)
    if o.dataset not in DATASETS:
        die(f"--dataset must be one of {', '.join(DATASETS)}, got {o.dataset!r}")
    if o.dataset not in SYNTHETIC and not o.src:
        what = 'directory or glob of .tar shards' if o.dataset == 'tars' else '.json/.jsonl file'
        die(f"--dataset={o.dataset} needs --src=<{what}>")
    if o.dataset not in SYNTHETIC and not o.tokenizer:
        die(f"--dataset={o.dataset} needs --tokenizer=<checkpoint dir>: its Processor resizes images, counts tokens")
    # other sources record shapes' (unused) sizes, as before drawings existed, so their meta.json still matches
    defaults = SYNTHETIC.get(o.dataset, dict(SYNTHETIC['shapes'], val_frac=0.005))
    o.val_frac = defaults['val_frac'] if o.val_frac is None else o.val_frac
    o.num_samples = o.num_samples or defaults['num_samples']
    o.image_size = o.image_size or defaults['image_size']
    if not isinstance(o.val_frac, (int, float)) or not 0 <= o.val_frac < 1:
        die(f"--val_frac must be a number in [0, 1), got {o.val_frac!r}")
    if o.captions is not None and o.dataset not in SYNTHETIC:
        die(f"--captions={o.captions} is for the generated datasets ({', '.join(SYNTHETIC)}), "
            f"not --dataset={o.dataset}")
    o.captions = o.captions or defaults.get('captions', 'full')
    words = o.captions.split(',')
    if not words or any(w not in ('full', 'shape') for w in words) or len(set(words)) < len(words):
        die(f"--captions must be 'full', 'shape' or 'full,shape', got {o.captions!r}")
    o.shape_image_size = o.shape_image_size or defaults.get('shape_image_size', o.image_size)
    for k in ('image_size', 'shape_image_size'):
        if type(getattr(o, k)) is not int or getattr(o, k) < 1:
            die(f"--{k} must be a whole number of pixels, at least 1, got {getattr(o, k)!r}")
    base = o.out_dir or os.path.join('data', o.dataset)
    # (out_dir, words, image_size): the same drawings (the same random draws), each set drawn at its own size
    o.views = [(base, w, o.image_size) if w == 'full' else (base.rstrip('/\\') + '-shape', w, o.shape_image_size)
               for w in words]
    return o


def check_resume(meta_path, out_dir, settings):
    """Resuming into out_dir: only the options its meta.json records may add to what is there."""
    try:
        with open(meta_path) as f:
            old = json.load(f)['config']
    except (ValueError, KeyError, TypeError) as e:
        die(f"{meta_path}: not a meta.json prepare.py wrote ({type(e).__name__}: {e}); delete {out_dir} or "
             "give another --out_dir")
    diff = sorted(k for k in settings.keys() | old.keys() if settings.get(k) != old.get(k))
    if diff:
        die(f"{out_dir} was prepared with other options "
             f"({', '.join(f'{k}: {old.get(k)!r} there, {settings.get(k)!r} now' for k in diff)}); "
             "give another --out_dir or delete it")


def work_units(o):
    """(processor, units): what meta.json records as the processor ('.': the generated datasets make their own), and
    the work as (piece name, payload): chunk_size sample numbers or rows, or one tar shard's path."""
    if o.dataset in SYNTHETIC:
        return '.', [(f"{o.dataset}-{a // o.chunk_size:05d}", range(a, min(a + o.chunk_size, o.num_samples)))
                     for a in range(0, o.num_samples, o.chunk_size)]
    processor = os.path.abspath(o.tokenizer) if os.path.isdir(o.tokenizer) else o.tokenizer  # a dir, or a hub id
    try:
        Processor.from_pretrained(processor, o.min_pixels, o.max_pixels)
    except Exception as e:
        die(f"--tokenizer={o.tokenizer}: {e}")
    exts = ('.tar',) if o.dataset == 'tars' else ('.json', '.jsonl')
    files = sorted(glob.glob(os.path.join(o.src, '*') if os.path.isdir(o.src) else o.src))
    files = [f for f in files if f.endswith(exts)]
    if not files:
        die(f"--src={o.src} matches no {'/'.join(exts)} files")
    units = []
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        if o.dataset == 'tars':
            units.append((stem, f))
            continue
        try:
            with open(f) as fh:
                rows = [line for line in fh if line.strip()] if f.endswith('.jsonl') else json.load(fh)
            assert isinstance(rows, list), "not a JSON list of rows"
        except (OSError, ValueError, AssertionError) as e:
            die(f"--src: cannot read {f}: {e}")
        root = o.image_root or os.path.dirname(os.path.abspath(f))
        units += [(f"{stem}-{a // o.chunk_size:05d}", (stem, a, rows[a:a + o.chunk_size], root))
                  for a in range(0, len(rows), o.chunk_size)]
    if len({name for name, _ in units}) < len(units):
        die("--src: two source files share a name, and pieces are named after their source")
    return processor, units


def open_done(out_dir):
    """out_dir/done.jsonl opened to append to, a last line that an interrupted run cut short dropped first (its piece
    is done again): only whole lines count."""
    path = os.path.join(out_dir, 'done.jsonl')
    with open(path, 'ab+') as f:
        f.seek(0)
        text = f.read()
        f.truncate(text.rfind(b'\n') + 1)
    return open(path, 'a')


def run_pool(o, todo, views, image_size, processor_dir, done):
    """The units of todo written by a pool of workers into views ((out_dir, words) of one image_size), each finished
    piece listed as it comes in the done.jsonl of each view that lacks it (done: each view's finished pieces). -> how
    many were left undone, their source unreadable."""
    # the generated images as PNG at zlib's fastest level: the same pixels as the default level 6, in half its time
    # (the drawings demo's 80000 images: about 1 s of prepare.py's 25), in files 8% larger
    lossless = dict(format='PNG', compress_level=1)
    settings = dict(source=source(o, image_size), views=views, val_frac=o.val_frac, max_seq_len=o.max_seq_len,
                    fmt=lossless if o.dataset in SYNTHETIC else dict(format='JPEG', quality=95),
                    lengths={} if o.dataset in SYNTHETIC else None)
    failed, logs = 0, [open_done(out_dir) for out_dir, _ in views]
    with Pool(min(o.num_workers, len(todo)), init, (processor_dir, o.min_pixels, o.max_pixels, settings)) as pool:
        for name, counts, err in tqdm(pool.imap_unordered(pool_work, todo), total=len(todo), desc=o.dataset,
                                      unit='piece'):
            if err:
                failed += 1
                tqdm.write(f"warning: {name} left undone: {err}", file=sys.stderr)
                continue
            for log, d in zip(logs, done):
                if name not in d:
                    log.write(json.dumps({'name': name, 'counts': counts}) + '\n')
                    log.flush()
    for log in logs:
        log.close()
    return failed


def view_settings(o, words, image_size):
    """What one view's meta.json records: the options, its caption words and image size, and drawings()'s version."""
    settings = {k: v for k, v in vars(o).items()
                if k not in ('out_dir', 'num_workers', 'views', 'captions', 'shape_image_size')}
    settings['image_size'] = image_size
    if words != 'full':  # recorded only when not 'full', so that a meta.json written before the option still matches
        settings['captions'] = words
    if o.dataset == 'drawings':
        settings['drawn_by'] = DRAWN_BY
    return settings


def main(options):
    """`python prepare.py`: the options block's values (after the command line) -> each view's out_dir prepared or
    added to (one for the real datasets; one per caption set of the generated ones), and a summary line for each on
    stdout."""
    o = resolve(options)
    for out_dir, words, size in o.views:
        meta_path = os.path.join(out_dir, 'meta.json')
        if os.path.exists(meta_path):
            check_resume(meta_path, out_dir, view_settings(o, words, size))
    processor, units = work_units(o)

    for out_dir, words, size in o.views:
        for split in ('train', 'val'):
            os.makedirs(os.path.join(out_dir, split), exist_ok=True)
        meta_path = os.path.join(out_dir, 'meta.json')
        if not os.path.exists(meta_path):
            with open(meta_path, 'w') as f:
                json.dump({'config': view_settings(o, words, size), 'processor': processor}, f, indent=1)
        if processor == '.' and not os.path.exists(os.path.join(out_dir, 'tokenizer.json')):
            shapes_processor(o.dataset, o.prompt, size, o.min_pixels, o.max_pixels).save_pretrained(out_dir)
    done = {out_dir: read_done(out_dir, cut_ok=True) for out_dir, _, _ in o.views}
    already = {out_dir: sum(name in d for name, _ in units) for out_dir, d in done.items()}
    failed = 0
    for size in dict.fromkeys(size for _, _, size in o.views):  # a pass for each image size, each drawn at its own
        views = [(out_dir, words) for out_dir, words, s in o.views if s == size]
        todo = [u for u in units if any(u[0] not in done[out_dir] for out_dir, _ in views)]
        if todo:
            failed += run_pool(o, todo, views, size, views[0][0] if processor == '.' else processor,
                               [done[out_dir] for out_dir, _ in views])
    for out_dir, _, _ in o.views:
        total = sum(map(Counter, read_done(out_dir).values()), Counter())
        if o.dataset in SYNTHETIC and total['val']:  # a held-out image for README's `python sample.py` command
            PreparedDataset(out_dir, 'val')[0]['images'][0].save(os.path.join(out_dir, 'example.png'))
        kept = ('train', 'val', 'train turns', 'val turns')
        skipped = ', '.join(f"{n} {k}" for k, n in sorted(total.items()) if k not in kept)
        print(f"{out_dir}: {total['train']} train + {total['val']} val rows "
              f"({total['train turns']} + {total['val turns']} assistant turns); skipped: {skipped or 'none'}"
              + (f"; {already[out_dir]} of {len(units)} pieces were already done" if already[out_dir] else '')
              + (f"; {failed} unreadable sources left undone (re-run to retry)" if failed else ''))


if __name__ == '__main__':
    main(options)
