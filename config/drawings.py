# The demo that captions people's own drawings, second of its two runs: the graft of config/drawings_shape.py, which
# learned shape and size first, goes on to the full captions of shapes varied as a paint program draws them.
#   python prepare.py --dataset=drawings --captions=shape && python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py config/drawings.py && python sample.py --init_from=out-drawings --image=data/drawings/example.png --temperature=0
# 232-238 s for both train.py runs on a quiet 2-core machine (three runs; this one 95-97 s), held-out loss 0.0126 at
# iter 1600; 97.3% exact on held-out drawings (547/562), 95.5% on tests/shapes_drawn.py (382/400).
out_dir = "out-drawings"
init_from = "pretrained"
pretrained = "out-drawings-shape/ckpt"  # config/drawings_shape.py's checkpoint
dataset = "data/drawings"
stage = "stage2"  # projector and decoder...
vision_top_n = 2  # ...and the whole vision tower
learning_rate = 7e-4
decoder_lr = 7e-4
vision_lr = 7e-4
batch_size = 16
gradient_accumulation_steps = 1
max_iters = 1600  # color and background come quickly once shape is there
# Tried at 4000 iters of the full captions from scratch and lr 2e-3 (one run, where this demo now takes two), none did
# better than the 63-66% held-out of two plain runs: queries, positions or residual outputs zero at init, label
# smoothing 0.1 and 0.3, vision rope_theta 20 and 100, 64x64 px images (55%, at 1.75x the step); nor, with 8-px
# patches, beta2 0.95, weight decay, 4 decoder layers or 4 vision blocks. Half the batches asking only for size and
# shape, from the start, got 49%: the order is what helps. Two processes (torchrun, batch 8 each) step in 46 ms where
# one takes 48. Nor, with the two runs, 4 or 8 vision heads, or 6-px patches (half the step, twice the iters).
warmup_frac = 0.05
min_lr_frac = 0.1
eval_interval = 1000
eval_iters = 8
log_interval = 500
num_workers = 1  # one core prepares batches...
threads = 1  # ...the other steps
device = "cpu"
dtype = "float32"
