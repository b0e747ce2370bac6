"""Errors a user can fix: the entry points print them as one line and exit with code 2, no traceback."""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A problem in the user's settings or files; the message names it and says how to fix it."""

    exit_code = 2


class ConfigError(UserError, ValueError):
    """An invalid setting, raised before any data is loaded or model built."""


class DataError(UserError):
    """Data missing, corrupt, or inconsistent."""


class NonFiniteLossError(UserError, FloatingPointError):
    """A loss term became NaN or infinite during training."""

    exit_code = 3


def check(condition: bool, key: str, allowed: str, value) -> None:
    """Raise :class:`ConfigError` naming ``key``, the allowed range and the value given, unless ``condition``."""
    if not condition:
        raise ConfigError(f"{key} must be {allowed} (got {value!r})")


def check_choice(value: str, key: str, choices) -> None:
    check(value in choices, key, "one of " + ", ".join(sorted(choices)), value)


def user_error_behind(e: BaseException | None) -> UserError | None:
    """The UserError that ``e`` is or was raised from (jsonargparse and Lightning wrap exceptions)."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, UserError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def exit_with_argument_error(message: str) -> None:
    """What every entry point does with a bad command-line argument: the message on one stderr line, exit 2."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    sys.stderr.write(f"error: {text} (see --help)\n")
    sys.exit(2)


def report_user_error(e: BaseException) -> int:
    """For an entry point's ``except``: print the one-line message of the UserError behind ``e`` and
    return its exit code; anything else is a bug and is raised again with its traceback."""
    cause = user_error_behind(e)
    if cause is None:
        raise e
    sys.stderr.write(f"error: {cause}\n")
    return cause.exit_code


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse for every script: a bad argument is one stderr line and exit code 2 (no usage dump)."""

    def error(self, message: str):
        exit_with_argument_error(message)
