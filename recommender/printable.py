"""Text safe to print on a terminal: control characters shown as escapes.

Names come from outside (image-folder classes, paths, study names, model names, dataset specs):
an escape sequence in one would clear the screen or set the window title when printed. Every
line the command prints passes through :func:`printable` (messages, log lines, progress labels)
or :class:`Printable` (a rich renderable such as the explanation), which show each C0/C1
control character except newline and tab as ``\\xNN``.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["printable", "Printable"]

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: Any) -> str:
    """``str(text)`` with control characters (not newline or tab) written as ``\\xNN``."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group(0)):02x}", str(text))


class Printable:
    """A rich renderable whose text is passed through :func:`printable` (styles are kept: they
    are not part of the text)."""

    def __init__(self, renderable: Any):
        self.renderable = renderable

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        for seg in console.render(self.renderable, options):
            yield seg if seg.control else Segment(printable(seg.text), seg.style)
