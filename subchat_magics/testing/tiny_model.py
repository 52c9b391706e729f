"""A tiny Qwen3 model with random weights and a Qwen3-style tokenizer, built locally.

No weights can be downloaded in CI, so the vLLM tests run the real engine on this model:
``Qwen3ForCausalLM`` (hidden 128, 2 layers, 4 heads, 2 KV heads), a byte-level BPE
tokenizer trained on a fixed word corpus and wrapped as ``Qwen2Tokenizer``, and the
Qwen3 chat template (earlier assistant turns lose their ``<think>`` block; thinking off
appends an empty one after the generation prompt). Its replies are gibberish; the
plumbing is real.

The model is built once under ``~/.cache/subchat-magics/tiny-qwen3-<RECIPE>`` (override
the parent folder with ``SUBCHAT_CACHE``), atomically: a build goes to a temporary
folder that is renamed into place when complete, so an interrupted or concurrent build
never leaves a half-written model. Bump ``RECIPE`` when anything below changes.

Building needs ``transformers``, ``tokenizers`` and ``torch`` (imported only when building).
Run as a script to build it and print its path: ``python -m subchat_magics.testing.tiny_model``.
Call :func:`use_cpu_engine_settings` before vLLM is imported to run the engine on a CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

RECIPE = "v3"
VOCAB_SIZE = 1024  # the BPE trainer's target; the corpus yields a little less
MAX_POSITIONS = 8192
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens, not special: they stay in the text

# The Qwen3 chat template (as shipped with Qwen/Qwen3-14B), tool calls included.
QWEN3_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

_WORDS = """the of and to in is was for on that with as by at from his her they this
which be are have had not but one all were when there an been their has more would
who will no if out so said what up its about into than them can only other new some
could time these two may then do first any my now such like our over man me even most
made after also did many before must through back years where much your way well down
should because each just those people how too little state good very make world still
own see men work long get here between both life being under never day same another
know while last might us great old year off come since against go came right used take
three system state model token chat tree branch parent child reply prompt message
engine cache prefix stream batch kernel notebook python vector matrix physics units
energy light water river mountain city music story question answer think reason why
because number small large fast slow green blue red north south east west""".split()


def cache_root() -> Path:
    return Path(os.environ.get("SUBCHAT_CACHE") or "~/.cache/subchat-magics").expanduser()


def use_cpu_engine_settings(log_level: str = "WARNING", tmpdir: bool = True) -> Path:
    """Before vLLM is imported: an in-process engine (loads in seconds, not a minute), a
    small KV cache (it would reserve ~9 GiB of RAM), caches and sockets under our cache
    folder. Values already set win. Returns the cache folder."""
    cache = cache_root()
    for sub in ("vllm", "tmp", "rpc"):
        (cache / sub).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CACHE_ROOT", str(cache / "vllm"))
    os.environ.setdefault("VLLM_RPC_BASE_PATH", str(cache / "rpc"))
    if tmpdir:
        os.environ.setdefault("TMPDIR", str(cache / "tmp"))
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", log_level)
    return cache


def model_dir() -> Path:
    return cache_root() / f"tiny-qwen3-{RECIPE}"


def _corpus(n_lines: int = 4000) -> list[str]:
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if rng.random() < 0.2:
            line += f" {rng.randint(0, 9999)}"
        lines.append(line)
    return lines


def _build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                        fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    n_added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - n_added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    data = json.loads(bpe.to_str())
    vocab: dict[str, int] = data["model"]["vocab"]
    # tokenizers 0.23 stores merges as pairs; Qwen2Tokenizer wants a list of pairs too
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in data["model"]["merges"]]
    tok = Qwen2Tokenizer(
        vocab=vocab, merges=merges,
        unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.add_tokens(["<|endoftext|>"], special_tokens=True)
    tok.add_tokens(THINK_TOKENS, special_tokens=False)
    tok.chat_template = QWEN3_CHAT_TEMPLATE
    tok.model_max_length = MAX_POSITIONS
    tok.save_pretrained(out)
    return tok


def _build_model(out: Path, tok) -> None:
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    vocab_size = len(tok)  # the config's vocabulary must be the tokenizer's
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=MAX_POSITIONS, rope_theta=1_000_000.0, tie_word_embeddings=False,
        bos_token_id=eot, eos_token_id=eos, pad_token_id=eot,
    )
    config.dtype = "float32"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        # Spread the logits (std ~2) and zero the output rows of the control tokens, of
        # the lone non-ASCII bytes (they decode to partial UTF-8) and of the tokens with
        # control characters (unreadable in a notebook): their logit is then
        # 0, far below the others', so greedy replies never stop early and always stream
        # visible text, and sampled ones (temperature <= 1) stop about once in 10,000
        # tokens. Untied embeddings: a tied random model repeats the last prompt token.
        head = model.get_output_embeddings().weight
        head.mul_(10.0)
        ids: set[int] = set()
        ids.update(tok.convert_tokens_to_ids(SPECIAL_TOKENS + THINK_TOKENS))
        byte_chars = _nonascii_byte_chars()
        ids.update(i for t, i in tok.get_vocab().items() if t in byte_chars)
        ids.update(i for i in range(vocab_size)
                   if any(ord(c) < 0x20 and c not in "\n\t" or ord(c) == 0x7F for c in tok.decode([i])))
        head[sorted(ids)] = 0.0
    model.save_pretrained(out, safe_serialization=True)
    GenerationConfig(bos_token_id=eot, eos_token_id=[eos, eot], pad_token_id=eot).save_pretrained(out)


def _nonascii_byte_chars() -> set[str]:
    """The byte-level characters that stand for the bytes 0x80-0xFF (GPT-2's table)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return {c for b, c in chars.items() if b >= 0x80}


def build(out: Path | None = None) -> Path:
    """Build the tiny model (if missing) and return its folder."""
    final = Path(out) if out is not None else model_dir()
    if (final / "config.json").exists() and (final / "model.safetensors").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        tok = _build_tokenizer(tmp)
        _build_model(tmp, tok)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").exists():  # not a concurrent build that won
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":
    print(build())
