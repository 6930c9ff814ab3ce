"""
Turns a corpus into a prepared dataset directory for train.py: rows of chat messages with their images already
resized by Processor.resize (what the model sees, so training never decodes full-size photos), split into train and
a held-out val by a stable hash of each sample's key (re-runs and resumes agree on it).

  python prepare.py --dataset=shapes                  # offline demo: captioned synthetic shapes + its own tokenizer
  python prepare.py --dataset=drawings                # the same captions on shapes varied as people draw them
  python prepare.py --dataset=drawings --captions=shape   # ...captioned "a small circle." (data/drawings-shape)
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
drawings: the same captions and tokenizer on shapes varied as people's drawings in a paint program are (canvas size
  and aspect, place, shade, size, anti-aliasing, JPEG), stored at most 48x48 px: 4-px patches, 4-36 vision tokens.

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
    num_samples = None  # shapes/drawings: how many images; None = SYNTHETIC's (drawings: 64000, fewer repeats of each)
    image_size = None  # shapes/drawings: the largest side the processor keeps, max_pixels = image_size**2; None = 96
    #                  for shapes (6x6 patches of 16: 9 merged vision tokens; at 64, 4 tokens, a tiny ViT learned far
    #                  more slowly), 48 for drawings (12x12 patches of 4: 36 tokens; see drawings())
    seed = 1337  # shapes/drawings
    captions = 'full'  # shapes/drawings: 'full', or 'shape' ("a small circle.", out_dir data/<dataset>-shape): the
    #                    same images, for the drawings demo's first run (config/drawings_shape.py)
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


def shape_caption(size, color, shape, bg, words='full'):  # the grammar of shapes and drawings, and of their tokenizer
    # 'shape' leaves out color and background: learned from the start, they slow the learning of shape (the runs that
    # showed it: docs/experiments.md)
    return f"a {size} {color} {shape} on a {bg} background." if words == 'full' else f"a {size} {shape}."

# --- sources: each yields (key, messages, images) per sample, or a reason string for one it skips. Images may be
# PIL images, encoded bytes or file paths: decoding happens in work(), where a bad one is counted. The first argument
# is one work unit's payload; source() binds the rest from the options.

SHAPES = ('circle', 'square', 'triangle', 'cross')
COLORS = {'red': (220, 30, 30), 'green': (30, 160, 50), 'blue': (30, 70, 220), 'yellow': (240, 200, 20),
          'purple': (140, 50, 180), 'orange': (250, 130, 20)}
BACKGROUNDS = {'white': (255, 255, 255), 'black': (0, 0, 0), 'gray': (128, 128, 128)}
SIZES = {'small': 0.5, 'large': 0.9}  # extent / image side; smaller shapes were much harder for a tiny ViT to tell apart


def shapes(indices, seed, image_size, prompt, captions):
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
        yield f"shapes-{seed}-{i}", caption_row(shape_caption(size, color, shape, bg, captions), prompt), [im]
# drawings: each color word is a hue range in degrees and a lowest HSV value, the shades a paint program's palette
# gives it; each background a range of gray levels; each size word a range of extents (of the canvas's short side)
# with a clear gap between them
SHADES = {'red': (-12, 10, 0.55), 'orange': (20, 40, 0.75), 'yellow': (48, 64, 0.75), 'green': (95, 150, 0.45),
          'blue': (205, 245, 0.5), 'purple': (270, 305, 0.45)}
GRAYS = {'white': (232, 255), 'black': (0, 28), 'gray': (100, 155)}
EXTENTS = {'small': (0.33, 0.5), 'large': (0.68, 0.95)}
OUTLINES = {  # unit outlines, y down
    'square': [(-1, -1), (1, -1), (1, 1), (-1, 1)],
    'triangle': [(0, -1), (1, 1), (-1, 1)],
    'circle': [(math.cos(k * math.pi / 60), math.sin(k * math.pi / 60)) for k in range(120)],
}


def cross(a):  # arms of half-width a
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]


def drawings(indices, seed, prompt, captions):
    """One filled shape per canvas, varied as people's drawings are: canvases of 80-800 px, square or up to 2:1 either
    way; a continuous size within each size word; a shade of the color word; a little squashed and turned; anywhere
    on the canvas; hard-edged or anti-aliased (drawn 2x or 4x and reduced); 40% saved as JPEG. Resized to at most 48x48
    px, a small shape spans only 8-12 px: 4-px patches tell its outline apart where 8-px ones (at 64 px) left a tiny
    ViT at half the accuracy after as many steps."""
    for i in indices:
        r = random.Random(f"{seed}-{i}")
        shape, color = r.choice(SHAPES), r.choice(list(SHADES))
        bg, size = r.choice(list(GRAYS)), r.choice(list(EXTENTS))
        long = r.uniform(80, 800)
        aspect = 1 if r.random() < 0.3 else math.exp(r.uniform(0, math.log(2)))
        w, h = (round(long), round(long / aspect)) if r.random() < 0.5 else (round(long / aspect), round(long))
        k = min(r.choice((1, 2, 4)), 1600 // max(w, h))  # supersampling; 1 draws hard, aliased edges
        g = r.uniform(*GRAYS[bg])
        im = Image.new('RGB', (w * k, h * k), tuple(round(min(255, max(0, g + r.uniform(-4, 4)))) for _ in range(3)))
        h0, h1, v0 = SHADES[color]
        rgb = colorsys.hsv_to_rgb(r.uniform(h0, h1) / 360 % 1, r.uniform(0.7, 1), r.uniform(v0, 1))
        s = r.uniform(*EXTENTS[size]) * min(w, h) / 2  # half the extent
        q = r.uniform(0.85, 1)
        sx, sy = (s, s * q) if r.random() < 0.5 else (s * q, s)
        t = math.radians(r.uniform(-10, 10)) if shape != 'circle' else 0
        c, si = math.cos(t), math.sin(t)
        pts = [(x * sx * c - y * sy * si, x * sx * si + y * sy * c)
               for x, y in (cross(r.uniform(0.25, 0.45)) if shape == 'cross' else OUTLINES[shape])]
        xs, ys = [x for x, _ in pts], [y for _, y in pts]
        cx = min(max(w / 2 + r.uniform(-0.3, 0.3) * w, 2 - min(xs)), w - 2 - max(xs))  # whole on the canvas
        cy = min(max(h / 2 + r.uniform(-0.3, 0.3) * h, 2 - min(ys)), h - 2 - max(ys))
        ImageDraw.Draw(im).polygon([((cx + x) * k, (cy + y) * k) for x, y in pts],
                                   fill=tuple(round(255 * v) for v in rgb))
        im = im.resize((w, h), Image.BOX) if k > 1 else im
        if r.random() < 0.4:
            im = load_image(io.BytesIO(encode(im, dict(format='JPEG', quality=r.randint(30, 95)))))
        yield f"drawings-{seed}-{i}", caption_row(shape_caption(size, color, shape, bg, captions), prompt), [im]


def tar_samples(path, prompt):
    stem = os.path.splitext(os.path.basename(path))[0]

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
SYNTHETIC = {'shapes': dict(num_samples=8000, image_size=96, patch_size=16, val_frac=0.05),
             'drawings': dict(num_samples=64000, image_size=48, patch_size=4, val_frac=0.01)}


def source(o):
    """The source of dataset o.dataset as a function of a work unit's payload alone, the options it reads bound
    (a partial of a module function: it travels to the pool's workers, whatever their start method)."""
    if o.dataset == 'shapes':
        return partial(shapes, seed=o.seed, image_size=o.image_size, prompt=o.prompt, captions=o.captions)
    if o.dataset == 'drawings':
        return partial(drawings, seed=o.seed, prompt=o.prompt, captions=o.captions)
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


def work(name, payload, source, proc, out_dir, val_frac, max_seq_len, fmt):
    """Work unit NAME: the samples source(payload) yields, resized by proc, measured, split and written as piece NAME
    of each split under out_dir, images saved as fmt. -> (name, counts, None), or (name, None, why) when the source
    itself is unreadable (its pieces are then removed, for a re-run to retry)."""
    counts, pieces = Counter(), {s: Piece(out_dir, s, name) for s in ('train', 'val')}
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
            try:  # the length training will see; a row collate rejects would fail training too
                n = proc.collate([{'messages': messages, 'images': images}])['input_ids'].shape[1]
            except Exception:
                counts['bad row'] += 1
                continue
            if n > max_seq_len:
                counts['too long'] += 1
                continue
            blobs = [encode(im, fmt) for im in images]
            head = json.dumps({'key': key, 'messages': messages, 'sizes': [len(b) for b in blobs]})
            split = 'val' if is_val(key, val_frac) else 'train'
            pieces[split].add(head.encode() + b'\n' + b''.join(blobs), n)
            counts[split] += 1
            counts[f'{split} turns'] += sum(m['role'] == 'assistant' for m in messages)
    except Exception as e:  # the source itself is unreadable (e.g. a truncated tar): leave it for a re-run
        for p in pieces.values():
            p.close(keep=False)
        return name, None, f"{type(e).__name__}: {e}"
    for p in pieces.values():
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
    if o.captions not in ('full', 'shape'):
        die(f"--captions must be 'full' or 'shape', got {o.captions!r}")
    if o.captions != 'full' and o.dataset not in SYNTHETIC:
        die(f"--captions={o.captions} is for the generated datasets ({', '.join(SYNTHETIC)}), "
            f"not --dataset={o.dataset}")
    o.out_dir = o.out_dir or os.path.join('data', o.dataset + ('-shape' if o.captions == 'shape' else ''))
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


def run_pool(o, todo, processor_dir):
    """The units of todo written by a pool of workers, each finished piece listed in done.jsonl as it comes.
    -> how many were left undone, their source unreadable."""
    settings = dict(source=source(o), out_dir=o.out_dir, val_frac=o.val_frac, max_seq_len=o.max_seq_len,
                    fmt=dict(format='PNG') if o.dataset in SYNTHETIC else dict(format='JPEG', quality=95))
    failed = 0
    with Pool(min(o.num_workers, len(todo)), init, (processor_dir, o.min_pixels, o.max_pixels, settings)) as pool, \
            open(os.path.join(o.out_dir, 'done.jsonl'), 'a') as log:
        for name, counts, err in tqdm(pool.imap_unordered(pool_work, todo), total=len(todo), desc=o.dataset,
                                      unit='piece'):
            if err:
                failed += 1
                tqdm.write(f"warning: {name} left undone: {err}", file=sys.stderr)
                continue
            log.write(json.dumps({'name': name, 'counts': counts}) + '\n')
            log.flush()
    return failed


def main(options):
    """`python prepare.py`: the options block's values (after the command line) -> out_dir prepared or added to,
    and one summary line on stdout."""
    o = resolve(options)
    settings = {k: v for k, v in vars(o).items() if k not in ('out_dir', 'num_workers')}
    if o.captions == 'full':  # so that a meta.json written before the option existed still matches
        del settings['captions']
    meta_path = os.path.join(o.out_dir, 'meta.json')
    if os.path.exists(meta_path):
        check_resume(meta_path, o.out_dir, settings)
    processor, units = work_units(o)

    for split in ('train', 'val'):
        os.makedirs(os.path.join(o.out_dir, split), exist_ok=True)
    if not os.path.exists(meta_path):
        with open(meta_path, 'w') as f:
            json.dump({'config': settings, 'processor': processor}, f, indent=1)
    if processor == '.' and not os.path.exists(os.path.join(o.out_dir, 'tokenizer.json')):
        shapes_processor(o.dataset, o.prompt, o.image_size, o.min_pixels, o.max_pixels).save_pretrained(o.out_dir)
    done = read_done(o.out_dir)
    todo = [u for u in units if u[0] not in done]
    failed = run_pool(o, todo, o.out_dir if processor == '.' else processor) if todo else 0
    total = sum(map(Counter, read_done(o.out_dir).values()), Counter())
    if o.dataset in SYNTHETIC and total['val']:  # a held-out image for README's `python sample.py` command
        PreparedDataset(o.out_dir, 'val')[0]['images'][0].save(os.path.join(o.out_dir, 'example.png'))
    kept = ('train', 'val', 'train turns', 'val turns')
    skipped = ', '.join(f"{n} {k}" for k, n in sorted(total.items()) if k not in kept)
    print(f"{o.out_dir}: {total['train']} train + {total['val']} val rows "
          f"({total['train turns']} + {total['val turns']} assistant turns); skipped: {skipped or 'none'}"
          + (f"; {len(units) - len(todo)} of {len(units)} pieces were already done" if len(todo) < len(units) else '')
          + (f"; {failed} unreadable sources left undone (re-run to retry)" if failed else ''))


if __name__ == '__main__':
    main(options)
