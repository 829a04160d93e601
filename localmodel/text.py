"""Names from outside (remote paths, keys, URIs, user paths) made safe to print.

A name may hold characters that change what a reader sees: a newline or carriage return forges a
second log line, an escape sequence drives the terminal, a bidirectional override (U+202E) shows
``exe.txt`` as ``txt.exe``. :func:`has_control` tells whether a name holds one (sources refuse such
names); :func:`printable` is the one rendering every message uses when it quotes a name.
"""

from __future__ import annotations

import re

# C0 controls, DEL and C1 controls; the Unicode line and paragraph separators (U+2028, U+2029,
# which some viewers break lines at); the bidirectional marks, embeddings, overrides and isolates
# (U+061C, U+200E, U+200F, U+202A-U+202E, U+2066-U+2069: Unicode TR#9 and CVE-2021-42574), and
# the byte order mark / zero-width no-break space (U+FEFF), which hides in copied names.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ufeff]")


def has_control(text: str) -> bool:
    """True when ``text`` holds a character :func:`printable` would escape."""
    return _CONTROL.search(text) is not None


def printable(text: str, *, limit: int = 200) -> str:
    """``text`` on one line, each control or bidi character written as ``\\n``, ``\\xNN`` or ``\\uNNNN``, and
    cut to ``limit`` characters (``...`` appended) so a hostile name cannot flood a log line."""
    if len(text) > limit:
        text = text[: max(0, limit - 3)] + "..."
    return _CONTROL.sub(_escape, text)


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
