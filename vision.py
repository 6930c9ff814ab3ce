"""
The Qwen3-VL vision tower in plain PyTorch: VisionConfig and VisionTower, a numerical mirror of
transformers' Qwen3VLVisionModel (models/qwen3_vl/modeling_qwen3_vl.py) up to its pooler_output,
i.e. patch embed + interpolated learned positions + 2-D rotary ViT blocks + 2x2 patch merger.
The DeepStack mergers are left out: the Artemis graft only consumes the final merger's output.
"""
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VisionConfig:
    depth: int = 27
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    hidden_act: str = "gelu_pytorch_tanh"
    deepstack_visual_indexes: list = field(default_factory=lambda: [8, 16, 24])
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.hidden_act not in ("gelu_pytorch_tanh", "gelu"):
            raise ValueError(f"vision config: hidden_act {self.hidden_act!r}, expected 'gelu_pytorch_tanh' or 'gelu'")

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        names = {f.name for f in fields(cls)} - {"rope_theta"}
        kw = {k: v for k, v in d.items() if k in names}
        # transformers 5 nests theta under rope_parameters; older configs keep it top level
        theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta"))
        if theta is not None:
            kw["rope_theta"] = float(theta)
        if "deepstack_visual_indexes" in kw:
            kw["deepstack_visual_indexes"] = list(kw["deepstack_visual_indexes"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = asdict(self)
        # "axial" is what transformers 5 writes (and the only type its vision rotary accepts)
        d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "axial"}
        d["model_type"] = "qwen3_vl_vision"
        return d


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.num_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, groups):
        N, D = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_head, -1).unbind(1)  # each (N, n_head, head_dim)
        # rotary in fp32 like the reference, whatever the activation dtype
        q = (q.float() * cos + rotate_half(q.float()) * sin).to(v.dtype)
        k = (k.float() * cos + rotate_half(k.float()) * sin).to(v.dtype)
        y = torch.empty_like(q)
        # attention never crosses images or frames: the frames of all images of one size are one batch of sequences
        for idx, hw in groups:
            qi, ki, vi = (z[idx].view(-1, hw, self.n_head, z.shape[-1]).transpose(1, 2) for z in (q, k, v))
            yi = F.scaled_dot_product_attention(qi, ki, vi)  # (frames, n_head, hw, head_dim), scale head_dim**-0.5
            y[idx] = yi.transpose(1, 2).reshape(-1, self.n_head, yi.shape[-1])
        return self.proj(y.view(N, D))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.approximate = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}[config.hidden_act]
        self.norm1 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.hidden_size, eps=1e-6)
        self.mlp = nn.ModuleDict(dict(
            linear_fc1=nn.Linear(config.hidden_size, config.intermediate_size),
            linear_fc2=nn.Linear(config.intermediate_size, config.hidden_size),
        ))

    def forward(self, x, cos, sin, groups):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        h = F.gelu(self.mlp.linear_fc1(self.norm2(x)), approximate=self.approximate)
        return x + self.mlp.linear_fc2(h)


def grid_positions(grid_thw, m):
    """(row, col, h, w) of every patch, long (N,), with patches in the processor's merge-window order:
    per image, per frame, (h/m, w/m) windows of m x m patches, each window row-major."""
    t, h, w = grid_thw.unbind(1)
    n = t * h * w
    hh, ww = h.repeat_interleave(n), w.repeat_interleave(n)
    start = (n.cumsum(0) - n).repeat_interleave(n)
    j = (torch.arange(n.sum(), device=grid_thw.device) - start) % (hh * ww)  # index within its frame
    win, r, c = j // (m * m), j // m % m, j % m
    row = win // (ww // m) * m + r
    col = win % (ww // m) * m + c
    return row, col, hh, ww


def frame_groups(grid_thw):
    """[(rows of x, frame size hw)], one per frame size: the patches of every frame of hw patches, frame after frame,
    for one batched attention each, where a loop over the images would make a small call per image and block."""
    n = grid_thw.prod(-1)  # (n_images,)
    hw = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(n)  # (N,) the frame size of each patch
    sizes = hw.unique().tolist()
    if len(sizes) == 1:  # one size (a single image, a fixed resolution): all of x, read in place
        return [(slice(None), sizes[0])]
    return [((hw == s).nonzero()[:, 0], s) for s in sizes]


def bilinear_taps(i, n, side):
    """align_corners bilinear taps into a length-`side` axis for index i of an axis of length n."""
    src = i.float() * (side - 1) / (n - 1).clamp(min=1)
    lo = src.floor()
    frac = src - lo
    lo = lo.long()
    return torch.stack([lo, (lo + 1).clamp(max=side - 1)], -1), torch.stack([1 - frac, frac], -1)  # (N, 2)


class VisionTower(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        C, D = config.in_channels, config.hidden_size
        T, P, m = config.temporal_patch_size, config.patch_size, config.spatial_merge_size
        self.patch_embed = nn.ModuleDict(dict(proj=nn.Conv3d(C, D, (T, P, P), stride=(T, P, P))))
        self.pos_embed = nn.Embedding(config.num_position_embeddings, D)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.depth)])
        self.merger = nn.ModuleDict(dict(
            norm=nn.LayerNorm(D, eps=1e-6),
            linear_fc1=nn.Linear(D * m * m, D * m * m),
            linear_fc2=nn.Linear(D * m * m, config.out_hidden_size),
        ))

    def forward(self, pixel_values, grid_thw) -> torch.Tensor:
        cfg = self.config
        m, D, hd = cfg.spatial_merge_size, cfg.hidden_size, cfg.hidden_size // cfg.num_heads
        proj = self.patch_embed.proj
        dev, dtype = proj.weight.device, proj.weight.dtype
        grid_thw = grid_thw.to(dev)

        # the Conv3d's kernel equals its stride, so it is one matmul over flattened patches
        x = F.linear(pixel_values.to(dev, dtype), proj.weight.view(D, -1), proj.bias)  # (N, D)

        # learned side x side position table, resampled to each grid in fp32 then added in x's dtype
        row, col, h, w = grid_positions(grid_thw, m)
        side = int(cfg.num_position_embeddings ** 0.5)
        (ri, rw), (ci, cw) = bilinear_taps(row, h, side), bilinear_taps(col, w, side)
        idx = (ri[:, :, None] * side + ci[:, None, :]).flatten(1)  # (N, 4)
        wts = (rw[:, :, None] * cw[:, None, :]).flatten(1)  # (N, 4)
        pos = (self.pos_embed(idx).float() * wts[..., None]).sum(1)  # (N, D)
        x = x + pos.to(dtype)

        # 2-D rotary: of the hd/2 rotation frequencies, the first half turn with the row, the second with the column
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd // 2, 2, device=dev, dtype=torch.float) / (hd // 2))
        freqs = torch.cat([row[:, None] * inv_freq, col[:, None] * inv_freq], -1)  # (N, hd/2)
        emb = torch.cat([freqs, freqs], -1)[:, None, :]  # (N, 1, hd), broadcast over heads
        cos, sin = emb.cos(), emb.sin()

        groups = frame_groups(grid_thw)
        for block in self.blocks:
            x = block(x, cos, sin, groups)  # (N, D)

        x = self.merger.norm(x).view(-1, D * m * m)  # (N / m^2, m^2 D): one row per m x m window
        x = self.merger.linear_fc2(F.gelu(self.merger.linear_fc1(x)))
        return x  # (n_img_tokens, out_hidden)

    def flops(self, grid_thw):
        """Forward FLOPs for images of grid_thw (n, 3): 2 per weight per patch (the merger's per m x m window), and
        each frame's attention, 4 hw D per patch and block (q k^T and the weighted sum of v)."""
        c, n = self.config, int(grid_thw.prod(-1).sum())
        size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        attn = 4 * c.hidden_size * c.depth * sum(t * (h * w) ** 2 for t, h, w in grid_thw.tolist())
        return 2 * n * (size(self.patch_embed) + size(self.blocks)) + 2 * n // c.spatial_merge_size ** 2 * size(
            self.merger) + attn
