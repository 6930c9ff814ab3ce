"""The Artemis graft: a Mistral-family decoder, a 2-layer MLP projector and the Qwen3-VL vision tower (vision.py).

Mirrors transformers' `MistralForCausalLM` (modeling_mistral.py) and artemis-vlm's
`ArtemisVLMForConditionalGeneration`: the projected image vectors overwrite the decoder's input
embeddings at the `<|image_pad|>` positions, then the decoder runs unchanged (1-D RoPE, no M-RoPE,
no DeepStack). Module attribute names equal the checkpoint keys, so checkpoint.py loads a checkpoint
with a strict state-dict load. Generation follows gpt-fast: a preallocated KV cache written at
`input_pos`, a prefill that encodes the image once, then one-token decode steps.
"""
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from vision import VisionConfig, VisionTower, rotate_half


@dataclass
class TextConfig:
    """Mistral decoder shapes; field names are config.json keys, defaults are MistralConfig's."""
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 0  # 0: hidden_size // num_attention_heads (Mistral-Nemo sets 128 with hidden 5120)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = 4096  # None: full causal attention
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list | None = 2
    pad_token_id: int | None = None

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d):
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"text config: rope_type {kind!r} is not supported, expected 'default' (plain RoPE)")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"text config: hidden_act {d['hidden_act']!r} is not supported, expected 'silu'")
        kw = {f.name: d[f.name] for f in fields(cls) if f.name in d and d[f.name] is not None}
        kw["rope_theta"] = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        if "sliding_window" in d:  # an explicit null means full attention; absent means MistralConfig's 4096
            kw["sliding_window"] = d["sliding_window"]
        return cls(**kw)

    def to_dict(self):
        d = asdict(self)
        d["rope_parameters"] = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
        return {"model_type": "mistral", "architectures": ["MistralForCausalLM"], "hidden_act": "silu", **d}


@dataclass
class ArtemisConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int = 22  # the A-series repurposed <|image_pad|>
    video_token_id: int = 23
    projector_hidden_act: str = "gelu"
    quantization: str | None = None  # 'int8': the decoder's linears hold int8 weights and scales (quantize.py)

    @classmethod
    def from_dict(cls, d):  # an artemis-vlm config.json; checkpoint.read_config checks what it names first
        return cls(TextConfig.from_dict(d["text_config"]), VisionConfig.from_dict(d["vision_config"]),
                   d.get("image_token_id", 22), d.get("video_token_id", 23),
                   quantization=(d.get("quantization") or {}).get("method"))

    def to_dict(self, dtype=None):
        q = {"quantization": {"method": self.quantization, "scales": "per output channel"}} if self.quantization else {}
        return {"model_type": "artemis_vlm", "architectures": ["ArtemisVLMForConditionalGeneration"],
                "text_config": self.text.to_dict(), "vision_config": self.vision.to_dict(),
                "image_token_id": self.image_token_id, "video_token_id": self.video_token_id,
                "projector_hidden_act": self.projector_hidden_act,
                "dtype": str(dtype).removeprefix("torch.") if dtype else None, **q}


# ----------------------------------------------------------------------------------------------
# Mistral decoder

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # normalise in fp32, cast back, then scale: transformers' order, which matters in bf16
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(pos, head_dim, theta, dtype):
    """cos, sin of shape (B, 1, T, head_dim) for integer positions (B, T); computed in fp32, then cast."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


class KVCache(nn.Module):
    def __init__(self, batch, n_kv, max_len, head_dim, dtype, device):
        super().__init__()
        for name in ("k", "v"):
            self.register_buffer(name, torch.zeros(batch, n_kv, max_len, head_dim, dtype=dtype, device=device),
                                 persistent=False)

    def update(self, input_pos, k, v):  # input_pos: slots (T,) of the first len(k) rows, or (rows, slots): those rows'
        row, input_pos = (slice(len(k)), input_pos) if torch.is_tensor(input_pos) else input_pos
        self.k[row, :, input_pos], self.v[row, :, input_pos] = k, v
        return self.k[row], self.v[row]


class Attention(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, c.hidden_size, bias=False)
        self.kv_cache = None

    def forward(self, x, cos, sin, mask, input_pos=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if input_pos is not None:  # generation: keys and values go to the cache, attention reads all of it
            k, v = self.kv_cache.update(input_pos, k, v)  # (B, nkv, max_len, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask, input_pos=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, input_pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Mistral(nn.Module):
    """MistralForCausalLM: keys `model.embed_tokens`, `model.layers.{i}.*`, `model.norm`, `lm_head`."""

    def __init__(self, c: TextConfig):
        super().__init__()
        self.config = c
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(c.vocab_size, c.hidden_size),
            layers=nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers)),
            norm=RMSNorm(c.hidden_size, c.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.gradient_checkpointing = False

    def forward(self, x, pos, mask, input_pos=None):
        """x: input embeddings (B, T, d); pos: RoPE positions (B, T); mask: bool (B, 1, T, S) or None
        for plain causal; input_pos: KV-cache slots (KVCache.update) when a cache is set up. -> hidden (B, T, d)."""
        cos, sin = rope(pos, self.config.head_dim, self.config.rope_theta, x.dtype)
        recompute = self.gradient_checkpointing and self.training
        for layer in self.model.layers:
            args = (x, cos, sin, mask, input_pos)
            x = torch.utils.checkpoint.checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
        return self.model.norm(x)


def causal_mask(q_slots, kv_len, key_valid, window):
    """Boolean (B, 1, T, S) mask, True where query slot i may attend key slot j: causal, within the sliding window
    (the last `window` keys including itself), not a padding key. A query always keeps its own slot, so a padding
    query never sees an all-False row (softmax NaN); its output is never used."""
    k = torch.arange(kv_len, device=q_slots.device)
    m = k[None, :] <= q_slots[:, None]  # (T, S)
    if window is not None:
        m = m & (k[None, :] > q_slots[:, None] - window)
    m = m[None] & key_valid[:, None, :kv_len]  # (B, T, S)
    return (m | (k[None, :] == q_slots[:, None]))[:, None]


class Int8Linear(nn.Module):
    """nn.Linear without bias, its weight int8 (out, in) with one scale per output row: y = (x @ w.T) * scales.
    quantize.py rounds float weights into these; checkpoint.py builds them for an int8 checkpoint's load."""

    def __init__(self, in_features, out_features, dtype=None, device=None):
        super().__init__()
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))

    def forward(self, x):
        if torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            # one row (batch-1 decode) as a multiply and a sum: inductor reads the int8 weight once in a fused
            # reduction, where F.linear would first write a float copy of the whole weight
            return (x.unsqueeze(-2) * self.weight.to(x.dtype)).sum(-1) * self.scales  # (..., out)
        if x.device.type == "cpu" and x.dtype == torch.float32:  # aten's int8 matmul: 5x less time than dequantizing
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.scales)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.weight.to(x.dtype)) * self.scales


# ----------------------------------------------------------------------------------------------
# The graft

class Projector(nn.Module):
    """artemis-vlm's ArtemisVLMProjector: vision out_hidden -> text hidden, exact GELU."""
    def __init__(self, d_in, d_out):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_out)
        self.fc2 = nn.Linear(d_out, d_out)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class LinearCrossEntropy(torch.autograd.Function):
    """F.cross_entropy(F.linear(h, w).float(), targets, reduction="sum") without an (n, vocab) tensor: rows go a chunk
    at a time, each chunk's gradients computed with its logits in the forward pass, so backward only scales them. With
    a 131072-token vocabulary the fp32 logits and their gradient would otherwise be a step's largest tensors."""

    @staticmethod
    def forward(ctx, h, w, targets, grad_enabled):  # h (n, d), w (vocab, d), targets (n,)
        need_h, need_w = (grad_enabled and n for n in ctx.needs_input_grad[:2])  # needs_input_grad ignores no_grad
        gh, gw = torch.empty_like(h) if need_h else None, torch.zeros_like(w) if need_w else None
        loss = torch.zeros((), device=h.device)
        c = max(1, 2**24 // len(w))  # rows per chunk: 64 MiB of fp32 logits (128 rows of a 131072-token vocabulary)
        for i in range(0, len(h), c):  # a function per chunk: its (c, vocab) tensor is gone before the next one's
            loss += LinearCrossEntropy.chunk(h[i:i + c], w, targets[i:i + c], gh[i:i + c] if need_h else None, gw)
        ctx.grads = gh, gw  # not save_for_backward: dropped below, so autograd can adopt gw as w.grad, not copy it
        return loss

    @staticmethod
    def chunk(x, w, t, gx, gw):
        """One chunk's summed loss; its gradient goes into gx (its rows of h's) and is added to gw, where given."""
        z = (x @ w.T).float()  # (c, vocab) logits
        target = z.gather(1, t[:, None])  # (c, 1)
        top = z.amax(-1, keepdim=True)  # (c, 1)
        e = z.sub_(top).exp_()  # exp(z - max), in place of the logits: no second (c, vocab) tensor
        total = e.sum(-1, keepdim=True)  # (c, 1)
        if gx is not None or gw is not None:
            g = e.div_(total)  # softmax
            g[torch.arange(len(t), device=t.device), t] -= 1  # d loss / d logits
            g = g.to(x.dtype)
            if gx is not None:
                torch.mm(g, w, out=gx)  # (c, d)
            if gw is not None:
                gw.addmm_(g.T, x)  # (vocab, d), summed over the chunks
        return (top + total.log() - target).sum()  # logsumexp(z) - z[target]

    @staticmethod
    def backward(ctx, grad):
        (gh, gw), ctx.grads = ctx.grads, None
        return None if gh is None else gh.mul_(grad), None if gw is None else gw.mul_(grad), None, None


class ArtemisVLM(nn.Module):
    def __init__(self, config: ArtemisConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config.vision)
        self.multi_modal_projector = Projector(config.vision.out_hidden_size, config.text.hidden_size)
        self.language_model = Mistral(config.text)

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with the projected image vectors written at the <|image_pad|> positions."""
        x = self.language_model.model.embed_tokens(input_ids)  # (B, T, d_text)
        is_img = input_ids == self.config.image_token_id
        n_pad, where = int(is_img.sum()), f"input_ids hold {int(is_img.sum())} image placeholders"
        if pixel_values is None:
            if n_pad:
                raise ValueError(f"{where} (id {self.config.image_token_id}) but no pixel_values were given")
            return x
        feats = self.visual(pixel_values, image_grid_thw)  # (n_img_tokens, out_hidden)
        feats = self.multi_modal_projector(feats)  # (n_img_tokens, d_text)
        if n_pad != feats.shape[0]:
            raise ValueError(f"{where} (id {self.config.image_token_id}) but the images give {feats.shape[0]} "
                             "features (grid_thw.prod() // merge**2 per image)")
        return x.masked_scatter(is_img[..., None], feats.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, labels=None, attention_mask=None):
        """Returns (logits, loss) like nanoGPT. Without labels: logits (B, T, vocab), loss None. With labels
        (-100 = ignored, shifted here): the mean cross-entropy over the labelled tokens, and logits None,
        because the head runs only on labelled positions, a chunk at a time: (B*T, 131072) logits never exist."""
        T = input_ids.shape[1]
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        valid = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # left padding keeps each row at 0, 1, ...
        window = self.config.text.sliding_window
        mask = None  # plain causal: lets SDPA pick its flash kernel
        if not valid.all() or (window is not None and T > window):
            mask = causal_mask(torch.arange(T, device=x.device), T, valid, window)
        h = self.language_model(x, pos, mask)  # (B, T, d_text)
        if labels is None:
            return self.language_model.lm_head(h), None
        targets = labels[:, 1:]
        keep = targets != -100
        h, targets = h[:, :-1][keep], targets[keep]  # (n_labelled, d_text), (n_labelled,)
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype  # what F.linear would use
        with torch.autocast(dev, enabled=False):
            w = self.language_model.lm_head.weight.to(dt)  # (vocab, d_text)
            if self.config.quantization and not self.config.text.tie_word_embeddings:  # an int8 head, dequantized
                w = w * self.language_model.lm_head.scales[:, None].to(dt)
            return None, LinearCrossEntropy.apply(h.to(dt), w, targets, torch.is_grad_enabled()) / len(targets)

    def set_training_stage(self, stage, vision_top_n=0):
        """artemis-vlm's recipe: stage1 trains the projector; stage2 adds the decoder; the vision tower stays frozen
        but for its top `vision_top_n` blocks (all of it when that covers every block). Returns (n_trainable, n_total)
        parameters."""
        if stage not in ("stage1", "stage2"):
            raise ValueError(f"stage {stage!r}: expected 'stage1' or 'stage2'")
        blocks = self.visual.blocks
        self.visual.requires_grad_(vision_top_n >= len(blocks))  # every block: the patch embedding and merger too
        for block in blocks[max(len(blocks) - vision_top_n, 0):] if vision_top_n else []:
            block.requires_grad_(True)
        self.language_model.requires_grad_(stage == "stage2")
        self.multi_modal_projector.requires_grad_(True)
        sizes = [(p.numel(), p.requires_grad) for p in self.parameters()]
        return sum(n for n, g in sizes if g), sum(n for n, _ in sizes)

    def flops(self, n_tokens, T, n_labelled, grid=None):
        """Training FLOPs of a batch as it runs: n_tokens in rows of T, n_labelled labelled, images of grid. Per token
        the decoder's matmuls go forward, back to their inputs (gradients reach the images) and to trained weights (2N
        each), plus attention (12 L H hd T); the head on labelled tokens alone; the projector; the tower's forward."""
        c, lm, layers = self.config.text, self.language_model, self.language_model.model.layers
        size = lambda m, trained=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trained)  # noqa
        attn = 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * T
        head = (4 + 2 * lm.lm_head.weight.requires_grad) * lm.lm_head.weight.numel()  # forward, input and weight grads
        images = 0 if grid is None else self.visual.flops(grid) * (3 if size(self.visual, True) else 1) + 4 * size(
            self.multi_modal_projector) * int(grid.prod(-1).sum()) // self.config.vision.spatial_merge_size ** 2
        return n_tokens * (4 * size(layers) + 2 * size(layers, True) + attn) + n_labelled * head + images

    # ------------------------------------------------------------------------------------------
    # generation

    def setup_caches(self, batch, max_len):
        """A KV cache of at least max_len slots per layer; returns its length. One big enough is kept, so a compiled
        decode step sees the same shapes across prompts: it is captured once, not per prompt length."""
        c, p = self.config.text, self.language_model.model.embed_tokens.weight  # a float tensor, even in int8
        kv = self.language_model.model.layers[0].self_attn.kv_cache
        if kv is not None and kv.k.shape[0] == batch and kv.k.shape[2] >= max_len and (kv.k.dtype, kv.k.device) == (
                p.dtype, p.device):
            return kv.k.shape[2]
        max_len = -(-max_len // 256) * 256  # rounded up, so slightly longer prompts reuse it too
        for layer in self.language_model.model.layers:
            layer.self_attn.kv_cache = KVCache(batch, c.num_key_value_heads, max_len, c.head_dim, p.dtype, p.device)
        return max_len

    def clear_caches(self):  # frees the KV caches that generate() leaves in place for the next prompt
        for layer in self.language_model.model.layers:
            layer.self_attn.kv_cache = None

    def prefill(self, input_ids, pos, key_valid, pixel_values=None, image_grid_thw=None, row=None, start=0):
        """The prompt into cache slots start.. of each row, or of row alone; sees the image. Last logits (B, vocab)."""
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        slots = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        mask = causal_mask(slots, key_valid.shape[1], key_valid, self.config.text.sliding_window)
        h = self.language_model(x, pos, mask, slots if row is None else (slice(row, row + 1), slots))
        return self.language_model.lm_head(h[:, -1])

    def decode_one(self, token, pos, input_pos, key_valid):
        """One token per row at cache slot input_pos (a 1-element tensor); RoPE positions pos (B, 1)."""
        x = self.language_model.model.embed_tokens(token)  # (B, 1, d_text)
        mask = causal_mask(input_pos, key_valid.shape[1], key_valid, self.config.text.sliding_window)
        h = self.language_model(x, pos, mask, input_pos)
        return self.language_model.lm_head(h[:, -1])

    def compile_decode(self):
        """decode_one compiled for inference on the model's device. CUDA: CUDA graphs, one launch per token. CPU: the
        weights are frozen into the graph so inductor packs them for its own GEMM kernels (max-autotune), which stream
        them near memory bandwidth where MKL's gemv on (out, in) weights reaches a third; compile again after the
        weights change. int8 weights are not frozen: that would fold their dequantization into float constants."""
        if self.language_model.lm_head.weight.is_cuda:
            return torch.compile(self.decode_one, mode="reduce-overhead", fullgraph=True)
        step = torch.compile(self.decode_one, fullgraph=True)
        quiet = dict(autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # stdout is the text

        def decode_one(*args):  # the patch must be active at the first call, when inductor compiles
            with torch._inductor.config.patch(freezing=not self.config.quantization, max_autotune=True, **quiet):
                return step(*args)
        return decode_one

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, pixel_values=None,
                 image_grid_thw=None, attention_mask=None, stop_ids=None, decode_one=None, callback=None):
        """Prompt (B, T), left-padded when rows differ in length (attention_mask 0 on the pads), followed by up to
        max_new_tokens new tokens; a row that emits a stop id repeats it while the others finish. decode_one: an
        optional compiled `self.decode_one`; callback(tokens (B,)) sees each step and may return a bool (B,) of rows it
        counts as finished (its own stop strings or lengths). The KV cache stays for the next call (clear_caches())."""
        (B, T), dev = input_ids.shape, input_ids.device
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        S = self.setup_caches(B, T + max_new_tokens)
        key_valid = torch.ones(B, S, dtype=torch.bool, device=dev)  # slots past the prompt: masked by causality
        key_valid[:, :T] = attention_mask.bool()
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
        stop = torch.tensor(stop_ids or [], dtype=torch.long, device=dev)
        done, out = torch.zeros(B, dtype=torch.bool, device=dev), [input_ids]
        logits = self.prefill(input_ids, pos, key_valid, pixel_values, image_grid_thw)
        nxt_pos = pos[:, -1:] + 1  # (B, 1)
        for i in range(max_new_tokens):
            tok = sample(logits, temperature, top_k, top_p)  # (B,)
            tok = torch.where(done, out[-1][:, -1], tok)
            out.append(tok[:, None])
            done |= torch.isin(tok, stop)
            if callback is not None and (finished := callback(tok)) is not None:
                done |= finished.to(dev)
            if done.all() or i == max_new_tokens - 1:
                break
            input_pos = torch.tensor([T + i], device=dev)
            logits = (decode_one or self.decode_one)(tok[:, None], nxt_pos + i, input_pos, key_valid)
        return torch.cat(out, dim=1)


def sample(logits, temperature=1.0, top_k=None, top_p=None):
    """Next token per row from logits (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None:
        p, idx = logits.softmax(-1).sort(-1, descending=True)
        drop = p.cumsum(-1) - p > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), -float("inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]
