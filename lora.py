"""
LoRA on the decoder's linear layers (Hu et al. 2021, as PEFT's LoraConfig defines it), for Stage 2 on one GPU, and
its merge command. A wrapped layer computes `W x + (lora_alpha / r) * B A x`: W frozen, A (r, in) initialised as
nn.Linear is, B (out, r) at zero, so an untrained adapter is the base model. The frozen W may be quantize.py's int8
(`lora_base = "int8"` in train.py, QLoRA-style), whose backward dequantizes again rather than keep a float copy.

    python train.py config/stage2_lora.py                                    # the adapters, on one GPU
    python lora.py --init_from=out-stage2-lora --out_dir=out-stage2-merged   # W + (alpha / r) B A: a plain checkpoint

Module names are PEFT's (`q_proj.base_layer`, `q_proj.lora_A`, `q_proj.lora_B`), so the trainable tensors' names are
the keys PEFT writes for artemis-vlm's model class. checkpoint.py reads and writes the files (adapter_config.json,
adapter_model.safetensors) and merges an adapter into its base as it loads one, so sample.py, serve.py and quantize.py
load a LoRA run's out_dir as they load any checkpoint; this file's command line writes that merge to disk.
A file of its own, as quantize.py is: one way of changing the decoder's linears, with the one conversion it needs.
"""

import torch
import torch.nn as nn

from checkpoint import (ADAPTER_CONFIG, check_new_dir, copy_side_files, from_pretrained, nbytes, read_adapter_config,
                        resolve, save_pretrained)
from configurator import configure, die
from model import Int8Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # PEFT's target_modules

# -----------------------------------------------------------------------------
init_from = ""  # a LoRA run's out_dir or checkpoint dir (adapter_config.json + adapter_model.safetensors)
out_dir = ""  # the merged artemis-vlm checkpoint; written next to it as <out_dir>.tmp and renamed when complete
# -----------------------------------------------------------------------------


class FrozenInt8(torch.autograd.Function):
    """An Int8Linear's output with a gradient for its input only. Autograd through `F.linear(x, w.to(x.dtype))`
    would keep every layer's float copy of its weight until the backward pass (the float decoder again), and aten's
    CPU int8 matmul has no backward at all."""

    @staticmethod
    def forward(ctx, x, linear):
        ctx.linear, ctx.x_dtype = linear, x.dtype
        return linear(x)

    @staticmethod
    def backward(ctx, g):  # g (..., out) -> (..., in): x's gradient through w * scales
        w, s = ctx.linear.weight, ctx.linear.scales
        return ((g * s.to(g.dtype)) @ w.to(g.dtype)).to(ctx.x_dtype), None


class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout):
        super().__init__()
        w = base.weight  # (out, in)
        self.base_layer = base.requires_grad_(False)
        self.lora_A = nn.Linear(w.shape[1], r, bias=False, device=w.device)  # kaiming-uniform, as PEFT's default
        self.lora_B = nn.Linear(r, w.shape[0], bias=False, device=w.device)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        frozen = FrozenInt8.apply(x, self.base_layer) if isinstance(self.base_layer, Int8Linear) else self.base_layer(x)
        x = self.lora_dropout(x.to(self.lora_A.weight.dtype))  # fp32 adapters on a bf16 base outside autocast
        return frozen + (self.lora_B(self.lora_A(x)) * self.scaling).to(frozen.dtype)


def apply_lora(model, r, alpha, dropout=0.0, targets=TARGETS):
    """Freeze the decoder and wrap the `targets` linears of each decoder layer (nn.Linear, or Int8Linear after
    quantize_int8) in a LoRALinear with fp32 adapters on the weight's device. Returns the model."""
    model.language_model.requires_grad_(False)
    for layer in model.language_model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in targets:
                if hasattr(parent, name):
                    setattr(parent, name, LoRALinear(getattr(parent, name), r, alpha, dropout))
    return model


def main():
    if not init_from or not out_dir:
        die("expected --init_from=<a LoRA run's out_dir or checkpoint> and --out_dir=<new dir>")
    try:
        src = resolve(init_from)
        adapter = read_adapter_config(src)
        if adapter is None:
            die(f"--init_from={init_from}: {src} has no {ADAPTER_CONFIG}, expected a LoRA run's checkpoint")
    except (ValueError, FileNotFoundError) as e:
        die(f"--init_from: {e}")
    try:  # before the base loads
        check_new_dir(out_dir, init_from, src)
    except ValueError as e:
        die(str(e))
    try:
        model = from_pretrained(src)  # the base in its own dtype, each adapted weight plus (alpha / r) B A
    except (ValueError, FileNotFoundError) as e:
        die(f"--init_from: {e}")
    save_pretrained(model, out_dir, write_extra=lambda tmp: copy_side_files(src, tmp))
    print(f"{src} + {adapter['base_model_name_or_path']} -> {out_dir}: r={adapter['r']} adapters merged, "
          f"{nbytes(model.state_dict().values()) / 1e9:.3f} GB of weights")


if __name__ == "__main__":
    configure(globals())
    main()
