# The demo that captions people's own drawings, second of its two runs: the graft of config/drawings_shape.py, which
# learned shape and size first, goes on to the full captions of shapes varied as people draw them.
#   python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py config/drawings.py && python sample.py --image=data/drawings/example.png --prompt="Describe this image." --temperature=0
# Expect held-out loss 0.008-0.02 at iter 1200 (0.0194 at 2 threads; 0.0109, 0.0166, 0.0080, 0.0187, 0.0137 and 0.0138
# at seeds 1 to 6); 94.3-97.8% exact on held-out drawings, 95.1-96.8% on tests/shapes_fresh.py, 96.0-98.8% on
# tests/shapes_drawn.py, 94.8-97.8% on tests/shapes_drawn2.py (seven runs). Time: README's "Two commands" (over its
# 4-minute aim; 2400 + 1600 iters bought no more on shapes_fresh.py at one seed: README and docs/experiments.md).
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
