"""The argument parser both halves of the `kura` command use: a usage mistake is one line
naming the command (`kura serve: unrecognized arguments: --lisen (see kura serve --help)`),
like every other error, and a non-zero exit."""

from __future__ import annotations

import argparse


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
