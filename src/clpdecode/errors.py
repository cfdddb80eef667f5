"""Errors that the CLI turns into one clear line on stderr and exit status 2, and the
checks of user input that raise them (one place for each, used by the CLI and the API)."""

from __future__ import annotations

import math
import numbers


class ClpError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched artifact.

    `param`: the setting the error is about, by its Python name (`max_new_tokens`), which
    the message uses too. Each front end names it its own way (`named`): the CLI as its
    flag (`--max-new-tokens`), the server as its JSON field (`max_tokens`), so that one
    check serves all three without any of them naming another's spelling.
    """

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def named(self, name: str) -> str:
        """The message with `param` called `name` instead."""
        msg = str(self)
        return msg.replace(self.param, name) if self.param else msg


def flag_name(param: str) -> str:
    """A setting's Python name as the CLI spells it (`clp_threshold` -> `--clp-threshold`)."""
    return param if param.startswith("-") else "--" + param.replace("_", "-")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_unit_interval(name: str, value: float) -> float:
    """A probability threshold: a number in [0, 1] (nan and infinities refused)."""
    if not (_is_number(value) and 0.0 <= value <= 1.0):
        raise ClpError(f"{name} must be a number in [0, 1], got {value!r}", param=name)
    return float(value)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ClpError(f"{name} must be a whole number >= 1, got {value!r}", param=name)
    if value < 1:
        raise ClpError(f"{name} must be at least 1, got {value}", param=name)
    return value


def check_finite(name: str, value: float) -> float:
    if not (_is_number(value) and math.isfinite(value)):
        raise ClpError(f"{name} must be a finite number, got {value!r}", param=name)
    return float(value)


def check_text(name: str, text: str) -> str:
    """Text that can reach a tokenizer: valid Unicode without lone surrogates.

    Command-line arguments holding bytes that are not UTF-8 arrive in Python as lone
    surrogates (PEP 383); tokenizers reject those with a TypeError, so they are refused
    here with the offending byte named.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        code = ord(bad)
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"lone surrogate U+{code:04X}"
        raise ClpError(f"{name} is not valid UTF-8 ({what} at character {e.start}); "
                       "check the terminal's or the file's encoding") from None
    return text


def check_prompt(text: str, name: str = "the prompt") -> str:
    """A prompt: non-empty text that a tokenizer accepts (see check_text)."""
    if not isinstance(text, str) or not text.strip():
        raise ClpError(f"{name} is empty")
    return check_text(name, text)


def check_prompt_ids(ids, vocab_size: int) -> list[int]:
    """A prompt as token ids: a non-empty list of whole numbers in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") or len(ids) == 0:
        raise ClpError("the prompt is empty" if hasattr(ids, "__len__") and not isinstance(ids, (str, bytes))
                       else f"prompt ids must be a list of token ids, got {type(ids).__name__}")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or not 0 <= t < vocab_size:
            raise ClpError(f"prompt token {i} is {t!r}: token ids are whole numbers in [0, {vocab_size})")
    return ids


def check_context(prompt_tokens: int, max_new_tokens: int, window: int | None,
                  limit: str = "the model's context window") -> None:
    """Refuse a generation that could run past the model's context window (or another
    `limit` on positions, such as a server's slot).

    Refused, not clamped: a silently shorter answer (or a benchmark whose prompts get
    different budgets) would be worse than an error that names the numbers.
    """
    if window and prompt_tokens + max_new_tokens > window:
        room = window - prompt_tokens
        fix = f"use max_new_tokens {room} or less" if room >= 1 else "shorten the prompt"
        raise ClpError(f"the prompt is {prompt_tokens} tokens and max_new_tokens {max_new_tokens}: "
                       f"{prompt_tokens + max_new_tokens} > {limit} of {window}; {fix}",
                       param="max_new_tokens" if room >= 1 else None)


def check_profile_context(context: int, step_tokens: int, window: int | None) -> None:
    """Refuse a `clp profile` whose cache of `context` tokens plus its largest timed step
    would pass the model's context window (positions past it are not the model's)."""
    if window and context + step_tokens > window:
        room = window - step_tokens
        fix = f"use --context {room} or less" if room >= 1 else "time smaller steps (--tokens, --tree-sizes)"
        raise ClpError(f"--context {context} plus steps of up to {step_tokens} tokens needs "
                       f"{context + step_tokens} positions > the model's context window of {window}; {fix}")
