"""quantize.py: int8 weight-only decoder linears stay close to full precision on the tiny parity models, every matmul
path computes the same dequantized product, and an int8 checkpoint round-trips through save, load, sample.py and
quantize.py while train.py refuses it."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from checkpoint import from_pretrained, save_pretrained
from model import ArtemisConfig, ArtemisVLM, Int8Linear, TextConfig
from quantize import int8_linear, quantize_int8
from test_model import GRIDS, IMG, TEXT, VISION, image_batch, perturb
from test_sample import checkpoint
from vision import VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parity_model(seed=0, window=None, tied=False):
    torch.manual_seed(seed)
    text = TextConfig.from_dict({**TEXT, "sliding_window": window, "tie_word_embeddings": tied})
    return perturb(ArtemisVLM(ArtemisConfig(text, VisionConfig(**VISION), IMG)).eval(), seed)


@pytest.mark.parametrize("window", [None, 5])
def test_int8_stays_close_to_full_precision(window):
    """Log-probs of every real position of the image batch and of 8 text rows (349 positions), teacher-forced.
    Measured over seeds 0-5 and both windows: mean |delta log-prob| 0.0085-0.0094, max 0.054-0.091, the same greedy
    next token at 97.4-99.1% of positions. Bounds: about twice those."""
    full = parity_model(window=window)
    q = quantize_int8(copy.deepcopy(full))
    ids, mask, _, pixels = image_batch()
    text = torch.randint(30, 90, (8, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = torch.cat([full(ids, pixels, GRIDS, attention_mask=mask)[0][mask.bool()], full(text)[0].flatten(0, 1)])
        b = torch.cat([q(ids, pixels, GRIDS, attention_mask=mask)[0][mask.bool()], q(text)[0].flatten(0, 1)])
    a, b = a.log_softmax(-1), b.log_softmax(-1)
    delta, agree = (a - b).abs(), (a.argmax(-1) == b.argmax(-1)).float().mean()
    assert 0 < delta.mean() <= 0.02 and delta.max() <= 0.2, (delta.mean(), delta.max())
    assert agree >= 0.95, agree


def test_which_modules_are_quantized():
    model = quantize_int8(parity_model())
    int8 = {n for n, m in model.named_modules() if isinstance(m, Int8Linear)}
    want = {f"language_model.model.layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")} | {"language_model.lm_head"}
    assert int8 == want
    assert model.config.quantization == "int8"
    tied = quantize_int8(parity_model(tied=True))  # a tied head stays the float embedding table
    assert tied.language_model.lm_head.weight is tied.language_model.model.embed_tokens.weight
    assert tied.language_model.lm_head.weight.dtype == torch.float32


def test_every_matmul_path_is_the_dequantized_product():
    """Eager fp32 on CPU (aten's int8 kernel), the generic dequantize-then-matmul (bf16 here), and the compiled
    single-row reduction all compute x @ (int8 weight * scales).T; and rounding per output row is within half a step."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 72, bias=False)
    q = int8_linear(linear)
    w = q.weight.float() * q.scales[:, None]  # (72, 40)
    assert (w - linear.weight).abs().max() <= 0.5 * q.scales.max() + 1e-7
    assert q.weight.abs().amax(1).eq(127).all()  # each row's largest weight uses the full range
    for x in (torch.randn(3, 5, 40), torch.randn(1, 1, 40)):
        assert torch.allclose(q(x), F.linear(x, w), atol=1e-5)
        qb = copy.deepcopy(q).to(torch.bfloat16)
        assert qb.weight.dtype == torch.int8 and qb.scales.dtype == torch.bfloat16
        assert torch.allclose(qb(x.bfloat16()).float(), F.linear(x, w), atol=0.05, rtol=0.02)
    x = torch.randn(1, 1, 40)
    assert torch.allclose(torch.compile(q)(x), F.linear(x, w), atol=1e-5)


def test_quantized_checkpoint_round_trips(tmp_path):
    model = quantize_int8(parity_model())
    save_pretrained(model, str(tmp_path / "int8"))
    with open(tmp_path / "int8" / "config.json") as f:
        assert json.load(f)["quantization"]["method"] == "int8"
    again = from_pretrained(str(tmp_path / "int8"))
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b), k
    ids, mask, _, pixels = image_batch()
    with torch.no_grad():
        assert torch.equal(model(ids, pixels, GRIDS, attention_mask=mask)[0],
                           again(ids, pixels, GRIDS, attention_mask=mask)[0])
    half = from_pretrained(str(tmp_path / "int8"), dtype=torch.bfloat16)
    q_proj = half.language_model.model.layers[0].self_attn.q_proj
    assert q_proj.weight.dtype == torch.int8 and q_proj.scales.dtype == torch.bfloat16
    # the loss path dequantizes the int8 head: the same loss as the logits give
    labels = ids.masked_fill(ids == IMG, -100).masked_fill(mask == 0, -100)
    with torch.no_grad():
        logits, _ = again(ids, pixels, GRIDS, attention_mask=mask)
        _, loss = again(ids, pixels, GRIDS, labels=labels, attention_mask=mask)
    want = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    assert abs(loss.item() - want.item()) <= 1e-5
    # strict loading still names the key: a checkpoint without its scales
    from safetensors.torch import load_file, save_file
    sd = load_file(str(tmp_path / "int8" / "model.safetensors"))
    del sd["language_model.lm_head.scales"]
    save_file(sd, str(tmp_path / "int8" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensor 'language_model.lm_head.scales' \(expected shape \(96,\)\)"):
        from_pretrained(str(tmp_path / "int8"))


def test_compiled_int8_decode_equals_eager(tmp_path):
    model = quantize_int8(parity_model())
    torch._dynamo.reset()  # a fresh capture, not a recompile of an earlier test's decode_one
    ids = torch.randint(30, 90, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(model.generate(ids, 8, temperature=0, decode_one=model.compile_decode()),
                           model.generate(ids, 8, temperature=0))


def script(name, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, name), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def one_error(r):
    lines = [line for line in r.stderr.splitlines() if not line.startswith("overriding:")]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_scripts_quantize_sample_and_refuse_to_train(tmp_path):
    src = checkpoint(tmp_path / "out" / "ckpt", scripted=True)  # answers exactly 'Hi'
    r = script("quantize.py", f"--init_from={tmp_path / 'out'}", f"--out_dir={tmp_path / 'int8'}")  # an out_dir
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "int8")) == sorted(os.listdir(src))  # tokenizer, template, preprocessor
    assert from_pretrained(str(tmp_path / "int8")).config.quantization == "int8"
    for args in ([f"--init_from={tmp_path / 'int8'}"], [f"--init_from={src}", "--quantize=int8"]):
        r = script("sample.py", *args, "--device=cpu", "--prompt=Hello", "--max_new_tokens=8")
        assert r.returncode == 0 and r.stdout == "Hi\n", r.stderr
    msg = one_error(script("sample.py", f"--init_from={src}", "--quantize=int4"))
    assert "--quantize=int4" in msg
    # saves that would delete what they did not write are refused, and nothing is deleted: the source itself, the
    # training out_dir holding it, a folder inside it, a folder of the user's
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"mine")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for out, expect in ((src, "new directory"), (tmp_path / "out", "new directory"),
                        (tmp_path / "out" / "ckpt" / "sub", "new directory"),
                        (tmp_path / "photos", "not a checkpoint")):
        msg = one_error(script("quantize.py", f"--init_from={tmp_path / 'out'}", f"--out_dir={out}"))
        assert "--out_dir" in msg and expect in msg, msg
        assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    msg = one_error(script("quantize.py", f"--init_from={tmp_path / 'int8'}", f"--out_dir={tmp_path / 'again'}"))
    assert "already quantized" in msg and not os.path.exists(tmp_path / "again")
    data = tmp_path / "data"
    r = script("prepare.py", "--dataset=shapes", "--num_samples=40", f"--out_dir={data}", "--num_workers=1",
               "--val_frac=0.1")
    assert r.returncode == 0, r.stderr
    msg = one_error(script("train.py", "--init_from=pretrained", f"--pretrained={tmp_path / 'int8'}",
                           f"--dataset={data}", f"--out_dir={tmp_path / 'train'}", "--device=cpu", "--dtype=float32",
                           "--batch_size=2"))
    assert "int8 checkpoint" in msg and "full-precision" in msg
