# Stage-1 projector alignment, the A3 recipe: A2 decoder + Qwen3-VL-2B vision tower, BLIP3o long captions.
#   python prepare.py --dataset=tars --src='blip3o/*.tar' --tokenizer=schneewolflabs/A2 --out_dir=data/blip3o
#   python train.py config/stage1.py
# Expect (A3 card, 1M samples, one GB10): eval loss 5.55 at step 0, ~0.78 by 5%, ~0.60 at the end of 31,219 steps.
out_dir = "out-stage1"
init_from = "parts"
text_model = "schneewolflabs/A2"
vision_model = "Qwen/Qwen3-VL-2B-Instruct"
image_token_id = 22
dataset = "data/blip3o"
stage = "stage1"  # only the ~37M-parameter projector trains
learning_rate = 1e-3  # cosine to 0 after 5% warmup
warmup_frac = 0.05
min_lr_frac = 0.0
max_iters = 0  # one epoch
batch_size = 2
gradient_accumulation_steps = 16  # effective batch 32
eval_interval = 1560  # 5% of the run, as on the card's eval curve
eval_iters = 100
log_interval = 10
dtype = "bfloat16"
