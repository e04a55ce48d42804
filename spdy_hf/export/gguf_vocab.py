"""The tokenizer of a GGUF file: llama.cpp's `tokenizer.*` keys, taken from another GGUF file or built from a
Hugging Face fast tokenizer.

llama.cpp tokenizes by itself from these keys, so they must describe the tokenizer the model was trained with:

- copied from a GGUF file (`tokenizer_from`, or the `.gguf` model itself): exact, whatever the tokenizer;
- built from a byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, SmolLM...): the token list in id order, each token's
  type (control for special tokens, user-defined for other added tokens), the merges, the special token ids and the
  chat template. llama.cpp picks its pre-tokenizer (how text is split before the merges) by name
  (`tokenizer.ggml.pre`); the name is read off the tokenizer's pre-tokenizer where it is one this module knows, or
  given (`pre`).
"""

from __future__ import annotations

import json
import logging

from ..errors import SPDYError

logger = logging.getLogger(__name__)

# the split patterns of byte-level BPE tokenizers that llama.cpp knows by name (tokenizer.json `Split` patterns)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


class TokenizerExportError(SPDYError):
    """The tokenizer cannot be written as llama.cpp's keys; the message says what to pass instead."""


def copy_tokenizer(writer, path: str) -> None:
    """Adds every `tokenizer.*` key of the GGUF file at `path` to `writer`, as it is there."""
    import gguf

    reader = gguf.GGUFReader(path)
    copied = 0
    for key, value in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = value.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value.contents())
        else:
            writer.add_key_value(key, value.contents(), kind)
        copied += 1
    if not copied:
        raise TokenizerExportError(f"{path} holds no tokenizer (no tokenizer.* keys); pass a GGUF file of the same "
                                   "model that has one, or none to build it from the model's own tokenizer.")


def pre_tokenizer_name(backend: dict) -> str | None:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer (tokenizer.json as a dict), None if unknown."""
    pre = backend.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"  # digits one by one, then GPT-2's split (SmolLM, StarCoder)
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return SPLIT_NAMES.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def add_bpe_tokenizer(writer, tokenizer, vocab_size: int, pre: str | None = None) -> None:
    """Adds the `tokenizer.*` keys of a byte-level BPE fast tokenizer to `writer`, for a model whose embedding has
    `vocab_size` rows (ids the tokenizer does not use become unused tokens)."""
    import gguf

    backend_tokenizer = getattr(tokenizer, "backend_tokenizer", None)
    if backend_tokenizer is None:
        raise TokenizerExportError(f"{type(tokenizer).__name__} is not a fast (tokenizers) tokenizer; pass "
                                   "tokenizer_from=<a GGUF file of the same model> (--tokenizer-from).")
    backend = json.loads(backend_tokenizer.to_str())
    model = backend.get("model", {})
    decoder = backend.get("decoder") or {}
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(decoder):
        raise TokenizerExportError(
            f"Only byte-level BPE tokenizers are built here (GPT-2, Llama 3, Qwen2, SmolLM); this one is "
            f"{model.get('type')} with a {decoder.get('type')} decoder. Pass tokenizer_from=<a GGUF file of the same "
            "model> (--tokenizer-from): its tokenizer is copied as it is.")
    if pre is None:
        pre = pre_tokenizer_name(backend)
        if pre is None:
            raise TokenizerExportError(
                "The tokenizer's pre-tokenizer is not one llama.cpp is known here to name "
                f"({json.dumps(backend.get('pre_tokenizer'))[:200]}). Pass its llama.cpp name as tokenizer_pre= "
                "(--tokenizer-pre; see llama.cpp's llama-vocab.cpp), or tokenizer_from=<a GGUF file of the same model>.")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size:
            tokens[index], types[index] = token, int(gguf.TokenType.NORMAL)
    for added in backend.get("added_tokens", []):
        index = added["id"]
        if index < vocab_size:
            tokens[index] = added["content"]
            types[index] = int(gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED)
    beyond = [t for t, i in tokenizer.get_vocab().items() if i >= vocab_size]
    if beyond:
        raise TokenizerExportError(f"The tokenizer has {len(beyond)} ids at or above the model's vocabulary size "
                                   f"{vocab_size} (e.g. {beyond[0]!r}); it is not this model's tokenizer.")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        index = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(index, int) and 0 <= index < vocab_size:
            add(index)
    bos = getattr(tokenizer, "bos_token_id", None)
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    writer.add_add_bos_token(bos is not None and len(ids) > 0 and ids[0] == bos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, str) and template:
        writer.add_chat_template(template)
    logger.info("GGUF tokenizer: byte-level BPE, %d tokens, %d merges, pre-tokenizer %r.", vocab_size, len(merges),
                pre)
