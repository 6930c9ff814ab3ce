# Stage-2 multimodal instruction tuning from A3, as the seeds plan Artemis: projector + full decoder, vision tower
# frozen, with heavy text rehearsal of A2's tool-calling, identity and reasoning data so A2's abilities survive.
#   python prepare.py --dataset=llava --src=llava_v1_5_mix665k.json --image_root=images --tokenizer=schneewolflabs/A3 --out_dir=data/llava
#   python prepare.py --dataset=chat --src=a2_tools.jsonl --tokenizer=schneewolflabs/A3 --out_dir=data/a2-tools
#   python prepare.py --dataset=chat --src=a2_identity.jsonl --tokenizer=schneewolflabs/A3 --out_dir=data/a2-identity
#   python prepare.py --dataset=chat --src=a2_reasoning.jsonl --tokenizer=schneewolflabs/A3 --out_dir=data/a2-reasoning
#   torchrun --standalone --nproc_per_node=8 train.py config/stage2.py
# The text corpora are chat rows without images ({"messages": [...]}, the last message the assistant reply that
# trains, reasoning as <think>...</think> in it, tool calls as its "tool_calls"); prepare.py keeps only "messages",
# so tool schemas must be written into the system message.
# Expect each eval to print the held-out loss per source: llava's falling below A3's caption loss within the first
# few hundred steps while the three A2 sources stay near where they start (rehearsal working), and 4 held-out
# images captioned beside their reference answers. A 12B decoder with fp32 AdamW state needs ~197 GB, so it is
# sharded (fsdp = True) over 8 x 80 GB GPUs.
out_dir = "out-stage2"
init_from = "pretrained"
pretrained = "schneewolflabs/A3"
# one text row in three: the seeds say "heavy" rehearsal and give no ratio; raise the A2 weights if their held-out
# losses climb
dataset = "data/llava:6,data/a2-tools:1,data/a2-identity:1,data/a2-reasoning:1"
length_window = 16  # rows of 16 steps sorted by length before micro-batches are cut (batch_size 1: no padding)
stage = "stage2"
train_on = "all"  # every answer of a multi-turn LLaVA conversation is a target ("last": only the final one)
learning_rate = 2e-5  # projector: already aligned, so no longer the 1e-3 of Stage-1
decoder_lr = 1e-5
warmup_frac = 0.03
min_lr_frac = 0.0
max_iters = 0  # one pass over as many rows as the four sources hold
batch_size = 1
gradient_accumulation_steps = 64  # global batch 64, whatever the number of GPUs
gradient_checkpointing = True
fsdp = True
eval_interval = 500
eval_iters = 100  # per source
eval_samples = 4
log_interval = 10
dtype = "bfloat16"
