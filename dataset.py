"""
Reads what prepare.py writes (the layout of a prepared dataset directory is in prepare.py's docstring): one split of
one dataset, ds = PreparedDataset('data/shapes', 'train'), ds[i] a row for Processor.collate; several datasets drawn
by weight, Mixture('data/llava:3,data/a2-text:1', 'train'), whose schedule() is train.py's data order; and
length_grouped(), the cutting of micro-batches from rows of similar length, which bench.py measures. No options:
everything comes in as arguments.
"""
import io
import json
import os

import numpy as np

from processor import load_image


class PreparedDataset:
    """One split of a prepared dataset: ds[i] -> {"messages": [...], "images": [PIL.Image]}, a row for
    Processor.collate. Rows are numbered in piece-name order, the same on every run and every machine."""

    def __init__(self, dir, split):
        with open(os.path.join(dir, 'meta.json')) as f:
            self.meta = json.load(f)
        p = self.meta['processor']  # '.' (shapes: the dataset carries its own), a checkpoint dir or a hub id
        self.processor_dir = dir if p == '.' else p
        names = sorted(n for n, c in read_done(dir).items() if c.get(split))
        self.bins = [os.path.join(dir, split, n + '.bin') for n in names]
        self.offsets = [np.load(os.path.join(dir, split, n + '.idx.npy')) for n in names]
        self.starts = np.cumsum([0] + [len(o) - 1 for o in self.offsets])
        self.lengths = np.concatenate([np.zeros(0, np.int32)] + [read_lengths(os.path.join(dir, split, n + '.len.npy'),
                                                                              len(o) - 1)
                                                                 for n, o in zip(names, self.offsets)])

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} of {len(self)}")
        i %= len(self)
        p = int(np.searchsorted(self.starts, i, 'right')) - 1
        j = i - self.starts[p]
        a, b = int(self.offsets[p][j]), int(self.offsets[p][j + 1])
        with open(self.bins[p], 'rb') as f:  # a fresh handle per read: safe in forked DataLoader workers
            f.seek(a)
            head, _, body = f.read(b - a).partition(b'\n')
        row = json.loads(head)
        ends = np.cumsum([0] + row['sizes'])
        images = [load_image(io.BytesIO(body[s:e])) for s, e in zip(ends, ends[1:])]
        return {'messages': row['messages'], 'images': images}


def read_done(dir, cut_ok=False):
    """{piece name: its counts} of the finished pieces listed in dir/done.jsonl: only those are part of the dataset.
    A last line cut short by an interrupted prepare.py is a ValueError that names the file, or with cut_ok (prepare.py
    finishing the job) left out: that piece is done again."""
    path = os.path.join(dir, 'done.jsonl')
    if not os.path.exists(path):
        return {}
    with open(path, encoding='utf-8', errors='replace') as f:
        *lines, cut = f.read().split('\n')  # each line is written whole with its newline: what follows the last is cut
    if cut and not cut_ok:
        raise ValueError(f"{path}: its last line is cut short (prepare.py was interrupted while writing it); run the "
                         "same prepare.py command again to finish the dataset")
    done = {}
    for i, line in enumerate(lines, 1):
        try:
            d = json.loads(line)
            done[d['name']] = d['counts']
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path}: line {i} is not a piece prepare.py listed ({line[:60]!r})") from None
    return done


def read_lengths(path, n):
    # datasets prepared before lengths were recorded still read: their rows count as length 0 (not grouped)
    return np.load(path) if os.path.exists(path) else np.zeros(n, np.int32)


def parse_mixture(spec):
    """'data/llava:3,data/a2-text:1' -> [('data/llava', 3.0), ('data/a2-text', 1.0)]; a path alone weighs 1."""
    out = []
    for part in spec.split(','):
        path, sep, w = part.strip().rpartition(':')
        path, w = (path, w) if sep else (w, '1')
        try:
            w = float(w)
        except ValueError:
            raise ValueError(f"{part!r}: expected PATH or PATH:WEIGHT, and {w!r} is not a number") from None
        if not 0 < w < float('inf'):
            raise ValueError(f"{part!r}: the weight must be a positive number")
        if not os.path.exists(os.path.join(path, 'meta.json')):
            raise ValueError(f"{path!r} is not a prepared dataset (no meta.json): run prepare.py first")
        if any(os.path.samefile(path, p) for p, _ in out):
            raise ValueError(f"{path!r} is listed twice: give it one weight")
        out.append((path, w))
    return out


class Mixture:
    """Prepared datasets drawn by weight, from a spec like 'data/llava:3,data/a2-text:1'; one path is a mixture of
    one. Rows are numbered source after source (ds[i] as PreparedDataset's); schedule() says which rows each
    training step takes."""

    def __init__(self, spec, split):
        self.paths, weights = zip(*parse_mixture(spec))
        self.weights = np.array(weights) / sum(weights)
        self.sources = [PreparedDataset(p, split) for p in self.paths]
        base = [os.path.basename(os.path.normpath(p)) for p in self.paths]
        self.names = base if len(set(base)) == len(base) else list(self.paths)  # for the logs
        self.processor_dir = self.sources[0].processor_dir
        self.starts = np.cumsum([0] + [len(s) for s in self.sources])
        self.lengths = np.concatenate([s.lengths for s in self.sources])
        self.perms = {}  # source -> (epoch, its permutation)

    def __len__(self):
        return int(self.starts[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.starts, i, 'right')) - 1
        return self.sources[k][i - int(self.starts[k])]

    def schedule(self, step, batch_size, n_micro, window, seed):
        """Each training step's n_micro micro-batches of batch_size row numbers, from `step` on, forever: a fixed
        function of seed and step, so a resumed run and any world size see the same rows. Steps come in windows of
        `window` (0: groups of 1, unsorted). Window w draws the source of each of its rows by weight, takes each
        source's next rows in that source's epoch order (reshuffled by seed and epoch: a source that runs out starts
        its next epoch), then sorts the rows by token length, cuts micro-batches from neighbours and shuffles those:
        a micro-batch pads little, and a step still sees all lengths."""
        W, n = max(window, 1), max(window, 1) * batch_size * n_micro  # steps and rows per window
        w = step // W
        used = sum((self.draw(seed, v, n)[1] for v in range(w)), np.zeros(len(self.sources), np.int64))
        while True:
            src, counts = self.draw(seed, w, n)
            rows = np.empty(n, np.int64)
            for k in range(len(self.sources)):
                rows[src == k] = self.starts[k] + self.take(seed, k, used[k], counts[k])
            used += counts
            batches = length_grouped(rows, self.lengths[rows], batch_size, np.random.default_rng([seed, 2, w])) \
                if window else rows.reshape(-1, batch_size)
            for s in range(max(step - w * W, 0), W):
                yield batches[s * n_micro:(s + 1) * n_micro].tolist()
            w += 1

    def draw(self, seed, w, n):
        """The source of each of window w's n rows, and how many each gives."""
        K = len(self.sources)
        src = np.random.default_rng([seed, 0, w]).choice(K, n, p=self.weights) if K > 1 else np.zeros(n, np.int64)
        return src, np.bincount(src, minlength=K)

    def take(self, seed, k, start, count):
        """Row numbers (within source k) of its rows start .. start+count-1 in epoch order, across epochs."""
        N, c = len(self.sources[k]), np.arange(start, start + count)
        out = np.empty(count, np.int64)
        for e in np.unique(c // N):
            if self.perms.get(k, (None,))[0] != e:
                self.perms[k] = e, np.random.default_rng([seed, 1, k, e]).permutation(N)
            at = c // N == e
            out[at] = self.perms[k][1][c[at] % N]
        return out


def length_grouped(rows, lengths, batch_size, rng):
    """rows (n,) with their token counts -> (n / batch_size, batch_size) micro-batches of rows of similar length
    (sorted, then cut), in an order shuffled by rng, so the steps still mix short and long."""
    batches = rows[np.argsort(lengths, kind='stable')].reshape(-1, batch_size)
    return batches[rng.permutation(len(batches))]
