"""Render samples/report.txt into samples/report.pdf (title, headings, page numbers).

Text layout: blocks are separated by blank lines; the first block is the title; a block
of one short line without closing punctuation is a heading; other blocks are paragraphs
(a block of several lines keeps its line breaks). Output is deterministic.

    python scripts/make_samples.py
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from fpdf import FPDF

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
FIXED_DATE = datetime(2026, 2, 1, tzinfo=timezone.utc)
FONT = "Helvetica"


class ReportPDF(FPDF):
    """A4 pages with a centred page number at the bottom."""

    def footer(self) -> None:
        self.set_y(-15)
        self.set_font(FONT, size=9)
        self.cell(0, 10, str(self.page_no()), align="C")


def is_heading(block: str) -> bool:
    return "\n" not in block and len(block) < 60 and not block.endswith((".", ",", ":", ";"))


def render(text: str, title: str) -> bytes:
    """Lay out the report text as PDF bytes."""
    pdf = ReportPDF(format="A4")
    pdf.set_creation_date(FIXED_DATE)
    pdf.set_title(title)
    pdf.set_author("ckv-mlx samples")
    pdf.set_auto_page_break(auto=True, margin=20)
    pdf.add_page()
    title_block, *blocks = [block.strip() for block in text.strip().split("\n\n")]
    pdf.set_font(FONT, style="B", size=20)
    pdf.multi_cell(0, 10, title_block, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(4)
    for block in blocks:
        if is_heading(block):
            pdf.ln(3)
            pdf.set_font(FONT, style="B", size=14)
            pdf.multi_cell(0, 8, block, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(1)
        else:
            pdf.set_font(FONT, size=11)
            pdf.multi_cell(0, 5.5, block, new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    return bytes(pdf.output())


def main() -> None:
    source = SAMPLES / "report.txt"
    text = source.read_text(encoding="utf-8")
    target = SAMPLES / "report.pdf"
    target.write_bytes(render(text, title=text.splitlines()[0]))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
