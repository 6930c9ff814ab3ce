"""vision.py against transformers' Qwen3VLVisionModel on a tiny random checkpoint written by save_pretrained."""
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3VLVisionConfig, Qwen3VLVisionModel

from vision import VisionConfig, VisionTower

# several images in one call: wide, tall, a single merge window, a 2-frame clip, grids both smaller and larger than
# the 8x8 position table (down- and up-sampling), and last a frame of the first's size in another shape (attention
# batches the frames of one size, wherever they are in the call)
GRID = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 2, 2], [2, 4, 4], [1, 12, 10], [1, 6, 4]])


def randomize(model):
    """Weights of O(1) effect so that a tolerance means something (the HF init is near-identity)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            z = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * z)
            elif p.dim() == 1:
                p.copy_(0.2 * z)
            elif name == "pos_embed.weight":
                p.copy_(z)
            else:
                p.copy_(z * p[0].numel() ** -0.5)


@pytest.fixture(scope="module", params=["gelu_pytorch_tanh", "gelu"])
def checkpoint(request, tmp_path_factory):
    # head_dim 16: 4 rotary frequencies per axis; non-default theta so reading it is exercised
    cfg = Qwen3VLVisionConfig(
        depth=3, hidden_size=64, intermediate_size=96, num_heads=4, patch_size=4, out_hidden_size=40,
        num_position_embeddings=64, deepstack_visual_indexes=[0], hidden_act=request.param,
        rope_parameters={"rope_theta": 100.0, "rope_type": "axial"},
    )
    ref = Qwen3VLVisionModel._from_config(cfg, attn_implementation="sdpa").eval()
    randomize(ref)
    path = tmp_path_factory.mktemp("qwen3vl_vision")
    ref.save_pretrained(path)
    config = VisionConfig.from_dict(json.loads((path / "config.json").read_text()))
    sd = {k: v for k, v in load_file(path / "model.safetensors").items() if not k.startswith("deepstack_merger_list.")}
    torch.manual_seed(1)
    pixels = torch.randn(int(GRID.prod(-1).sum()), 3 * 2 * 4 * 4)
    with torch.no_grad():
        expected = ref(pixels, grid_thw=GRID).pooler_output
    return path, config, sd, pixels, expected


def test_matches_transformers(checkpoint):
    _, config, sd, pixels, expected = checkpoint
    assert config.rope_theta == 100.0
    tower = VisionTower(config)
    tower.load_state_dict(sd, strict=True)
    with torch.no_grad():
        out = tower(pixels, GRID)
    assert out.shape == (int(GRID.prod(-1).sum()) // 4, 40) and out.dtype == torch.float32
    assert expected.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    assert (out - expected).abs().max() <= 4e-6  # measured 1.1e-6 to 1.3e-6 over 4 seeds and both activations


def test_images_do_not_attend_to_each_other(checkpoint):
    _, config, sd, pixels, _ = checkpoint
    tower = VisionTower(config)
    tower.load_state_dict(sd, strict=True)
    n = GRID[:1].prod()
    with torch.no_grad():
        both = tower(pixels, GRID)
        first = tower(pixels[:n], GRID[:1])
    assert (both[: n // 4] - first).abs().max() <= 3e-6  # measured 6e-7 to 9.5e-7


def test_meta_build_then_assign(checkpoint):
    """The loader's path: build on meta, load with assign=True; nothing may be left on meta."""
    _, config, sd, pixels, expected = checkpoint
    with torch.device("meta"):
        tower = VisionTower(config)
    assert list(tower.buffers()) == []
    tower.load_state_dict(sd, strict=True, assign=True)
    assert not any(t.is_meta for t in tower.state_dict().values())
    with torch.no_grad():
        out = tower(pixels, GRID)
    assert not out.is_meta
    assert (out - expected).abs().max() <= 4e-6  # measured 1.1e-6 to 1.3e-6 over 4 seeds and both activations


def test_bf16_matches_transformers_bf16(checkpoint):
    path, config, sd, pixels, expected = checkpoint
    tower = VisionTower(config)
    tower.load_state_dict(sd, strict=True)
    tower.to(torch.bfloat16)
    # from_pretrained keeps the rotary inv_freq buffer in fp32; ref.to(bf16) would round it
    ref = Qwen3VLVisionModel.from_pretrained(path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = tower(pixels, GRID)  # fp32 pixels are cast to the weights' dtype
        want = ref(pixels, grid_thw=GRID).pooler_output
    assert out.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want.float(), rtol=2**-7, atol=1e-3)  # within one bf16 ulp
    # same kernels on CPU, so nearly bit-equal; inv_freq rounded to bf16 would give ~4e-3 here
    assert (out.float() - want.float()).abs().mean() <= 1e-3
    assert (out.float() - expected).abs().max() <= 0.05 * expected.abs().max()


def test_config_defaults_match_transformers():
    assert VisionConfig.from_dict(Qwen3VLVisionConfig().to_dict()) == VisionConfig()


def test_config_round_trip():
    cfg = VisionConfig(depth=24, hidden_size=1024, intermediate_size=4096, out_hidden_size=2048,
                       deepstack_visual_indexes=[5, 11, 17], hidden_act="gelu", rope_theta=500.0)
    d = cfg.to_dict()
    assert VisionConfig.from_dict(d) == cfg
    # transformers accepts our dict and writes back one we read the same
    assert VisionConfig.from_dict(Qwen3VLVisionConfig(**d).to_dict()) == cfg
    assert VisionConfig.from_dict(json.loads(json.dumps(d))) == cfg


def test_config_rope_spellings():
    def read(**d):  # unknown keys, as transformers writes them, are ignored
        return VisionConfig.from_dict({"depth": 2, "transformers_version": "x", "dtype": "bfloat16", **d}).rope_theta

    assert read(rope_parameters={"rope_theta": 5.0, "rope_type": "axial"}) == 5.0
    assert read(rope_theta=7.0) == 7.0
    assert read(rope_parameters={"rope_theta": 5.0}, rope_theta=7.0) == 5.0
    assert read(rope_parameters=None, rope_theta=7.0) == 7.0
    assert read() == 10000.0
