"""Errors that llmkit reports to the user as one line and exit code 2 (bad input), never as a traceback."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class LlmkitError(Exception):
    """A problem with the user's input (recipe, key, value, file, field, model): exit code 2."""

    exit_code = 2


class RecipeError(LlmkitError):
    """A recipe that cannot be read or does not validate."""


class DataError(LlmkitError):
    """A data source that is missing, empty, malformed or lacks a field."""


class ModelError(LlmkitError):
    """A model or tokenizer that is missing, unreadable or does not fit the recipe."""


class RunDirError(LlmkitError):
    """An output directory that holds something we must not overwrite."""


class Interrupted(Exception):
    """Training stopped on a signal after saving a checkpoint (exit code 130)."""

    exit_code = 130


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """Return " (did you mean 'x'?)" for the closest choice, or "" when nothing is close."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f"; did you mean '{matches[0]}'?" if matches else ""


class TrainingError(LlmkitError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""

    exit_code = 1
