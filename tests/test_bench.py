"""bench.py's memory section counts the weights of each of its runs on the meta device (the A3 shape never exists):
the count must be the bytes of the same model built for real, at the tiny preset's shape."""
import importlib
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    argv, sys.argv = sys.argv, ["bench.py"]  # its options parse sys.argv on import
    try:
        return importlib.import_module("bench")
    finally:
        sys.argv = argv


@pytest.mark.parametrize("name", ["stage 1", "one device", "LoRA", "int8 base"])
def test_meta_count_is_the_real_models_bytes(bench, name):
    run = next(r for n, r in bench.RUNS.items() if name in n)
    config = bench.preset_config("tiny")
    config.text.vocab_size = 1024  # its 131072-token table adds nothing but time here
    counted = {}
    for device in ("meta", "cpu"):
        torch.manual_seed(0)
        m = bench.graft(config, run, device)
        counted[device] = {}
        for t in list(m.parameters()) + list(m.buffers()):
            key = (t.dtype, t.requires_grad)
            counted[device][key] = counted[device].get(key, 0) + t.numel() * t.element_size()
    assert counted["meta"] == counted["cpu"] and len(counted["cpu"]) >= 2  # frozen and trainable at least
