"""LoRA (lora.py, train.py's lora_* keys) on the tiny models: the adapter in PEFT's format as peft 0.21.2 loads it onto
artemis-vlm's model class, its merge into a checkpoint artemis-vlm loads, what trains, exact resume after SIGTERM, and
the int8 base's gradients and training."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from checkpoint import PEFT_PREFIX, from_pretrained, load, read_adapter, save_adapter
from lora import TARGETS, LoRALinear, apply_lora
from model import ArtemisConfig, ArtemisVLM, Int8Linear, TextConfig
from quantize import quantize_int8
from test_train import ROOT, data, losses, resumed_equals_uninterrupted, tiny_ckpt, train  # noqa: F401
from vision import VisionConfig

LORA = ["--init_from=pretrained", "--stage=stage2", "--lora_rank=4", "--lora_alpha=8"]


def adapted(tmp_path, r, alpha, top_n):
    """artemis-vlm's model on random weights saved to disk; ours loaded from it with adapters whose B is not zero (so
    they act), its projector and opened vision blocks changed too, and those tensors saved as train.py saves them."""
    from test_model import artemis_reference
    ref, path = artemis_reference(tmp_path)
    ours = from_pretrained(path, dtype=torch.float64)  # float64: the two graft implementations agree to 5e-7 there
    ours.set_training_stage("stage2", top_n)
    apply_lora(ours, r, alpha, dropout=0.1).double()
    trained = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in trained.values():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)
    blocks = [f"visual.blocks.{i}" for i in range(len(ours.visual.blocks) - top_n, len(ours.visual.blocks))]
    save_adapter(str(tmp_path / "adapter"), trained, dict(
        r=r, lora_alpha=alpha, lora_dropout=0.1, target_modules=list(TARGETS),
        modules_to_save=["multi_modal_projector", *blocks], base_model_name_or_path=path))
    return ref.double(), ours.eval(), path


def logits(model, ours):
    from test_model import GRIDS, image_batch
    ids, mask, _, pixels = image_batch()
    pixels = pixels.double()
    with torch.no_grad():
        out = model(ids, pixels, GRIDS, attention_mask=mask)[0] if ours else \
            model(input_ids=ids, attention_mask=mask, pixel_values=pixels, image_grid_thw=GRIDS).logits
    return out[mask.bool()]  # (real positions, vocab)


@pytest.mark.parametrize("r, alpha, top_n", [(4, 8, 0), (2, 16, 1)])
def test_peft_loads_the_adapter_onto_artemis_vlm(tmp_path, r, alpha, top_n):
    peft = pytest.importorskip("peft")
    ref, ours, path = adapted(tmp_path, r, alpha, top_n)
    base = logits(from_pretrained(path, dtype=torch.float64).eval(), ours=True)
    theirs = peft.PeftModel.from_pretrained(ref, str(tmp_path / "adapter")).eval()
    want, got = logits(theirs, ours=False), logits(ours, ours=True)
    assert (got - base).abs().max() > 0.5  # the adapters, projector and vision block change the output
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    # the scaling, alpha / r in both: at (4, 8) and (2, 16) alpha alone or rsLoRA's alpha / sqrt(r) differ from it
    theirs_scaling = {m.scaling["default"] for m in theirs.modules() if isinstance(getattr(m, "scaling", 0), dict)}
    assert theirs_scaling == {m.scaling for m in ours.modules() if isinstance(m, LoRALinear)} == {alpha / r}


def test_merged_checkpoint_loads_in_artemis_vlm(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, ours, _ = adapted(tmp_path, 4, 8, 1)
    def merge(out):
        return subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), f"--init_from={tmp_path / 'adapter'}",
                               f"--out_dir={out}"], capture_output=True, text=True, cwd=ROOT)
    inside = merge(tmp_path / "adapter" / "merged")  # would sit inside the adapter it merges: refused, before loading
    assert inside.returncode == 2 and "--out_dir" in inside.stderr and "new directory" in inside.stderr
    assert not os.path.exists(tmp_path / "adapter" / "merged")
    p = merge(tmp_path / "merged")
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / "merged")) == ["config.json", "model.safetensors"]
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float64).eval()
    want, got = logits(merged, ours=False), logits(ours, ours=True)
    assert (got - want).abs().max() <= 1e-5, (got - want).abs().max()
    again = from_pretrained(str(tmp_path / "merged")).state_dict()  # and ours reads the merge back unchanged
    for k, v in from_pretrained(str(tmp_path / "adapter")).state_dict().items():
        assert torch.equal(v, again[k]), k


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, data, tiny_ckpt):
    """A LoRA run on the int8 base with the top vision block open, where only the adapters learn (the projector and
    the block at lr 0), so its loss falls only by what they learn through the int8 layers."""
    out = tmp_path_factory.mktemp("int8")
    train(out, data, *LORA, f"--pretrained={tiny_ckpt}", "--lora_base=int8", "--vision_top_n=1", "--max_iters=8",
          "--eval_interval=8", "--decoder_lr=1e-2", "--learning_rate=0", "--vision_lr=0")
    return out


def test_only_adapters_projector_and_opened_blocks_get_optimizer_state(int8_run):
    ckpt = int8_run / "ckpt"
    with safe_open(ckpt / "adapter_model.safetensors", framework="pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    layers = [f"language_model.model.layers.{i}.{m}.{t}.lora_{ab}.weight" for i in range(2) for ab in "AB"
              for m, ts in (("self_attn", TARGETS[:4]), ("mlp", TARGETS[4:])) for t in ts]
    full = [f"multi_modal_projector.fc{i}.{w}" for i in (1, 2) for w in ("weight", "bias")]
    vision = [k for k in from_pretrained(ckpt).state_dict() if k.startswith("visual.blocks.1.")]
    assert sorted(saved) == sorted(PEFT_PREFIX + k for k in layers + full + vision)
    assert all(saved[PEFT_PREFIX + k].abs().max() > 0 for k in layers if "lora_B" in k)  # trained off zero
    assert not os.path.exists(ckpt / "model.safetensors")  # the base is not copied into every checkpoint
    state = torch.load(ckpt / "train_state.pt", weights_only=False)["optimizer"]["state"]
    assert sorted(tuple(s["exp_avg"].shape) for s in state.values()) == sorted(tuple(t.shape) for t in saved.values())


def test_int8_base_trains(int8_run):
    loss = losses(int8_run)
    assert max(loss[i] for i in (5, 6, 7)) < min(loss[i] for i in (0, 1, 2)) - 0.1, loss


def test_a_lora_out_dir_loads_as_its_merged_base(tmp_path, int8_run, tiny_ckpt):
    """sample.py and serve.py (checkpoint.load) and quantize.py take a LoRA run's out_dir: the base with the adapters
    merged, which equals the base with the adapters applied."""
    model, processor = load(str(int8_run))
    ids = torch.randint(30, 60, (2, 12), generator=torch.Generator().manual_seed(0))
    unmerged = apply_lora(from_pretrained(tiny_ckpt), 4, 8)
    assert not unmerged.load_state_dict(read_adapter(str(int8_run / "ckpt")), strict=False).unexpected_keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], unmerged.eval()(ids)[0], atol=1e-5, rtol=0)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "quantize.py"), f"--init_from={int8_run}",
                        f"--out_dir={tmp_path / 'q'}"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert not any(n.startswith("adapter") or n.endswith(".pt") for n in os.listdir(tmp_path / "q"))
    assert from_pretrained(tmp_path / "q").config.quantization == "int8"


def test_int8_base_gradients_are_the_dequantized_weights_gradients():
    """The adapters' gradients through a frozen int8 decoder equal those through its float dequantization."""
    torch.manual_seed(0)
    text = TextConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, sliding_window=None)
    vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16,
                          num_position_embeddings=16, deepstack_visual_indexes=[])
    q = quantize_int8(ArtemisVLM(ArtemisConfig(text, vision)))
    deq = copy.deepcopy(q)
    for m in deq.language_model.modules():
        for name, child in list(m.named_children()):
            if isinstance(child, Int8Linear):
                linear = torch.nn.Linear(child.weight.shape[1], child.weight.shape[0], bias=False)
                linear.weight.data = child.weight.float() * child.scales[:, None]
                setattr(m, name, linear)
    deq.config.quantization = None
    for model in (q, deq):
        torch.manual_seed(1)
        apply_lora(model, 4, 8)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.1)
    ids = torch.randint(30, 64, (2, 10))  # no <|image_pad|> (22)
    for model in (q, deq):
        model(ids, labels=ids)[1].backward()
    lora = [n for n, _ in q.named_parameters() if "lora_" in n]
    assert len(lora) == 2 * 2 * len(TARGETS)
    grads = dict(deq.named_parameters())
    for n, p in q.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(p.grad, grads[n].grad, atol=1e-5, rtol=1e-4)
    assert all(isinstance(m.base_layer, Int8Linear) for m in q.modules() if isinstance(m, LoRALinear))


def test_lora_resume_after_sigterm_continues_the_same_run(tmp_path, data, tiny_ckpt):
    """With dropout on the adapters' input, so the restored RNG matters too."""
    common = [*LORA, f"--pretrained={tiny_ckpt}", "--lora_dropout=0.1", "--max_iters=12", "--eval_interval=1000",
              "--decoder_lr=1e-2"]
    resumed_equals_uninterrupted(tmp_path, data, common, 12)


def test_lora_config_errors_are_one_line(tmp_path, data, tiny_ckpt):
    for args, msg in [(["--stage=stage1"], "trains in stage2 only"),
                      (["--lora_targets=q_proj,qkv"], "lora_targets='q_proj,qkv', expected a comma-separated subset"),
                      (["--init_from=scratch"], "adapts an artemis checkpoint")]:
        p = train(tmp_path, data, *LORA, f"--pretrained={tiny_ckpt}", *args, check=False)
        assert p.returncode == 2 and msg in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
