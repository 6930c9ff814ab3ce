"""train.py end to end on a tiny shapes dataset: resume after SIGTERM (one process and DDP), two processes' gradients
equal one process's with double accumulation, the learning-rate schedule, clipping, when checkpoints are saved, what
each stage trains, that its checkpoints load in artemis-vlm, and that the accuracy scripts run."""
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from checkpoint import from_pretrained, save_pretrained
from model import ArtemisConfig, ArtemisVLM, TextConfig
from processor import Processor
from vision import VisionConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--head_dim=16", "--intermediate_size=64",
        "--vision_depth=1", "--vision_hidden=32", "--vision_heads=2", "--vision_out=32", "--num_workers=0",
        "--device=cpu", "--dtype=float32", "--batch_size=4", "--eval_iters=2", "--log_interval=1",
        "--eval_samples=0",  # captions at eval: tested in test_mixture.py
        "--threads=1"]  # a tiny model gains nothing from more; on shared cores, threads spinning for each other lose 5x


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--dataset=shapes", "--num_samples=160",
                    f"--out_dir={d}", "--num_workers=1", "--chunk_size=80", "--val_frac=0.1"],
                   check=True, capture_output=True, cwd=d)
    return str(d)


TRAIN = os.path.join(ROOT, "train.py")
SGD = os.path.join(ROOT, "tests", "sgd_train.py")  # train.py with plain SGD: weights move by lr x gradient
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def train(out, data, *args, check=True, script=TRAIN, nproc=1, env=None):
    cmd = [*(TORCHRUN if nproc == 2 else [sys.executable]), script, f"--out_dir={out}", f"--dataset={data}", *TINY,
           *args]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})})
    if check:  # a run's last printed lines too: a process that aborts at exit leaves no traceback in stderr
        assert p.returncode == 0, f"exit {p.returncode}; stdout ends {p.stdout[-1500:]!r}; stderr {p.stderr[-3000:]}"
    return p


def interrupted(out, data, *args, at, sig=signal.SIGTERM, nproc=1):
    """train.py sent sig, to its process group as Ctrl-C or `timeout` send it, when it prints a line starting with
    `at`: (exit status, what it printed after that line). stdout is read as printed, with PYTHONUNBUFFERED unset as
    most environments leave it: train.py itself must send each line when it prints it, or this reads nothing until
    the run has ended (torchrun starts its processes with `python -u`: there the one-process runs are the check).
    Under torchrun the signal goes to torchrun and to each of its processes."""
    cmd = [*(TORCHRUN if nproc == 2 else [sys.executable]), TRAIN, f"--out_dir={out}", f"--dataset={data}", *TINY,
           *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env,
                         start_new_session=True)
    for line in p.stdout:
        if line.startswith(at):
            os.killpg(p.pid, sig)  # the whole group, loader workers included
            break
    rest = []
    for line in p.stdout:  # torchrun's workers too, as a scheduler signals every process of a job, at each line
        rest.append(line)  # while they run: now and then one signal sent once does not reach them (seen under DDP)
        for pid in children(p.pid) if nproc == 2 else []:
            os.kill(pid, sig)
    return p.wait(), "".join(rest)


def children(pid):
    """The processes whose parent is pid. torchrun starts its workers in sessions of their own, and passes a signal
    on to them late enough that a fast run can end first."""
    found = []
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(d))
        except OSError:  # gone meanwhile
            pass
    return found


def stopped_by_sigterm(out, data, *args, at, nproc=1):
    """train.py stopped by SIGTERM at the log line of step `at`, having saved its checkpoint on the way out; returns
    what it printed after that line."""
    code, rest = interrupted(out, data, *args, at=f"iter {at}:", nproc=nproc)
    assert nproc == 2 or code == 0, code  # torchrun reports the signal it was stopped by in its status
    assert "saved checkpoint" in rest, rest
    return rest


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [(r["iter"], r["loss"]) for r in map(json.loads, f) if "loss" in r]
    assert len({it for it, _ in rows}) == len(rows), f"a step logged twice: {[it for it, _ in rows]}"
    return dict(rows)


def weights(path):
    return from_pretrained(path, dtype=torch.float32).state_dict()


def assert_same_run(full, cut, n, tol=1e-6):
    full, cut = losses(full), losses(cut)
    assert sorted(cut) == list(range(n))  # every step once: nothing repeated, nothing skipped
    for it in range(n):
        assert cut[it] == pytest.approx(full[it], abs=tol), it


def resumed_equals_uninterrupted(tmp_path, data, common, n, cut=()):
    """The run `common` (n steps) uninterrupted, and again (with `cut` too) stopped by SIGTERM after step 3 and
    resumed: every step's loss equal."""
    train(tmp_path / "full", data, *common)
    rest = stopped_by_sigterm(tmp_path / "cut", data, *common, *cut, at=3)
    stopped = json.loads(open(tmp_path / "cut" / "metrics.jsonl").readlines()[-1])["iter"] + 1
    assert 3 < stopped < n, rest
    train(tmp_path / "cut", data, *common, "--init_from=resume")
    assert_same_run(tmp_path / "full", tmp_path / "cut", n)


def test_resume_after_sigterm_continues_the_same_run(tmp_path, data):
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=40", "--eval_interval=1000"]
    resumed_equals_uninterrupted(tmp_path, data, common, 40, cut=["--num_workers=1"])
    # another seed would silently change the data order: refused in one line
    p = train(tmp_path / "cut", data, *common, "--init_from=resume", "--seed=7", check=False)
    assert p.returncode == 2 and "resume with other seed" in p.stderr and "Traceback" not in p.stderr


def test_resume_is_exact_with_8bit_adamw_and_bf16_weights(tmp_path, data):
    """config/stage2_single.py's optimizer (torchao's, compiled as train.py runs it) and bf16 weights: the 8-bit
    moments and the RNG of stochastic rounding come back, and the weights the checkpoint holds are the run's own."""
    pytest.importorskip("torchao")
    # stage1 at width 64: the projector's matrices get 8-bit moments (4096 values), and torchao compiles its step
    # for two shapes only, tens of seconds on a CPU the first time
    common = ["--init_from=scratch", "--stage=stage1", "--max_iters=12", "--eval_interval=1000", "--n_embd=64",
              "--vision_out=64", "--optimizer=adamw8bit", "--master_weights=bf16", "--dtype=bfloat16"]
    resumed_equals_uninterrupted(tmp_path, data, common, 12, cut=["--num_workers=1"])
    with safe_open(tmp_path / "cut" / "ckpt" / "model.safetensors", "pt") as f:
        assert f.get_slice("multi_modal_projector.fc1.weight").get_dtype() == "BF16"
    full, cut = weights(tmp_path / "full" / "ckpt"), weights(tmp_path / "cut" / "ckpt")
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    msg = one_error(train(tmp_path / "cut", data, *common, "--init_from=resume", "--master_weights=fp32", check=False))
    assert "resume with other master_weights" in msg


def test_resume_is_exact_with_muon(tmp_path, data):
    """The drawings demo's optimizer: the hidden matrices' momentum comes back with the AdamW moments of the rest."""
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=12", "--eval_interval=1000",
              "--optimizer=muon", "--muon_lr_scale=3"]
    resumed_equals_uninterrupted(tmp_path, data, common, 12)
    opt = torch.load(tmp_path / "cut" / "ckpt" / "train_state.pt", weights_only=False)["optimizer"]
    muon = [g for g in opt["param_groups"] if g["muon"]]
    assert muon and all("momentum_buffer" in opt["state"][i] for g in muon for i in g["params"])
    assert any(opt["state"][i]["momentum_buffer"].dim() == 5 for g in muon for i in g["params"])  # patch filters
    assert all("exp_avg" in opt["state"][i] for g in opt["param_groups"] if not g["muon"] for i in g["params"])
    # each part's Muon group comes just before its AdamW groups, at muon_lr_scale times their lr
    groups = opt["param_groups"]
    assert all(g["base_lr"] == pytest.approx(3 * groups[i + 1]["base_lr"]) and not groups[i + 1]["muon"]
               for i, g in enumerate(groups) if g["muon"])
    # the saved groups carry their learning rates: another scale would be silently ignored, so it is refused
    msg = one_error(train(tmp_path / "cut", data, *common, "--init_from=resume", "--muon_lr_scale=1", check=False))
    assert "resume with other muon_lr_scale" in msg
    # a run saved under other groups (before the patch embedding was Muon's): a one-line error
    path = tmp_path / "cut" / "ckpt" / "train_state.pt"
    state = torch.load(path, weights_only=False)
    state["optimizer"]["param_groups"][0]["params"].pop()
    torch.save(state, path)
    msg = one_error(train(tmp_path / "cut", data, *common, "--init_from=resume", check=False))
    assert "train_state.pt: its optimizer state does not fit" in msg and "--init_from=pretrained" in msg
    msg = one_error(train(tmp_path / "bf16", data, *common, "--master_weights=bf16", "--dtype=bfloat16", check=False))
    assert "optimizer='muon' needs master_weights='fp32'" in msg
    msg = one_error(train(tmp_path / "lora", data, *common, "--lora_rank=4", check=False))
    assert "optimizer='muon' needs" in msg and "lora_rank=0" in msg


def test_resume_after_a_kill_keeps_one_row_per_step(tmp_path, data):
    """Killed (no save on the way out) after its checkpoint at iter 8, with a metrics line cut in half: the resumed run
    goes through steps 8-11 again, and metrics.jsonl holds each step's row once, as the uninterrupted run's."""
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=16", "--eval_interval=8"]
    train(tmp_path / "full", data, *common)
    interrupted(tmp_path / "cut", data, *common, at="iter 11: loss", sig=signal.SIGKILL)
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


SMALL = ["--batch_size=2", "--gradient_accumulation_steps=1"]  # steps of one micro-batch of 2 rows: quick
def same_lr(lr):  # one learning rate for the projector, the decoder and the vision tower
    return [f"--{k}={lr}" for k in ("learning_rate", "decoder_lr", "vision_lr")]


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_two_processes_step_like_one_process_with_double_accumulation(tmp_path, data, tiny_ckpt, shard):
    """Two gloo processes, each with half the accumulation steps, against one process: the same losses and, under
    plain SGD, the same two updates, which are lr x the gradients. (After AdamW's first step a gradient off by a
    constant factor, processes summed instead of averaged or a wrong accumulation divisor, gives the same weights.)"""
    args = ["--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2", "--vision_top_n=1",
            "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=2", "--batch_size=2",
            "--grad_clip=0", *same_lr(0.1)]  # clipping would scale a gradient off by a factor back to the same norm
    train(tmp_path / "one", data, *args, script=SGD)
    train(tmp_path / "two", data, *args, f"--fsdp={shard == 'fsdp'}", script=SGD, nproc=2)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(l1) == sorted(l2) == [0, 1] and l2 == pytest.approx(l1, abs=1e-6)
    start, one, two = weights(tiny_ckpt), weights(tmp_path / "one" / "ckpt"), weights(tmp_path / "two" / "ckpt")
    moved = set()
    for k in start:
        d1, d2 = one[k] - start[k], two[k] - start[k]
        assert (d2 - d1).norm() <= 1e-4 * d1.norm(), (k, (d2.norm() / d1.norm()).item())
        if d1.norm() > 0:
            moved.add(k.split(".")[0])
    assert moved == {"multi_modal_projector", "language_model", "visual"}


def test_ddp_run_stopped_and_resumed_continues_the_one_process_run(tmp_path, data):
    """2 processes stopped by SIGTERM to torchrun, then resumed on 2: every step's loss as in one process's
    uninterrupted run."""
    # 200 steps: 30 of these tiny steps (0.7 s) can all be in the pipe before the test has read step 2's line
    common = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--max_iters=200", "--eval_interval=1000",
              "--gradient_accumulation_steps=2", "--batch_size=2"]
    train(tmp_path / "full", data, *common)
    rest = stopped_by_sigterm(tmp_path / "cut", data, *common, at=2, nproc=2)
    stopped = json.loads(open(tmp_path / "cut" / "metrics.jsonl").readlines()[-1])["iter"] + 1
    assert 2 < stopped < 200, rest
    train(tmp_path / "cut", data, *common, "--init_from=resume", nproc=2)
    assert_same_run(tmp_path / "full", tmp_path / "cut", 200, tol=1e-5)


def test_fsdp_resume_is_exact_and_reshards(tmp_path, data, tiny_ckpt):
    """An fsdp run stopped by SIGTERM writes each process's shards of the weights and AdamW state; resumed on two
    processes every step's loss equals the uninterrupted run's, and resumed on one (DCP reshards) too."""
    common = ["--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2", "--vision_top_n=1",
              "--max_iters=100", "--eval_interval=1000", "--gradient_accumulation_steps=2", "--batch_size=2"]
    train(tmp_path / "full", data, *common)  # one process: what two processes' steps equal (the DDP tests above)
    rest = stopped_by_sigterm(tmp_path / "cut", data, *common, "--fsdp=True", at=2, nproc=2)
    assert 2 < json.loads(open(tmp_path / "cut" / "metrics.jsonl").readlines()[-1])["iter"] + 1 < 100, rest
    shards = os.listdir(tmp_path / "cut" / "ckpt" / "sharded")
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(shards), shards  # each process wrote its own
    assert torch.load(tmp_path / "cut" / "ckpt" / "train_state.pt", weights_only=False)["optimizer"] is None
    shutil.copytree(tmp_path / "cut", tmp_path / "one")
    train(tmp_path / "cut", data, *common, "--fsdp=True", "--init_from=resume", nproc=2)
    assert_same_run(tmp_path / "full", tmp_path / "cut", 100)
    train(tmp_path / "one", data, *common, "--init_from=resume")
    assert_same_run(tmp_path / "full", tmp_path / "one", 100)


def test_lr_schedule_is_warmup_then_cosine_to_min_lr_frac(tmp_path, data, tiny_ckpt):
    """The learning rate every group stepped with (read from the optimizer), against the schedule: over the first
    warmup_frac of max_iters a linear rise to the group's lr, reached when warmup ends, then a cosine down to
    min_lr_frac x that lr at max_iters."""
    log = tmp_path / "steps.jsonl"
    train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2", "--vision_top_n=1",
          "--max_iters=20", "--eval_interval=1000", "--warmup_frac=0.2", "--min_lr_frac=0.1",
          "--learning_rate=1e-3", "--decoder_lr=2e-4", "--vision_lr=5e-5", *SMALL, script=SGD,
          env={"SGD_LOG": str(log)})
    steps = [json.loads(line) for line in open(log)]
    warmup, n, floor = 4, 20, 0.1

    def want(it):
        if it < warmup:
            return (it + 1) / (warmup + 1)  # the first step already learns
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (it - warmup) / (n - warmup)))

    assert len(steps) == n and sorted(set(steps[0]["base_lr"])) == [5e-5, 2e-4, 1e-3]
    for it, step in enumerate(steps):
        for base, lr in zip(step["base_lr"], step["lr"]):
            assert lr == pytest.approx(base * want(it), rel=1e-9), (it, base)
    mult = [step["lr"][0] / step["base_lr"][0] for step in steps]
    # by name: warmup's first step, the peak where it ends, the cosine's middle, its last step (just above the floor)
    assert mult[0] == pytest.approx(0.2) and mult[warmup] == 1.0 and mult[12] == pytest.approx(0.55)
    assert mult[-1] == pytest.approx(0.1 + 0.45 * (1 - math.cos(math.pi / 16)))
    with open(tmp_path / "metrics.jsonl") as f:  # the log line's lr is the projector's
        logged = {r["iter"]: r["lr"] for r in map(json.loads, f) if "lr" in r}
    assert logged == pytest.approx({it: 1e-3 * want(it) for it in range(n)}, rel=1e-9)


def test_grad_clip_scales_the_whole_gradient_to_its_bound(tmp_path, data, tiny_ckpt):
    """One SGD step, so the update over lr is the gradient the optimizer stepped with: clipped, it is the unclipped
    gradient of all trainable tensors together, scaled to norm grad_clip."""
    start = weights(tiny_ckpt)

    def stepped(out, clip, lr):
        train(tmp_path / out, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2",
              "--vision_top_n=1", "--max_iters=1", "--eval_interval=1", f"--grad_clip={clip}", *same_lr(lr),
              *SMALL, script=SGD)
        after = weights(tmp_path / out / "ckpt")
        return torch.cat([(after[k] - start[k]).flatten() / lr for k in start])

    g = stepped("free", 0, 1.0)
    clip = 1e-3
    clipped = stepped("clipped", clip, 100.0)  # an update large enough to read back from fp32 weights
    assert g.norm() > 10 * clip  # the bound is active
    assert clipped.norm() == pytest.approx(clip, rel=1e-3)
    assert (clipped - g * (clip / g.norm())).norm() <= 1e-3 * clip


def saves(stdout):
    return [int(it) for it in re.findall(r"^saved checkpoint to .* at iter (\d+)$", stdout, re.M)]


def test_without_always_save_only_a_better_val_loss_is_saved(tmp_path, data, tiny_ckpt):
    p = train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2",
              "--max_iters=8", "--eval_interval=1", "--always_save_checkpoint=False", *same_lr(0.3), *SMALL)
    with open(tmp_path / "metrics.jsonl") as f:
        evals = {r["iter"]: r["val_loss"] for r in map(json.loads, f) if "val_loss" in r}
    assert sorted(evals) == list(range(9))
    best, better = math.inf, []
    for it in range(1, 9):  # iter 0 is the starting weights: the first eval after it sets the bar
        if evals[it] < best:
            best, better = evals[it], better + [it]
    assert len(better) < 8, evals  # some eval did not improve: this run tells saving always from saving on improvement
    assert saves(p.stdout) == better, evals
    state = torch.load(tmp_path / "ckpt" / "train_state.pt", weights_only=False)
    assert state["iter_num"] == better[-1] and state["best_val_loss"] == best


def test_eval_only_evaluates_once_and_trains_nothing(tmp_path, data, tiny_ckpt):
    p = train(tmp_path, data, "--init_from=pretrained", f"--pretrained={tiny_ckpt}", "--stage=stage2",
              "--max_iters=5", "--eval_interval=1", "--eval_only=True")
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 1 and rows[0]["iter"] == 0 and math.isfinite(rows[0]["val_loss"]) and "loss" not in rows[0]
    assert not saves(p.stdout) and not os.path.exists(tmp_path / "ckpt")


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
    assert (torch.log_softmax(got, -1) - torch.log_softmax(want, -1)).abs().max() <= 4e-6  # measured 9.5e-7


def tokens_per_row(stdout):
    """Tokens per row of the first logged step, from its samples/s and tok/s."""
    m = re.search(r"iter 0: .* ([\d.]+) samples/s, (\d+) tok/s", stdout)
    return float(m[2]) / float(m[1])


def test_max_pixels_sizes_the_images_and_is_saved(tmp_path, data):
    """The shapes' 96x96 images at max_pixels=64*64 are 4 vision tokens each, not 9, and the checkpoint's processor
    keeps that size, as config/drawings_shape.py's smaller images need; a bad value is one line."""
    full = train(tmp_path / "full", data, "--init_from=scratch", "--max_iters=1").stdout
    small = train(tmp_path / "small", data, "--init_from=scratch", "--max_iters=1", "--max_pixels=4096").stdout
    assert tokens_per_row(full) - tokens_per_row(small) == pytest.approx(9 - 4, abs=0.2)
    assert Processor.from_pretrained(str(tmp_path / "small" / "ckpt")).max_pixels == 4096
    assert Processor.from_pretrained(str(tmp_path / "full" / "ckpt")).max_pixels == Processor.from_pretrained(
        data).max_pixels
    line = one_error(train(tmp_path / "bad", data, "--init_from=scratch", "--max_pixels=-5", check=False))
    assert "max_pixels=-5" in line and "min_pixels" in line


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


def test_accuracy_scripts_run(data, tiny_ckpt):
    """tests/shapes_accuracy.py, shapes_drawn.py, shapes_drawn2.py and shapes_fresh.py score a trained demo in
    minutes; here a random checkpoint with the shapes tokenizer scores 3 images each, so a change to what they call
    breaks a test, not the script."""
    for script, args, says in (("shapes_accuracy.py", [tiny_ckpt, data, "3"], "exact held-out captions"),
                               ("shapes_drawn.py", [tiny_ckpt, "3"], "exact captions of drawings made by another"),
                               ("shapes_drawn2.py", [tiny_ckpt, "3"], "exact captions of drawings made by a second"),
                               ("shapes_fresh.py", [tiny_ckpt, "3"], "exact captions of new drawings of prepare")):
        p = subprocess.run([sys.executable, os.path.join(ROOT, "tests", script), *args], capture_output=True,
                           text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})  # as TINY's threads
        assert p.returncode == 0, p.stderr[-3000:]
        assert re.match(rf"[0-3]/3 = [\d.]+% {says}", p.stdout), p.stdout


def test_missing_torchao_is_one_line(tmp_path, data):
    """torchao is imported only when chosen, and before a model loads (this one would fail to): without it, one line
    that names it. bf16 master weights need bf16 compute: one line too."""
    hide = "import runpy, sys; sys.modules['torchao'] = None; runpy.run_path('train.py', run_name='__main__')"
    args = [f"--out_dir={tmp_path}", f"--dataset={data}", *TINY, "--init_from=pretrained",
            f"--pretrained={tmp_path / 'nowhere'}"]
    p = subprocess.run([sys.executable, "-c", hide, *args, "--optimizer=adamw8bit"], capture_output=True, text=True,
                       cwd=ROOT)
    assert "needs torchao (pip install torchao)" in one_error(p)
    msg = one_error(train(tmp_path, data, "--master_weights=bf16", check=False))
    assert "master_weights='bf16' computes in bf16: set dtype='bfloat16'" in msg
