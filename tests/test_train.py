"""train.py end to end on a tiny shapes dataset: resume after SIGTERM, DDP equals accumulation, what each stage
trains, and that its checkpoints load in artemis-vlm."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from checkpoint import from_pretrained, save_pretrained
from model import ArtemisConfig, ArtemisVLM, TextConfig
from processor import Processor
from vision import VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--head_dim=16", "--intermediate_size=64",
        "--vision_depth=1", "--vision_hidden=32", "--vision_heads=2", "--vision_out=32", "--num_workers=0",
        "--device=cpu", "--dtype=float32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--eval_samples=0"]  # captions at eval: tested in test_mixture.py


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--dataset=shapes", "--num_samples=160",
                    f"--out_dir={d}", "--num_workers=1", "--chunk_size=80", "--val_frac=0.1"],
                   check=True, capture_output=True, cwd=d)
    return str(d)


def train(out, data, *args, check=True):
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", f"--dataset={data}", *TINY, *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["iter"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def weights(path):
    return from_pretrained(path, dtype=torch.float32).state_dict()


def interrupted(out, data, args, at, sig):
    """A training run sent sig at its line starting with `at`, to its whole process group (as Ctrl-C or `timeout`
    do): (exit status, what it printed after)."""
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), f"--out_dir={out}", f"--dataset={data}", *TINY, *args]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith(at):
            os.killpg(p.pid, sig)
            break
    rest = p.stdout.read()
    return p.wait(), rest


def test_resume_after_sigterm_continues_the_same_run(tmp_path, data):
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=40", "--eval_interval=1000"]
    train(tmp_path / "full", data, *common)
    rc, rest = interrupted(tmp_path / "cut", data, [*common, "--num_workers=1"], "iter 3:", signal.SIGTERM)
    assert rc == 0
    stopped = json.loads(open(tmp_path / "cut" / "metrics.jsonl").readlines()[-1])["iter"] + 1
    assert "saved checkpoint" in rest and 3 < stopped < 40, rest
    train(tmp_path / "cut", data, *common, "--init_from=resume")
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(40))  # every step once: nothing repeated, nothing skipped
    for it in range(40):
        assert cut[it] == pytest.approx(full[it], abs=1e-6), it
    # another seed would silently change the data order: refused in one line
    p = train(tmp_path / "cut", data, *common, "--init_from=resume", "--seed=7", check=False)
    assert p.returncode == 2 and "resume with other seed" in p.stderr and "Traceback" not in p.stderr


def test_resume_after_a_kill_keeps_one_row_per_step(tmp_path, data):
    """Killed (no save on the way out) after its checkpoint at iter 8, with a metrics line cut in half: the resumed run
    goes through steps 8-11 again, and metrics.jsonl holds each step's row once, as the uninterrupted run's."""
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=16", "--eval_interval=8"]
    train(tmp_path / "full", data, *common)
    interrupted(tmp_path / "cut", data, common, "iter 11: loss", signal.SIGKILL)
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as f:
        f.write('{"iter": 12, "lo')  # a write the kill cut short
    train(tmp_path / "cut", data, *common, "--init_from=resume")
    rows = [json.loads(line) for line in open(tmp_path / "cut" / "metrics.jsonl")]
    assert [r["iter"] for r in rows if "loss" in r] == list(range(16))
    assert [r["iter"] for r in rows if "val_loss" in r] == [0, 8, 16]
    full = losses(tmp_path / "full")
    assert all(r["loss"] == pytest.approx(full[r["iter"]], abs=1e-6) for r in rows if "loss" in r)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, data):
    """A random tiny graft with the shapes tokenizer, as init_from='pretrained' expects."""
    d = str(tmp_path_factory.mktemp("ckpt"))
    proc = Processor.from_pretrained(data)
    torch.manual_seed(0)
    text = TextConfig(vocab_size=proc.tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      sliding_window=None)
    vision = VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                          num_position_embeddings=16, deepstack_visual_indexes=[])
    model = ArtemisVLM(ArtemisConfig(text, vision, proc.image_token_id))
    save_pretrained(model, d, write_extra=proc.save_pretrained)
    return d


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_stages_train_only_their_parts(tmp_path, data, tiny_ckpt, stage):
    train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", f"--stage={stage}",
          "--max_iters=2", "--eval_interval=2", "--learning_rate=1e-2", "--decoder_lr=1e-2")
    before, after = weights(tiny_ckpt), weights(tmp_path / "ckpt")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "nothing trained"
    assert all(k.startswith("multi_modal_projector.") for k in changed) if stage == "stage1" else \
        not any(k.startswith("visual.") for k in changed) and any(k.startswith("language_model.") for k in changed)


@pytest.mark.parametrize("top_n", [1, 2])
def test_vision_top_n_opens_the_top_blocks(tmp_path, data, tiny_ckpt, top_n):
    train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage1",
          f"--vision_top_n={top_n}", "--max_iters=2", "--eval_interval=2", "--vision_lr=1e-2")
    before, after = weights(tiny_ckpt), weights(tmp_path / "ckpt")
    changed = {".".join(k.split(".")[1:3]) for k in before if k.startswith("visual.")
               and not torch.equal(before[k], after[k])}
    # the tiny tower has 2 blocks: opening both opens all of it, patch embedding and merger too
    want = {"blocks.1"} if top_n == 1 else {"blocks.0", "blocks.1", "patch_embed.proj", "pos_embed.weight",
                                            "merger.norm", "merger.linear_fc1", "merger.linear_fc2"}
    assert changed == want


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_with_double_accumulation(tmp_path, data, tiny_ckpt, shard):
    args = ["--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2", "--max_iters=1",
            "--eval_interval=1", "--gradient_accumulation_steps=2", "--batch_size=2"]
    train(tmp_path / "one", data, *args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py"), f"--out_dir={tmp_path / 'two'}", f"--dataset={data}", *TINY, *args,
           f"--fsdp={shard == 'fsdp'}"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert losses(tmp_path / "two")[0] == pytest.approx(losses(tmp_path / "one")[0], abs=1e-6)
    one, two = weights(tmp_path / "one" / "ckpt"), weights(tmp_path / "two" / "ckpt")
    start = weights(tiny_ckpt)
    assert any(not torch.equal(start[k], one[k]) for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-6, rtol=0)


def test_checkpoint_loads_in_artemis_vlm(tmp_path, data, tiny_ckpt):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("artemis_vlm")
    train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2",
          "--max_iters=1", "--eval_interval=1")
    ckpt = str(tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    ours = from_pretrained(ckpt, dtype=torch.float32).eval()
    proc = Processor.from_pretrained(ckpt)
    from PIL import Image
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}]
    batch = proc(proc.apply_chat_template(msgs, add_generation_prompt=True), images=[Image.new("RGB", (64, 64), "red")])
    with torch.no_grad():
        want = ref(**batch).logits
        got, _ = ours(batch["input_ids"], batch["pixel_values"], batch["image_grid_thw"])
    assert (torch.log_softmax(got, -1) - torch.log_softmax(want, -1)).abs().max() <= 1e-4


def test_bad_init_from_is_one_line(tmp_path, data):
    p = train(tmp_path, data, "--init_from=nowhere", check=False)
    assert p.returncode == 2 and "init_from='nowhere'" in p.stderr and "Traceback" not in p.stderr


def test_bad_train_on_is_one_line(tmp_path, data):
    p = train(tmp_path, data, "--init_from=scratch", "--train_on=every", check=False)
    assert p.returncode == 2 and "train_on='every', expected 'all' or 'last'" in p.stderr
    assert "Traceback" not in p.stderr


def test_missing_dataset_is_one_line(tmp_path):
    p = train(tmp_path, str(tmp_path / "nope"), "--init_from=scratch", check=False)
    assert p.returncode == 2 and "is not a prepared dataset" in p.stderr and "Traceback" not in p.stderr


def one_error(p):
    lines = [line for line in p.stderr.splitlines() if not line.startswith("overriding:")]  # configurator's echo
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), p.stderr[-3000:]
    return lines[0]


def test_damaged_checkpoint_is_one_line(tmp_path, data, tiny_ckpt):
    """Weights cut short by an interrupted copy, or a resume state that is not one: one line naming the file."""
    shutil.copytree(tiny_ckpt, tmp_path / "cut")
    weights = tmp_path / "cut" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    msg = one_error(train(tmp_path / "out", data, "--init_from=pretrained", f"--pretrained={tmp_path / 'cut'}",
                          check=False))
    assert f"{weights}: truncated or not a safetensors file" in msg
    shutil.copytree(tiny_ckpt, tmp_path / "run" / "ckpt")
    (tmp_path / "run" / "ckpt" / "train_state.pt").write_bytes(b"PK\x03\x04 cut short")
    msg = one_error(train(tmp_path / "run", data, "--init_from=resume", check=False))
    assert f"{tmp_path / 'run' / 'ckpt' / 'train_state.pt'}: unreadable resume state" in msg
    # a ckpt folder of the user's where the checkpoint goes: refused before training, and left as it was
    (tmp_path / "mine" / "ckpt").mkdir(parents=True)
    (tmp_path / "mine" / "ckpt" / "notes.txt").write_text("keep me")
    msg = one_error(train(tmp_path / "mine", data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", check=False))
    assert "out_dir=" in msg and "not a checkpoint" in msg
    assert os.listdir(tmp_path / "mine" / "ckpt") == ["notes.txt"]
