"""Text from elsewhere (folder names, titles, run names, configs, errors) made safe for a terminal, a line of
Markdown and a link in a report (issue 29).

- :func:`safe_text`: terminal control characters (ESC sequences, BEL, CR...) shown as ``\\xNN``.
- :func:`one_line`: line breaks become spaces, so a title holding a newline stays one Markdown line and
  cannot start a line of its own in ``report.md`` (a heading, a list, a command in a file it was linked to).
- :func:`relative_href`: a path inside the report folder as a link that cannot carry a scheme
  (``javascript:``), leave the folder, or break out of ``href="..."`` / ``[label](...)``.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from urllib.parse import quote

from normlab.errors import NormlabError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LINE_BREAKS = re.compile(r"[\r\n\x0b\x0c\x1c-\x1e\x85\u2028\u2029]+")


def safe_text(text: str) -> str:
    """``text`` with terminal control characters (ESC sequences, BEL, CR...) written as ``\\xNN``.

    Run names and errors come from the store, which anyone can write: printed raw, an escape sequence
    could rewrite the terminal (clear it, retitle it, hide lines).
    """
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def one_line(text: str) -> str:
    """``text`` with every run of line breaks replaced by one space and other control characters escaped."""
    return safe_text(_LINE_BREAKS.sub(" ", str(text)))


def relative_href(path: str) -> str:
    """``path`` (relative, ``/``-separated, inside the report folder) as a link target: each part
    percent-encoded (``:`` too, so no scheme survives; ``(``, ``)``, ``<``, ``>``, quotes and spaces too).

    Raises:
        NormlabError: ``path`` is absolute or climbs out of the folder (``..``).
    """
    pure = PurePosixPath(str(path).replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise NormlabError(f"link {path!r} must be a path inside the report folder")
    return "/".join(quote(part, safe="") for part in pure.parts)
