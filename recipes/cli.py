"""argparse types shared by the scripts: a value out of range is refused by argparse itself (exit 2, naming the
argument), before any work starts."""

from __future__ import annotations

import argparse


def nonnegative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 1")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not an integer >= 0")
    return value


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with an error as one line (`prog: error: ...; see --help`) instead of the usage block and
    the error: bad input is one line, exit code 2, everywhere in the recipe."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")
