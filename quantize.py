"""
Int8 weight-only quantization of the decoder's linear layers, in the manner of gpt-fast's quantize.py: each output
channel of a weight gets its own scale (its largest |w| / 127), the weight is stored as int8, and the matmul
dequantizes it on the fly. Batch-1 decode reads every weight once per token, so its speed follows the bytes.

    python quantize.py --init_from=out-shapes --out_dir=out-shapes-int8     # a checkpoint dir, out_dir or hub id
    python sample.py --init_from=out-shapes-int8 --image=shape.png          # loads like any checkpoint
    python sample.py --init_from=out-shapes --quantize=int8 --image=shape.png   # quantized at load, for one run

Quantized: q/k/v/o_proj, gate/up/down_proj of every decoder layer, and lm_head. Kept as they are: the embeddings,
the norms, the vision tower and the projector (small, and run once per image), and a head tied to the embeddings
(quantizing it would add an int8 copy beside the float table the embedding lookup still needs).
The checkpoint is the artemis-vlm layout with `<linear>.weight` in int8 and `<linear>.scales` beside it, and a
"quantization" entry in config.json, from which ArtemisVLM builds these modules: loading stays a strict load, one
tensor at a time. transformers cannot load it; train.py refuses it (int8 weights take no gradients).
"""
import os
import shutil
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
init_from = ""  # an artemis checkpoint dir, a training out_dir (checkpoint in <out_dir>/ckpt) or a hub repo id
out_dir = ""  # where the int8 checkpoint goes; written next to it as <out_dir>.tmp and renamed when complete
# -----------------------------------------------------------------------------


class Int8Linear(nn.Module):
    """nn.Linear without bias whose weight is int8 (out, in) with one scale per output row: y = (x @ w.T) * scales."""

    def __init__(self, in_features, out_features, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x):
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            # one row (batch-1 decode) as a multiply and a sum: inductor reads the int8 weight once in a fused
            # reduction, where F.linear would first write a float copy of the whole weight
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales  # (..., out)
        if x.device.type == "cpu" and x.dtype == torch.float32:  # aten's int8 matmul: 5x less time than dequantizing
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.scales)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


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
    lm, tied = model.language_model, model.config.text.tie_word_embeddings
    for module in list(lm.modules()):
        for child, linear in list(module.named_children()):
            if isinstance(linear, nn.Linear) and not (tied and linear is lm.lm_head):
                setattr(module, child, int8_linear(linear))
    model.config.quantization = "int8"
    return model


def main():
    from model import ArtemisVLM, resolve  # here: model.py imports this file to build an int8 checkpoint's modules

    def die(msg):
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)

    if not init_from or not out_dir:
        die("expected --init_from=<checkpoint dir, training out_dir or hub id> and --out_dir=<new dir>")
    src = init_from
    if os.path.isdir(os.path.join(src, "ckpt")) and not os.path.exists(os.path.join(src, "config.json")):
        src = os.path.join(src, "ckpt")  # a training out_dir
    try:
        src = resolve(src)
        if os.path.realpath(src) == os.path.realpath(out_dir):
            die(f"--out_dir={out_dir}: is the checkpoint being quantized; give a new directory")
        model = ArtemisVLM.from_pretrained(src)  # in its own dtype: the scales keep it
    except (ValueError, FileNotFoundError) as e:
        die(f"--init_from: {e}")
    if model.config.quantization:
        die(f"--init_from={init_from}: is already quantized ({model.config.quantization})")
    before = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    quantize_int8(model)
    after = sum(t.numel() * t.element_size() for t in model.state_dict().values())

    def copy_files(tmp):  # tokenizer, chat template, preprocessor: all but the weights, config and resume state
        for name in os.listdir(src):
            if name == "config.json" or name.startswith("model") and ".safetensors" in name or name.endswith(".pt"):
                continue
            (shutil.copytree if os.path.isdir(os.path.join(src, name)) else shutil.copy)(
                os.path.join(src, name), os.path.join(tmp, name))

    model.save_pretrained(out_dir, write_extra=copy_files)
    print(f"{src} -> {out_dir}: {before / 1e9:.3f} GB -> {after / 1e9:.3f} GB of weights (int8 decoder linears)")


if __name__ == "__main__":
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    main()
