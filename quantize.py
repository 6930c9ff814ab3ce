"""
Int8 weight-only quantization of the decoder's linear layers, in the manner of gpt-fast's quantize.py: each output
channel of a weight gets its own scale (its largest |w| / 127), the weight is stored as int8, and the matmul
dequantizes it on the fly (model.Int8Linear). Batch-1 decode reads every weight once per token, so its speed follows
the bytes.

    python quantize.py --init_from=out-shapes --out_dir=out-shapes-int8     # a checkpoint dir, out_dir or hub id
    python sample.py --init_from=out-shapes-int8 --image=shape.png          # loads like any checkpoint
    python sample.py --init_from=out-shapes --quantize=int8 --image=shape.png   # quantized at load, for one run

Quantized: q/k/v/o_proj, gate/up/down_proj of every decoder layer, and lm_head. Kept as they are: the embeddings,
the norms, the vision tower and the projector (small, and run once per image), and a head tied to the embeddings
(quantizing it would add an int8 copy beside the float table the embedding lookup still needs).
The checkpoint is the artemis-vlm layout with `<linear>.weight` in int8 and `<linear>.scales` beside it, and a
"quantization" entry in config.json, from which checkpoint.from_pretrained builds these modules before its strict
load, one tensor at a time. transformers cannot load it; train.py refuses it (int8 weights take no gradients), but
trains LoRA adapters over its int8 decoder with lora_base = "int8".
"""

import torch

from checkpoint import check_new_dir, copy_side_files, from_pretrained, int8_targets, nbytes, resolve, save_pretrained
from configurator import configure, die
from model import Int8Linear

# -----------------------------------------------------------------------------
init_from = ""  # an artemis checkpoint dir, a training out_dir (checkpoint in <out_dir>/ckpt) or a hub repo id
out_dir = ""  # where the int8 checkpoint goes; written next to it as <out_dir>.tmp and renamed when complete
# -----------------------------------------------------------------------------


@torch.no_grad()
def int8_linear(linear):
    """The Int8Linear of a float nn.Linear, rounded in fp32 a block of rows at a time (a 131072-row head in fp32
    would be another 2.7 GB at the A3 shape). Works on the meta device: shapes and dtypes only."""
    w = linear.weight
    q = Int8Linear(w.shape[1], w.shape[0], w.dtype, w.device)
    for i in range(0, w.shape[0], 4096):
        rows = w[i:i + 4096].float()
        scales = (rows.abs().amax(1) / 127).clamp(min=1e-12)  # an all-zero row keeps a usable scale
        q.weight[i:i + 4096] = (rows / scales[:, None]).round().clamp(-127, 127)
        q.scales[i:i + 4096] = scales
    return q


def quantize_int8(model):
    """Replace the decoder's nn.Linear modules (a tied head excepted) by Int8Linear in place and mark the config, so
    save_pretrained writes an int8 checkpoint. Modules already in int8 are left alone. Returns the model."""
    for parent, name, linear in int8_targets(model):
        setattr(parent, name, int8_linear(linear))
    model.config.quantization = "int8"
    return model


def main():
    if not init_from or not out_dir:
        die("expected --init_from=<checkpoint dir, training out_dir or hub id> and --out_dir=<new dir>")
    try:
        src = resolve(init_from)
    except (ValueError, FileNotFoundError) as e:
        die(f"--init_from: {e}")
    try:  # before the weights load
        check_new_dir(out_dir, init_from, src)
    except ValueError as e:
        die(str(e))
    try:
        model = from_pretrained(src)  # in its own dtype: the scales keep it
    except (ValueError, FileNotFoundError) as e:
        die(f"--init_from: {e}")
    if model.config.quantization:
        die(f"--init_from={init_from}: is already quantized ({model.config.quantization})")
    before = nbytes(model.state_dict().values())
    quantize_int8(model)
    after = nbytes(model.state_dict().values())
    save_pretrained(model, out_dir, write_extra=lambda tmp: copy_side_files(src, tmp))
    print(f"{src} -> {out_dir}: {before / 1e9:.3f} GB -> {after / 1e9:.3f} GB of weights (int8 decoder linears)")


if __name__ == "__main__":
    configure(globals())
    main()
