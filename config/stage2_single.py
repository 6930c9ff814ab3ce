# Stage-2 on one device, as the seeds' trainer runs it (Merlina's vlm_stage2 on a 128 GB GB10): config/stage2.py's
# recipe (data, rehearsal, learning rates, global batch 64), the decoder fully fine-tuned in bf16 with an 8-bit AdamW.
#   pip install torchao   # the 8-bit AdamW and the stochastic rounding; pure PyTorch
#   (the four prepare.py commands of config/stage2.py)
#   python train.py config/stage2_single.py
# Memory to expect (python bench.py --only=memory --preset=a3; README, Hardware notes): the 12.28B trainable
# parameters (decoder and projector) at the 6.03 bytes each measured at bench.py's small preset (bf16 weights 2, bf16
# gradients 2, 8-bit moments 2.03; fp32 AdamW: 16, 197 GB) are 74 GB; with the frozen bf16 tower, weights 25.2 GB,
# gradients 24.6 GB, optimizer state 25.0 GB. Beside them the checkpointed activations of one 1,000-token row,
# 2.1 GB, or, after the backward, the optimizer step's temporaries for its largest tensor, the 671M-parameter
# embedding (8.03 bytes a value, measured on a CPU): 5.4 GB. Peak about 80 GB, 48 GB under the GB10's 128 GB (which the host
# shares) and 61 GB under an H200's 141 GB. Without checkpointing: 85.2 GB at batch 1, 94.1 GB at batch 2.
out_dir = "out-stage2-single"
init_from = "pretrained"
pretrained = "schneewolflabs/A3"
dataset = "data/llava:6,data/a2-tools:1,data/a2-identity:1,data/a2-reasoning:1"
length_window = 16
stage = "stage2"
train_on = "all"
learning_rate = 2e-5  # projector
decoder_lr = 1e-5  # 1/400 of bf16's spacing below 1: stochastic rounding is what lets such steps add up
warmup_frac = 0.03
min_lr_frac = 0.0
max_iters = 0
batch_size = 1
gradient_accumulation_steps = 64  # global batch 64, as config/stage2.py's 8 GPUs
gradient_checkpointing = True
optimizer = "adamw8bit"  # torchao's: moments in 8 bits, 2 bytes a parameter for both
master_weights = "bf16"  # weights and gradients in bf16, each update rounded stochastically
dtype = "bfloat16"
eval_interval = 500
eval_iters = 100
eval_samples = 4
log_interval = 10
