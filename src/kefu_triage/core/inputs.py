"""How a customer turn (and its previous turns) becomes the model's text input.

Shared by training (torch side) and the ONNX runtime (torch-free): both must build exactly the same
strings, so this module depends on nothing but the standard library.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from typing import Any

# Longer inputs are cut before tokenisation: the model sees at most max_length tokens anyway, and a
# 100k-character message must not cost 100k characters of tokeniser work.
MAX_MESSAGE_CHARS = 512
MAX_TURN_CHARS = 128
ROLE_PREFIX = {"customer": "顾客：", "agent": "客服："}
TURN_SEPARATOR = " "


class InputError(ValueError):
    """A message or context that cannot be turned into model input."""


def clean_text(text: str, max_chars: int = MAX_MESSAGE_CHARS) -> str:
    """Drop control characters (keep ordinary whitespace as a space), collapse runs of space, cut length."""
    if len(text) > max_chars * 4:
        text = text[: max_chars * 4]
    out = []
    for ch in text:
        cat = unicodedata.category(ch)
        if ch in "\t\n\r\u3000" or cat == "Zs":
            out.append(" ")
        elif cat in ("Cc", "Cf", "Cs", "Co", "Cn") and ch != "\u200d":
            continue  # zero-width joiner is kept: emoji sequences use it
        else:
            out.append(ch)
    return " ".join("".join(out).split())[:max_chars]


def format_context(context: Sequence[Any] | None, context_turns: int) -> str | None:
    """The last ``context_turns`` previous turns (oldest first) as one segment, or None."""
    if not context or context_turns <= 0:
        return None
    if not isinstance(context, (list, tuple)):
        raise InputError(f"context must be a list of {{'role', 'text'}} turns, got {type(context).__name__}")
    parts = []
    start = max(
        0, len(context) - context_turns
    )  # errors name the turn's index in the whole list, not the window
    for i, turn in enumerate(list(context)[start:], start):
        if not isinstance(turn, dict):
            raise InputError(
                f"context turn {i} must be a dict with 'role' and 'text', got {type(turn).__name__}"
            )
        role, text = turn.get("role"), turn.get("text")
        if (
            not isinstance(role, str) or role not in ROLE_PREFIX
        ):  # an unhashable role (a list) is bad input too
            raise InputError(f"context turn {i}: role must be 'customer' or 'agent', got {role!r}")
        if not isinstance(text, str):
            raise InputError(f"context turn {i}: text must be a string, got {type(text).__name__}")
        text = clean_text(text, MAX_TURN_CHARS)
        if text:
            parts.append(ROLE_PREFIX[role] + text)
    return TURN_SEPARATOR.join(parts) or None


def build_input(
    text: Any, context: Sequence[Any] | None = None, context_turns: int = 0
) -> tuple[str, str | None]:
    """(first segment = the current message, second segment = previous turns or None).

    Raises InputError (a ValueError) for a non-string message; an empty or whitespace message is
    allowed and becomes "" (the model then sees only special tokens and answers with low confidence).
    """
    if not isinstance(text, str):
        raise InputError(f"text must be a string, got {type(text).__name__}")
    return clean_text(text), format_context(context, context_turns)


# ---------------------------------------------------------------------------------------------------
# Token ids: one builder for training, export calibration and the runtime
# ---------------------------------------------------------------------------------------------------
def configure_tokenizer(tokenizer: Any, max_length: int) -> Any:
    """A ``tokenizers.Tokenizer`` set up as the model reads input: truncation of the pair (longest first)
    to ``max_length`` tokens, no padding (batches are padded by :func:`pad_encodings`)."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(int(max_length), strategy="longest_first")
    return tokenizer


def encode_inputs(
    tokenizer: Any, texts: Sequence[Any], contexts: Sequence[Any] | None, context_turns: int
) -> list:
    """``tokenizers`` Encodings of messages (+ previous turns as a second segment), built by :func:`build_input`.

    Raises InputError naming ``texts[i]`` for a message or context that cannot be model input."""
    contexts = contexts if contexts is not None else [None] * len(texts)
    pairs = []
    for i, (text, context) in enumerate(zip(texts, contexts, strict=True)):
        try:
            first, second = build_input(text, context, context_turns)
        except InputError as exc:
            raise InputError(f"texts[{i}]: {exc}") from None
        pairs.append((first, second) if second is not None else first)
    if len(pairs) == 1:  # encode_batch wakes the tokenizer's thread pool: ~3x the time for one message
        return [tokenizer.encode(*pairs[0]) if isinstance(pairs[0], tuple) else tokenizer.encode(pairs[0])]
    return tokenizer.encode_batch(pairs) if pairs else []


def pad_encodings(
    encodings: Sequence[Any],
    pad_id: int,
    names: Sequence[str] = ("input_ids", "attention_mask", "token_type_ids"),
) -> dict[str, Any]:
    """Right-padded int64 numpy arrays [N, longest] of ``names`` for a batch of Encodings."""
    import numpy as np

    width = max((len(e.ids) for e in encodings), default=0)
    ids = np.full((len(encodings), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(encodings), width), dtype=np.int64)
    types = np.zeros((len(encodings), width), dtype=np.int64)
    for row, e in enumerate(encodings):
        n = len(e.ids)
        ids[row, :n], mask[row, :n], types[row, :n] = e.ids, 1, e.type_ids
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {k: feed[k] for k in names}
