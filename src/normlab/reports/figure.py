"""A saved figure (file + caption) and its inline HTML / Markdown forms.

Reports are self-contained: HTML embeds the PNG as base64 (``data:image/png``), so the file opens anywhere
with no sibling files; the Markdown summary links the PNG beside it.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normlab.errors import NormlabError


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
        file = Path(root) / self.path
        if not file.is_file():
            raise NormlabError(f"figure {self.name!r}: file {file} does not exist")
        if file.suffix == ".svg":
            img = file.read_text(encoding="utf-8")
            # Drop the XML prolog: it is not allowed inside HTML.
            img = img[img.find("<svg") :]
        elif file.suffix == ".png":
            data = base64.b64encode(file.read_bytes()).decode("ascii")
            img = f'<img alt="{html.escape(self.name)}" src="data:image/png;base64,{data}">'
        else:
            raise NormlabError(
                f"figure {self.name!r}: unsupported format {file.suffix!r}; allowed: .png, .svg"
            )
        return f"<figure>{img}<figcaption>{html.escape(self.caption)}</figcaption></figure>"

    def to_markdown(self) -> str:
        caption = self.caption.replace("\n", " ")
        return f"![{caption}]({self.path})"


def save_matplotlib(fig: Any, directory: Path, name: str, caption: str, dpi: int = 110) -> Figure:
    """Save matplotlib ``fig`` as ``<directory>/<name>.png``, close it and return its :class:`Figure`."""
    if not name or any(c in name for c in "/\\") or name.startswith("."):
        raise NormlabError(f"figure name must be a plain file stem, got {name!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    file = directory / f"{name}.png"
    fig.savefig(file, dpi=dpi, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return Figure(name=name, path=file.name, caption=caption)
