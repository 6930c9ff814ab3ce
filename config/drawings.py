# The demo that captions people's own drawings, second of its two runs: the graft of config/drawings_shape.py, which
# learned shape and size first, goes on to the full captions of shapes varied as a paint program draws them.
#   python prepare.py --dataset=drawings --captions=shape && python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py config/drawings.py && python sample.py --init_from=out-drawings --image=data/drawings/example.png --temperature=0
# Expect 232-238 s for both train.py runs on a quiet 2-core machine (three runs; this one 95-97 s), held-out loss
# 0.0126 at iter 1600; 97.3% exact on held-out drawings (547/562), 95.5% on tests/shapes_drawn.py (382/400).
# What was tried on the way, and at which settings: docs/experiments.md.
out_dir = "out-drawings"
init_from = "pretrained"
pretrained = "out-drawings-shape/ckpt"  # config/drawings_shape.py's checkpoint
dataset = "data/drawings"
stage = "stage2"  # projector and decoder...
vision_top_n = 2  # ...and the whole vision tower
learning_rate = 7e-4  # the first run's (config/drawings_shape.py says why)
decoder_lr = 7e-4
vision_lr = 7e-4
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1600  # color and background come quickly once shape is there
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 1000
eval_iters = 8
log_interval = 500
num_workers = 1  # one core prepares batches...
threads = 1  # ...the other steps
device = "cpu"
dtype = "float32"
