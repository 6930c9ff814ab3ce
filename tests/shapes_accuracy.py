"""Exact-match caption accuracy of a trained shapes demo on its held-out split (a script, not a test: it needs the
demo's trained checkpoint).

    python tests/shapes_accuracy.py                      # out-shapes/ckpt on data/shapes
    python tests/shapes_accuracy.py out-shapes/ckpt data/shapes
    python tests/shapes_accuracy.py out-shapes/ckpt data/shapes 100  # the first 100 held-out rows only
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import from_pretrained  # noqa: E402
from dataset import PreparedDataset  # noqa: E402
from processor import Processor  # noqa: E402

ckpt = sys.argv[1] if len(sys.argv) > 1 else "out-shapes/ckpt"
data = sys.argv[2] if len(sys.argv) > 2 else "data/shapes"
model = from_pretrained(ckpt, dtype=torch.float32).eval()
proc = Processor.from_pretrained(ckpt)
ds = PreparedDataset(data, "val")
n = min(int(sys.argv[3]), len(ds)) if len(sys.argv) > 3 else len(ds)
t0, right, wrong = time.time(), 0, []
for start in range(0, n, 32):
    rows = [ds[i] for i in range(start, min(start + 32, n))]
    prompts = [proc.apply_chat_template(r["messages"][:-1], add_generation_prompt=True) for r in rows]
    batch = proc(prompts, images=[im for r in rows for im in r["images"]], padding_side="left")
    out = model.generate(batch["input_ids"], 24, temperature=0, pixel_values=batch["pixel_values"],
                         image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                         stop_ids=proc.stop_ids)
    T = batch["input_ids"].shape[1]
    for r, ids in zip(rows, out[:, T:].tolist()):
        got, want = proc.decode(ids).strip(), r["messages"][-1]["content"].strip()
        right += got == want
        if got != want:
            wrong.append((want, got))
print(f"{right}/{n} = {100 * right / n:.1f}% exact held-out captions ({time.time() - t0:.1f} s)")
for want, got in wrong[:5]:
    print(f"  want {want!r}\n  got  {got!r}")
