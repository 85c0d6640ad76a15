"""The built-in model's tokenizer declares the special tokens its GGUF file declares.

transformers' GGUF conversion reports ``<|im_start|>`` (the BOS, id 1) as EOS
for SmolLM2; the file's metadata and the model config say ``<|im_end|>`` (id 2).
Padding, the separator between calibration documents and the tokens the edit
metric ignores all follow the tokenizer, so it must be right.
"""

from __future__ import annotations

from gguf import GGUFReader

from shared.models import _load_builtin_tokenizer, gguf_path, source_identity


def _gguf_id(reader: GGUFReader, key: str) -> int:
    field = reader.fields[key]
    return int(field.parts[field.data[0]][0])


def test_builtin_tokenizer_special_tokens_match_the_gguf_metadata() -> None:
    reader = GGUFReader(str(gguf_path()))
    tok = _load_builtin_tokenizer()
    assert tok.eos_token_id == _gguf_id(reader, "tokenizer.ggml.eos_token_id") == 2
    assert tok.eos_token == "<|im_end|>"
    assert tok.bos_token_id == _gguf_id(reader, "tokenizer.ggml.bos_token_id") == 1
    assert tok.pad_token_id == _gguf_id(reader, "tokenizer.ggml.padding_token_id")
    assert tok.unk_token_id == _gguf_id(reader, "tokenizer.ggml.unknown_token_id")


def test_builtin_tokenizer_reloads_identically_from_its_cache() -> None:
    first = _load_builtin_tokenizer()
    again = _load_builtin_tokenizer()  # served from the JSON cache
    assert again.special_tokens_map == first.special_tokens_map
    assert again("Question: Who?")["input_ids"] == first("Question: Who?")["input_ids"]


def test_builtin_source_identity_names_the_tokenizer_version() -> None:
    # a store holding a base built with the old tokenizer must not be reused
    assert "-tok2-" in source_identity("builtin:smollm2-135m")
    assert "-tok2-" in source_identity("builtin:tiny-random")
