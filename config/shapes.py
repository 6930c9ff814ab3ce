# The CPU demo: a tiny graft, vision tower included, learns to caption synthetic shapes from scratch.
#   python prepare.py --dataset=shapes && python train.py config/shapes.py && python sample.py --image=data/shapes/example.png --prompt="Describe this image."
# Expect about 4 minutes on 2 CPU cores, held-out loss 0.0085 at iter 4500, and 97% of held-out images captioned
# exactly right (python tests/shapes_accuracy.py: 376/387).
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
max_iters = 4500
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 500
eval_iters = 8
log_interval = 250
num_workers = 1
device = "cpu"
dtype = "float32"
