"""The command line's parser: a usage mistake is one line, like every other user mistake.

argparse prints the whole usage block (up to 8 lines for `show`) and then
``vit-attn show: error: ...``; every other refusal of this tool is one
``vit-attn: error: ...`` line with exit status 2, which scripts and job logs rely on.
"""

from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line naming the command and its --help."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix("vit-attn").strip()
        where = f"{command}: " if command else ""
        help_of = " ".join(["vit-attn", *command.split(), "--help"])
        self.exit(2, f"vit-attn: error: {where}{message} (see {help_of})\n")
