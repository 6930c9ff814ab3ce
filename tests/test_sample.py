"""sample.py end to end as a newcomer runs it: a subprocess on tiny checkpoints built here (random weights, a byte-level
tokenizer), checking the streamed text, the stderr summary and the one-line errors."""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from checkpoint import from_pretrained, save_pretrained
from model import ArtemisConfig, ArtemisVLM, TextConfig
from processor import Processor
from vision import VisionConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "sample.py")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
           "<|video_pad|>"]
CTX = 128  # max_position_embeddings: a text-only prompt is ~60 tokens, an image adds 4 to 6
SUMMARY = re.compile(r"^(\d+) prompt tokens \((\d+) image\), (\d+) new tokens, time to first token [\d.]+ s, "
                     r"decode [\d.]+ tokens/s$", re.M)


def tokenizer(extra=()):
    # byte-level BPE without merges: one token per byte, plus the chat and vision tokens (<think> is not special,
    # as in Qwen3, so a thinking answer shows it) and the extra words, each one token
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))},
                               merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in ("<think>", "</think>", *extra)])
    return tok


def checkpoint(path, scripted=False, ctx=CTX):
    """A tiny random graft with its processor. scripted: the decoder's next token depends only on the current one
    and answers '\\n' -> <|vision_start|> -> 'H' -> 'i' -> <|im_end|>, so the expected output is exactly 'Hi'; or a list
    of tokens it answers that way instead, from the one a prompt ends with (new words become tokens)."""
    chain = ["Ċ", "<|vision_start|>", "H", "i", "<|im_end|>"] if scripted is True else scripted or []
    tok = tokenizer([t for t in chain if t not in tokenizer().get_vocab()])
    tid = tok.token_to_id
    torch.manual_seed(0)
    text = TextConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, sliding_window=None, max_position_embeddings=ctx,
                      bos_token_id=None, eos_token_id=tid("<|endoftext|>"))
    vision = VisionConfig(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                          num_position_embeddings=16, deepstack_visual_indexes=[0], patch_size=16, spatial_merge_size=2)
    model = ArtemisVLM(ArtemisConfig(text, vision, tid("<|image_pad|>"), tid("<|video_pad|>")))
    if scripted:
        lm = model.language_model
        with torch.no_grad():
            for layer in lm.model.layers:  # layers add nothing to the residual: logits = lm_head(norm(embedding))
                layer.self_attn.o_proj.weight.zero_()
                layer.mlp.down_proj.weight.zero_()
            lm.lm_head.weight.zero_()
            chain = [tid(t) for t in chain]
            for k, (a, b) in enumerate(zip(chain, chain[1:])):
                lm.model.embed_tokens.weight[a] = torch.eye(32)[k]
                lm.lm_head.weight[b, k] = 10.0
    save_pretrained(model, str(path))
    Processor(tok, special_tokens={"eos_token": "<|endoftext|>"}, max_pixels=128 * 128).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sample")
    Image.new("RGB", (64, 64), (200, 30, 30)).save(d / "a.png")  # 4x4 patches: 4 image tokens
    Image.radial_gradient("L").resize((96, 64)).save(d / "b.png")  # 6x4 patches: 6 image tokens
    (d / "bad.png").write_bytes(b"not a png")
    return dict(dir=d, a=str(d / "a.png"), b=str(d / "b.png"), bad=str(d / "bad.png"),
                scripted=checkpoint(d / "scripted", scripted=True), random=checkpoint(d / "random"))


def run(*args, cwd=REPO):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")  # the answer may hold any character
    return subprocess.run([sys.executable, SAMPLE, "--device=cpu", "--max_new_tokens=16", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def summary(r):
    assert r.returncode == 0, r.stderr
    m = SUMMARY.findall(r.stderr)
    assert len(m) == 1, r.stderr
    return tuple(int(x) for x in m[0])


def one_error(r):
    lines = [line for line in r.stderr.splitlines() if not line.startswith("overriding:")]  # configurator's echo
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and r.stdout == ""
    return lines[0]


def test_one_image_streams_answer_without_special_tokens(files):
    r = run(f"--init_from={files['scripted']}", f"--image={files['a']}")
    assert r.stdout == "Hi\n"  # <|vision_start|> hidden, stopped at <|im_end|> well before 16 tokens
    prompt, n_img, n_new = summary(r)
    assert n_img == 4 and prompt > n_img and n_new == 4


def test_text_only(files):
    r = run(f"--init_from={files['scripted']}", "--prompt=Hello", "--system=Be brief.", "--temperature=1.0")
    assert r.stdout == "Hi\n"
    assert summary(r)[1] == 0


def test_two_images_greedy_matches_generate(files):
    """The streaming loop is model.generate for one row: same tokens, shown as decode(skip_special_tokens) shows them,
    and run twice at temperature 0 the same text."""
    args = (f"--init_from={files['random']}", f"--image={files['a']},{files['b']}", "--prompt=Compare.",
            "--temperature=0")
    r1, r2 = run(*args), run(*args)
    assert summary(r1)[1] == 10 and r1.stdout == r2.stdout
    model, proc = from_pretrained(files["random"]), Processor.from_pretrained(files["random"])
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Compare."}]}]
    inputs = proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False),
                  images=[files["a"], files["b"]])
    out = model.generate(inputs["input_ids"], 16, temperature=0, pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], stop_ids=proc.stop_ids)
    expected = proc.decode(out[0, inputs["input_ids"].shape[1]:])
    assert expected and r1.stdout == expected + "\n"


def test_default_model_is_the_demo_that_exists(files, tmp_path):
    """No --init_from: the drawings demo README's first command trains, else the shapes demo; neither, README's
    command."""
    msg = one_error(run(cwd=tmp_path))
    assert ("python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py "
            "config/drawings.py" in msg and "--init_from" in msg), msg
    shutil.copytree(files["scripted"], tmp_path / "out-shapes" / "ckpt")  # a training out_dir
    assert run(f"--image={files['a']}", cwd=tmp_path).stdout == "Hi\n"
    shutil.copytree(files["random"], tmp_path / "out-drawings" / "ckpt")  # answers something else than 'Hi'
    assert run(f"--image={files['a']}", cwd=tmp_path).stdout not in ("Hi\n", "")


def bad_dirs(d):
    (d / "empty").mkdir(exist_ok=True)
    (d / "llama").mkdir(exist_ok=True)
    (d / "llama" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if not (d / "notok").exists():
        shutil.copytree(d / "scripted", d / "notok")
        os.remove(d / "notok" / "tokenizer.json")
    if not (d / "truncated").exists():  # an interrupted copy or download
        shutil.copytree(d / "scripted", d / "truncated")
        weights = (d / "truncated" / "model.safetensors").read_bytes()
        (d / "truncated" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    for name, edit in (("listcfg", lambda c: []), ("fourheads", lambda c: {
            **c, "text_config": {**c["text_config"], "num_attention_heads": "four"}})):
        if not (d / name).exists():  # a config.json of the wrong shape or type
            shutil.copytree(d / "scripted", d / name)
            cfg = json.loads((d / name / "config.json").read_text())
            (d / name / "config.json").write_text(json.dumps(edit(cfg)))
    if not (d / "badtok").exists():
        shutil.copytree(d / "scripted", d / "badtok")
        (d / "badtok" / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    if not (d / "noshard").exists():  # a sharded checkpoint with one shard missing
        save_pretrained(from_pretrained(d / "scripted"), str(d / "noshard"), max_shard_size=200_000,
                        write_extra=Processor.from_pretrained(d / "scripted").save_pretrained)
        os.remove(sorted((d / "noshard").glob("model-*.safetensors"))[1])


@pytest.mark.parametrize("args, expect", [
    (["--image={dir}/missing.jpg"], ["--image", "missing.jpg"]),
    (["--image={a},{bad}"], ["--image", "bad.png", "image"]),
    (["--init_from={dir}/empty"], ["--init_from", "empty/config.json"]),
    (["--init_from={dir}/llama"], ["--init_from", "artemis_vlm"]),
    (["--init_from={dir}/notok"], ["--init_from", "tokenizer.json"]),
    (["--init_from={dir}/truncated"], ["--init_from", "truncated/model.safetensors", "truncated"]),
    (["--init_from={dir}/noshard"], ["--init_from", "noshard/model-00002-of-", "index.json"]),
    (["--init_from={dir}/listcfg"], ["--init_from", "listcfg/config.json", "JSON list", "expected an object"]),
    (["--init_from={dir}/fourheads"], ["--init_from", "fourheads/config.json", "text_config",
                                       "num_attention_heads is 'four', expected a whole number"]),
    (["--init_from={dir}/badtok"], ["--init_from", "badtok/tokenizer.json", "not a tokenizers tokenizer.json"]),
    (["--init_from={dir}/no/such/dir"], ["--init_from", "no/such/dir: no such directory"]),
    (["--temperature=-1"], ["--temperature=-1", "expected 0 (greedy) or more"]),
    (["--num_samples=0"], ["--num_samples=0", "expected at least 1"]),
    (["--max_pixels=-5"], ["--max_pixels=-5", "whole number of pixels"]),
    (["--max_pixels=100", "--prompt=Hi"], ["--max_pixels=100 is below the checkpoint's min_pixels=1024"]),
    (["--tempreature=0"], ["tempreature", "temperature"]),
    (["--prompt=" + "x" * 200, "--max_new_tokens=1"], ["context of 128", "max_position_embeddings"]),
    (["--image={a}", "--max_new_tokens=100"], ["--max_new_tokens=100", "context of 128"]),
], ids=["missing-image", "unreadable-image", "no-config", "not-artemis", "no-tokenizer", "truncated-weights",
        "missing-shard", "config-list", "config-type", "bad-tokenizer", "missing-dir", "negative-temperature",
        "no-samples", "negative-max-pixels", "max-below-min", "unknown-option", "long-prompt", "long-answer"])
def test_one_line_errors(files, args, expect):
    bad_dirs(files["dir"])
    args = [a.format(dir=files["dir"], a=files["a"], bad=files["bad"]) for a in args]
    msg = one_error(run(f"--init_from={files['scripted']}", *args))
    assert all(e in msg for e in expect), msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_absent(files):
    msg = one_error(run(f"--init_from={files['scripted']}", "--device=cuda"))
    assert "--device=cuda" in msg and "CUDA" in msg


def greedy_caption(ckpt, path, n=16):
    model, proc = from_pretrained(ckpt), Processor.from_pretrained(ckpt)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image in detail."}]}]
    inputs = proc(proc.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False), images=[path])
    new = model.generate(inputs["input_ids"], n, temperature=0, pixel_values=inputs["pixel_values"],
                         image_grid_thw=inputs["image_grid_thw"], stop_ids=proc.stop_ids)[0, inputs["input_ids"].shape[1]:]
    return proc.decode(new)


def test_folder_run_captions_each_image_once(files, tmp_path):
    """A directory is a folder run: one JSON line per readable image, each the greedy caption that image gets alone
    (2 rows at a time, so the third image takes the row of the first caption to end); a corrupt file is named and
    skipped; a re-run with the same --out adds nothing, and after a kill cut its last line, redoes that line alone; a
    glob to stdout gives the same lines; sampled captions are the same in rows of 1 or of 3, each image drawing from
    its own seed."""
    d = tmp_path / "photos"
    d.mkdir()
    for name in ("a.png", "b.png", "bad.png"):
        shutil.copy(files[name.removesuffix(".png")], d / name)
    Image.radial_gradient("L").resize((64, 96)).convert("RGB").save(d / "c.jpg")  # 4x6 patches
    (d / "notes.txt").write_text("not an image, not listed")
    out = tmp_path / "captions.jsonl"
    args = (f"--init_from={files['random']}", "--temperature=0", "--batch_size=2")
    r = run(*args, f"--image={d}", f"--out={out}")
    assert r.returncode == 0 and r.stdout == "", r.stderr
    assert "bad.png" in r.stderr and "Traceback" not in r.stderr and "notes.txt" not in r.stderr
    lines = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda x: x["image"])
    assert [x["image"] for x in lines] == [str(d / n) for n in ("a.png", "b.png", "c.jpg")]
    want = [greedy_caption(files["random"], x["image"]) for x in lines]
    assert all(want) and [x["caption"] for x in lines] == want
    before = out.read_text()
    r = run(*args, f"--image={d}", f"--out={out}")
    assert r.returncode == 0 and out.read_text() == before, r.stderr
    first, *rest = before.splitlines(keepends=True)  # a run killed while writing its last line: that line is cut
    out.write_text("".join(rest) + first[:len(first) // 2])
    r = run(*args, f"--image={d}", f"--out={out}")
    assert r.returncode == 0 and out.read_text() == "".join(rest) + first, r.stderr  # cut line gone, caption again
    r = run(*args, f"--image={d}/*.png")
    assert r.returncode == 0, r.stderr
    assert sorted((json.loads(line) for line in r.stdout.splitlines()), key=lambda x: x["image"]) == lines[:2]
    hot = [run(f"--init_from={files['random']}", "--temperature=1.0", f"--batch_size={n}", f"--image={d}")
           for n in (1, 3)]
    assert all(h.returncode == 0 for h in hot), hot[0].stderr
    assert sorted(hot[0].stdout.splitlines()) == sorted(hot[1].stdout.splitlines()) != sorted(
        json.dumps(x, ensure_ascii=False) for x in lines)
