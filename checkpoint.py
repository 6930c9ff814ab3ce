"""
Checkpoints on disk, all in one place: finding one (a directory, a training out_dir, a hub repo id), reading it
strictly one tensor at a time, assembling a new graft from parts, writing the artemis-vlm layout atomically, and the
training resume state, written and read side by side (as nanochat's checkpoint_manager keeps them), LoRA adapters in
PEFT's format, and the sharded resume state of an FSDP run (torch.distributed.checkpoint).

    model = from_pretrained("schneewolflabs/A3", dtype=torch.bfloat16, device="cuda")   # an artemis-vlm checkpoint
    model = from_parts("schneewolflabs/A2", "Qwen/Qwen3-VL-2B-Instruct")   # artemis-vlm's from_a2_and_vision
    save_pretrained(model, "out/graft")        # config.json + safetensors, sharded above 5 GiB; transformers loads it
    model, processor = load("out-stage1")      # what sample.py and serve.py load: weights and processor together

The model is built on the meta device and every tensor is read straight into its dtype and device, then assigned by
a strict load: each checkpoint key is consumed or on IGNORED_KEYS, and a missing, extra or misshapen tensor is an
error that names it. An int8 checkpoint (quantize.py) is built with its Int8Linear modules before that load. A LoRA
run's checkpoint (adapter_config.json + adapter_model.safetensors, as PEFT writes them) loads as its base with each
adapted weight plus (lora_alpha / r) B A, added one tensor at a time as the base is read.
"""
import json
import os
import re
import shutil
import types
from dataclasses import fields

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import ArtemisConfig, ArtemisVLM, Int8Linear, Projector, TextConfig
from processor import Processor
from vision import VisionConfig

# Checkpoint tensors the graft reads past on purpose. Qwen3-VL feeds its DeepStack mergers into its own decoder's early
# layers; Artemis keeps the Mistral decoder unmodified, so it never uses them.
IGNORED_KEYS = ("visual.deepstack_merger_list.",)
TRAIN_STATE = "train_state.pt"  # beside the weights of a training checkpoint: optimizer, step, RNG, config
SHARDED = "sharded"  # an FSDP run's trainable weights and optimizer state, each process's shards (a DCP directory)
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # PEFT's file names
PEFT_PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model (the artemis-vlm model)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found, expected a Hugging Face checkpoint file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def why(e):
    """An exception as one line: its type and the first line of its message (pickle, zip and DCP raise long ones)."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def nbytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def resolve(path):
    """A local checkpoint directory as is, the checkpoint inside a training out_dir (<out_dir>/ckpt), or a hub repo id
    fetched through huggingface-hub. A save stopped between its two renames left the previous one at <path>.old."""
    if os.path.isdir(os.path.join(path, "ckpt")) and not os.path.exists(os.path.join(path, "config.json")):
        path = os.path.join(path, "ckpt")  # a training out_dir
    if os.path.isdir(path):
        return path
    if os.path.isdir(path.rstrip("/") + ".old"):
        return path.rstrip("/") + ".old"
    if os.path.exists(path):
        raise ValueError(f"{path}: is a file, expected a checkpoint directory or a hub repo id")
    # a hub id is NAME or OWNER/NAME; a path that cannot be one, or that starts in a local directory, is a local path
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", path) or path.startswith(".") or os.path.isdir(path.split("/")[0]):
        raise FileNotFoundError(f"{path}: no such directory, expected a checkpoint directory, a training out_dir "
                                "or a hub repo id")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja", "tokenizer*"])
    except Exception as e:
        raise ValueError(f"{path}: no such local directory, and fetching it as a hub repo id failed "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def read_config(path):
    """The ArtemisConfig of an artemis-vlm checkpoint directory and its config.json as read."""
    d = read_json(os.path.join(path, "config.json"))
    where = f"{path}/config.json"
    if not isinstance(d, dict):
        raise ValueError(f"{where}: holds a JSON {type(d).__name__}, expected an object of config keys")
    if d.get("model_type") != "artemis_vlm":
        raise ValueError(f"{where}: model_type {d.get('model_type')!r}, expected 'artemis_vlm'")
    if d.get("projector_hidden_act", "gelu") != "gelu":
        raise ValueError(f"{where}: projector_hidden_act {d['projector_hidden_act']!r}, expected 'gelu'")
    q = d.get("quantization") or {}
    if not isinstance(q, dict) or q.get("method") not in (None, "int8"):
        raise ValueError(f"{where}: quantization {q!r}, expected {{\"method\": \"int8\", ...}} or none")
    for key, cls in (("text_config", TextConfig), ("vision_config", VisionConfig)):
        check_fields(cls, d.get(key), f"{where}: {key}")
    for key in ("image_token_id", "video_token_id"):
        if key in d and not (type(d[key]) is int and d[key] >= 0):
            raise ValueError(f"{where}: {key} is {d[key]!r}, expected a token id (a whole number, at least 0)")
    try:
        return ArtemisConfig.from_dict(d), d
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{where}: not an artemis_vlm config ({e})") from None


def check_fields(cls, d, where):
    """Each key of config section d that names a field of the dataclass cls holds a value of that field's type; the
    shape fields (sizes, counts) are whole numbers of at least 1, ids at least 0, head_dim 0 (derived) or more."""
    if not isinstance(d, dict):
        raise ValueError(f"{where} is {d!r}, expected an object of config keys")
    for f in fields(cls):
        v = d.get(f.name)
        if v is None:
            continue  # absent or null: the field's default, or None where it allows it
        kinds = tuple(t for t in (f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,))
                      if t is not type(None))
        ok = type(v) in kinds or (float in kinds and type(v) is int)  # bool is not taken for an int, nor int for bool
        least = 0 if f.name.endswith("_id") or f.name == "head_dim" else 1
        if ok and type(v) is int and int in kinds and v < least:
            ok, kinds = False, (f"a whole number of at least {least}",)
        if not ok:
            names = " or ".join(k if isinstance(k, str) else {"int": "a whole number", "float": "a number",
                                                               "bool": "true or false", "str": "a string",
                                                               "list": "a list"}[k.__name__] for k in kinds)
            raise ValueError(f"{where}: {f.name} is {v!r}, expected {names}")


def read_tensors(path, rename, dtype, device, weights="model.safetensors"):
    """{rename(key): tensor} for the checkpoint's tensors whose rename is not None, read one at a time straight
    into `dtype` on `device` (floating tensors; int8 weights stay int8), so host memory holds at most one copy.
    weights: the file, or the stem of a sharded index (model.safetensors.index.json), to read."""
    index = os.path.join(path, weights + ".index.json")
    if os.path.exists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: no \"weight_map\" of tensor names to shard files")
        files = sorted(set(weight_map.values()))
    elif os.path.exists(os.path.join(path, weights)):
        files = [weights]
    else:
        raise FileNotFoundError(f"{path}: no {weights} or {weights}.index.json")
    sd = {}
    for name in files:
        file = os.path.join(path, name)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{file}: not found, though {index} maps tensors to it (a shard missing from "
                                    "the download?)")
        try:
            with safe_open(file, framework="pt") as f:
                for k in f.keys():
                    new = rename(k)
                    if new is not None:
                        t = f.get_tensor(k)
                        sd[new] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        except SafetensorError as e:  # cut short by an interrupted copy or download, or not safetensors at all
            raise ValueError(f"{file}: truncated or not a safetensors file ({e})") from None
    return sd


def load_strict(model, sd, where):
    """Assign sd's tensors to the model (never copied into a random init), with errors that name the key."""
    tied = model.config.text.tie_word_embeddings
    want = {k: v.shape for k, v in model.state_dict().items()}
    if tied:  # transformers writes a tied head once, as the embedding table
        want.pop("language_model.lm_head.weight")
        sd.pop("language_model.lm_head.weight", None)
    for k in want:
        if k not in sd:
            raise ValueError(f"{where}: missing tensor {k!r} (expected shape {tuple(want[k])})")
        if sd[k].shape != want[k]:
            raise ValueError(f"{where}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(want[k])}")
    extra = sorted(set(sd) - set(want))
    if extra:
        raise ValueError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} unexpected in all)")
    model.load_state_dict(sd, strict=not tied, assign=True)
    if tied:  # assign=True replaced the shared Parameter: share it again
        model.language_model.lm_head.weight = model.language_model.model.embed_tokens.weight
    return model


def from_pretrained(path, dtype=None, device="cpu"):
    """An artemis-vlm checkpoint (a directory, single file or sharded; a training out_dir; a hub repo id), in its own
    dtype unless one is given. A LoRA adapter's directory gives its base with the adapters merged."""
    path = resolve(path)
    adapter = read_adapter_config(path)
    base = resolve(adapter["base_model_name_or_path"]) if adapter else path
    if adapter and read_adapter_config(base):
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: its base {base} is itself a LoRA adapter; merge that one first "
                         "(python lora.py)")
    config, cfg = read_config(base)
    if adapter and config.quantization:
        raise ValueError(f"{path}/{ADAPTER_CONFIG}: its base {base} is an int8 checkpoint; adapters merge into the "
                         "full-precision one")
    dtype = dtype or getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
    sd = read_tensors(base, lambda k: None if k.startswith(IGNORED_KEYS) else k, dtype, device)
    if adapter:
        merge_adapter(sd, read_adapter(path, device), adapter, f"{path}/{ADAPTER_WEIGHTS}")
    with torch.device("meta"):
        model = ArtemisVLM(config)
        for parent, name, linear in int8_targets(model) if config.quantization else []:  # empty until the load
            setattr(parent, name, Int8Linear(linear.in_features, linear.out_features))
    return load_strict(model, sd, path)


def int8_targets(model):
    """(parent, name, linear) of each decoder nn.Linear that an int8 checkpoint (quantize.py) holds as an Int8Linear:
    all but a tied head, since an int8 copy would sit beside the float table the embedding lookup still needs."""
    lm, tied = model.language_model, model.config.text.tie_word_embeddings
    return [(m, name, child) for m in lm.modules() for name, child in m.named_children()
            if isinstance(child, nn.Linear) and not (tied and child is lm.lm_head)]


def from_parts(text_path, vision_path, image_token_id=22, video_token_id=23, dtype=None, device="cpu", seed=0):
    """A new graft: a Mistral-family decoder checkpoint + the vision tower of a Qwen3-VL checkpoint (only its
    `model.visual.*` tensors are read) + a freshly initialised projector."""
    text_path, vision_path = resolve(text_path), resolve(vision_path)
    tcfg = read_json(os.path.join(text_path, "config.json"))
    vcfg = read_json(os.path.join(vision_path, "config.json"))
    if tcfg.get("model_type") != "mistral":
        raise ValueError(f"{text_path}/config.json: model_type {tcfg.get('model_type')!r}, expected 'mistral'")
    if "vision_config" not in vcfg:
        raise ValueError(f"{vision_path}/config.json: no 'vision_config', expected a Qwen3-VL checkpoint")
    config = ArtemisConfig(TextConfig.from_dict(tcfg), VisionConfig.from_dict(vcfg["vision_config"]),
                           image_token_id, video_token_id)
    dtype = dtype or getattr(torch, tcfg.get("dtype") or tcfg.get("torch_dtype") or "float32")
    with torch.device("meta"):
        model = ArtemisVLM(config)
    sd = read_tensors(text_path, lambda k: "language_model." + k, dtype, device)

    def vision_key(k):
        for prefix in ("model.visual.", "visual."):
            if k.startswith(prefix):
                k = "visual." + k[len(prefix):]
                return None if k.startswith(IGNORED_KEYS) else k

    sd.update(read_tensors(vision_path, vision_key, dtype, device))
    with torch.random.fork_rng(devices=[]):  # nn.Linear's own init, which artemis-vlm's from_a2_and_vision keeps
        torch.manual_seed(seed)
        fresh = Projector(config.vision.out_hidden_size, config.text.hidden_size)
    sd.update({"multi_modal_projector." + k: v.to(device, dtype) for k, v in fresh.state_dict().items()})
    return load_strict(model, sd, f"{text_path} + {vision_path}")


def save_pretrained(model, path, max_shard_size=5 * 2**30, write_extra=None, state_dict=None):
    """config.json + safetensors in the artemis-vlm layout, sharded above max_shard_size bytes with an index.
    Written into `path.tmp` and renamed over `path`, so an interrupted save never leaves a checkpoint that
    looks complete. write_extra(tmp_dir) adds files (tokenizer, resume state) inside the same swap;
    state_dict replaces model.state_dict() (a gathered FSDP one). A save replaces only what a save wrote: a path,
    path.tmp or path.old that holds anything else is a ValueError, before anything is written."""
    sd = {k: v.detach().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if model.config.text.tie_word_embeddings:
        sd.pop("language_model.lm_head.weight")  # transformers re-ties it from embed_tokens
    shards, size = [{}], 0
    for k, v in sd.items():
        n = nbytes([v])
        if shards[-1] and size + n > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    tmp = fresh_tmp(path)
    write_json(os.path.join(tmp, "config.json"), model.config.to_dict(next(iter(sd.values())).dtype))
    if len(shards) == 1:
        save_file(shards[0], os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, os.path.join(tmp, name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        write_json(os.path.join(tmp, "model.safetensors.index.json"),
                   {"metadata": {"total_size": nbytes(sd.values())}, "weight_map": weight_map})
    swap_in(tmp, path, write_extra)


def check_save(path):
    """(path.tmp, path.old), once each of the three a save to path replaces is absent, an empty directory or a
    checkpoint directory (a config.json of model_type artemis_vlm, or a LoRA run's adapter_config.json, as a save
    writes them first): a save never deletes a user's folder or file. A ValueError that names it otherwise."""
    tmp, old = path.rstrip("/") + ".tmp", path.rstrip("/") + ".old"
    for p in (path, tmp, old):
        if not os.path.lexists(p):
            continue
        if os.path.islink(p) or not os.path.isdir(p):
            raise ValueError(f"{p}: exists and is not a checkpoint directory, and a save to {path} would replace it; "
                             "give another path, or move it away")
        ours = False
        for name, key, want in (("config.json", "model_type", "artemis_vlm"), (ADAPTER_CONFIG, "peft_type", "LORA")):
            try:
                with open(os.path.join(p, name)) as f:
                    ours = ours or json.load(f).get(key) == want
            except (OSError, ValueError, AttributeError):
                pass
        if not ours and os.listdir(p):
            raise ValueError(f"{p}: holds files that are not a checkpoint (no config.json of model_type "
                             f"'artemis_vlm', no LoRA adapter_config.json), and a save to {path} would replace them; "
                             "give another path, or move them away")
    return tmp, old


def check_new_dir(out_dir, init_from, src):
    """For a command that writes a new checkpoint from the one at init_from (resolved to src), before the weights
    load: a ValueError naming --out_dir when it is, holds or lies inside the source (init_from may be a training
    out_dir around src: its metrics.jsonl too), or when check_save refuses it."""
    out = os.path.realpath(out_dir)
    for s in {os.path.realpath(p) for p in (src, init_from) if os.path.exists(p)}:
        if os.path.commonpath([out, s]) in (out, s):
            raise ValueError(f"--out_dir={out_dir}: is, holds or lies inside the checkpoint it is made from "
                             f"({init_from}); give a new directory")
    try:
        check_save(out_dir)
    except ValueError as e:
        raise ValueError(f"--out_dir: {e}") from None


def fresh_tmp(path):
    """An empty `path.tmp`, where a checkpoint is written before swap_in makes it `path`, once check_save found
    nothing there that a save did not write."""
    tmp, _ = check_save(path)
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def swap_in(tmp, path, write_extra=None):
    """Add write_extra(tmp)'s files, sync tmp's files to disk, then rename it over `path` (the previous checkpoint
    stays at `path.old` between the two renames, where resolve() finds it)."""
    if write_extra is not None:
        write_extra(tmp)
    for name in os.listdir(tmp):  # on disk before the renames below make them the checkpoint
        if os.path.isfile(os.path.join(tmp, name)):  # a directory in it (SHARDED) was synced by its writer
            fd = os.open(os.path.join(tmp, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def copy_side_files(src, dst):
    """The tokenizer, chat template and preprocessor config of checkpoint src into dst: all but its weights (or
    adapter), its config.json and a training checkpoint's resume state."""
    for name in os.listdir(src):
        if name in ("config.json", ADAPTER_CONFIG, ADAPTER_WEIGHTS, SHARDED) or name.endswith(".pt") or \
                name.startswith("model") and ".safetensors" in name:
            continue
        (shutil.copytree if os.path.isdir(os.path.join(src, name)) else shutil.copy)(
            os.path.join(src, name), os.path.join(dst, name))


# ----------------------------------------------------------------------------------------------
# LoRA adapters in PEFT's format: what peft.PeftModel.from_pretrained reads onto artemis-vlm's model class

def save_adapter(path, tensors, adapter, write_extra=None):
    """adapter_config.json + adapter_model.safetensors as PEFT writes them, swapped in at once like save_pretrained.
    tensors: {name in this model: tensor}, the lora_A/lora_B weights and the modules trained in full; adapter: the
    LoraConfig fields that vary (r, lora_alpha, lora_dropout, target_modules, modules_to_save,
    base_model_name_or_path)."""
    tmp = fresh_tmp(path)
    write_json(os.path.join(tmp, ADAPTER_CONFIG), {
        "peft_type": "LORA", "task_type": None, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True, **adapter})
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in tensors.items()},
              os.path.join(tmp, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    swap_in(tmp, path, write_extra)


def read_adapter_config(path):
    """The adapter_config.json of a LoRA checkpoint directory, checked; None for a directory without one."""
    file = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.exists(file):
        return None
    d = read_json(file)
    if d.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {d.get('peft_type')!r}, expected 'LORA'")
    for k in ("r", "lora_alpha", "base_model_name_or_path"):
        if not d.get(k):
            raise ValueError(f"{file}: no {k!r}, expected a LoRA adapter with the checkpoint it adapts")
    # variants whose merge is not W + (lora_alpha / r) B A: merged as plain LoRA, they would give a wrong model
    other = [k for k in ("use_rslora", "use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern") if d.get(k)]
    if other or d.get("bias", "none") != "none":
        raise ValueError(f"{file}: {', '.join(other) or 'bias ' + repr(d['bias'])} set, expected plain LoRA")
    return d


def read_adapter(path, device="cpu"):
    """{name in this model: fp32 tensor} of a LoRA checkpoint's adapter_model.safetensors, PEFT's prefix removed."""
    def rename(k):
        if not k.startswith(PEFT_PREFIX):
            raise ValueError(f"{path}/{ADAPTER_WEIGHTS}: tensor {k!r} lacks PEFT's {PEFT_PREFIX!r} prefix")
        return k[len(PEFT_PREFIX):]

    return read_tensors(path, rename, torch.float32, device, weights=ADAPTER_WEIGHTS)


def merge_adapter(sd, tensors, adapter, where):
    """The base's tensors sd with an adapter applied, in place: each lora_A/lora_B pair adds (lora_alpha / r) B A to
    its weight, in fp32, and every other tensor (a module trained in full: the projector) replaces the base's."""
    scaling = adapter["lora_alpha"] / adapter["r"]
    for k, t in tensors.items():
        stem, _, kind = k.removesuffix(".weight").rpartition(".")
        if kind in ("lora_A", "lora_B"):
            a, b, w = tensors.get(f"{stem}.lora_A.weight"), tensors.get(f"{stem}.lora_B.weight"), f"{stem}.weight"
            if a is None or b is None:
                raise ValueError(f"{where}: tensor {k!r} has no {'lora_B' if b is None else 'lora_A'} beside it")
            if kind == "lora_A":
                continue  # merged with its lora_B
            if w not in sd or sd[w].shape != (b.shape[0], a.shape[1]):
                have = "the base lacks" if w not in sd else f"the base has of shape {tuple(sd[w].shape)}"
                raise ValueError(f"{where}: tensor {k!r} adapts {w!r}, which {have}; expected shape "
                                 f"{(b.shape[0], a.shape[1])}")
            sd[w] = (sd[w].float() + scaling * (b @ a)).to(sd[w].dtype)  # (out, in)
        elif k in sd and t.shape == sd[k].shape:
            sd[k] = t.to(sd[k].dtype)
        else:
            raise ValueError(f"{where}: tensor {k!r} of shape {tuple(t.shape)} is not a tensor of the base")


# ----------------------------------------------------------------------------------------------
# training checkpoints: what train.py resumes from, written and read here side by side

def save_train_state(path, model, processor, state, state_dict=None, adapter=None, sharded=None):
    """A training checkpoint: the weights in the artemis-vlm layout (sample.py, artemis-vlm and transformers load
    them), or for a LoRA run (adapter: its LoraConfig fields, see save_adapter) only the trainable tensors in
    state_dict as a PEFT adapter; the processor; `state` (optimizer, step, RNG, config) as train_state.pt; and
    `sharded`, the directory save_sharded wrote; swapped in at once."""
    def extra(d):
        processor.save_pretrained(d)
        torch.save(state, os.path.join(d, TRAIN_STATE))
        if sharded:
            os.rename(sharded, os.path.join(d, SHARDED))

    if adapter:
        save_adapter(path, state_dict, adapter, write_extra=extra)
    else:
        save_pretrained(model, path, write_extra=extra, state_dict=state_dict)


def load_train_state(path, trainable, device):
    """What save_train_state wrote: (state, {name: fp32 tensor} of the names in `trainable`). The trainable weights
    are read in fp32, the optimizer's master copy, not rounded to the dtype the frozen rest was loaded in."""
    path = resolve(path)  # or the previous checkpoint, where a save stopped halfway through its swap
    file = os.path.join(path, TRAIN_STATE)
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # missing, truncated or not a torch.save file: pickle and zip raise many kinds
        raise ValueError(f"{file}: unreadable resume state ({why(e)})") from None
    if read_adapter_config(path):
        return state, {k: v for k, v in read_adapter(path, device).items() if k in trainable}
    return state, read_tensors(path, lambda k: k if k in trainable else None, torch.float32, device)


def save_sharded(path, model, optimizer):
    """Collective: the trainable weights and the optimizer state of an FSDP-sharded model, each process writing
    its own shards with torch.distributed.checkpoint (nothing is gathered), into `path.sharded`, which
    save_train_state then moves into the checkpoint. Returns that directory."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    out = f"{path.rstrip('/')}.{SHARDED}"
    if os.path.isdir(out) and any(n != ".metadata" and not n.endswith(".distcp") for n in os.listdir(out)):
        raise ValueError(f"{out}: holds files that are not DCP shards, and a save to {path} would replace them; "
                         "move them away")  # every process sees it: none waits at the barrier for another
    if dist.get_rank() == 0:
        shutil.rmtree(out, ignore_errors=True)  # left by a save stopped before its swap
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=out)
    return out


def load_sharded(path, model, optimizer):
    """What save_sharded wrote, read into the model's trainable weights and the optimizer. Each process reads the
    parts of the shards it holds now, so the world size may differ from the saving run's (DCP reshards); a model
    that is not sharded reads whole tensors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
    src = os.path.join(resolve(path), SHARDED)
    if not os.path.isdir(src):
        raise FileNotFoundError(f"{src}: not found, expected the sharded optimizer state of an fsdp run")
    opts = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optimizer": optim_sd}
    try:
        dcp.load(state, checkpoint_id=src)
    except Exception as e:  # a missing or misshapen shard, metadata that is not DCP's: raised as CheckpointException
        raise ValueError(f"{src}: unreadable sharded state ({why(e)})") from None
    # dcp.load read every trainable tensor or raised; the frozen ones are the loaded checkpoint's, hence not strict
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))


# ----------------------------------------------------------------------------------------------
# inference: the model options sample.py and serve.py share

DEMOS = ("out-drawings", "out-shapes")  # load('')'s default: the demo README's first command trains, else the quicker
DEMO_COMMAND = ("python prepare.py --dataset=drawings && python train.py config/drawings_shape.py && python train.py "
                "config/drawings.py")


def demo():
    """What init_from '' stands for: the demo README's first command trains (out-drawings), else the shapes demo's."""
    for d in DEMOS:
        if os.path.isdir(os.path.join(d, "ckpt")):
            return d
    raise ValueError(f"no model: train the demo with README's first command (`{DEMO_COMMAND}`), or pass "
                     "--init_from=<checkpoint dir, training out_dir or hub id>")


def load(init_from, device="cpu", dtype="", min_pixels=None, max_pixels=None):
    """(model in eval mode, processor) from a checkpoint dir, a training out_dir or a hub id (fetched once for both);
    '' is the demo README's first command trains (out-drawings), else the shapes demo's (out-shapes). dtype '' is
    bfloat16 on CUDA, float32 on a CPU. A bad option is a ValueError that names it."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: CUDA is not available here (torch {torch.__version__}); use --device=cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype={dtype}: expected float32, bfloat16 or float16")
    for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
        if v is not None and (type(v) is not int or v < 1):
            raise ValueError(f"--{k}={v}: expected a whole number of pixels, at least 1")
    init_from = init_from or demo()
    try:
        path = resolve(init_from)
        model = from_pretrained(path, dtype=getattr(torch, dtype), device=device).eval()
        processor = Processor.from_pretrained(path)
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"--init_from: {e}") from None
    lo, hi = min_pixels or processor.min_pixels, max_pixels or processor.max_pixels
    if lo > hi:  # against each other, or against the checkpoint's other limit
        raise ValueError(f"--min_pixels={lo} is above --max_pixels={hi}" if min_pixels and max_pixels else
                         f"--min_pixels={lo} is above the checkpoint's max_pixels={hi}" if min_pixels else
                         f"--max_pixels={hi} is below the checkpoint's min_pixels={lo}")
    processor.min_pixels, processor.max_pixels = lo, hi
    return model, processor
