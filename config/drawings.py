# The demo that captions people's own drawings, second of its two runs: the graft of config/drawings_shape.py, which
# learned shape and size first, goes on to the full captions of shapes varied as people draw them.
#   python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py config/drawings.py && python sample.py --image=data/drawings/example.png --prompt="Describe this image." --temperature=0
# Expect held-out loss 0.009-0.025 at iter 1200 (0.0104 at 2 threads on an EPYC, 0.0096 on a Xeon; 0.0144, 0.0124,
# 0.0147, 0.0250, 0.0117 and 0.0129 at seeds 1 to 6); 94.3-97.3% exact on held-out drawings, 94.7-97.5% on
# tests/shapes_fresh.py, 94.2-98.5% on tests/shapes_drawn.py, 94.5-99.5% on tests/shapes_drawn2.py (nine runs). Time:
# README's "Two commands" (4.0-5.1 minutes against its 4-minute aim, eight runs on two EPYCs; fewer steps or pixels
# cost points, more buy none: README and docs/experiments.md).
# What was tried on the way, and at which settings: docs/experiments.md.
out_dir = "out-drawings"
init_from = "pretrained"
pretrained = "out-drawings-shape/ckpt"  # config/drawings_shape.py's checkpoint
dataset = "data/drawings"
max_pixels = 2304  # 48x48, data/drawings' size, where the first run's checkpoint (and data) say 32x32
stage = "stage2"  # projector and decoder...
vision_top_n = 3  # ...and the whole vision tower (config/drawings_shape.py's 3 blocks)
optimizer = "muon"  # the first run's (config/drawings_shape.py says why)
muon_lr_scale = 3.0
learning_rate = 7e-4  # the first run's (config/drawings_shape.py says why)
decoder_lr = 7e-4
vision_lr = 7e-4
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1200  # color and background come quickly once shape is there; shape goes on improving
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 1000
eval_iters = 8
log_interval = 500
num_workers = 0  # config/drawings_shape.py says why
threads = 2
device = "cpu"
dtype = "float32"
