"""train.py as users run it, with plain SGD (momentum 0) in AdamW's place, for the tests (tests/test_train.py).

AdamW's first step moves each weight by about lr x sign(gradient), whatever the gradient's size, so two runs whose
gradients differ by a constant factor (processes summed instead of averaged, a wrong accumulation divisor) end with
the same weights. Under SGD a weight moves by lr x its gradient, and the factor shows. Each optimizer step appends
one JSON line to $SGD_LOG (process 0): every group's base lr and the lr it stepped with.

    python tests/sgd_train.py [train.py's arguments]
    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/sgd_train.py [train.py's arguments]
"""
import json
import os
import runpy
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SGD(torch.optim.SGD):
    def __init__(self, params, **adamw_options):  # betas, fused: nothing to SGD; each group brings its own lr
        super().__init__(params, lr=0.0)

    def step(self, closure=None):
        if os.environ.get("SGD_LOG") and os.environ.get("RANK", "0") == "0":
            with open(os.environ["SGD_LOG"], "a") as f:
                f.write(json.dumps({"base_lr": [g["base_lr"] for g in self.param_groups],
                                    "lr": [g["lr"] for g in self.param_groups]}) + "\n")
        return super().step(closure)


torch.optim.AdamW = SGD
sys.path.insert(0, ROOT)
sys.argv[0] = os.path.join(ROOT, "train.py")
runpy.run_path(sys.argv[0], run_name="__main__")
