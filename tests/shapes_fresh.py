"""Exact-match caption accuracy of a trained drawings demo on new drawings of prepare.py's own routine, from a seed no
default run uses (a script, not a test: it needs the demo's trained checkpoint). The 366 held-out rows of
data/drawings leave a run's figure about +-1.1 points of chance (one binomial standard error, at 95% right); 2000 new
ones about +-0.5, so two settings' runs compare here at half the noise. Scored as tests/shapes_drawn.py scores: each
drawing captioned as sample.py does, through the checkpoint's processor.

    python tests/shapes_fresh.py out-drawings/ckpt          # 2000 drawings
    python tests/shapes_fresh.py out-drawings/ckpt 5000 48  # how many, and prepare.py's --image_size
"""
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from prepare import SYNTHETIC, drawings  # noqa: E402
from shapes_drawn import score  # noqa: E402

SEED = 777  # prepare.py's default is 1337: these drawings are none of its rows

if __name__ == "__main__":
    ckpt = sys.argv[1] if len(sys.argv) > 1 else "out-drawings/ckpt"
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    size = int(sys.argv[3]) if len(sys.argv) > 3 else SYNTHETIC["drawings"]["image_size"]
    rows = drawings(range(n), SEED, "Describe this image.", size)

    def draw(_):
        _, messages, (im,) = next(rows)
        f = io.BytesIO()
        im.save(f, format="PNG")  # lossless: a drawing saved as JPEG by drawings() keeps its artefacts
        return f.getvalue(), messages[-1]["content"]
    score(draw, ckpt, n, SEED, f"new drawings of prepare.py's routine (seed {SEED})")
