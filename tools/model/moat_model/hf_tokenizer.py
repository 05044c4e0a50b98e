"""What moat-model.json says about text, read from a Hugging Face model's own files.

`tokenizer.json` (the fast tokenizer), `tokenizer_config.json` (chat template, special token
texts), `chat_template.jinja` (newer transformers save the template there), `config.json`
and `generation_config.json` (the ids generation stops at). Both a checkpoint and an export
(optimum's, onnxruntime-genai's) carry them.

Every fact is cross-checked against the tokenizer: an end-of-sequence id that is not the
token its text names, a tokenizer larger than the model's vocabulary, or one much smaller
(a tokenizer from another model) is refused, naming the file and field.
"""

from __future__ import annotations

import dataclasses
import os

from tokenizers import Tokenizer

from .decoder import ConversionError, read_json_object

TEMPLATE_FILE = "chat_template.jinja"
# Models pad their embedding tables (Qwen2 by ~2%); a tokenizer covering less than this share
# of the rows was made for another model.
MIN_VOCAB_COVERAGE = 0.9


@dataclasses.dataclass(frozen=True)
class TextSpec:
    tokenizer_path: str
    tokenizer: Tokenizer
    chat_template: str | None
    eos_token_ids: list[int]
    bos_token_id: int | None
    add_bos_token: bool


def _token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken object."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ConversionError(f"{where} must be a token id or a list of them, not {value!r}")
    return list(values)


def chat_template(root: str, tokenizer_config: dict) -> str | None:
    path = os.path.join(root, TEMPLATE_FILE)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: the one called "default" is the chat one
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ConversionError("tokenizer_config.json chat_template must be a string")
    return template


def read(root: str, vocab_size: int, *, require_chat_template: bool = True,
         extra_eos: list[int] = (), extra_bos: int | None = None) -> TextSpec:
    """Reads and cross-checks the text side of a model directory.

    `vocab_size` is the number of rows of the model's embedding (or of its logits);
    `extra_eos` / `extra_bos` are ids another file of the directory states (genai_config.json).
    """
    tokenizer_path = os.path.join(root, "tokenizer.json")
    if not os.path.exists(tokenizer_path):
        hint = (" (only a slow sentencepiece tokenizer.model is there: save the fast tokenizer with "
                "AutoTokenizer.from_pretrained(...).save_pretrained(...))"
                if os.path.exists(os.path.join(root, "tokenizer.model")) else "")
        raise ConversionError(f"tokenizer.json is missing{hint}")
    try:
        tokenizer = Tokenizer.from_file(tokenizer_path)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ConversionError(f"tokenizer.json does not load: {e}") from None

    size = tokenizer.get_vocab_size(with_added_tokens=True)
    top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
    if top >= vocab_size:
        raise ConversionError(f"tokenizer.json has token id {top}, but the model has only {vocab_size} "
                              "vocabulary rows (config.json vocab_size): a tokenizer from another model?")
    if size < MIN_VOCAB_COVERAGE * vocab_size:
        raise ConversionError(f"tokenizer.json has {size} tokens, but the model has {vocab_size} vocabulary "
                              "rows (config.json vocab_size): a tokenizer from another model?")

    tok_config = read_json_object(root, "tokenizer_config.json", required=False) or {}
    config = read_json_object(root, "config.json", required=False) or {}
    gen_config = read_json_object(root, "generation_config.json", required=False) or {}

    def resolve(field: str) -> int | None:
        text = _token_text(tok_config.get(field))
        if text is None:
            return None
        token_id = tokenizer.token_to_id(text)
        if token_id is None:
            raise ConversionError(f"tokenizer_config.json {field} {text!r} is not a token of tokenizer.json "
                                  "(a tokenizer from another model?)")
        return token_id

    eos: list[int] = []
    for where, ids in (("generation_config.json eos_token_id", _ids(gen_config.get("eos_token_id"), "generation_config.json eos_token_id")),
                       ("config.json eos_token_id", _ids(config.get("eos_token_id"), "config.json eos_token_id")),
                       ("genai_config.json eos_token_id", list(extra_eos))):
        for token_id in ids:
            if token_id >= vocab_size or tokenizer.id_to_token(token_id) is None:
                raise ConversionError(f"{where} {token_id} is not a token of tokenizer.json")
            if token_id not in eos:
                eos.append(token_id)
    # The tokenizer's own end token stops generation too: a fine-tune whose config names one
    # end id while its tokenizer names another would otherwise run on past its answers.
    eos_text_id = resolve("eos_token")
    if eos_text_id is not None and eos_text_id not in eos:
        eos.append(eos_text_id)
    if not eos:
        raise ConversionError("no end-of-sequence id: neither generation_config.json nor config.json has "
                              "eos_token_id, and tokenizer_config.json has no eos_token")

    bos = resolve("bos_token")
    config_bos = config.get("bos_token_id", extra_bos)
    if bos is None and isinstance(config_bos, int) and not isinstance(config_bos, bool):
        if config_bos >= vocab_size or tokenizer.id_to_token(config_bos) is None:
            raise ConversionError(f"config.json bos_token_id {config_bos} is not a token of tokenizer.json")
        bos = config_bos
    # Whether plain text gets a BOS is what the tokenizer itself does with special tokens
    # on (its post-processor); moat's engine adds it from moat-model.json instead.
    probe = "Hello"
    with_special = tokenizer.encode(probe, add_special_tokens=True).ids
    without = tokenizer.encode(probe, add_special_tokens=False).ids
    add_bos = bos is not None and with_special[:1] == [bos] and without[:1] != [bos]

    template = chat_template(root, tok_config)
    if template is None and require_chat_template:
        raise ConversionError(f"no chat template: tokenizer_config.json has no chat_template and there is no "
                              f"{TEMPLATE_FILE} (pass --no-chat-template to serve plain completions only)")
    return TextSpec(tokenizer_path, tokenizer, template, eos, bos, add_bos)
