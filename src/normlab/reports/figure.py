"""A saved figure (file + caption) and its inline HTML / Markdown forms.

Reports are self-contained: HTML embeds the PNG as base64 (``data:image/png``), so the file opens anywhere
with no sibling files; the Markdown summary links the PNG beside it.

Report folders come from elsewhere (a colleague's ``outcome.json``), so a figure is untrusted: its path
must name a plain file inside the report folder (no ``..``, no absolute path, no symlink leading out), and
its bytes must be a PNG or an SVG. An SVG is never pasted into the page as markup (its ``<script>`` and
``onload`` would run); it is embedded as ``<img src="data:image/svg+xml;base64,...">``, where browsers
render it as a static image with scripts and external loads disabled.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError
from normlab.files import atomic_open
from normlab.text import one_line


@dataclass
class Figure:
    """A figure saved under a report folder: ``path`` is relative to that folder."""

    name: str
    path: str
    caption: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "caption": self.caption}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Figure:
        return cls(data["name"], data["path"], data["caption"])

    def to_html(self, root: Path) -> str:
        """``<figure>`` with the image inlined as base64 PNG (or inline SVG markup) and an escaped caption."""
        file = self.resolve(root)
        suffix = file.suffix.lower()
        if suffix not in _MIME:
            raise NormlabError(
                f"figure {self.name!r}: unsupported format {file.suffix!r}; allowed: .png, .svg"
            )
        content = file.read_bytes()
        if not _looks_like(suffix, content):
            raise NormlabError(f"figure {self.name!r}: {self.path} is not a valid {suffix[1:].upper()} file")
        data = base64.b64encode(content).decode("ascii")
        img = f'<img alt="{html.escape(self.name)}" src="data:{_MIME[suffix]};base64,{data}">'
        return f"<figure>{img}<figcaption>{html.escape(self.caption)}</figcaption></figure>"

    def resolve(self, root: Path) -> Path:
        """The figure's file, checked to be a plain file inside ``root`` (after following symlinks)."""
        if not isinstance(self.path, str) or not self.path or Path(self.path).is_absolute():
            raise NormlabError(
                f"figure {self.name!r}: path {self.path!r} must be relative to the report folder"
            )
        base = Path(root).resolve()
        file = (base / self.path).resolve()
        if not file.is_relative_to(base):
            raise NormlabError(f"figure {self.name!r}: path {self.path!r} leads outside the report folder")
        if not file.is_file():
            raise NormlabError(f"figure {self.name!r}: file {self.path} does not exist in {root}")
        return file

    def to_markdown(self) -> str:
        caption = _md_text(self.caption.replace("\n", " ")).replace("]", "\\]")
        target = self.path.replace(" ", "%20").replace(")", "%29").replace("<", "%3C").replace(">", "%3E")
        return f"![{caption}]({target})"


_MIME = {".png": "image/png", ".svg": "image/svg+xml"}
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _looks_like(suffix: str, content: bytes) -> bool:
    if suffix == ".png":
        return content.startswith(_PNG_MAGIC)
    head = content[:1024].lstrip().lower()
    return head.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")) and b"<svg" in content.lower()


def _md_text(text: str) -> str:
    """Escape ``&``, ``<`` and ``>`` so raw HTML in a Markdown source renders as text, never as tags."""
    return html.escape(one_line(text), quote=False)


# A report page is at most 1100 px wide: figures are drawn about 990 px wide (at save_matplotlib's 110 dpi),
# readable on a laptop screen without zooming; fonts keep their point size, so the plot area grows.
MIN_WIDTH_IN = 9.0


def fit_width(fig: Any, min_width: float = MIN_WIDTH_IN) -> None:
    """Widen a narrower ``fig`` to ``min_width`` inches; its height grows by the square root of that factor
    (the full factor would make a small 5.5 x 3.6 figure fill a laptop screen's height)."""
    width, height = fig.get_size_inches()
    if width < min_width:
        fig.set_size_inches(min_width, height * (min_width / width) ** 0.5)


def save_matplotlib(fig: Any, directory: Path, name: str, caption: str, dpi: int = 110) -> Figure:
    """Save matplotlib ``fig`` as ``<directory>/<name>.png``, close it and return its :class:`Figure`."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise NormlabError(f"figure name must be a plain file stem, got {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"{name}.png"
    fit_width(fig)
    with atomic_open(file, "wb") as stream:  # a link at <name>.png is replaced, not written through
        fig.savefig(stream, format="png", dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Figure(name=name, path=file.name, caption=caption)
