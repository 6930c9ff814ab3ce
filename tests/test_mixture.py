"""Stage-2 data: a weighted mixture of an image dataset and a text-only chat corpus (dataset.Mixture) -- its draws
match the weights, its schedule resumes exactly and groups by length, and train.py trains on it (per-source eval,
eval captions, resume, DDP and FSDP with 2 gloo processes)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from checkpoint import from_pretrained
from dataset import Mixture, PreparedDataset
from processor import Processor
from test_train import ROOT, SGD, losses, same_lr, stopped_by_sigterm, train

WORDS = "the tool call returns a list of results with their scores and sources in order".split()


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    """(shapes dir, text dir): 160 captioned shapes and 160 text-only chat rows of 3-60 word replies, prepared with
    the shapes tokenizer, as a text rehearsal corpus is prepared with the decoder's."""
    d = tmp_path_factory.mktemp("mix")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), *a, "--num_workers=1",  # noqa
                                     "--chunk_size=80", "--val_frac=0.1"], check=True, capture_output=True,
                                    text=True, cwd=d)
    run("--dataset=shapes", "--num_samples=160", f"--out_dir={d / 'shapes'}")
    rng = np.random.default_rng(0)
    with open(d / "chat.jsonl", "w") as f:
        for i in range(160):
            reply = " ".join(rng.choice(WORDS, rng.integers(3, 60)))
            msgs = [{"role": "user", "content": f"question {i}: what does the tool return?"},
                    {"role": "assistant", "content": reply}]
            f.write(json.dumps({"id": f"chat-{i}", "messages": msgs, "images": None}) + "\n")
    p = run("--dataset=chat", f"--src={d / 'chat.jsonl'}", f"--tokenizer={d / 'shapes'}", f"--out_dir={d / 'text'}")
    assert "160" not in p.stdout.split("skipped:")[1] and "skipped: none" in p.stdout, p.stdout  # every row kept
    return str(d / "shapes"), str(d / "text")


def test_text_only_rows_prepare_with_their_lengths(mix):
    img, txt = mix
    ds, proc = PreparedDataset(txt, "train"), Processor.from_pretrained(img)
    assert len(ds) > 100 and len(ds.lengths) == len(ds)
    for i in (0, 7, len(ds) - 1):
        row = ds[i]
        assert row["images"] == [] and row["messages"][-1]["role"] == "assistant"
        assert ds.lengths[i] == proc.collate([row])["input_ids"].shape[1]  # what a training batch holds
    assert len(set(ds.lengths.tolist())) > 20  # lengths vary: there is padding to save


def draws(m, steps, batch_size=4, n_micro=4, window=8, seed=1, start=0):
    g = m.schedule(start, batch_size, n_micro, window, seed)
    return [next(g) for _ in range(steps)]


def test_draws_match_the_weights_and_sources_restart_their_epochs(mix):
    img, txt = mix
    m = Mixture(f"{img}:3,{txt}:1", "train")
    rows = np.array(draws(m, 400)).ravel()  # 400 steps x 16 rows
    from_img = (rows < m.starts[1]).mean()
    # binomial: sd = sqrt(.75 * .25 / 6400) = 0.0054; the tolerance is 4.6 sd
    assert abs(from_img - 0.75) < 0.025, from_img
    # the text source (~144 rows) gave ~1600: ~11 epochs, each a permutation, so every row came equally often (+-1)
    counts = np.bincount(rows[rows >= m.starts[1]] - m.starts[1], minlength=len(m.sources[1]))
    assert counts.min() >= 10 and counts.max() - counts.min() <= 1, counts
    # a fresh order each epoch (by seed, source and epoch)
    assert not np.array_equal(m.take(1, 1, 0, 50), m.take(1, 1, len(m.sources[1]), 50))


def test_schedule_resumes_exactly_and_groups_by_length(mix):
    img, txt = mix
    spec = f"{img}:1,{txt}:1"
    full = draws(Mixture(spec, "train"), 40)
    for start in (3, 8, 21):  # mid-window, at a window's start, and after a few windows
        assert draws(Mixture(spec, "train"), 40 - start, start=start) == full[start:], start
    assert draws(Mixture(spec, "train"), 40, seed=2) != full

    def padding(window):
        m = Mixture(spec, "train")
        batches = [b for step in draws(m, 40, window=window) for b in step]
        lengths = [m.lengths[b] for b in batches]
        return sum(int(x.max()) * len(x) - int(x.sum()) for x in lengths) / sum(int(x.max()) * len(x) for x in lengths)

    grouped, plain = padding(8), padding(0)
    assert grouped < plain / 3, (grouped, plain)


def test_datasets_prepared_before_lengths_still_read(mix, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(mix[1], old)
    for split in ("train", "val"):
        for f in os.listdir(old / split):
            if f.endswith(".len.npy"):
                os.remove(old / split / f)
    ds = PreparedDataset(str(old), "train")
    assert ds[0]["messages"] == PreparedDataset(mix[1], "train")[0]["messages"] and not ds.lengths.any()
    assert len(draws(Mixture(f"{mix[0]},{old}:0.5", "train"), 3)) == 3


@pytest.mark.parametrize("spec, says", [("{img}:3,{tmp}/nope:1", "is not a prepared dataset"),
                                        ("{img}:3,{txt}:heavy", "'heavy' is not a number"),
                                        ("{img}:0,{txt}:1", "the weight must be a positive number"),
                                        ("{img}:1,{img}:2", "is listed twice")])
def test_bad_mixture_is_one_line(mix, tmp_path, spec, says):
    spec = spec.format(img=mix[0], txt=mix[1], tmp=tmp_path)
    p = train(tmp_path / "out", spec, "--init_from=scratch", check=False)
    assert p.returncode == 2 and says in p.stderr and "dataset=" in p.stderr and "Traceback" not in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("error: dataset="), p.stderr  # the one line after the echo


MIX = ["--init_from=scratch", "--stage=stage2", "--vision_top_n=1", "--length_window=3", "--eval_samples=2"]


def test_resume_mid_mixture_sees_the_same_rows_with_per_source_eval_and_captions(tmp_path, mix):
    spec = f"{mix[0]}:3,{mix[1]}:1"
    common = [*MIX, "--max_iters=12", "--eval_interval=6"]
    p = train(tmp_path / "full", spec, *common)
    rows = [json.loads(line) for line in open(tmp_path / "full" / "metrics.jsonl")]
    evals = [r for r in rows if "val_losses" in r]
    assert [r["iter"] for r in evals] == [0, 6, 12]
    for r in evals:  # each source's held-out loss, and the overall one their 3:1 mean
        shapes, text = r["val_losses"]["shapes"], r["val_losses"]["text"]
        assert r["val_loss"] == pytest.approx(0.75 * shapes + 0.25 * text, rel=1e-6) and shapes != text
    assert "(shapes " in p.stdout and ", text " in p.stdout
    captions = [r["captions"] for r in rows if "captions" in r]
    val = [PreparedDataset(mix[0], "val")[i] for i in range(2)]
    want = [r["messages"][-1]["content"] for r in val]
    assert len(captions) == 3 and all([c["reference"] for c in cap] == want for cap in captions)
    assert f"reference: {want[0]!r}" in p.stdout
    # the last eval's captions: the greedy replies of the weights it saved, each row prompted alone, cut at 150 tokens
    model = from_pretrained(str(tmp_path / "full" / "ckpt"), dtype=torch.float32)
    proc, capped = Processor.from_pretrained(mix[0]), 0
    for row, got in zip(val, captions[-1]):
        prompt = proc.apply_chat_template(row["messages"][:-1], add_generation_prompt=True, enable_thinking=False)
        batch = proc(prompt, images=row["images"])
        out = model.generate(batch["input_ids"], 160, temperature=0, pixel_values=batch["pixel_values"],
                             image_grid_thw=batch["image_grid_thw"], stop_ids=proc.stop_ids)
        new = out[0, batch["input_ids"].shape[1]:].tolist()
        assert got["caption"] == proc.reply(new[:150]).strip()
        capped += not set(new[:150]) & set(proc.stop_ids)
    assert capped, "every reply stopped before 150 tokens: the cap went untested"

    # stopped by SIGTERM partway into the run, then resumed: every step's loss as in the full run (captions off:
    # generation draws no random numbers and changes nothing that trains)
    common.append("--eval_samples=0")
    rest = stopped_by_sigterm(tmp_path / "cut", spec, *common, "--num_workers=1", at=7)
    stopped = json.loads(open(tmp_path / "cut" / "metrics.jsonl").readlines()[-1])["iter"] + 1
    assert 7 < stopped < 12, (stopped, rest)
    train(tmp_path / "cut", spec, *common, "--init_from=resume")
    full, cut = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(12))
    for it in range(12):
        assert cut[it] == pytest.approx(full[it], abs=1e-6), it


@pytest.mark.parametrize("shard", ["ddp", "fsdp"])
def test_mixture_on_two_processes_equals_one(tmp_path, mix, shard):
    """As tests/test_train.py's two-process test, on steps that mix image and text-only micro-batches (whose
    vision side has no gradient on one process): under plain SGD the same updates, so the same gradients."""
    spec = f"{mix[0]}:1,{mix[1]}:1"
    args = [*MIX, "--max_iters=2", "--eval_interval=2", "--gradient_accumulation_steps=2", "--batch_size=2",
            "--grad_clip=0", *same_lr(0.1)]
    one = train(tmp_path / "one", spec, *args, script=SGD)
    two = train(tmp_path / "two", spec, *args, f"--fsdp={shard == 'fsdp'}", script=SGD, nproc=2)
    l1, l2 = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert l2[0] == pytest.approx(l1[0], abs=1e-6) and l2[1] == pytest.approx(l1[1], abs=1e-5)
    ev1, ev2 = ([json.loads(x) for x in open(d / "metrics.jsonl") if "val_losses" in x] for d in
                (tmp_path / "one", tmp_path / "two"))
    for a, b in zip(ev1, ev2):
        assert b["val_losses"] == pytest.approx(a["val_losses"], rel=1e-5)
    w1, w2 = (from_pretrained(str(d / "ckpt"), dtype=torch.float32).state_dict() for d in
              (tmp_path / "one", tmp_path / "two"))
    for k in w1:  # under SGD at lr 0.1 a gradient off by a factor moves weights far more than 1e-6
        torch.testing.assert_close(w2[k], w1[k], atol=1e-6, rtol=0)
    assert one.stdout.count("reference:") == two.stdout.count("reference:") == 4  # 2 evals x 2 samples, printed once
