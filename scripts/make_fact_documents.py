"""Write the real documents of the exact-fact evaluation into ckv_mlx/data/documents/.

Each kind is a folder of plain-text documents, cut at a line end to about ``SIZE``
characters (~4K tokens of the built-in model):

* manual: Python's language and library reference (``pydoc_data.topics``, PSF licence);
* code: modules of Python's standard library (PSF licence);
* legal: licence texts, which their licences allow to copy verbatim (Debian's copies);
* financial: fictional reports written for this project (the sample report and three
  more, kept by hand in the folder; this script only copies the sample report).

The output is committed, so the evaluation does not depend on the Python version or the
machine; run again only to rebuild it (SOURCES.md says where each came from).

    python scripts/make_fact_documents.py
"""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import pydoc_data.topics

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "ckv_mlx" / "data" / "documents"
SIZE = 17_000
LICENCES = Path("/usr/share/common-licenses")
MANUALS = {
    "01-format-strings": ("formatstrings", "string-methods"),
    "02-data-model": ("customization", "attribute-access", "specialnames"),
    "03-sequence-types": ("typesseq", "typesseq-mutable", "typesmapping"),
    "04-statements": ("compound", "exceptions", "import", "with"),
}
MODULES = {"01-textwrap": "textwrap.py", "02-calendar": "calendar.py", "03-heapq": "heapq.py",
           "04-fractions": "fractions.py"}
LEGAL = {"01-gpl-3": "GPL-3", "02-mpl-2": "MPL-2.0", "03-lgpl-2.1": "LGPL-2.1", "04-gpl-2": "GPL-2"}


def cut(text: str, size: int = SIZE) -> str:
    """``text`` up to the last line end before ``size`` characters, ASCII spaces only."""
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    if len(text) <= size:
        return text.strip() + "\n"
    return text[: text.rindex("\n", 0, size)].strip() + "\n"


def write(kind: str, name: str, text: str):
    path = OUT / kind / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(cut(text), encoding="utf-8")
    print(f"{path.relative_to(ROOT)}: {path.stat().st_size:,} bytes")


def main():
    for name, topics in MANUALS.items():
        write("manual", name, "\n\n".join(pydoc_data.topics.topics[t] for t in topics))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name, module in MODULES.items():
        write("code", name, (stdlib / module).read_text(encoding="utf-8"))
    for name, licence in LEGAL.items():
        write("legal", name, (LICENCES / licence).read_text(encoding="utf-8"))
    shutil.copy(ROOT / "samples" / "report.txt", OUT / "financial" / "01-northwind-orchards.txt")


if __name__ == "__main__":
    main()
