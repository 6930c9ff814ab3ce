# Stage-2 instruction tuning from A3 on one GPU: config/stage2.py's data and schedule, but the decoder frozen in bf16
# with LoRA adapters on all its linears (r 128, alpha 256, adapters at 2e-4 and projector at 2e-5: LLaVA-1.5's
# finetune_lora.sh), where the full fine-tune shards 197 GB of weights and AdamW state over 8 GPUs.
#   (the four prepare.py commands at the top of config/stage2.py)
#   python train.py config/stage2_lora.py
#   python lora.py --init_from=out-stage2-lora --out_dir=out-stage2-merged   # a plain artemis-vlm checkpoint
# Expect the per-source held-out losses of config/stage2.py's runs to move the same way (llava's falling below A3's
# caption loss within the first few hundred steps, the three A2 sources staying near where they start), and
# checkpoints of about 2 GB (456M adapter parameters and the 37M-parameter projector in fp32), not 25 GB.
# Memory to expect (python bench.py --only=memory --preset=a3; README, Hardware notes), per GPU at this batch of 2
# rows of 1,000 tokens with checkpointing: 35.2 GB, one 80 GB card with 45 GB to spare: the bf16 base and the fp32
# adapters 27.1 GB, the adapters' and projector's gradients 2.0 GB and AdamW state 3.9 GB, activations 2.2 GB.
# Without checkpointing 67.6 GB.
out_dir = "out-stage2-lora"
init_from = "pretrained"
pretrained = "schneewolflabs/A3"
dataset = "data/llava:6,data/a2-tools:1,data/a2-identity:1,data/a2-reasoning:1"
length_window = 16
stage = "stage2"
train_on = "all"
lora_rank = 128
lora_alpha = 256
lora_dropout = 0.05
learning_rate = 2e-5  # projector
decoder_lr = 2e-4  # the adapters
warmup_frac = 0.03
min_lr_frac = 0.0
max_iters = 0
batch_size = 2
gradient_accumulation_steps = 32  # global batch 64, as config/stage2.py
gradient_checkpointing = True
eval_interval = 500
eval_iters = 100
eval_samples = 4
log_interval = 10
dtype = "bfloat16"
