# The CPU demo: a tiny graft, vision tower included, learns to caption synthetic shapes from scratch.
#   python prepare.py --dataset=shapes && python train.py config/shapes.py && python sample.py
# Expect about 5 minutes on 2 CPU cores, a held-out loss near 0.01, and exact captions of held-out images.
out_dir = "out-shapes"
init_from = "scratch"
dataset = "data/shapes"
stage = "stage2"  # projector and decoder...
vision_top_n = 2  # ...and the whole vision tower (its depth): nothing here is pretrained
learning_rate = 2e-3
decoder_lr = 2e-3
vision_lr = 2e-3
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 500
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 100
eval_iters = 8
log_interval = 25
num_workers = 1
device = "cpu"
dtype = "float32"
