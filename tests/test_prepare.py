"""prepare.py the way people run it: `python prepare.py --dataset=... --out_dir=...` in a subprocess, then the result
read back through PreparedDataset and Processor.collate. Fixtures (tar shards, JSON rows, images) are made here."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from dataset import PreparedDataset  # noqa: E402
from processor import Processor, smart_resize  # noqa: E402


def prepare(cwd, *args):
    p = subprocess.run([sys.executable, os.path.join(ROOT, "prepare.py"), "--num_workers=2", *args],
                       cwd=cwd, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout.strip(), p.stderr


def ok(cwd, *args):
    rc, out, err = prepare(cwd, *args)
    assert rc == 0, err
    return out  # the summary line


def captions(ds):
    return sorted(ds[i]["messages"][-1]["content"] for i in range(len(ds)))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """A small shapes dataset; its processor doubles as the --tokenizer checkpoint for the other datasets."""
    d = tmp_path_factory.mktemp("shapes")
    summary = ok(d, "--dataset=shapes", "--num_samples=60", "--chunk_size=25", "--val_frac=0.2", "--out_dir=out")
    return d / "out", summary


def test_shapes_dataset(shapes, tmp_path):
    out, summary = shapes
    assert summary.startswith("out: ") and "skipped: none" in summary
    train, val = PreparedDataset(out, "train"), PreparedDataset(out, "val")
    assert len(train) + len(val) == 60 and 0 < len(val) < 30
    assert f"{len(train)} train + {len(val)} val rows ({len(train)} + {len(val)} assistant turns)" in summary
    assert os.path.samefile(train.processor_dir, out)
    proc = Processor.from_pretrained(train.processor_dir)
    tok = proc.tokenizer
    for t in ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
              "<think>", "</think>", "<|endoftext|>"]:
        assert tok.encode(t, add_special_tokens=False).ids == [tok.token_to_id(t)], t
    assert tok.get_vocab_size() < 1024 and proc.stop_ids == [tok.token_to_id("<|im_end|>")]
    assert proc.pad_id == tok.token_to_id("<|endoftext|>")
    text = "Any text, even ünïcode ✓, still encodes."
    assert tok.decode(tok.encode(text).ids) == text
    row = train[0]
    assert set(row) == {"messages", "images"} and row["images"][0].size == (96, 96)
    assert row["messages"][0]["content"] == [{"type": "image"}, {"type": "text", "text": "Describe this image."}]
    words = row["messages"][1]["content"].split()
    assert words[0] == "a" and words[-3:-1] == ["a", words[-2]] and words[-1] == "background."
    batch = proc.collate([train[i] for i in range(4)] + [val[0]])
    assert batch["image_grid_thw"].tolist() == [[1, 6, 6]] * 5  # 9 merged vision tokens per image
    assert ((batch["input_ids"] == proc.image_token_id).sum(1) == 9).all()
    # the target is the caption (one token per word) and the end of turn
    ids = batch["input_ids"][0][batch["labels"][0] != -100]
    assert proc.decode(ids).strip() == row["messages"][1]["content"]
    assert len(ids) <= len(words) + 3

    # the same seed gives the same data, however the work is split among processes
    again = ok(tmp_path, "--dataset=shapes", "--num_samples=60", "--chunk_size=25", "--val_frac=0.2",
               "--out_dir=out", "--num_workers=1")
    assert again.split(";")[0] == summary.split(";")[0]
    assert Image.open(out / "example.png").size == (96, 96)  # README's sample.py command has an image
    for split in ("train", "val"):
        for f in sorted(os.listdir(out / split)):
            assert (out / split / f).read_bytes() == (tmp_path / "out" / split / f).read_bytes(), f


def test_drawings_dataset(tmp_path):
    """The drawings vary as people's do, in canvas shape among the rest, and are stored as the processor's 4-px patches
    see them: at most 48x48 px, sides a multiple of 8 (one merged vision token), whatever the canvas."""
    summary = ok(tmp_path, "--dataset=drawings", "--num_samples=80", "--chunk_size=40", "--val_frac=0.2",
                 "--out_dir=out")
    out = tmp_path / "out"
    train, val = PreparedDataset(out, "train"), PreparedDataset(out, "val")
    assert len(train) + len(val) == 80 and len(val) > 0 and "skipped: none" in summary
    proc = Processor.from_pretrained(train.processor_dir)
    assert proc.patch_size == 4 and proc.max_pixels == 48 * 48
    rows = [train[i] for i in range(len(train))]
    sizes = {r["images"][0].size for r in rows}
    assert all(w % 8 == h % 8 == 0 and w * h <= 48 * 48 for w, h in sizes), sizes
    assert any(w > h for w, h in sizes) and any(w < h for w, h in sizes) and any(w == h for w, h in sizes), sizes
    words = [r["messages"][1]["content"].split() for r in rows]
    assert all(w[0] == "a" and w[4:] == ["on", "a", w[6], "background."] for w in words)
    assert {w[1] for w in words} == {"small", "large"} and {w[3] for w in words} == {"circle", "square", "triangle",
                                                                                       "cross"}
    assert {w[2] for w in words} == {"red", "orange", "yellow", "green", "blue", "purple"}
    shades = {r["images"][0].getpixel((0, 0)) for r, w in zip(rows, words) if w[6] == "white"}
    assert len(shades) > 1  # backgrounds vary in shade too
    batch = proc.collate(rows[:8])
    n_img = (batch["input_ids"] == proc.image_token_id).sum(1)
    assert (n_img == batch["image_grid_thw"].prod(1) // 4).all() and n_img.max() <= 36
    ids = batch["input_ids"][0][batch["labels"][0] != -100]
    assert proc.decode(ids).strip() == rows[0]["messages"][1]["content"]
    w, h = Image.open(out / "example.png").size
    assert w * h <= 48 * 48


def test_drawings_shape_captions(tmp_path):
    """One run writes both caption sets: data/drawings and data/drawings-shape hold the same drawings, split the same
    way, the second captioned with size and shape only and drawn at 32x32 px, with the tokenizer of the full
    captions: the drawings demo's second run goes on from the first's checkpoint, processor included.
    --captions=shape alone gives the same."""
    args = ("--dataset=drawings", "--num_samples=40", "--chunk_size=20", "--val_frac=0.2")
    summary = ok(tmp_path, *args)
    assert summary.splitlines()[0].startswith(os.path.join("data", "drawings") + ": ")
    assert summary.splitlines()[1].startswith(os.path.join("data", "drawings-shape") + ": ")
    full, short = tmp_path / "data" / "drawings", tmp_path / "data" / "drawings-shape"
    assert (full / "tokenizer.json").read_bytes() == (short / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        a, b = PreparedDataset(full, split), PreparedDataset(short, split)
        assert len(a) == len(b) > 0
        smaller = 0
        for i in range(len(a)):
            w = a[i]["messages"][1]["content"].split()  # a small red circle on a white background.
            assert b[i]["messages"][1]["content"] == f"a {w[1]} {w[3]}."
            (w48, h48), (w32, h32) = a[i]["images"][0].size, b[i]["images"][0].size
            assert w32 * h32 <= min(32 * 32, w48 * h48)  # the same canvas, drawn smaller
            smaller += w32 * h32 < w48 * h48
        assert smaller > len(a) // 2
    assert Processor.from_pretrained(full).max_pixels == 48 * 48
    proc = Processor.from_pretrained(short)
    assert proc.max_pixels == 32 * 32
    rows = [PreparedDataset(short, "train")[i] for i in range(4)]
    batch = proc.collate(rows)
    ids = batch["input_ids"][0][batch["labels"][0] != -100]
    assert proc.decode(ids).strip() == rows[0]["messages"][1]["content"]
    assert len(ids) == 6  # "a", " small", " circle", "." (a token a word, as in the full captions), "<|im_end|>", "\n"
    assert ok(tmp_path / "data", *args, "--captions=shape", "--out_dir=drawings").endswith("were already done")
    ok(tmp_path, *args, "--captions=shape", "--out_dir=alone")
    for split in ("train", "val"):
        for f in sorted(os.listdir(short / split)):
            assert (short / split / f).read_bytes() == (tmp_path / "alone-shape" / split / f).read_bytes(), f
    rc, _, err = prepare(tmp_path, *args, "--captions=colour")
    assert rc == 2 and err.strip().splitlines()[-1] == \
        "error: --captions must be 'full', 'shape' or 'full,shape', got 'colour'"
    rc, _, err = prepare(tmp_path, "--dataset=chat", "--src=rows.jsonl", "--tokenizer=ckpt", "--captions=shape")
    assert rc == 2 and "--captions=shape is for the generated datasets" in err.strip().splitlines()[-1]


def jpeg(color, size=(96, 64)):
    b = io.BytesIO()
    Image.new("RGB", size, color).save(b, format="JPEG")
    return b.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    big = jpeg((0, 0, 255), (1000, 700))
    png = io.BytesIO()
    Image.new("RGBA", (40, 80), (0, 255, 0, 128)).save(png, format="PNG")
    write_tar(src / "000.tar", [
        ("000/good.jpg", jpeg((255, 0, 0))), ("000/good.txt", b"a red picture"),
        ("000/corrupt.jpg", b"\xff\xd8\xff not really a jpeg"), ("000/corrupt.txt", b"never seen"),
        ("000/nocaption.jpg", jpeg((0, 255, 0))),
        ("000/truncated.jpg", big[:len(big) // 2]), ("000/truncated.txt", b"cut short"),
        ("000/meta.png", png.getvalue()), ("000/meta.json", json.dumps({"caption": "a caption from json",
                                                                         "url": "http://x"}).encode()),
    ])
    write_tar(src / "001.tar", [("big.jpg", big), ("big.txt", b"  a big blue picture\n"),
                                ("empty.jpg", jpeg((9, 9, 9))), ("empty.txt", b"   ")])
    return src


def is_val(key, frac):  # the documented rule: sha1 of the sample key, "<shard>/<key>" for tars
    return int.from_bytes(hashlib.sha1(key.encode()).digest()[:8], "big") < frac * 2 ** 64


def test_tars(shapes, shards, tmp_path):
    tok = shapes[0]
    data = (shards / "001.tar").read_bytes()
    (shards / "002.tar").write_bytes(data[:len(data) // 3])  # a shard cut short, as by an interrupted download
    write_tar(shards / "003.tar", [(f"{k}.{e}", jpeg((k, k, k)) if e == "jpg" else b"gray") for k in range(4)
                                   for e in ("jpg", "txt")])
    with tarfile.open(shards / "003.tar") as tf:  # cut where a member starts: it reads without error, shorter
        cut = tf.getmembers()[4].offset
    (shards / "003.tar").write_bytes((shards / "003.tar").read_bytes()[:cut])
    args = ["--dataset=tars", f"--src={shards}", f"--tokenizer={tok}", "--out_dir=out", "--val_frac=0.5"]
    rc, summary, err = prepare(tmp_path, *args)
    assert rc == 0 and "002" in err  # never fatal: reported, and left for a re-run
    assert "warning: 003 left undone" in err and "no end-of-archive marker" in err, err
    assert "2 bad image" in summary and "2 no caption" in summary, summary
    assert "2 unreadable sources left undone" in summary
    out = tmp_path / "out"
    train, val = PreparedDataset(out, "train"), PreparedDataset(out, "val")
    assert sorted(captions(train) + captions(val)) == [
        "a big blue picture", "a caption from json", "a red picture"]
    keys = {"a red picture": "000/000/good", "a caption from json": "000/000/meta", "a big blue picture": "001/big"}
    assert captions(val) == sorted(c for c, k in keys.items() if is_val(k, 0.5))
    assert os.path.samefile(train.processor_dir, tok)
    proc = Processor.from_pretrained(train.processor_dir)
    rows = [train[i] for i in range(len(train))] + [val[i] for i in range(len(val))]
    for row in rows:
        assert row["messages"][0]["content"][1]["text"] == "Describe this image."
        im = row["images"][0]
        assert im.mode == "RGB" and im.size == proc.resize(im).size  # stored already resized
    big = next(r for r in rows if r["messages"][1]["content"] == "a big blue picture")
    h, w = smart_resize(700, 1000, 32, proc.min_pixels, proc.max_pixels)
    assert big["images"][0].size == (w, h)
    assert proc.collate(rows)["input_ids"].shape[0] == 3
    assert [p.name for p in (out / "train").iterdir() if p.name.startswith("002")] == []
    before = (captions(train), captions(val))

    # an interrupted run: a piece on disk but not recorded, its line in done.jsonl cut short, and a stray .tmp --
    # the reader names the file, and a re-run does the piece once more, never duplicated
    done = (out / "done.jsonl").read_text().splitlines()
    (out / "done.jsonl").write_text(done[0] + "\n" + done[1][:12])
    with pytest.raises(ValueError, match=r"done\.jsonl: its last line is cut short"):
        PreparedDataset(out, "train")
    (out / "train" / "zzz.bin.tmp").write_bytes(b"half a piece")
    again = ok(tmp_path, *args)
    assert "1 of 4 pieces were already done" in again and "2 unreadable" in again
    assert (captions(PreparedDataset(out, "train")), captions(PreparedDataset(out, "val"))) == before
    names = [json.loads(line)["name"] for line in (out / "done.jsonl").read_text().splitlines()]
    assert names == [json.loads(line)["name"] for line in done]
    # the shards downloaded again in full: only they are processed
    write_tar(shards / "002.tar", [("x.jpg", jpeg((1, 2, 3))), ("x.txt", b"a new one")])
    write_tar(shards / "003.tar", [("y.jpg", jpeg((3, 2, 1))), ("y.txt", b"another")])
    again = ok(tmp_path, *args)
    assert "2 of 4 pieces were already done" in again and "unreadable" not in again
    assert len(PreparedDataset(out, "train")) + len(PreparedDataset(out, "val")) == 5
    # other options on the same out_dir are refused, not mixed in
    rc, _, err = prepare(tmp_path, *args, "--prompt=Caption this.")
    errors = [l for l in err.splitlines() if l.startswith("error:")]
    assert rc == 2 and len(errors) == 1 and "prompt" in errors[0] and "Caption this." in errors[0]


def test_llava_and_chat(shapes, tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 32), "red").save(tmp_path / "imgs" / "r.png")
    Image.new("RGB", (32, 64), "blue").save(tmp_path / "imgs" / "b.png")
    long = "word " * 300
    llava = [
        {"id": "first", "image": "r.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is it?"}, {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "after", "image": "b.png", "conversations": [
            {"from": "human", "value": "Look at this: <image>"}, {"from": "gpt", "value": "Blue."}]},
        {"id": "text", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "long", "conversations": [{"from": "human", "value": long}, {"from": "gpt", "value": "ok"}]},
        {"id": "missing", "image": "nope.png", "conversations": [
            {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "twomarkers", "image": "r.png", "conversations": [
            {"from": "human", "value": "<image><image>"}, {"from": "gpt", "value": "?"}]},
        {"id": "broken"},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    summary = ok(tmp_path, "--dataset=llava", "--src=llava.json", f"--image_root={tmp_path / 'imgs'}",
                 f"--tokenizer={shapes[0]}", "--out_dir=llava", "--max_seq_len=200", "--val_frac=0", "--chunk_size=3")
    assert "3 train + 0 val rows (4 + 0 assistant turns)" in summary  # "first" holds two answers
    assert "1 too long" in summary and "1 bad image" in summary and "2 bad row" in summary
    ds = PreparedDataset(tmp_path / "llava", "train")
    rows = {ds[i]["messages"][1]["content"]: ds[i] for i in range(len(ds))}
    assert rows["Red."]["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is it?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]}, {"role": "assistant", "content": "Yes."}]
    assert rows["Red."]["images"][0].size == (64, 32)
    proc = Processor.from_pretrained(ds.processor_dir)
    batch = proc.collate([rows["Red."]])  # both answers are targets, under the shapes processor's plain ChatML
    assert proc.decode(batch["input_ids"][0][batch["labels"][0] != -100], False) == "Red.<|im_end|>Yes.<|im_end|>\n"
    assert rows["Blue."]["messages"][0]["content"] == [{"type": "text", "text": "Look at this:"}, {"type": "image"}]
    assert rows["Hello."]["images"] == []  # a text-only row

    chat = [
        {"messages": json.dumps([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Color?"}]},
                                 {"role": "assistant", "content": "Red."}]), "image": "imgs/r.png"},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}], "image": None},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                      {"role": "assistant", "content": "Two."}], "images": ["imgs/r.png", "imgs/b.png"]},
        {"messages": [{"role": "user", "content": long}, {"role": "assistant", "content": "ok"}], "image": None},
        {"messages": [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "?"}]},
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(map(json.dumps, chat)) + "\n{not json\n")
    summary = ok(tmp_path, "--dataset=chat", "--src=chat.jsonl", f"--tokenizer={shapes[0]}", "--out_dir=chat",
                 "--max_seq_len=200", "--val_frac=0")
    assert "3 train + 0 val rows (3 + 0 assistant turns)" in summary, summary
    assert "1 too long" in summary and "2 bad row" in summary, summary
    ds = PreparedDataset(tmp_path / "chat", "train")
    rows = {ds[i]["messages"][-1]["content"]: ds[i] for i in range(len(ds))}
    assert rows["Red."]["messages"][0]["content"][1] == {"type": "text", "text": "Color?"}
    assert rows["Hello."]["images"] == []
    assert rows["Hello."]["messages"][0] == {"role": "system", "content": "Be brief."}
    assert [im.size for im in rows["Two."]["images"]] == [(64, 32), (32, 64)]
    proc = Processor.from_pretrained(ds.processor_dir)
    batch = proc.collate(list(rows.values()))
    assert batch["image_grid_thw"].shape[0] == 3 and batch["input_ids"].shape[1] <= 200


@pytest.mark.parametrize("args, words", [
    (["--dataset=coco"], ["--dataset", "shapes, drawings, tars, chat, llava", "coco"]),
    (["--dataset=tars", "--tokenizer=x"], ["--src"]),
    (["--dataset=chat", "--src=x.jsonl", "--tokenizer=missing_dir"], ["--tokenizer", "missing_dir"]),
    (["--dataset=drawings", "--shape_image_size=-32"], ["--shape_image_size", "-32", "at least 1"]),
])
def test_bad_arguments(tmp_path, args, words):
    rc, out, err = prepare(tmp_path, *args)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and out == "" and "Traceback" not in err and line.startswith("error:")
    assert all(w in line for w in words), line
    assert not (tmp_path / "data").exists()


def test_damaged_meta_is_one_line(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "meta.json").write_text('{"config": {"dataset": "sha')  # cut short
    rc, out, err = prepare(tmp_path, "--dataset=shapes", "--num_samples=10", "--out_dir=out")
    lines = [line for line in err.splitlines() if not line.startswith("overriding:")]  # configurator's echo
    assert rc == 2 and out == "" and "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"error: {os.path.join('out', 'meta.json')}: not a meta.json prepare.py wrote"), err


def test_importing_reads_no_options(tmp_path):
    # only `python prepare.py` reads options: an importer's command line is its own, no option is a global, and a
    # writer runs on the arguments it is given
    code = ("import sys; sys.argv[1:] = ['--dataset=nope']; import prepare; "
            "assert not hasattr(prepare, 'dataset') and not hasattr(prepare, 'options'); "
            "key, row, [im] = next(prepare.shapes([0], seed=1, image_size=32, prompt='Hi.')); "
            "assert key == 'shapes-1-0' and row[0]['content'][1]['text'] == 'Hi.' and im.size == (32, 32); print('ok')")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "ok" and "overriding" not in p.stderr, p.stderr
