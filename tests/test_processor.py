"""processor.py against transformers' Qwen2VLImageProcessorPil, tokenizer.apply_chat_template, and artemis-vlm's
ArtemisVLMProcessor / ArtemisDataCollator, on the photographs scikit-image ships and a tokenizer built here."""
import io
import json
import os
import tracemalloc
from types import SimpleNamespace

import numpy as np
import pytest
import skimage
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

from artemis_vlm import ArtemisDataCollator, ArtemisVLMProcessor
from processor import CHAT_TEMPLATE, Processor, load_image, smart_resize

DATA = os.path.join(os.path.dirname(skimage.__file__), "data")  # files inside the wheel, no pooch download
VISION = SimpleNamespace(patch_size=16, temporal_patch_size=2, spatial_merge_size=2)
# A-series layout: Tekken reserved ids 14..23 repurposed; ChatML markers after them
SPECIALS = ["<unk>", "<s>", "</s>"] + [f"<SPECIAL_{i}>" for i in range(3, 14)] + [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>"]
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather at a place, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]


def photo(name):
    image = Image.open(os.path.join(DATA, name))
    image.load()
    return image


@pytest.fixture(scope="module")
def images():
    chelsea, coffee, rocket, hubble = (photo(n) for n in ("chelsea.png", "coffee.png", "rocket.jpg",
                                                          "hubble_deep_field.jpg"))
    rgba = coffee.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(coffee.size))  # real transparency: alpha 0..255
    p = Image.new("P", (40, 30), 1)
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = 1  # palette transparency, not an alpha band
    return {"chelsea": chelsea, "coffee": coffee, "rocket": rocket, "hubble": hubble,
            "gray": photo("camera.png"), "rgba": rgba, "la": photo("camera.png").convert("LA"), "p": p,
            "tiny": photo("no_time_for_that_tiny.gif"),  # 14x25 palette gif
            "wide": chelsea.resize((3000, 20), Image.BICUBIC),  # aspect 150
            "tall": rocket.resize((16, 1500), Image.BICUBIC)}


def build_tokenizer(specials=SPECIALS):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [CHAT_TEMPLATE, json.dumps(TOOLS), "A cat sits on a wooden floor. Describe this image in detail.",
              "The quick brown fox jumps over the lazy dog. Ein Bild einer Katze. 猫の写真です。"] * 4
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=1200, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])  # adds BOS
    return tok


def write_checkpoint(d, tok, chat_template=CHAT_TEMPLATE, **extra):
    os.makedirs(d, exist_ok=True)
    tok.save(os.path.join(d, "tokenizer.json"))
    added = {str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False, "special": True} for i, t in tok.get_added_tokens_decoder().items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "added_tokens_decoder": added, **extra}
    if chat_template is not None:
        config["chat_template"] = chat_template
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "artemis_vlm", "image_token_id": 22, "vision_config": {
            "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}}, f)
    return str(d)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), build_tokenizer())


@pytest.fixture(scope="module")
def ref_tok(ckpt):
    return AutoTokenizer.from_pretrained(ckpt)


def conversations(images):
    """(messages, images) pairs: system prompt, several images, tools, tool results, thinking, text only."""
    chat = [
        {"role": "system", "content": "You are Artemis, a careful visual assistant."},
        {"role": "user", "content": [{"type": "image"}, {"type": "image", "image": images["coffee"]},
                                     {"type": "text", "text": "Compare these two photos."}]},
        {"role": "assistant", "content": "<think>\nA cat, then a cup.\n</think>\n\nA cat and a cup of coffee."},
        {"role": "user", "content": [{"type": "text", "text": "Weather where this launched?"}, {"type": "image"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Cape Canaveral"}}}]},
        {"role": "tool", "content": '{"temp": 27}'},
        {"role": "assistant", "reasoning_content": "The tool says 27.", "content": "27 °C, sunny. 猫も元気。"},
    ]
    caption = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
               {"role": "assistant", "content": "A cat lying on a wooden floor."}]
    text = [{"role": "user", "content": "Is 7 prime?"},
            {"role": "assistant", "content": "<think>Divisors: 1 and 7.</think>Yes.", "tool_calls": None},
            {"role": "user", "content": "And 9?"}, {"role": "assistant", "thinking": "3*3", "content": "No."}]
    return [(chat, [images["chelsea"], images["coffee"], images["rocket"]]), (caption, [images["hubble"]]),
            (text, [])]


def reference_processor(ref_tok, **kw):
    return ArtemisVLMProcessor(tokenizer=ref_tok, vision_config=VISION, **kw)


def test_smart_resize_matches_transformers():
    for h, w in [(300, 451), (48, 80), (1, 1), (7, 1400), (4000, 3000), (16, 3199), (512, 512), (33, 47)]:
        for lo, hi in [(32 * 32, 512 * 512), (64 * 64, 128 * 128), (256 * 256, 1024 * 1024)]:
            assert smart_resize(h, w, 32, lo, hi) == hf_smart_resize(h, w, 32, lo, hi), (h, w, lo, hi)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)


@pytest.mark.parametrize("lo,hi", [(32 * 32, 512 * 512), (64 * 64, 128 * 128), (256 * 256, 1024 * 1024),
                                   (32 * 32, 40 * 40)])
def test_pixels_match_transformers(ckpt, images, lo, hi):
    ims = list(images.values())
    ref = Qwen2VLImageProcessorPil(patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=lo, max_pixels=hi)
    want = ref(images=ims, return_tensors="pt")
    pixels, grid = Processor.from_pretrained(ckpt, min_pixels=lo, max_pixels=hi).preprocess(ims)
    assert torch.equal(grid, want["image_grid_thw"])
    assert pixels.dtype == torch.float32 and pixels.shape == want["pixel_values"].shape
    assert torch.equal(pixels, want["pixel_values"])  # bit-identical


def test_template_matches_transformers(ckpt, ref_tok, images):
    p = Processor.from_pretrained(ckpt)
    for msgs, _ in conversations(images):
        for kw in [{}, {"add_generation_prompt": True}, {"enable_thinking": False}, {"tools": TOOLS},
                   {"add_vision_id": True, "enable_thinking": True}]:
            for m in (msgs, msgs[:-1]):
                want = ref_tok.apply_chat_template(m, tokenize=False, **kw)
                assert p.apply_chat_template(m, **kw) == want
                ids = ref_tok.apply_chat_template(m, tokenize=True, return_dict=False, **kw)
                assert p.apply_chat_template(m, tokenize=True, **kw) == ids
    text = p.apply_chat_template(conversations(images)[0][0], tools=TOOLS)
    assert text.count("<|vision_start|><|image_pad|><|vision_end|>") == 3 and "<think>\nThe tool says 27." in text


def test_jinja_environment_matches_transformers(tmp_path, images):
    # the environment's extras: special-token variables, tojson options, loop controls, strftime_now,
    # namespace, raise_exception in an untaken branch, extra kwargs, reasoning aliases, None-valued keys
    t = ("{{ bos_token }}{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.index > 3 %}{% break %}"
         "{% endif %}{% set ns.n = ns.n + 1 %}{{ m.role }}={{ m | tojson(indent=2, sort_keys=true) }}\n"
         "{% if m.content is none %}{{ raise_exception('none') }}{% endif %}{% endfor %}{{ ns.n }} "
         "{{ strftime_now('%Y') }} {{ custom }} {{ eos_token }} {{ unk_token }} {{ tools | tojson }}\n"
         "  {% if custom %}\ntrimmed{% endif %}\n!")  # trim_blocks and lstrip_blocks
    d = write_checkpoint(tmp_path, build_tokenizer(), chat_template=t)
    msgs = [{"role": "user", "content": [{"type": "image", "image": images["tiny"]}, {"type": "text", "text": "é"}],
             "name": None}, {"role": "assistant", "content": "x", "reasoning": "r"}, {"role": "user", "content": "y"},
            {"role": "assistant", "content": "z"}]
    want = AutoTokenizer.from_pretrained(d).apply_chat_template(msgs, tokenize=False, tools=TOOLS, custom="<c>")
    assert Processor.from_pretrained(d).apply_chat_template(msgs, tools=TOOLS, custom="<c>") == want


def test_call_matches_artemis(ckpt, ref_tok, images):
    p = Processor.from_pretrained(ckpt, max_pixels=256 * 256)
    ref = reference_processor(ref_tok, max_pixels=256 * 256)
    for msgs, ims in conversations(images):
        text = p.apply_chat_template(msgs[:-1], add_generation_prompt=True)
        got, want = p(text=text, images=ims), ref(text=text, images=ims)
        assert sorted(got) == sorted(want.keys())
        assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                                want["attention_mask"])
        if ims:
            assert torch.equal(got["image_grid_thw"], want["image_grid_thw"])
            assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-5
            n = int((got["image_grid_thw"].prod(-1) // 4).sum())
            assert int((got["input_ids"] == p.image_token_id).sum()) == n


@pytest.mark.parametrize("side", ["right", "left"])
def test_batch_padding_matches_transformers(ckpt, ref_tok, images, side):
    p = Processor.from_pretrained(ckpt)
    texts = ["<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>", "short",
             "two <|image_pad|> <|image_pad|>"]
    got = p(text=texts, images=[images["tiny"], images["gray"], images["wide"]], padding_side=side)
    ref_tok.pad_token = ref_tok.eos_token  # what the collator falls back to
    want = ref_tok(p._expand(texts, got["image_grid_thw"]), padding=True, padding_side=side, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["attention_mask"],
                                                                            want["attention_mask"])
    assert p.pad_id == 2 and p.image_token_id == 22 and p.stop_ids == [2, 25]


@pytest.mark.parametrize("train_on", ["last", "all"])
@pytest.mark.parametrize("auto", [True, False])
def test_collate_matches_artemis(ckpt, ref_tok, images, auto, train_on):
    (chat, chat_ims), (caption, cap_ims), (text, _) = conversations(images)
    list_think = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Gray?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "<think>no color</think>Grayscale."}]}]
    rows = [{"messages": caption, "images": cap_ims}, {"messages": chat, "images": chat_ims},
            {"messages": text}, {"messages": list_think, "images": [images["gray"]]},
            {"messages": caption, "images": [images["rgba"]]}, {"messages": text, "images": []}]
    p = Processor.from_pretrained(ckpt, max_pixels=128 * 128)
    ref = ArtemisDataCollator(reference_processor(ref_tok, max_pixels=128 * 128), auto_detect_thinking=auto)
    # "last" is artemis-vlm's collator on any row, "all" on rows of one assistant turn: mixed, text only, one image row
    batches = (rows, rows[2:3] + rows[5:], rows[:1]) if train_on == "last" else (rows[:1] + rows[3:5], rows[:1])
    for batch in batches:
        got, want = p.collate(batch, auto_detect_thinking=auto, train_on=train_on), ref(batch)
        assert sorted(got) == sorted(want)
        for k in ("input_ids", "attention_mask", "labels", "image_grid_thw"):
            if k in want:
                assert torch.equal(got[k], want[k]), k
        if "pixel_values" in want:
            assert (got["pixel_values"] - want["pixel_values"]).abs().max() <= 1e-5
    labels = got["labels"][0]
    assert (labels != -100).any() and (labels[got["input_ids"][0] == p.image_token_id] == -100).all()


def labelled(p, batch, r):
    """Row r's runs of labelled tokens, decoded with their special tokens; each label is its input token."""
    ids, labels = batch["input_ids"][r], batch["labels"][r]
    on = labels != -100
    assert torch.equal(labels[on], ids[on])
    runs = [[]]
    for t, keep in zip(ids.tolist(), on.tolist()):
        if keep:
            runs[-1].append(t)
        elif runs[-1]:
            runs.append([])
    return [p.decode(run, skip_special_tokens=False) for run in runs if run]


def multi_turn(images):
    """{name: (messages, images, the labelled spans with train_on="all")}: rows of several assistant turns."""
    call = lambda city: {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}}
    called = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    ask = {"role": "user", "content": "Weather in Paris?"}
    chain = [ask, {"role": "assistant", "content": "", "reasoning_content": "Need the tool.",
                   "tool_calls": [call("Paris")]},
             {"role": "tool", "content": '{"temp": 21}'},
             {"role": "assistant", "content": "<think>\nIt says 21.\n</think>\n\n21 °C."}]
    return {
        "text": ([{"role": "user", "content": "Is 7 prime?"}, {"role": "assistant", "content": "Yes."},
                  {"role": "user", "content": "And 9?"}, {"role": "assistant", "content": "No: 9 = 3 x 3."}], [],
                 ["Yes.<|im_end|>", "No: 9 = 3 x 3.<|im_end|>\n"]),
        "image in the first turn": ([
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the photo?"}]},
            {"role": "assistant", "content": "A cat lying on a wooden floor."},
            {"role": "user", "content": "What color is it?"},
            {"role": "assistant", "content": "Orange and gray, with dark stripes."},
            {"role": "user", "content": "Is it asleep?"}, {"role": "assistant", "content": "No, its eyes are open."}],
            [images["chelsea"]],
            ["A cat lying on a wooden floor.<|im_end|>", "Orange and gray, with dark stripes.<|im_end|>",
             "No, its eyes are open.<|im_end|>\n"]),
        "images in two turns": ([
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image"}]},
            {"role": "assistant", "content": "A cup of coffee."}, {"role": "user", "content": "Which is warmer?"},
            {"role": "assistant", "content": "The coffee."}], [images["chelsea"], images["coffee"]],
            ["A cat.<|im_end|>", "A cup of coffee.<|im_end|>", "The coffee.<|im_end|>\n"]),
        "tool call": ([ask, {"role": "assistant", "content": "", "tool_calls": [call("Paris")]},
                       {"role": "tool", "content": '{"temp": 21}'},
                       {"role": "assistant", "content": "21 °C in Paris."}], [],
                      [called, "21 °C in Paris.<|im_end|>\n"]),
        # reasoning after the last user query is rendered, and so learned; before it the template drops it
        "reasoning": (chain, [], ["<think>\nNeed the tool.\n</think>\n\n" + called,
                                  "<think>\nIt says 21.\n</think>\n\n21 °C.<|im_end|>\n"]),
        "reasoning, then a question": (chain + [
            {"role": "user", "content": "And in Rome?"},
            {"role": "assistant", "content": "<think>\nNo tool needed.\n</think>\n\nI cannot tell."}], [],
            [called, "21 °C.<|im_end|>", "<think>\nNo tool needed.\n</think>\n\nI cannot tell.<|im_end|>\n"]),
    }


def test_collate_labels_every_assistant_turn(ckpt, ref_tok, images):
    p = Processor.from_pretrained(ckpt, max_pixels=128 * 128)
    ref = ArtemisDataCollator(reference_processor(ref_tok, max_pixels=128 * 128))
    cases = multi_turn(images)
    rows = [{"messages": msgs, "images": ims} for msgs, ims, _ in cases.values()]
    every, last = p.collate(rows), p.collate(rows, train_on="last")
    want = ref(rows)
    assert all(torch.equal(last[k], want[k]) for k in want if k != "pixel_values")
    pads = every["input_ids"] == p.image_token_id
    assert torch.equal(every["input_ids"], last["input_ids"]) and (every["labels"][pads] == -100).all()
    assert int(pads.sum()) == int((every["image_grid_thw"].prod(-1) // 4).sum()) > 0
    for r, (name, (msgs, ims, spans)) in enumerate(cases.items()):
        assert labelled(p, every, r) == spans, name  # turn by turn: each assistant message and its end token
        assert labelled(p, last, r) == spans[-1:], name
    # the pitfall the boundaries are found around: a prefix of this conversation does not render as a prefix of it
    msgs = cases["reasoning, then a question"][0]
    assert not p.apply_chat_template(msgs).startswith(p.apply_chat_template(msgs[:3]))


MISTRAL = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {% for c in m.content %}"
           "{% if c.type == 'image' %}[IMG]<|image_pad|>{% else %}{{ c.text }}{% endif %}{% endfor %} [/INST]"
           "{% else %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}")
ALWAYS_THINK = (  # ChatML whose every assistant turn shows a think block, empty when there is no reasoning
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
    "{% if '</think>' not in m.content %}<think>\n\n</think>\n\n{% endif %}{{ m.content }}"
    "{% else %}{% for c in m.content %}{% if c.type == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ c.text }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.mark.parametrize("template,end", [(MISTRAL, "</s>"), (ALWAYS_THINK, "<|im_end|>\n")])
def test_collate_turns_follow_the_template(tmp_path, images, template, end):
    d = write_checkpoint(tmp_path, build_tokenizer(), chat_template=template)
    p = Processor.from_pretrained(d, max_pixels=64 * 64)
    ref = ArtemisDataCollator(reference_processor(AutoTokenizer.from_pretrained(d), max_pixels=64 * 64))
    user = lambda *c: {"role": "user", "content": [{"type": "image"} if x is None else {"type": "text", "text": x}
                                                     for x in c]}
    rows = [{"messages": [user(None, "What is it?"), {"role": "assistant", "content": "A cat."}, user("Is it awake?"),
                          {"role": "assistant", "content": "<think>\nEyes open.\n</think>\n\nYes."},
                          user("And this?", None), {"role": "assistant", "content": "Coffee."}],
             "images": [images["chelsea"], images["coffee"]]}]
    spans = ["A cat." + end.strip(), "<think>\nEyes open.\n</think>\n\nYes." + end.strip(), "Coffee." + end]
    every, last = p.collate(rows), p.collate(rows, train_on="last")
    assert labelled(p, every, 0) == spans and labelled(p, last, 0) == spans[-1:]
    assert torch.equal(last["labels"], ref(rows)["labels"])


def test_decode_matches_transformers(ckpt, ref_tok, images):
    p = Processor.from_pretrained(ckpt)
    ids = p(text=p.apply_chat_template(conversations(images)[2][0]))["input_ids"][0]
    for skip in (True, False):
        assert p.decode(ids, skip_special_tokens=skip) == ref_tok.decode(ids, skip_special_tokens=skip)


def test_save_pretrained_roundtrip(tmp_path, ckpt, images):
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    p = Processor(build_tokenizer(), special_tokens={"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>"},
                  min_pixels=64 * 64, max_pixels=96 * 96, image_mean=mean, image_std=std)
    p.save_pretrained(tmp_path)
    q = Processor.from_pretrained(tmp_path)
    for k in ("patch_size", "temporal_patch_size", "merge_size", "min_pixels", "max_pixels", "image_mean",
              "image_std", "chat_template", "special_tokens", "pad_id", "stop_ids", "image_token_id"):
        assert getattr(q, k) == getattr(p, k), k
    ims = [images["chelsea"], images["la"]]
    msgs, _ = conversations(images)[1]
    text = p.apply_chat_template(msgs)
    a, b = p(text=[text, text], images=ims), q(text=[text, text], images=ims)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # transformers reads the same directory: tokenizer, template, image settings
    hf = AutoTokenizer.from_pretrained(tmp_path)
    assert hf.apply_chat_template(msgs, tokenize=False) == text and hf.pad_token_id == p.pad_id
    first = a["input_ids"][0][a["attention_mask"][0] == 1].tolist()
    assert hf(p._expand([text], a["image_grid_thw"][:1]))["input_ids"][0] == first
    want = Qwen2VLImageProcessorPil.from_pretrained(tmp_path)(images=ims, return_tensors="pt")
    assert torch.equal(want["image_grid_thw"], a["image_grid_thw"])
    assert (want["pixel_values"] - a["pixel_values"]).abs().max() <= 1e-5


def test_from_pretrained_settings(tmp_path):
    tok = build_tokenizer()
    d = write_checkpoint(tmp_path / "a", tok, chat_template=None, pad_token="<unk>")
    p = Processor.from_pretrained(d)  # no template, no preprocessor_config: built-in template, CLIP, artemis sizes
    assert p.chat_template == CHAT_TEMPLATE and (p.min_pixels, p.max_pixels) == (32 * 32, 512 * 512)
    assert p.image_mean == (0.48145466, 0.4578275, 0.40821073) and p.pad_id == 0
    tok.enable_padding(pad_id=23, pad_token="<|video_pad|>")  # no pad_token in the config: tokenizer.json's
    d = write_checkpoint(tmp_path / "pad", tok)
    assert Processor.from_pretrained(d).pad_id == AutoTokenizer.from_pretrained(d).pad_token_id == 23
    tok.no_padding()
    with open(os.path.join(d, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 14,
                   "size": {"shortest_edge": 56 * 56, "longest_edge": 1000 * 1000}}, f)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump({"model_type": "artemis_vlm", "vision_config": {"patch_size": 14, "spatial_merge_size": 2}}, f)
    p = Processor.from_pretrained(d, max_pixels=300 * 300)
    assert (p.min_pixels, p.max_pixels, p.image_mean, p.patch_size) == (56 * 56, 300 * 300, (0.5,) * 3, 14)
    assert p.preprocess([Image.new("RGB", (100, 60))])[1].tolist() == [[1, 4, 8]]  # factor 28: 56x112
    # a list of named templates; chat_template.jinja, when present, wins
    d = write_checkpoint(tmp_path / "b", tok, chat_template=[{"name": "default", "template": "D{{ messages|length }}"},
                                                             {"name": "tool_use", "template": "T"}])
    p = Processor.from_pretrained(d)
    msgs = [{"role": "user", "content": "hi"}]
    assert (p.apply_chat_template(msgs), p.apply_chat_template(msgs, tools=TOOLS)) == ("D1", "T")
    assert p.apply_chat_template(msgs, chat_template="tool_use") == "T"
    with open(os.path.join(d, "chat_template.jinja"), "w") as f:
        f.write("J{{ add_generation_prompt }}")
    assert Processor.from_pretrained(d).apply_chat_template(msgs) == "JFalse"


def test_resize_is_idempotent_and_bounded(ckpt, images):
    p = Processor.from_pretrained(ckpt)
    for image in images.values():
        once = p.resize(image)
        assert once.mode == "RGB" and once.width % 32 == 0 and once.height % 32 == 0
        assert once.width * once.height <= 512 * 512 and p.resize(once).size == once.size
    assert p.resize(images["rgba"]).getpixel((0, 0)) == (255, 255, 255)  # alpha 0 at the left edge: white


def test_huge_image_never_becomes_a_full_size_float_array(ckpt):
    p = Processor.from_pretrained(ckpt)
    huge = Image.new("RGB", (6000, 4000), (10, 200, 30))  # a float32 copy would be 288 MB
    tracemalloc.start()
    pixels, grid = p.preprocess([huge])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert grid.tolist() == [[1, 26, 38]] and peak < 30e6


def test_load_image(tmp_path, images):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
    path = tmp_path / "rotated.jpg"
    images["coffee"].resize((40, 20)).save(path, exif=exif)
    image = load_image(path)
    assert image.size == (20, 40) and image.getexif().get(0x0112) is None


def test_16_bit_grayscale_is_scaled_to_8_bits(tmp_path, ckpt):
    """A 16-bit grayscale PNG (Pillow's I;16) reaches the model as the 8-bit image it shows, v / 257, where
    transformers' convert("RGB") clips it to nearly all white."""
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    Image.fromarray(np.round(ramp / 257).astype(np.uint8)).save(tmp_path / "ramp8.png")
    p = Processor.from_pretrained(ckpt)
    assert load_image(tmp_path / "ramp16.png").mode == "I;16"
    got, want = (np.asarray(p.resize(load_image(tmp_path / f))) for f in ("ramp16.png", "ramp8.png"))
    assert np.array_equal(got, want) and 100 < got.mean() < 155
    ref = Qwen2VLImageProcessorPil()  # the difference the README states
    assert (np.asarray(ref.convert_to_rgb(load_image(tmp_path / "ramp16.png"))) == 255).mean() > 0.99


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_bad_image_files_raise(tmp_path, ckpt, images, damage):
    buf = io.BytesIO()
    images["rocket"].save(buf, "JPEG")
    data = {"truncated": buf.getvalue()[: len(buf.getvalue()) // 2], "garbage": b"not an image" * 10}
    path = tmp_path / "bad.jpg"
    if damage in data:
        path.write_bytes(data[damage])
    with pytest.raises(ValueError, match="bad.jpg: unreadable or truncated"):
        load_image(path)
    p = Processor.from_pretrained(ckpt)
    with pytest.raises(ValueError, match="bad.jpg"):
        p(text="<|image_pad|>", images=[str(path)])
    if damage == "truncated":  # opened lazily by the caller, decoded by us
        with pytest.raises(ValueError, match="bad.jpg: unreadable or truncated"):
            p.preprocess([Image.open(path)])


def test_bad_inputs_raise(ckpt, images, tmp_path):
    p = Processor.from_pretrained(ckpt)
    one = "<|vision_start|><|image_pad|><|vision_end|>hi"
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 2 images"):
        p(text=one, images=[images["tiny"], images["gray"]])
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        p(text=[one, one], images=[images["tiny"]])
    with pytest.raises(ValueError, match="1 <\\|image_pad\\|> placeholders but 0 images"):
        p(text=one)
    with pytest.raises(ValueError, match="aspect ratio 250.0 is above 200"):
        p(text=one, images=[Image.new("RGB", (5000, 20))])
    with pytest.raises(ValueError, match="padding_side"):
        p(text="x", padding_side="middle")
    with pytest.raises(ValueError, match="chat template failed: TemplateError: unknown role: critic"):
        p.apply_chat_template([{"role": "critic", "content": "x"}])
    caption = conversations(images)[1][0]
    with pytest.raises(ValueError, match="collate: row 1: the last message must be the assistant's target, got 'user'"):
        p.collate([{"messages": caption, "images": [images["tiny"]]}, {"messages": caption[:1], "images": []}])
    with pytest.raises(ValueError, match="collate: row 0: 1 <\\|image_pad\\|> placeholders but 0 images"):
        p.collate([{"messages": caption}])
    with pytest.raises(ValueError, match="train_on: expected 'all' or 'last', got 'every'"):
        p.collate([{"messages": caption, "images": [images["tiny"]]}], train_on="every")
    plain = Processor(build_tokenizer(), "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
                      "{% if add_generation_prompt %}assistant: {% endif %}", {"eos_token": "</s>"})
    two = [{"messages": conversations(images)[2][0]}]  # two assistant turns, neither closed by a stop token
    with pytest.raises(ValueError, match=r"collate: row 0: assistant message 1 is not a span .* end-of-turn token "
                                         r"\(</s>, <\|im_end\|>\) before the last turn; use train_on='last'"):
        plain.collate(two)
    assert (plain.collate(two, train_on="last")["labels"] != -100).sum() > 0
    with pytest.raises(ValueError, match="tokenizer: <\\|image_pad\\|> must be one added token"):
        Processor(build_tokenizer([s for s in SPECIALS if s != "<|image_pad|>"]), special_tokens={"eos_token": "</s>"})
    d = write_checkpoint(tmp_path / "noimg", build_tokenizer(SPECIALS[:22]))
    with pytest.raises(ValueError, match="<\\|image_pad\\|> must be one added token"):
        Processor.from_pretrained(d)


def test_offline_hub_id_raises(monkeypatch, tmp_path):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and so no request leaves this machine
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="schneewolflabs/not-here: not a local directory.*Hugging Face Hub"):
        Processor.from_pretrained("schneewolflabs/not-here")
