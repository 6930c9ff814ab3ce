# The CPU demo: a tiny graft, vision tower included, learns to caption synthetic shapes from scratch.
#   python prepare.py --dataset=shapes && python train.py config/shapes.py && python sample.py --image=data/shapes/example.png --prompt="Describe this image." --temperature=0
# Expect, on a quiet 2-core machine: 116-120 s for all of train.py (three runs; 3000 iters at 35-39 ms), held-out
# loss 0.0068 at iter 3000 (the run is deterministic) and 98.7% of held-out images captioned exactly right
# (python tests/shapes_accuracy.py: 382/387). It memorises its own renders: drawings made by another routine
# (python tests/shapes_drawn.py) get 19.2%: config/drawings_shape.py, then config/drawings.py, is the demo that
# captions those. What was tried on the way, and at which settings: docs/experiments.md.
out_dir = "out-shapes"
init_from = "scratch"
dataset = "data/shapes"
stage = "stage2"  # projector and decoder...
vision_top_n = 2  # ...and the whole vision tower (its depth): nothing here is pretrained
n_layer = 2  # the decoder only spells out what the vision tower saw; 4 layers cost 1.5x the step for nothing
learning_rate = 2e-3
decoder_lr = 2e-3
vision_lr = 2e-3
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 3000
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 500
eval_iters = 8
log_interval = 250
num_workers = 1  # one core prepares batches...
threads = 1  # ...the other steps: two intra-op threads beside the loader worker oversubscribed 2 cores (2x slower)
device = "cpu"
dtype = "float32"
