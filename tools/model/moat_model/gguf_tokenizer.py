"""Builds a Hugging Face `tokenizer.json` from the tokenizer a GGUF carries."""

from __future__ import annotations

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .decoder import ConversionError, TokenizerSpec

# gguf's TokenType values.
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4


def _is_special(text: str, token_type: int) -> bool:
    return token_type == TOKEN_CONTROL or (text.startswith("<|") and text.endswith("|>"))


def build(spec: TokenizerSpec) -> Tokenizer:
    if spec.model != "gpt2":
        raise ConversionError(f"tokenizer model {spec.model!r} is not supported (only 'gpt2' byte-level BPE)")
    vocab = {}
    for i, text in enumerate(spec.tokens):
        # A duplicate string would silently lose an id; llama.cpp vocabularies have none.
        if text in vocab:
            raise ConversionError(f"token {text!r} appears twice (ids {vocab[text]} and {i})")
        vocab[text] = i
    merges = []
    for line in spec.merges:
        parts = line.split(" ")
        if len(parts) != 2:
            raise ConversionError(f"malformed merge {line!r}")
        merges.append((parts[0], parts[1]))

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    # The SmolLM / StarCoder split: every digit is its own pre-token before GPT-2's regex.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()

    special, user = [], []
    for text, token_type in zip(spec.tokens, spec.token_types):
        if _is_special(text, token_type):
            special.append(AddedToken(text, special=True, normalized=False))
        elif token_type == TOKEN_USER_DEFINED:
            user.append(AddedToken(text, special=False, normalized=False))
    # Registering an existing vocabulary string keeps its id, so `<|im_start|>` stays 1.
    tok.add_special_tokens(special)
    tok.add_tokens(user)

    for t in special + user:
        if tok.token_to_id(t.content) != vocab[t.content]:
            raise ConversionError(f"added token {t.content!r} lost its id")
    return tok
