"""
Train the Artemis graft, both stages, in one loop that reads top to bottom (after nanoGPT's train.py).

    python train.py config/shapes.py                      # the CPU demo (after python prepare.py --dataset=shapes)
    python train.py config/stage1.py                      # A2 + Qwen3-VL-2B vision: projector alignment (A3 recipe)
    torchrun --standalone --nproc_per_node=8 train.py config/stage2.py   # multimodal instruction tuning
    python train.py config/stage2_single.py               # the same on one 128 GB device: bf16 weights, 8-bit AdamW
    python train.py config/stage2_lora.py                 # the same with LoRA adapters, on one GPU

stage1 trains the projector; stage2 the projector and the decoder; `vision_top_n` opens the top blocks of the vision
tower (all of it, patch embedding and merger too, when it covers every block). Only trainable parameters get optimizer
state: AdamW's, torchao's 8-bit AdamW's, or Muon's for the hidden matrices and the patch filters (muon.py: the CPU
demo's, which learns in half AdamW's steps). `lora_rank` trains LoRA adapters (lora.py) on the frozen decoder instead,
in bf16 on CUDA or in int8 (`lora_base = "int8"`). Checkpoints land in `out_dir/ckpt` in the artemis-vlm layout
(sample.py, artemis-vlm and transformers load them), or a LoRA run's as a PEFT adapter naming its base, with the
tokenizer and `train_state.pt`, the resume state: optimizer, step, RNG. Under fsdp each process writes its shards of the
trainable weights and optimizer state (torch.distributed.checkpoint) beside them. The data order is a fixed function of
seed and step, so the step is the data position. `dataset` may mix prepared datasets by weight
("data/llava:3,data/a2-text:1": Stage 2 with text rehearsal); eval reports each source's held-out loss and captions a
few held-out images. Micro-batches are cut from rows of similar length, so they pad little.
"""
import itertools
import json
import logging
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from checkpoint import (TRAIN_STATE, check_save, from_parts, from_pretrained, load_sharded, load_train_state,
                        read_adapter_config, resolve, save_sharded, save_train_state)
from configurator import configure, die
from dataset import Mixture
from lora import TARGETS, apply_lora
from model import ArtemisConfig, ArtemisVLM, TextConfig
from muon import MuonAdamW, is_hidden_matrix
from processor import Processor, has_think
from quantize import quantize_int8
from vision import VisionConfig

# a log line goes out as printed: through a pipe (`| tee`, a job scheduler) Python would hold it in a block buffer
sys.stdout.reconfigure(line_buffering=True)

# -----------------------------------------------------------------------------
# default config values: Stage-1 of A2 + Qwen3-VL-2B on BLIP3o, as config/stage1.py
out_dir = "out"
eval_interval = 500
log_interval = 10
eval_iters = 40  # held-out batches per eval and source
eval_samples = 4  # held-out images captioned greedily at each eval, beside their reference text; 0: off
eval_only = False
always_save_checkpoint = True  # else only when the held-out loss improves
init_from = "parts"  # 'parts' | 'pretrained' | 'resume' | 'scratch'
text_model = "schneewolflabs/A2"  # parts: any Mistral-family checkpoint
vision_model = "Qwen/Qwen3-VL-2B-Instruct"  # parts: its model.visual.* tensors
pretrained = "schneewolflabs/A3"  # pretrained: an artemis checkpoint
image_token_id = 22  # parts: <|image_pad|> in the decoder's vocabulary
# data
dataset = "data/blip3o"  # a directory written by prepare.py, or a weighted mixture: "data/llava:3,data/a2-text:1"
length_window = 16  # sort each window of this many steps' rows by length before cutting micro-batches; 0: off
batch_size = 2  # per process, per micro-step
gradient_accumulation_steps = 16  # global: divided between the processes
num_workers = 2  # data loader processes: decode and preprocess off the training step's critical path
train_on = "all"  # 'all': learn every assistant turn of a row; 'last': only its final one (artemis-vlm's collator)
max_pixels = 0  # the most pixels an image is resized to, saved with the checkpoint; 0: the processor's own
# model shapes, for init_from='scratch' only (the vocabulary comes from the dataset's tokenizer)
n_layer = 4
n_head = 4
n_kv_head = 2
n_embd = 128
head_dim = 32
intermediate_size = 384
vision_depth = 2
vision_hidden = 64
vision_heads = 2
vision_out = 128
# what trains
stage = "stage1"  # 'stage1': projector; 'stage2': projector + decoder
vision_top_n = 0  # open the top N vision blocks
gradient_checkpointing = False  # recompute decoder layers in the backward pass
# LoRA, stage2: adapters on the frozen decoder's linears (lora.py); the projector and opened vision blocks train in full
lora_rank = 0  # 0: off, the decoder trains in full
lora_alpha = 16  # the adapters' output is scaled by lora_alpha / lora_rank
lora_dropout = 0.05
lora_targets = ",".join(TARGETS)  # which linears of each decoder layer get adapters
lora_base = ""  # the frozen decoder: '' in the autocast dtype (bf16 on CUDA); 'int8': quantize.py's (QLoRA-style)
# the optimizer: one learning rate per part, warmup then cosine to min_lr_frac
optimizer = "adamw"  # 'adamw': torch's; 'adamw8bit': torchao's, 8-bit moments (block-wise scaled); 'muon': muon.py's
muon_lr_scale = 1.0  # optimizer='muon': Muon's matrices (and filters) step at this multiple of their part's AdamW lr
master_weights = "fp32"  # the trainable weights' dtype; 'bf16': torchao rounds each update stochastically
learning_rate = 1e-3  # projector
decoder_lr = 2e-5
vision_lr = 2e-6
max_iters = 0  # 0: one epoch of the train split
warmup_frac = 0.05
min_lr_frac = 0.0
weight_decay = 0.0
beta1 = 0.9
beta2 = 0.999
grad_clip = 1.0  # 0: off
# system
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = "bfloat16" if torch.cuda.is_available() else "float32"  # autocast dtype; float32 turns it off
compile = False
threads = 0  # CPU intra-op threads of the step; 0: torch's default, one per core (which the loader workers then share)
fsdp = False  # multi-GPU: shard decoder layers with FSDP2 instead of replicating with DDP
seed = 1337
peak_flops = 989e12  # per GPU, for MFU: H100 SXM dense bf16
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items() if not k.startswith("_") and isinstance(v, (int, float, bool, str))]
configure(globals())
config = {k: globals()[k] for k in config_keys}
# -----------------------------------------------------------------------------

if dtype not in ("float32", "bfloat16"):  # float16 would need a GradScaler; bf16 does not
    die(f"dtype={dtype!r}, expected 'float32' or 'bfloat16'")
if stage not in ("stage1", "stage2"):
    die(f"stage={stage!r}, expected 'stage1' or 'stage2'")
if train_on not in ("all", "last"):
    die(f"train_on={train_on!r}, expected 'all' or 'last'")
if optimizer not in ("adamw", "adamw8bit", "muon"):
    die(f"optimizer={optimizer!r}, expected 'adamw', 'adamw8bit' or 'muon'")
if master_weights not in ("fp32", "bf16"):
    die(f"master_weights={master_weights!r}, expected 'fp32' or 'bf16'")
# Muon orthogonalizes each full matrix whole, in fp32; LoRA's factors (B starts at zero) are not such matrices
if optimizer == "muon" and (master_weights != "fp32" or fsdp or lora_rank):
    die(f"optimizer='muon' needs master_weights='fp32', fsdp=False and lora_rank=0 (they are {master_weights!r}, "
        f"{fsdp}, {lora_rank})")
if master_weights == "bf16" and dtype != "bfloat16":  # fp32 activations would meet bf16 weights in every matmul
    die(f"master_weights='bf16' computes in bf16: set dtype='bfloat16' (it is {dtype!r})")
if optimizer == "adamw8bit" or master_weights == "bf16":  # torchao's optimizers; found out before a 12B model loads
    # on import, torchao's optional C++ kernels (these pure-PyTorch optimizers never call them) warn where they were
    # built for another Python or torch, and torch's pytree that torchao registers an Enum the old way: kept off
    # stderr, where an error is one line
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import torchao.optim  # the global `torchao`, used where the optimizer is built
    except ImportError as e:
        die(f"optimizer={optimizer!r} with master_weights={master_weights!r} needs torchao (pip install torchao): {e}")
for k in ("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval", "eval_iters"):
    if globals()[k] < 1:
        die(f"{k}={globals()[k]}, expected at least 1")
for k in ("length_window", "eval_samples", "lora_rank"):
    if globals()[k] < 0:
        die(f"{k}={globals()[k]}, expected 0 (off) or more")
targets = lora_targets.split(",")
if lora_rank and stage != "stage2":
    die(f"lora_rank={lora_rank} adapts the decoder, which trains in stage2 only; set stage='stage2'")
if lora_rank and init_from not in ("pretrained", "resume"):
    die(f"lora_rank={lora_rank} adapts an artemis checkpoint: set init_from='pretrained' (or 'resume')")
if lora_rank and fsdp:
    die(f"lora_rank={lora_rank} with fsdp=True: a LoRA run fits one GPU; with fsdp=False, torchrun adds GPUs as DDP")
if set(targets) - set(TARGETS):
    die(f"lora_targets={lora_targets!r}, expected a comma-separated subset of {','.join(TARGETS)}")
if lora_base not in ("", "int8") or lora_base and not lora_rank:
    die(f"lora_base={lora_base!r}, expected '' or 'int8' (with lora_rank set)")
ddp = int(os.environ.get("RANK", -1)) != -1  # launched by torchrun
if fsdp and not ddp:
    die("fsdp=True shards over processes: launch with torchrun --nproc_per_node=N")
if ddp:
    dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    rank, local_rank, world = dist.get_rank(), int(os.environ["LOCAL_RANK"]), dist.get_world_size()
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if gradient_accumulation_steps % world:
        die(f"gradient_accumulation_steps={gradient_accumulation_steps} must be a multiple of "
                         f"the {world} processes, so the global batch stays the same")
else:
    rank, world = 0, 1
master = rank == 0
accum = gradient_accumulation_steps // world  # micro-steps per process and optimizer step
global_batch = batch_size * gradient_accumulation_steps
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(seed)
random.seed(seed)
np.random.seed(seed)
device_type = "cuda" if device.startswith("cuda") else "cpu"
ptdtype = getattr(torch, dtype)
autocast = nullcontext() if ptdtype == torch.float32 else torch.autocast(device_type, dtype=ptdtype)
if master:
    os.makedirs(out_dir, exist_ok=True)
ckpt_dir = os.path.join(out_dir, "ckpt")
try:  # now, not at the first save after hours of training
    check_save(ckpt_dir)
except ValueError as e:
    die(f"out_dir={out_dir!r}: {e}")

# data -------------------------------------------------------------------------------------------------------------
try:  # before a 12B model loads for nothing
    train_ds, val_ds = Mixture(dataset, "train"), Mixture(dataset, "val")
except ValueError as e:
    die(f"dataset={dataset!r}: {e}")
for path, src in zip(train_ds.paths, train_ds.sources):
    if len(src) == 0:
        die(f"dataset={dataset!r}: {path} has no training rows")
    if master and not src.lengths.all():
        print(f"note: {path} was prepared before row lengths were recorded: its rows are not length-grouped")
steps_per_epoch = len(train_ds) // global_batch  # a mixture's epoch: as many rows as all its sources hold
max_iters = max_iters or steps_per_epoch
if steps_per_epoch == 0:
    die(f"{dataset} has {len(train_ds)} training rows, fewer than one global batch "
                     f"({global_batch} = batch_size x gradient_accumulation_steps)")
warmup_iters = int(warmup_frac * max_iters)

# model and processor -------------------------------------------------------------------------------------------
# Frozen weights are kept in the autocast dtype (a 12B decoder in fp32 would not fit); trainable ones in fp32 (or bf16:
# master_weights), the optimizer's master copy.
frozen_dtype = ptdtype


def init_model():
    """(model, processor, where a LoRA run's base comes from) as init_from says; a resumed run's optimizer, step and
    RNG, and a LoRA run's adapters, are restored by resume() below."""
    if init_from in ("resume", "pretrained"):
        path = resolve(ckpt_dir if init_from == "resume" else pretrained)  # a hub id is fetched once, for both loaders
        adapter = read_adapter_config(path)
        if adapter and lora_rank and init_from == "pretrained":
            raise ValueError(f"{path} is a LoRA adapter; merge it (python lora.py --init_from={pretrained} "
                             "--out_dir=...) and adapt the merged checkpoint")
        # a LoRA run resumes on its frozen base (from_pretrained would merge the adapters into it)
        base = adapter["base_model_name_or_path"] if adapter and init_from == "resume" else None
        model = from_pretrained(resolve(base) if base else path, dtype=frozen_dtype, device=device)
        processor = Processor.from_pretrained(path)
        # where PEFT finds the base: the checkpoint directory itself (inside a training out_dir), or the hub id
        return model, processor, base or (os.path.abspath(path) if os.path.exists(pretrained) else pretrained)
    elif init_from == "parts":
        path = resolve(text_model)
        model = from_parts(path, vision_model, image_token_id, dtype=frozen_dtype, device=device, seed=seed)
        processor = Processor.from_pretrained(path)  # the decoder's tokenizer and chat template
    elif init_from == "scratch":
        processor = Processor.from_pretrained(train_ds.processor_dir)
        vocab = processor.tokenizer.get_vocab_size()
        text = TextConfig(vocab_size=vocab, hidden_size=n_embd, intermediate_size=intermediate_size,
                          num_hidden_layers=n_layer, num_attention_heads=n_head, num_key_value_heads=n_kv_head,
                          head_dim=head_dim, sliding_window=None, max_position_embeddings=4096,
                          bos_token_id=None, eos_token_id=processor.stop_ids[0], pad_token_id=processor.pad_id)
        vision = VisionConfig(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_heads=vision_heads, out_hidden_size=vision_out, num_position_embeddings=64,
                              patch_size=processor.patch_size, spatial_merge_size=processor.merge_size,
                              temporal_patch_size=processor.temporal_patch_size, deepstack_visual_indexes=[])
        model = ArtemisVLM(ArtemisConfig(text, vision, processor.image_token_id)).to(device)
        # normal(0, 1/sqrt(fan_in)), zero biases, unit norms. transformers' std 0.02 is about 1/sqrt(fan_in) at widths
        # of 2500; at this demo's 64-384 it starts every matmul 2.5-6x too small and the attention near uniform, and the
        # shapes demo reached 94.6% held-out in 4500 iters where this init reaches 98.7% in 3000
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=p[0].numel() ** -0.5)
            elif "norm" not in name:
                torch.nn.init.zeros_(p)
        model.to(frozen_dtype)  # as a loaded checkpoint is: else a resumed run's frozen weights would differ
    else:
        die(f"init_from={init_from!r}, expected 'parts', 'pretrained', 'resume' or 'scratch'")
    return model, processor, None


try:
    model, processor, lora_from = init_model()
except (ValueError, FileNotFoundError) as e:  # the loaders name the file, key or argument
    die(f"init_from={init_from!r}: {e}")
if model.config.quantization:  # int8 weights take no gradients, and saving would write float over them
    die(f"init_from={init_from!r}: an {model.config.quantization} checkpoint (quantize.py) cannot be trained; "
        "train from the full-precision checkpoint it was made from")
if max_pixels:  # a run at another image size than its checkpoint's: config/drawings.py goes on at 48x48 from 32x32
    if max_pixels < processor.min_pixels:
        die(f"max_pixels={max_pixels}: expected at least the processor's min_pixels={processor.min_pixels}, or 0")
    processor.max_pixels = max_pixels
if processor.image_token_id != model.config.image_token_id:
    die(f"the tokenizer's <|image_pad|> is id {processor.image_token_id}, the model's "
                     f"image_token_id is {model.config.image_token_id}")
n_trainable, n_total = model.set_training_stage(stage, vision_top_n)
# LoRA: the decoder frozen (in int8 under lora_base='int8'), adapters on its linears, PEFT's config for the checkpoint
adapter = None
if lora_rank:
    if lora_base == "int8":
        quantize_int8(model)
    apply_lora(model, lora_rank, lora_alpha, lora_dropout, targets)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    whole = all(p.requires_grad for p in model.visual.parameters())
    opened = [f"visual.blocks.{i}" for i, b in enumerate(model.visual.blocks) if next(b.parameters()).requires_grad]
    adapter = dict(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=targets,
                   modules_to_save=["multi_modal_projector"] + (["visual"] if whole else opened),
                   base_model_name_or_path=lora_from)
trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
for p in trainable.values():  # the optimizer's master copy; a resumed run reads the saved values into it
    p.data = p.data.to(torch.bfloat16 if master_weights == "bf16" else torch.float32)
model.language_model.gradient_checkpointing = gradient_checkpointing
if master:
    print(f"{stage}: training {n_trainable / 1e6:.2f}M of {n_total / 1e6:.2f}M parameters"
          + (f" (LoRA r={lora_rank} on the {lora_base or dtype} decoder of {lora_from})" if lora_rank else ""))

# wrap for the step: the raw module stays `model`, for saving and eval; before the optimizer, since FSDP2 swaps
# the parameters for sharded ones ----------------------------------------------------------------------------------
if fsdp:
    from torch.distributed.fsdp import fully_shard  # FSDP2: parameters become DTensors sharded over the processes
    for layer in model.language_model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    # a micro-batch of text-only rows leaves the projector without a gradient on that process alone: reduce zeros
    # for it, or the processes' reduce-scatters would differ
    model.set_reduce_scatter_unused_params(True)
train_model = torch.compile(model) if compile else model
if ddp and not fsdp:  # find_unused_parameters: a micro-batch of text-only rows leaves the vision side without grads
    train_model = DDP(train_model, device_ids=[local_rank] if device_type == "cuda" else None,
                      find_unused_parameters=True, broadcast_buffers=False)  # buffers (int8 weights) never train

# optimizer: one group per part, decay on matrices only; under Muon the hidden matrices in groups of their own ---
parts = {"projector": (model.multi_modal_projector, learning_rate), "decoder": (model.language_model, decoder_lr),
         "vision": (model.visual, vision_lr)}
groups = []
for part, (module, lr) in parts.items():
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if optimizer == "muon" and is_hidden_matrix(n, p)]
    if muon:
        groups.append({"params": muon, "lr": lr * muon_lr_scale, "base_lr": lr * muon_lr_scale,
                       "weight_decay": weight_decay, "muon": True})
    for decay in (True, False):
        sel = [p for n, p in named if (p.dim() >= 2) == decay and not any(p is q for q in muon)]
        if sel:
            groups.append({"params": sel, "lr": lr, "base_lr": lr, "weight_decay": weight_decay if decay else 0.0})
if optimizer == "muon":  # the config key's string; from here on, the optimizer
    optimizer = MuonAdamW(groups, betas=(beta1, beta2))
elif optimizer == "adamw" and master_weights == "fp32":
    optimizer = torch.optim.AdamW(groups, betas=(beta1, beta2), fused=device_type == "cuda")
else:  # torchao steps in fp32 and rounds a bf16 weight stochastically: updates below its resolution still add up
    # (torch's AdamW rounds them to nearest, where they vanish); _AdamW is its plain AdamW, as its README shows
    make = torchao.optim.AdamW8bit if optimizer == "adamw8bit" else torchao.optim._AdamW
    optimizer = make(groups, betas=(beta1, beta2), bf16_stochastic_round=master_weights == "bf16")
params = [p for g in groups for p in g["params"]]

def train_batches(start_iter):
    """This process's micro-batches from optimizer step `start_iter` on. The mixture's schedule gives each step's
    gradient_accumulation_steps micro-batches as a fixed function of seed and step; process r takes the r-th
    share, so any world size sees the same micro-batches per step."""
    for micro in train_ds.schedule(start_iter, batch_size, gradient_accumulation_steps, length_window, seed):
        yield from micro[rank * accum:(rank + 1) * accum]


def own_group(worker_id):
    # Ctrl-C and `kill -TERM -<pgid>` reach every process of the group: in a group of their own the loader workers
    # live on while the main process finishes its step and saves (it ends them at exit, as usual)
    os.setpgid(0, 0)


def loader(ds, batches):
    collate = partial(processor.collate, train_on=train_on)
    # a generator of its own: each new loader draws its workers' base seed from it, never from the global RNG that
    # LoRA dropout and stochastic rounding (master_weights='bf16') draw from, and a resumed run makes its loader at
    # another step
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, collate_fn=collate,
                                       num_workers=num_workers, pin_memory=device_type == "cuda",
                                       worker_init_fn=own_group, generator=torch.Generator().manual_seed(seed))


def to_device(batch):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def forward(m, batch):
    with autocast:
        _, loss = m(batch["input_ids"], batch.get("pixel_values"), batch.get("image_grid_thw"),
                    labels=batch["labels"], attention_mask=batch["attention_mask"])
    return loss


@torch.no_grad()
def estimate_loss():
    """Mean loss over the first eval_iters batches of each source's held-out split, split between the processes:
    (the sources' losses averaged by mixture weight, {source: loss})."""
    model.eval()
    total = torch.zeros(len(val_ds.sources), 2, device=device)
    for k, (a, b) in enumerate(zip(val_ds.starts.tolist(), val_ds.starts[1:].tolist())):
        n = min(eval_iters * batch_size, b - a)
        n -= n % (world * batch_size)  # the same number of forwards on every process: FSDP's gathers are collective
        batches = [list(range(a + i, a + i + batch_size)) for i in range(rank * batch_size, n, world * batch_size)]
        for batch in loader(val_ds, batches):
            total[k] += torch.stack([forward(model, to_device(batch)).float(), torch.ones((), device=device)])
    if ddp:
        dist.all_reduce(total)
    model.train()
    losses = dict(zip(val_ds.names, (total[:, 0] / total[:, 1]).tolist()))  # nan: a source without val rows
    w = {name: wk for name, wk in zip(val_ds.names, val_ds.weights) if not math.isnan(losses[name])}
    return sum(w[name] * losses[name] for name in w) / sum(w.values()) if w else float("nan"), losses


def reply_text(message):
    c = message["content"]
    return c if isinstance(c, str) else " ".join(x["text"] for x in c if x.get("type") == "text")


# the held-out rows captioned at each eval: the first eval_samples with images, source by source (a text-only source
# is given up after 64 rows), as the A3 card compares its releases on 4 fixed held-out images
held_out = (src[i] for src in val_ds.sources for i in range(min(len(src), 64)))
samples = list(itertools.islice((r for r in held_out if r["images"]), eval_samples))


@torch.no_grad()
def eval_captions():
    """Greedy replies (150 new tokens at most, as on the card) to the samples' prompts: the messages before the
    assistant's reference reply."""
    prompts = [processor.apply_chat_template(r["messages"][:-1], add_generation_prompt=True,
                                             enable_thinking=has_think(r["messages"][-1].get("content", "")))
               for r in samples]
    batch = to_device(processor(prompts, images=[im for r in samples for im in r["images"]], padding_side="left"))
    model.eval()
    if fsdp:  # the layers gather their own shards when called; generate never calls the root's forward
        model.unshard()
    with autocast:  # no early stop under FSDP: every process must run the same number of (collective) steps
        out = model.generate(batch["input_ids"], 150, temperature=0, pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"], attention_mask=batch["attention_mask"],
                             stop_ids=None if fsdp else processor.stop_ids)
    if fsdp:
        model.reshard()
    model.clear_caches()  # the KV cache is not training state
    model.train()
    return [processor.reply(ids).strip() for ids in out[:, batch["input_ids"].shape[1]:]]


def get_lr(it):
    """Multiplier of each group's base lr: linear warmup, then cosine down to min_lr_frac at max_iters."""
    if it < warmup_iters:
        return (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, max_iters - warmup_iters))
    return min_lr_frac + (1 - min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress))


def rng_state():
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else None}


def set_rng_state(rng):
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"] is not None:
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint():
    """Weights from the raw module (never the DDP/compiled wrapper) with the resume state, swapped in at once. A LoRA
    run saves its trainable tensors only; its base stays where the adapter config says it came from."""
    global saved_at
    sd = model.state_dict()
    if lora_rank:
        sd = {k: v for k, v in sd.items() if k in trainable}
    if fsdp:  # gather the sharded DTensors one at a time (a collective); only process 0 keeps them, on CPU
        full = {}
        for k, v in sd.items():
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            if master:
                full[k] = v.cpu()
        sd = full
    # under fsdp every process writes its own shards of the trainable weights and optimizer state (collective)
    sharded = save_sharded(ckpt_dir, model, optimizer) if fsdp else None
    rngs = [rng_state()]
    if ddp:  # each process's own: LoRA dropout draws a different mask on each
        mine, rngs = rngs[0], [None] * world
        dist.all_gather_object(rngs, mine)
    saved_at = iter_num
    if master:
        save_train_state(ckpt_dir, model, processor, state_dict=sd, adapter=adapter, sharded=sharded, state={
            "iter_num": iter_num, "best_val_loss": best_val_loss, "config": config, "rng": rngs,
            "optimizer": None if fsdp else optimizer.state_dict()})
        print(f"saved checkpoint to {ckpt_dir} at iter {iter_num}")


def resume():
    """What save_checkpoint wrote, restored: the trainable master weights, optimizer, RNG; returns (iter_num,
    best_val_loss). The data order and the lr schedule are functions of the step and the config keys checked here."""
    try:  # under fsdp the weights come sharded, below (`trainable` holds the tensors from before sharding)
        state, exact = load_train_state(ckpt_dir, {} if fsdp else trainable, device)
    except (ValueError, FileNotFoundError) as e:
        die(f"init_from='resume': {e}")
    was = {"lora_rank": 0, "optimizer": "adamw", "master_weights": "fp32", "muon_lr_scale": 1.0,  # runs before the keys
           **state["config"]}
    keys = ["dataset", "seed", "batch_size", "gradient_accumulation_steps", "max_iters", "stage", "warmup_frac",
            "vision_top_n", "length_window", "lora_rank", "optimizer", "master_weights", "muon_lr_scale"]
    keys += ["lora_alpha", "lora_targets", "lora_base"] if lora_rank else []
    changed = [k for k in keys if was.get(k) != config[k]]
    if changed:
        die(f"resume with other {', '.join(changed)} than the run in {ckpt_dir} "
            f"(it had {', '.join(f'{k}={was.get(k)!r}' for k in changed)})")
    if state["optimizer"] is None:  # an fsdp run's: weights and optimizer state in shards, read at any world size
        try:
            load_sharded(ckpt_dir, model, optimizer)
        except (ValueError, FileNotFoundError) as e:
            die(f"init_from='resume': {e} (an fsdp run before sharded resume saved none: start from its weights "
                f"with --init_from=pretrained --pretrained={ckpt_dir})")
    elif fsdp:
        die(f"{ckpt_dir} was written without fsdp, its optimizer state whole in one file: resume it with fsdp=False")
    else:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(exact[n])  # the saved master weights (read in fp32), not their rounding to frozen_dtype
        try:  # e.g. a Muon run from before the patch embedding moved into its Muon group
            optimizer.load_state_dict(state["optimizer"])
        except ValueError as e:
            die(f"init_from='resume': {os.path.join(ckpt_dir, TRAIN_STATE)}: its optimizer state does not fit this "
                f"train.py's parameter groups ({e}); start from its weights with --init_from=pretrained "
                f"--pretrained={ckpt_dir}")
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]  # one per process since sharded resume
    set_rng_state(rngs[rank] if len(rngs) == world else rngs[0])
    return state["iter_num"], state["best_val_loss"]


saved_at = None
iter_num, best_val_loss = resume() if init_from == "resume" else (0, float("inf"))

stop_requested = False


def request_stop(signum, frame):
    global stop_requested
    stop_requested = True  # finish the step in flight, save, exit


signal.signal(signal.SIGINT, request_stop)
signal.signal(signal.SIGTERM, request_stop)


def trim_metrics(path, upto):
    """Resuming at step `upto`: the rows of the steps it goes through again (eval rows of step upto included) leave
    metrics.jsonl, and so does a last line a kill cut short, swapped in at once."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        *lines, _ = f.read().split("\n")  # what follows the last newline was cut short
    keep = []
    for line in lines:
        try:
            if json.loads(line)["iter"] < upto:
                keep.append(line + "\n")
        except (ValueError, KeyError, TypeError):
            pass
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(keep)
    os.replace(path + ".tmp", path)


if master and init_from == "resume":
    trim_metrics(os.path.join(out_dir, "metrics.jsonl"), iter_num)
metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a") if master else None


def log(**row):
    metrics.write(json.dumps(row) + "\n")
    metrics.flush()


# training loop -----------------------------------------------------------------------------------------------------
batches = iter(loader(train_ds, train_batches(iter_num)))
batch = next(batches)
t0, last_log = time.time(), iter_num
while True:
    if ddp:  # a signal reaches each process at its own moment: all stop at the same step or none does
        flag = torch.tensor(float(stop_requested), device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop_requested = bool(flag.item())
    lr_mult = get_lr(iter_num)
    for g in optimizer.param_groups:
        if torch.is_tensor(g["lr"]):  # torchao's: a tensor, filled in place, so a new value does not recompile
            g["lr"].fill_(g["base_lr"] * lr_mult)
        else:
            g["lr"] = g["base_lr"] * lr_mult

    if iter_num % eval_interval == 0 or iter_num == max_iters:
        val_loss, val_losses = estimate_loss()
        replies = eval_captions() if samples and (master or fsdp) else []  # FSDP: every process in each forward
        if master:
            print(f"iter {iter_num}: val loss {val_loss:.4f}" + (
                f" ({', '.join(f'{k} {v:.4f}' for k, v in val_losses.items())})" if len(val_losses) > 1 else ""))
            captions = [{"reference": reply_text(r["messages"][-1]), "caption": c} for r, c in zip(samples, replies)]
            for i, c in enumerate(captions):
                print(f"  held-out {i} reference: {c['reference']!r}\n  held-out {i} caption:   {c['caption']!r}")
            log(iter=iter_num, val_loss=val_loss, val_losses=val_losses, captions=captions)
        if iter_num > 0 and (val_loss < best_val_loss or always_save_checkpoint):
            best_val_loss = min(best_val_loss, val_loss)
            save_checkpoint()
    if stop_requested and saved_at != iter_num:
        save_checkpoint()
    if eval_only or iter_num >= max_iters or stop_requested:
        break

    losses, n_tokens, n_samples, flops = torch.zeros((), device=device), 0, 0, 0
    for micro in range(accum):
        if ddp and not fsdp:  # all-reduce gradients on the last micro-step only
            train_model.require_backward_grad_sync = micro == accum - 1
        n_tokens += int(batch["attention_mask"].sum())  # counted on the CPU: no device sync
        n_samples, T = n_samples + batch["input_ids"].shape[0], batch["input_ids"].shape[1]
        flops += model.flops(batch["input_ids"].numel(), T, int((batch["labels"][:, 1:] != -100).sum()),
                             batch.get("image_grid_thw"))  # what runs: the head on labelled tokens alone
        loss = forward(train_model, to_device(batch)) / accum
        batch = next(batches)  # the loader workers prepared it while the GPU worked
        loss.backward()
        losses += loss.detach()
    for p in params:
        if p.grad is None:  # a step of text-only rows: the vision side steps on its momentum, as under FSDP,
            p.grad = torch.zeros_like(p)  # whose reduce-scatter of unused parameters gives it zeros
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    if iter_num % log_interval == 0:
        if ddp:
            dist.all_reduce(losses)
            losses /= world
        loss_val = losses.item()  # a sync point: only on log steps
        dt = time.time() - t0
        n, t0, last_log = iter_num + 1 - last_log, time.time(), iter_num + 1  # steps since the last log line
        tok_s = n_tokens * world * n / dt
        mfu = None if device_type != "cuda" else flops * n / dt / peak_flops  # this process's share, per GPU
        if master:
            print(f"iter {iter_num}: loss {loss_val:.4f}, lr {lr_mult * learning_rate:.2e}, "
                  f"{dt * 1000 / n:.0f} ms/iter, {n_samples * world * n / dt:.1f} samples/s, {tok_s:.0f} tok/s"
                  + (f", mfu {mfu * 100:.1f}%" if mfu is not None else ""))
            log(iter=iter_num, loss=loss_val, lr=lr_mult * learning_rate, ms=dt * 1000 / n, tok_s=tok_s, mfu=mfu)
    iter_num += 1

if ddp:
    dist.barrier()  # process 0 may still be writing the checkpoint: tearing gloo down under it aborts the others
    dist.destroy_process_group()
