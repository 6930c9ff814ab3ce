"""Images and chat text -> model inputs for the Artemis graft, with no transformers at run time.

Mirrors, output for output:
- transformers' Qwen2VLImageProcessorPil (what artemis-vlm gets when torchvision is absent): RGB with alpha
  composited on white, smart_resize, uint8 bicubic resize, x/255, (x-mean)/std, patchify in merge-window order
  with the frame repeated on the temporal axis.
- artemis_vlm.ArtemisVLMProcessor: the checkpoint's jinja chat template rendered as transformers renders it, each
  <|image_pad|> expanded to grid.prod() // merge**2 copies, tokenization by tokenizer.json (post-processor on).
- artemis_vlm.ArtemisDataCollator: training batches whose labels mask the prompt prefix and every image pad
  (collate's train_on="last"; the default, "all", labels every assistant turn, each up to its end-of-turn token).
"""
import json
import math
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import numpy as np
import torch
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from PIL import Image, ImageOps
from tokenizers import AddedToken, Tokenizer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKEN = "<|image_pad|>"
IGNORE = -100  # label value the loss skips

# Used when a checkpoint ships no template: Qwen3's ChatML (tools, <think> handling, enable_thinking=False
# pre-filling an empty think block) with Qwen3-VL's image items. An image item ({"type": "image"}, or a dict
# with an "image"/"image_url" key) renders as <|vision_start|><|image_pad|><|vision_end|>; add_vision_id=True
# prefixes "Picture N: ". Reasoning comes from message.reasoning_content or a <think>...</think> in content and
# is kept only for assistant turns after the last user query.
CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- macro render(content, count) %}
    {%- if content is string %}
        {{- content }}
    {%- else %}
        {%- for item in content %}
            {%- if item.type == 'image' or 'image' in item or 'image_url' in item %}
                {%- if count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{%- endmacro %}
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- render(messages[0].content, true) + '\\n\\n' }}
    {%- endif %}
    {{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
    {%- for tool in tools %}
        {{- '\\n' + tool | tojson }}
    {%- endfor %}
    {{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within '
        '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
        '<args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + render(messages[0].content, true) + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == 'user' %}
        {%- set content = render(message.content, false) %}
        {%- if not (content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.role == 'system' and loop.first %}
    {%- elif message.role == 'user' or message.role == 'system' %}
        {{- '<|im_start|>' + message.role + '\\n' + render(message.content, true) + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {%- set content = render(message.content, true) %}
        {%- set reasoning = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' }}
            {{- content.lstrip('\\n') }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- set call = call.function or call %}
            {%- if loop.first and content or not loop.first %}
                {{- '\\n' }}
            {%- endif %}
            {{- '<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + render(message.content, true) + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('unknown role: ' + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""


def smart_resize(height, width, factor=32, min_pixels=32 * 32, max_pixels=512 * 512):
    """(height, width) rounded to multiples of factor, the area brought into [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image {width}x{height}: aspect ratio {max(height, width) / min(height, width):.1f} "
                         "is above 200, which the vision tower does not accept")
    h, w = round(height / factor) * factor, round(width / factor) * factor  # Python round: halves to even
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(path):
    """Open and fully decode an image file, upright as photo viewers show it (EXIF orientation applied)."""
    try:
        image = Image.open(path)
        image.load()  # decode now, so a truncated file fails here and not in a training step
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: unreadable or truncated image ({e})") from None
    return image


def to_rgb(image):
    """RGB, alpha composited on white. 16-bit grayscale (Pillow's I;16 modes: 16-bit PNG and TIFF) is scaled to 8
    bits, v / 257; transformers' convert("RGB") clips it instead, so that nearly every pixel comes out white."""
    if image.mode.startswith("I;16"):
        image = Image.fromarray(np.round(np.asarray(image, np.float32) / 257).astype(np.uint8), "L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        image = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _plain(x):
    # What transformers lets a template see: JSON-like data only; anything else (a PIL image in a content item)
    # becomes an inert "<TypeName>" string.
    if x is None or type(x) in (str, int, float, bool):
        return x
    if isinstance(x, dict):
        return {_plain(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_plain(v) for v in x)
    if isinstance(x, np.generic):
        return x.item()
    return f"<{type(x).__name__}>"


def _alias_reasoning(m):
    # transformers reads reasoning under any of these names and hands it to the template as reasoning_content
    r = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
    return m if r is None else {"thinking": r, **m, "reasoning_content": r}


def _raise(message):
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    env.globals.update(raise_exception=_raise, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    return env.from_string(template)


def has_think(content):  # a string, or a list of content items with text
    texts = [c.get("text") for c in content if isinstance(c, dict)] if isinstance(content, list) else [content]
    return any(isinstance(t, str) and "<think>" in t and "</think>" in t for t in texts)


class Processor:
    image_token = IMAGE_TOKEN

    def __init__(self, tokenizer, chat_template=None, special_tokens=None, patch_size=16, temporal_patch_size=2,
                 merge_size=2, min_pixels=32 * 32, max_pixels=512 * 512, image_mean=CLIP_MEAN, image_std=CLIP_STD):
        self.tokenizer = tokenizer
        tokenizer.no_padding()  # padding and truncation are ours to do, as transformers turns them off per call
        tokenizer.no_truncation()
        self.chat_template = chat_template or CHAT_TEMPLATE
        self.special_tokens = dict(special_tokens or {})  # {"bos_token": "<s>", ...}: template variables
        self.patch_size, self.temporal_patch_size, self.merge_size = patch_size, temporal_patch_size, merge_size
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        if not 0 < min_pixels <= max_pixels:
            raise ValueError(f"min_pixels={min_pixels}, max_pixels={max_pixels}: expected 0 < min_pixels <= max_pixels")
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)
        self.image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if self.image_token_id is None or tokenizer.encode(IMAGE_TOKEN, add_special_tokens=False).ids != [
                self.image_token_id]:
            raise ValueError(f"tokenizer: {IMAGE_TOKEN} must be one added token; this tokenizer lacks it")
        ids = {k: tokenizer.token_to_id(v) for k, v in self.special_tokens.items()}
        eos, pad = ids.get("eos_token"), ids.get("pad_token")
        self.pad_id = pad if pad is not None else eos
        if self.pad_id is None:
            raise ValueError("special_tokens: need a pad_token or eos_token that the tokenizer knows")
        self.stop_ids = list(dict.fromkeys(i for i in (eos, tokenizer.token_to_id("<|im_end|>")) if i is not None))
        # float32 (3, 1, 1, 1): float32 x/255 equals transformers' float64 rescale cast to float32 for all 256 uint8
        # values, so with float32 (x-mean)/std the pixel values come out bit-identical
        self._mean, self._std = (np.array(v, np.float32).reshape(3, 1, 1, 1) for v in (image_mean, image_std))

    @classmethod
    def from_pretrained(cls, path, min_pixels=None, max_pixels=None):
        d = Path(path)
        if not d.is_dir():
            try:
                from huggingface_hub import snapshot_download
                d = Path(snapshot_download(str(path), allow_patterns=[  # the small files only, never weights
                    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "additional_chat_templates/*",
                    "config.json", "preprocessor_config.json"]))
            except Exception as e:  # offline, no such repo, bad id: the hub raises many kinds
                raise ValueError(f"{path}: not a local directory, and fetching it from the Hugging Face Hub "
                                 f"failed ({type(e).__name__}); give a local checkpoint directory") from None

        def read(name):
            f = d / name
            try:
                return json.loads(f.read_text(encoding="utf-8")) if f.exists() else {}
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None

        if not (d / "tokenizer.json").exists():
            raise ValueError(f"{d}: no tokenizer.json (this processor reads tokenizers-format tokenizers only)")
        try:
            tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises plain Exceptions that name no file
            raise ValueError(f"{d / 'tokenizer.json'}: not a tokenizers tokenizer.json "
                             f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        tc = read("tokenizer_config.json")
        special = {k: v.get("content") if isinstance(v, dict) else v for k, v in tc.items() if k.endswith("_token")}
        extra = tc.get("extra_special_tokens")
        special.update(extra if isinstance(extra, dict) else {})
        special = {k: v for k, v in special.items() if isinstance(v, str)}
        if "pad_token" not in special and tok.padding:  # transformers falls back to tokenizer.json's padding
            special["pad_token"] = tok.padding["pad_token"]
        # tokens tokenizer_config.json declares but tokenizer.json lacks, added the way transformers adds them
        have = {t.content for t in tok.get_added_tokens_decoder().values()}
        decl = [AddedToken(**{k: v for k, v in t.items() if k != "__type"})
                for _, t in sorted(tc.get("added_tokens_decoder", {}).items(), key=lambda kv: int(kv[0]))]
        decl += [AddedToken(s, special=True, normalized=False) for s in special.values()]
        tok.add_tokens([t for t in decl if t.content not in have])

        template = tc.get("chat_template")
        if isinstance(template, list):
            template = {t["name"]: t["template"] for t in template}
        files = {"default": d / "chat_template.jinja"} | {
            f.stem: f for f in d.glob("additional_chat_templates/*.jinja")}
        files = {k: f.read_text(encoding="utf-8") for k, f in files.items() if f.exists()}
        if files:  # template files win over tokenizer_config.json, as in transformers
            template = files["default"] if list(files) == ["default"] else files

        cfg, pp = read("config.json"), read("preprocessor_config.json")
        vc = cfg.get("vision_config")  # the model's own sizes win: the pad count must match its merged tokens
        vision = dict(patch_size=16, temporal_patch_size=2, merge_size=2)
        vision.update({k: pp[k] for k in vision if k in pp} if vc is None else
                      {k: vc[j] for k, j in zip(vision, ("patch_size", "temporal_patch_size", "spatial_merge_size"))
                       if j in vc})
        size = pp.get("size") or {}
        pick = lambda *xs: next(x for x in xs if x is not None)
        return cls(tok, template, special, **vision,
                   min_pixels=pick(min_pixels, pp.get("min_pixels"), size.get("shortest_edge"), 32 * 32),
                   max_pixels=pick(max_pixels, pp.get("max_pixels"), size.get("longest_edge"), 512 * 512),
                   image_mean=pp.get("image_mean", CLIP_MEAN), image_std=pp.get("image_std", CLIP_STD))

    def save_pretrained(self, path):
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(d / "tokenizer.json"))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast", **self.special_tokens, "added_tokens_decoder": {
            str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized, "rstrip": t.rstrip,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(self.tokenizer.get_added_tokens_decoder().items())}}
        t = self.chat_template
        tc["chat_template"] = [{"name": k, "template": v} for k, v in t.items()] if isinstance(t, dict) else t
        if isinstance(t, str):
            (d / "chat_template.jinja").write_text(t, encoding="utf-8")
        (d / "tokenizer_config.json").write_text(json.dumps(tc, indent=2, ensure_ascii=False), encoding="utf-8")
        pp = {"image_processor_type": "Qwen2VLImageProcessor", "do_convert_rgb": True, "do_resize": True,
              "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
              "image_mean": list(self.image_mean), "image_std": list(self.image_std),
              "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
              "patch_size": self.patch_size, "temporal_patch_size": self.temporal_patch_size,
              "merge_size": self.merge_size}
        (d / "preprocessor_config.json").write_text(json.dumps(pp, indent=2), encoding="utf-8")

    # ---- images

    def resize(self, image):
        """RGB, smart_resize'd, bicubic: what the model sees. Resizing the result again keeps its size, except where
        the short side's floor of one factor already overshoots max_pixels (aspect near 200, small max_pixels)."""
        image = self._open(image)
        h, w = self._size(image)
        try:  # resize the uint8 image (never floats) first, so a huge photo never becomes a huge float array
            return to_rgb(image).resize((w, h), Image.BICUBIC)
        except OSError as e:  # a lazily opened file that turns out truncated
            raise ValueError(f"{getattr(image, 'filename', '') or 'image'}: unreadable or truncated ({e})") from None

    def _open(self, image):
        if isinstance(image, (str, Path)):
            return load_image(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"images: expected PIL images or file paths, got {type(image).__name__}")
        return image

    def _size(self, image):
        f = self.patch_size * self.merge_size
        return smart_resize(image.height, image.width, f, self.min_pixels, self.max_pixels)

    def preprocess(self, images):
        """PIL images or paths -> pixel_values (N, 3*T*P*P) float32 in merge-window order, image_grid_thw (n, 3)."""
        P, T, m = self.patch_size, self.temporal_patch_size, self.merge_size
        images = [self._open(image) for image in images]
        grid = torch.tensor([(1, h // P, w // P) for h, w in map(self._size, images)], dtype=torch.long).view(-1, 3)
        ends = grid.prod(-1).cumsum(0).tolist()
        out = np.empty((ends[-1] if ends else 0, 3, T, P, P), np.float32)

        def one(k):  # image k -> its rows of out
            (_, gh, gw), n = grid[k].tolist(), ends[k] - (ends[k - 1] if k else 0)
            x = np.asarray(self.resize(images[k]))  # (H, W, 3) uint8
            x = x.reshape(gh // m, m, P, gw // m, m, P, 3).transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m, gw/m, m, m, 3, P, P)
            y = np.divide(x.reshape(n, 3, 1, P, P), np.float32(255), dtype=np.float32)  # the uint8 patchified first
            np.subtract(y, self._mean, out=y)
            np.divide(y, self._std, out=y)
            out[ends[k] - n:ends[k]] = y  # broadcast: the frame repeated on the temporal axis

        # PIL's resize and numpy's loops release the GIL, so images run side by side, one per intra-op thread; in line
        # where there is one image or one thread (a data loader worker's): a pool costs more than a small image
        workers = min(len(images), torch.get_num_threads())
        if workers > 1:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(one, range(len(images))))
        else:
            list(map(one, range(len(images))))
        return torch.from_numpy(out).view(-1, 3 * T * P * P), grid  # (N, 3*T*P*P), (n, 3)

    # ---- text

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False, tools=None,
                            documents=None, chat_template=None, **kwargs):
        """Render messages as transformers' tokenizer.apply_chat_template does; tokenize=True gives the ids
        without post-processor tokens (transformers' add_special_tokens=False)."""
        t = self.chat_template
        if isinstance(t, dict) and chat_template in t:
            template = t[chat_template]
        elif isinstance(t, dict) and chat_template is None:
            name = "tool_use" if tools is not None and "tool_use" in t else "default"
            if name not in t:
                raise ValueError(f"chat_template: templates {sorted(t)} include no 'default'; pass chat_template=NAME")
            template = t[name]
        else:
            template = chat_template or t
        if not messages or not all(isinstance(m, dict) for m in messages):
            raise ValueError("messages: expected a non-empty list of {'role': ..., 'content': ...} dicts")
        if tools is not None and not all(isinstance(x, dict) for x in tools):
            raise ValueError("tools: expected a list of JSON-schema dicts")
        messages = [_alias_reasoning(_plain({k: v for k, v in m.items() if v is not None})) for m in messages]
        try:
            text = _compile(template).render(
                messages=messages, tools=_plain(tools), documents=_plain(documents),
                add_generation_prompt=add_generation_prompt, **_plain({**self.special_tokens, **kwargs}))
        except (jinja2.TemplateError, TypeError) as e:
            raise ValueError(f"chat template failed: {type(e).__name__}: {e}".replace("\n", " ")) from None
        return self.tokenizer.encode(text, add_special_tokens=False).ids if tokenize else text

    def _expand(self, texts, grid, where="text"):
        # one <|image_pad|> per image becomes as many pads as the vision tower gives merged tokens
        n, k = sum(t.count(IMAGE_TOKEN) for t in texts), 0 if grid is None else len(grid)
        if n != k:
            raise ValueError(f"{where}: {n} {IMAGE_TOKEN} placeholders but {k} images; give one image per placeholder")
        sizes = iter([] if grid is None else (grid.prod(-1) // self.merge_size ** 2).tolist())
        parts = [t.split(IMAGE_TOKEN) for t in texts]
        return [p[0] + "".join(IMAGE_TOKEN * next(sizes) + s for s in p[1:]) for p in parts]

    def _pad(self, seqs, pad, side="right"):
        if side not in ("left", "right"):
            raise ValueError(f"padding_side: expected 'left' or 'right', got {side!r}")
        L = max(len(s) for s in seqs)
        out, mask = torch.full((len(seqs), L), pad, dtype=torch.long), torch.zeros(len(seqs), L, dtype=torch.long)
        for i, s in enumerate(seqs):
            j = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
            out[i, j], mask[i, j] = torch.as_tensor(s, dtype=torch.long), 1
        return out, mask

    def __call__(self, text, images=None, padding_side="right"):
        """text (str or list of str, one <|image_pad|> per image) -> input_ids, attention_mask (B, L) and, when
        images are given, pixel_values (N, 3*T*P*P) and image_grid_thw (n, 3)."""
        texts = [text] if isinstance(text, str) else list(text)
        images = list(images or [])
        pixels, grid = self.preprocess(images) if images else (None, None)
        ids = [self.tokenizer.encode(t).ids for t in self._expand(texts, grid)]
        input_ids, mask = self._pad(ids, self.pad_id, padding_side)
        out = {"input_ids": input_ids, "attention_mask": mask}
        if images:
            out.update(pixel_values=pixels, image_grid_thw=grid)
        return out

    def collate(self, rows, auto_detect_thinking=True, train_on="all"):
        """rows of {"messages": [...], "images": [...]} (the last message an assistant turn) -> a right-padded training
        batch. train_on="all" labels every assistant turn, "last" only the final one (artemis-vlm's collator); labels
        are -100 over the rest: system, user and tool turns, role headers, image pads and padding."""
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on: expected 'all' or 'last', got {train_on!r}")
        seqs, labels, pixels, grids = [], [], [], []
        for i, row in enumerate(rows):
            msgs, images = row["messages"], list(row.get("images") or [])
            role = msgs[-1].get("role") if msgs and isinstance(msgs[-1], dict) else None
            if role != "assistant":
                raise ValueError(f"collate: row {i}: the last message must be the assistant's target, got {role!r}")
            # a row without real reasoning renders with the empty think block in its prompt, so the model is never
            # trained to emit one itself (artemis-vlm's auto_detect_thinking)
            think = not auto_detect_thinking or has_think(msgs[-1].get("content", ""))
            full = self.apply_chat_template(msgs, enable_thinking=think)
            pv, grid = self.preprocess(images) if images else (None, None)
            full, = self._expand([full], grid, f"collate: row {i}")
            ids = torch.tensor(self.tokenizer.encode(full).ids)
            start = len(self._prompt_ids(msgs[:-1], think, grid, f"collate: row {i} prompt"))
            target = torch.zeros(len(ids), dtype=torch.bool)
            target[start:] = True  # the last turn, to the end of the row: artemis-vlm's labels
            if train_on == "all":
                for a, b in self._earlier_turns(msgs, ids.tolist(), start, grid, auto_detect_thinking,
                                                f"collate: row {i}"):
                    target[a:b] = True
            seqs.append(ids)
            labels.append(torch.where(target & (ids != self.image_token_id), ids, IGNORE))
            if images:
                pixels.append(pv)
                grids.append(grid)
        input_ids, mask = self._pad(seqs, self.pad_id)
        batch = {"input_ids": input_ids, "attention_mask": mask, "labels": self._pad(labels, IGNORE)[0]}
        if pixels:
            batch.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.cat(grids))
        return batch

    def _prompt_ids(self, msgs, think, grid, where):
        """Token ids of the generation prompt that follows msgs, its image pads expanded by the first of grid's rows."""
        prompt = self.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=think)
        k = prompt.count(IMAGE_TOKEN)
        prompt, = self._expand([prompt], grid[:k] if k else None, where)
        return self.tokenizer.encode(prompt).ids

    def _earlier_turns(self, msgs, ids, limit, grid, auto_detect_thinking, where):
        """Token spans [a, b) of the assistant turns before the last (whose target starts at token limit), from renders
        of the template: a turn's target starts where the tokens of its generation prompt (the messages before it,
        add_generation_prompt=True) stop agreeing with the full row's, and ends with its first end-of-turn token,
        where generation would stop."""
        # A prefix of a conversation need not render as a prefix of the whole: Qwen3 keeps reasoning only after the
        # last user query, so a tool chain's reasoning shows in the prompt of a turn inside it, and not in the full
        # text once a later question follows. So the comparison restarts after the prompt's last end-of-turn token,
        # matched by count in the full row.
        stops, prev = set(self.stop_ids), 0
        ends = [t + 1 for t, x in enumerate(ids) if x in stops]
        for j in range(1, len(msgs) - 1):  # an assistant message that opens the conversation answers nothing
            msg = msgs[j]
            if msg.get("role") != "assistant":
                continue
            # as for the last turn: with no reasoning, an empty think block the template shows belongs to the prompt
            reasoning = has_think(msg.get("content", "")) or any(
                msg.get(k) for k in ("reasoning_content", "thinking", "reasoning"))
            q = self._prompt_ids(msgs[:j], not auto_detect_thinking or reasoning, grid, where)
            marks = [t + 1 for t, x in enumerate(q) if x in stops]
            n = len(marks)
            f, p = (ends[n - 1], marks[-1]) if 0 < n <= len(ends) else (0, 0)
            a = f + next((c for c, (x, y) in enumerate(zip(ids[f:], q[p:])) if x != y), len(q) - p)
            b = next((t for t in range(a, limit) if ids[t] in stops), None)
            if n > len(ends) or b is None or a < prev:  # no end-of-turn token, or renders that disagree
                names = ", ".join(self.tokenizer.id_to_token(t) for t in self.stop_ids)
                raise ValueError(f"{where}: assistant message {j} is not a span of the rendered conversation that ends "
                                 f"with an end-of-turn token ({names}) before the last turn; use train_on='last'")
            prev = b + 1
            yield a, prev

    def decode(self, ids, skip_special_tokens=True):
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def reply(self, ids):
        """The text of generated ids up to their first stop id (generate repeats it while a batch's other rows finish)."""
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self.decode(ids[:next((k for k, t in enumerate(ids) if t in self.stop_ids), len(ids))])
