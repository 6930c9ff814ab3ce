# Stage-2 multimodal instruction tuning from A3: projector + full decoder, vision tower frozen, with text rehearsal.
#   python prepare.py --dataset=llava --src=llava_v1_5_mix665k.json --image_root=images --tokenizer=schneewolflabs/A3 --out_dir=data/llava
#   torchrun --standalone --nproc_per_node=8 train.py config/stage2.py
# Expect the held-out loss to fall below A3's caption loss on the instruction mix within the first few hundred
# steps; a 12B decoder with fp32 AdamW state needs ~200 GB, so shard it (fsdp = True) over 8 x 80 GB GPUs.
out_dir = "out-stage2"
init_from = "pretrained"
pretrained = "schneewolflabs/A3"
dataset = "data/llava"
stage = "stage2"
train_on = "all"  # every answer of a multi-turn LLaVA conversation is a target ("last": only the final one)
learning_rate = 2e-5  # projector: already aligned, so no longer the 1e-3 of Stage-1
decoder_lr = 1e-5
warmup_frac = 0.03
min_lr_frac = 0.0
max_iters = 0  # one epoch
batch_size = 1
gradient_accumulation_steps = 64  # global batch 64, whatever the number of GPUs
gradient_checkpointing = True
fsdp = True
eval_interval = 500
eval_iters = 100
log_interval = 10
dtype = "bfloat16"
