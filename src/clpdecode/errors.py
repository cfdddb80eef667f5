"""Errors that the CLI turns into one clear line on stderr and exit status 2, and the
checks of user input that raise them (one place for each, used by the CLI and the API)."""

from __future__ import annotations

import math


class ClpError(Exception):
    """A user-facing error: bad input, a missing file, a mismatched artifact."""


def check_unit_interval(name: str, value: float) -> float:
    """A probability threshold: a number in [0, 1] (nan and infinities refused)."""
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ClpError(f"{name} must be a number in [0, 1], got {value}")
    return float(value)


def check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClpError(f"{name} must be at least 1, got {value}")
    return value


def check_finite(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ClpError(f"{name} must be a finite number, got {value}")
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


def check_context(prompt_tokens: int, max_new_tokens: int, window: int | None) -> None:
    """Refuse a generation that could run past the model's context window.

    Refused, not clamped: a silently shorter answer (or a benchmark whose prompts get
    different budgets) would be worse than an error that names the numbers.
    """
    if window and prompt_tokens + max_new_tokens > window:
        room = window - prompt_tokens
        fix = f"use --max-new-tokens {room} or less" if room >= 1 else "shorten the prompt"
        raise ClpError(f"the prompt is {prompt_tokens} tokens and --max-new-tokens {max_new_tokens}: "
                       f"{prompt_tokens + max_new_tokens} > the model's context window of {window}; {fix}")


def check_profile_context(context: int, step_tokens: int, window: int | None) -> None:
    """Refuse a `clp profile` whose cache of `context` tokens plus its largest timed step
    would pass the model's context window (positions past it are not the model's)."""
    if window and context + step_tokens > window:
        room = window - step_tokens
        fix = f"use --context {room} or less" if room >= 1 else "time smaller steps (--tokens, --tree-sizes)"
        raise ClpError(f"--context {context} plus steps of up to {step_tokens} tokens needs "
                       f"{context + step_tokens} positions > the model's context window of {window}; {fix}")
