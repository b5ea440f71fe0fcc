"""The help formatter of every `minimind` command (and the demo-data generator)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" to a flag's help only where it adds something.

    argparse's ArgumentDefaultsHelpFormatter appends it to every flag, so help that already says what the
    default is, or a flag whose default is None/False (meaning "not given" or "off"), reads twice or reads
    "(default: None)".
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_ = action.help or ""
        default = action.default
        if (default is None or default is False or default is argparse.SUPPRESS or default in ("", [], ())
                or "default" in help_.lower() or not action.option_strings):
            return help_
        return f"{help_} (default: %(default)s)"
