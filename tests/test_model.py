"""Parity of model.py with transformers' MistralForCausalLM and artemis-vlm's ArtemisVLMForConditionalGeneration
on tiny random weights saved by them and loaded by our loaders; cached generation; checkpoint round trips."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
artemis_vlm = pytest.importorskip("artemis_vlm")
from transformers import MistralConfig, MistralForCausalLM, Qwen3VLConfig, Qwen3VLForConditionalGeneration  # noqa: E402

from checkpoint import from_parts, from_pretrained, read_tensors, save_pretrained  # noqa: E402
from model import ArtemisConfig, Mistral, TextConfig  # noqa: E402

VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=48,
              num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=16, spatial_merge_size=2,
              temporal_patch_size=2, in_channels=3)
TEXT = dict(vocab_size=96, hidden_size=40, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=12, rms_norm_eps=1e-5, rope_parameters={"rope_theta": 1e4,
            "rope_type": "default"}, sliding_window=None, tie_word_embeddings=False)
IMG = 22
GRIDS = torch.tensor([[1, 4, 6], [1, 2, 2], [1, 6, 4]])


def perturb(model, seed=0):
    """Random init leaves norms at 1/0 and weights at std 0.02, which makes logits nearly uniform; give every
    tensor unit-scale activations so a mis-wired one shows in the log-probs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() >= 2:
                fan_in = p[0].numel() if "embed" not in name else 1
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    return model


def logprobs(logits):
    return torch.log_softmax(logits.float(), -1)


def artemis_reference(tmp_path, text=None, seed=0):
    torch.manual_seed(seed)
    cfg = artemis_vlm.ArtemisVLMConfig(vision_config=VISION, text_config=dict(model_type="mistral", **(text or TEXT)),
                                       image_token_id=IMG)
    ref = perturb(artemis_vlm.ArtemisVLMForConditionalGeneration(cfg).eval(), seed)
    ref.save_pretrained(tmp_path / "ref")
    return ref, str(tmp_path / "ref")


def image_batch(seed=0):
    """Two rows, three images of different grids (two in the first row), right-padded row 2, and labels."""
    g = torch.Generator().manual_seed(seed)
    n = [int(t.prod()) // 4 for t in GRIDS]
    row1 = [5, 6] + [IMG] * n[0] + [7, 8, 9] + [IMG] * n[1] + [10, 11, 12, 13]
    row2 = [5] + [IMG] * n[2] + list(torch.randint(30, 90, (6,), generator=g).tolist())
    T = max(len(row1), len(row2))
    ids = torch.tensor([row1 + [0] * (T - len(row1)), row2 + [0] * (T - len(row2))])
    mask = torch.tensor([[1] * len(row1) + [0] * (T - len(row1)), [1] * len(row2) + [0] * (T - len(row2))])
    labels = ids.clone()
    labels[ids == IMG] = -100
    labels[mask == 0] = -100
    labels[:, :2] = -100
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 16 * 16, generator=g)
    return ids, mask, labels, pixels


@pytest.mark.parametrize("window", [None, 5])
def test_decoder_matches_transformers(tmp_path, window):
    torch.manual_seed(0)
    ref = perturb(MistralForCausalLM(MistralConfig(**{**TEXT, "sliding_window": window})).eval())
    ref.save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        c = TextConfig.from_dict(json.load(f))
    assert c.head_dim == 12 and c.sliding_window == window
    ours = Mistral(c)
    ours.load_state_dict(read_tensors(str(tmp_path), lambda k: k, torch.float32, "cpu"), strict=True)
    ids = torch.randint(0, 96, (2, 17))
    pos = torch.arange(17).expand(2, 17)
    mask = None
    if window:
        from model import causal_mask
        mask = causal_mask(torch.arange(17), 17, torch.ones(2, 17, dtype=torch.bool), window)
    with torch.no_grad():
        want = logprobs(ref(ids).logits)
        got = logprobs(ours.lm_head(ours(ours.model.embed_tokens(ids), pos, mask)))
    assert torch.equal(got, want)  # bit-identical: the same kernels on the same tensors in the same order


@pytest.mark.parametrize("window", [None, 5])
def test_graft_matches_artemis_logits_and_loss(tmp_path, window):
    ref, path = artemis_reference(tmp_path, {**TEXT, "sliding_window": window})
    ours = from_pretrained(path, dtype=torch.float32).eval()
    ids, mask, labels, pixels = image_batch()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRIDS, labels=labels)
        logits, none = ours(ids, pixels, GRIDS, attention_mask=mask)
        no_logits, loss = ours(ids, pixels, GRIDS, labels=labels, attention_mask=mask)
    assert none is None and no_logits is None
    real = mask.bool()
    diff = (logprobs(logits) - logprobs(want.logits))[real].abs().max()
    assert diff <= 3e-5, diff  # measured 1.05e-5 (4.8e-6 to 1.05e-5 over seeds 0-3)
    assert abs(loss.item() - want.loss.item()) <= 2e-6  # measured 0 to 4.8e-7


def test_image_count_mismatch_is_an_error(tmp_path):
    _, path = artemis_reference(tmp_path)
    ours = from_pretrained(path)
    ids, mask, _, pixels = image_batch()
    with pytest.raises(ValueError, match="image placeholders"):
        ours(ids[:, :-1][:, 3:], pixels, GRIDS)
    with pytest.raises(ValueError, match="no pixel_values"):
        ours(ids)


def test_from_parts_saves_a_checkpoint_artemis_loads(tmp_path):
    torch.manual_seed(1)
    perturb(MistralForCausalLM(MistralConfig(**TEXT))).save_pretrained(tmp_path / "text")
    qcfg = Qwen3VLConfig(vision_config=VISION, text_config=dict(
        vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, rope_parameters={"rope_type": "default", "mrope_section": [4, 4, 4],
                                                             "rope_theta": 1e4}))
    qv = perturb(Qwen3VLForConditionalGeneration(qcfg), 1)
    qv.save_pretrained(tmp_path / "qwen")
    ours = from_parts(str(tmp_path / "text"), str(tmp_path / "qwen"), dtype=torch.float32).eval()
    vis_want = {k.removeprefix("model.visual."): v for k, v in qv.state_dict().items() if k.startswith("model.visual.")}
    for k, v in ours.visual.state_dict().items():
        assert torch.equal(v, vis_want[k]), k
    save_pretrained(ours, str(tmp_path / "graft"), max_shard_size=20_000)  # forces several shards + an index
    assert os.path.exists(tmp_path / "graft" / "model.safetensors.index.json")
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "graft"), dtype=torch.float32).eval()
    ids, mask, labels, pixels = image_batch(1)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRIDS).logits
        got, _ = ours(ids, pixels, GRIDS, attention_mask=mask)
    assert (logprobs(got) - logprobs(want))[mask.bool()].abs().max() <= 2e-5  # measured 3.3e-6 (up to 5.7e-6)
    # and it loads back through ours, unchanged
    again = from_pretrained(str(tmp_path / "graft"))
    for (k, a), (_, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_strict_loading_names_the_key(tmp_path):
    from safetensors.torch import load_file, save_file
    _, path = artemis_reference(tmp_path)
    sd = load_file(os.path.join(path, "model.safetensors"))
    bad = dict(sd)
    del bad["language_model.model.norm.weight"]
    save_file(bad, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'language_model.model.norm.weight' \(expected shape \(40,\)\)"):
        from_pretrained(path)
    bad = dict(sd)
    bad["multi_modal_projector.fc1.bias"] = torch.zeros(3)
    save_file(bad, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'multi_modal_projector.fc1.bias' has shape \(3,\), expected \(40,\)"):
        from_pretrained(path)
    bad = dict(sd)
    bad["language_model.model.extra"] = torch.zeros(3)
    save_file(bad, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="unexpected tensor 'language_model.model.extra'"):
        from_pretrained(path)
    # the deepstack mergers are on the ignore list, so the untouched checkpoint loads
    assert any(k.startswith("visual.deepstack_merger_list.") for k in sd)


def test_config_spellings():
    new = TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_theta": 5.0}})
    old = TextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4, "rope_theta": 5.0, "sliding_window": None})
    assert new.rope_theta == old.rope_theta == 5.0
    assert new.sliding_window == 4096 and old.sliding_window is None  # absent: MistralConfig's default
    assert new.head_dim == 16
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        TextConfig.from_dict({"rope_scaling": {"type": "yarn", "factor": 2.0}})
    c = ArtemisConfig(new, ArtemisConfig.from_dict({"model_type": "artemis_vlm", "text_config": {},
                                                     "vision_config": VISION}).vision)
    assert ArtemisConfig.from_dict(c.to_dict()) == c


def test_tied_embeddings_round_trip(tmp_path):
    ref, path = artemis_reference(tmp_path, {**TEXT, "tie_word_embeddings": True})
    ours = from_pretrained(path)
    assert ours.language_model.lm_head.weight is ours.language_model.model.embed_tokens.weight
    ids = torch.randint(30, 90, (1, 9))
    with torch.no_grad():
        assert torch.equal(logprobs(ours(ids)[0]), logprobs(ref(input_ids=ids).logits))  # text only: the decoder
    save_pretrained(ours, str(tmp_path / "again"))
    again = from_pretrained(str(tmp_path / "again"))
    assert torch.equal(again.language_model.lm_head.weight, ours.language_model.model.embed_tokens.weight)


def uncached_greedy(model, ids, mask, n, pixels=None, grids=None):
    for _ in range(n):
        logits, _ = model(ids, pixels, grids, attention_mask=mask)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return ids


@pytest.mark.parametrize("window", [None, 6])
def test_cached_generation_equals_uncached(tmp_path, window):
    _, path = artemis_reference(tmp_path, {**TEXT, "sliding_window": window})
    model = from_pretrained(path).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(30, 90, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding of different lengths
    mask[2, :1] = 0
    ids[mask == 0] = 0
    with torch.no_grad():
        want = uncached_greedy(model, ids, mask, 10)
        got = model.generate(ids, 10, temperature=0, attention_mask=mask)
        assert torch.equal(got, want)
        for i in range(3):  # each row alone, unpadded, continues the same way
            row = ids[i:i + 1, mask[i].bool()]
            assert torch.equal(model.generate(row, 10, temperature=0)[0, -10:], want[i, -10:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_the_full_logits_loss(tmp_path, dtype):
    """forward(labels=...) runs the head a chunk of positions at a time, gradients computed on the way; the loss and every
    gradient equal those of the plain cross-entropy over the full logits, in fp32 and under bf16 autocast."""
    _, path = artemis_reference(tmp_path, {**TEXT, "vocab_size": 131072})  # chunks of 128 rows
    model = from_pretrained(path).train()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(30, 90, (2, 300), generator=g)
    labels = ids.clone()
    labels[0, :20] = -100  # 579 labelled targets: five chunks, the last partial
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    with autocast:
        _, loss = model(ids, labels=labels)
    loss.backward()
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    with autocast:
        logits, _ = model(ids)
        want = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
    want.backward()
    assert torch.allclose(loss, want, rtol=1e-6, atol=0)
    assert got.keys() == {k for k, p in model.named_parameters() if p.grad is not None} and len(got) > 10
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the chunks' gradient sums round differently
    for k, p in model.named_parameters():
        if p.grad is not None:
            assert got[k].dtype == p.dtype and (got[k] - p.grad).norm() <= tol * p.grad.norm(), k
    with torch.no_grad(), autocast:  # eval: the same loss, no gradients prepared
        assert torch.allclose(model(ids, labels=labels)[1], want, rtol=1e-6, atol=0)


def test_compiled_decode_is_captured_once(tmp_path):
    """One compilation of decode_one (the CPU recipe: inductor, frozen weights) serves every token of prompts of
    different lengths (the cache is reused, so its shapes never change), and gives the eager tokens."""
    _, path = artemis_reference(tmp_path, {**TEXT, "sliding_window": 6})
    model = from_pretrained(path).eval()
    torch._dynamo.reset()
    step = model.compile_decode()
    g = torch.Generator().manual_seed(0)
    # dynamo's own patch, not monkeypatch: setattr/undo on its config module leaves the key unreadable for later tests
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for T, n in ((7, 12), (19, 5), (3, 30)):
            ids = torch.randint(30, 90, (1, T), generator=g)
            want = model.generate(ids, n, temperature=0)
            assert torch.equal(model.generate(ids, n, temperature=0, decode_one=step), want)
    assert model.language_model.model.layers[0].self_attn.kv_cache.k.shape[2] == 256
    model.clear_caches()
    assert model.language_model.model.layers[0].self_attn.kv_cache is None


def test_generation_sees_the_image_and_stops(tmp_path):
    ref, path = artemis_reference(tmp_path)
    model = from_pretrained(path).eval()
    with torch.no_grad():
        model.multi_modal_projector.fc2.weight.mul_(50)  # make the image dominate a random decoder
    grid = GRIDS[:1]
    ids = torch.tensor([[5] + [IMG] * 6 + [7, 8]])
    a = torch.randn(24, 1536, generator=torch.Generator().manual_seed(1))
    b = torch.randn(24, 1536, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_a = model.generate(ids, 8, temperature=0, pixel_values=a, image_grid_thw=grid)
        out_b = model.generate(ids, 8, temperature=0, pixel_values=b, image_grid_thw=grid)
        assert torch.equal(out_a, uncached_greedy(model, ids, torch.ones_like(ids), 8, a, grid))
        assert not torch.equal(out_a[:, -8:], out_b[:, -8:])
        stop = int(out_a[0, -6])  # the third new token
        stopped = model.generate(ids, 8, temperature=0, pixel_values=a, image_grid_thw=grid, stop_ids=[stop])
    assert stopped.shape[1] <= ids.shape[1] + 3 and stopped[0, -1] == stop


def test_sampling_options():
    from model import sample
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]]).repeat(200, 1)
    torch.manual_seed(0)
    assert (sample(logits, 0) == 2).all()
    assert set(sample(logits, 1.0, top_k=2).tolist()) <= {2, 3}
    assert set(sample(logits, 1.0, top_p=0.5).tolist()) == {2}
    assert len(set(sample(logits, 5.0).tolist())) > 2


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    _, path = artemis_reference(tmp_path)
    model = from_pretrained(path)
    target = str(tmp_path / "ckpt")
    save_pretrained(model, target)
    before = sorted(os.listdir(target))
    import checkpoint

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were killed while writing the shards

    monkeypatch.setattr(checkpoint, "save_file", crash)
    with torch.no_grad():
        model.multi_modal_projector.fc1.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    assert sorted(os.listdir(target)) == before
    again = from_pretrained(target)
    assert not torch.equal(again.multi_modal_projector.fc1.bias, model.multi_modal_projector.fc1.bias)
    # stopped between its two renames: the previous checkpoint still loads from where the first put it
    monkeypatch.undo()
    renames = []

    def rename_then_crash(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append(dst)
        os.replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "rename", rename_then_crash)
    with pytest.raises(KeyboardInterrupt):
        save_pretrained(model, target)
    monkeypatch.undo()
    assert not os.path.exists(target) and renames == [target + ".old"]
    again = from_pretrained(target)
    assert not torch.equal(again.multi_modal_projector.fc1.bias, model.multi_modal_projector.fc1.bias)


def test_a_save_never_deletes_what_it_did_not_write(tmp_path):
    _, path = artemis_reference(tmp_path)
    model = from_pretrained(path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "file").write_text("keep me too")
    (tmp_path / "ckpt.old").mkdir()  # where a save parks the checkpoint it replaces
    (tmp_path / "ckpt.old" / "notes.txt").write_text("and me")
    for target in ("mine", "file", "ckpt"):
        with pytest.raises(ValueError, match="a save to .* would replace"):
            save_pretrained(model, str(tmp_path / target))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and os.listdir(tmp_path / "mine") == ["notes.txt"]
    assert (tmp_path / "file").read_text() == "keep me too" and (tmp_path / "ckpt.old" / "notes.txt").exists()
    assert not os.path.exists(tmp_path / "ckpt") and not os.path.exists(tmp_path / "ckpt.tmp")
    (tmp_path / "empty").mkdir()
    save_pretrained(model, str(tmp_path / "empty"))  # an empty folder, then its own checkpoint: replaced
    save_pretrained(model, str(tmp_path / "empty"))
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants  # read once at import: setting HF_HUB_OFFLINE now would change nothing
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    want = r"no-such-org/no-such-graft: no such local directory, and fetching it as a hub repo id failed \("
    with pytest.raises(ValueError, match=want + r"LocalEntryNotFoundError: .*outgoing traffic has been disabled"):
        from_pretrained("no-such-org/no-such-graft")


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    _, path = artemis_reference(tmp_path)
    model = from_pretrained(path).train()
    ids, mask, labels, pixels = image_batch()
    grads, calls = [], []
    mlp = model.language_model.model.layers[0].mlp
    forward = mlp.forward
    mlp.forward = lambda x: calls.append(1) or forward(x)  # module hooks stay silent during the recompute
    for ckpt in (False, True):
        model.zero_grad()
        calls.clear()
        model.language_model.gradient_checkpointing = ckpt
        model(ids, pixels, GRIDS, labels=labels, attention_mask=mask)[1].backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        assert len(calls) == 1 + ckpt  # checkpointing runs the layer again in the backward pass
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], atol=1e-6, rtol=1e-5)
