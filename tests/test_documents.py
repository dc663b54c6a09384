"""Document reading: PDF and text round trips, one-line errors for each bad input."""

from __future__ import annotations

import re
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fpdf import FPDF
from PIL import Image

from ckv_mlx.text.documents import document_hash, read_document
from ckv_mlx.errors import CKVError

SAMPLES = Path(__file__).resolve().parents[1] / "samples"

SOURCE_TEXT = (
    "Northwind Orchards harvested apples, pears and cherries across thirty-eight orchards. "
    "Revenue grew by nine percent while the new plant in Yakima dried fruit around the clock. "
    "Seasonal pickers returned from earlier harvests, and the board proposed a larger dividend. "
) * 12
DEMO_FACTS = ("$412.6 million", "Orchard Crisps", "35.5 percent", "fastest", "2,140",
              "Yakima", "Daniel Okafor", "Chief Financial Officer")


def words(text: str) -> list[str]:
    return re.findall(r"\S+", text)


def is_subsequence(needles: list[str], haystack: list[str]) -> bool:
    remaining = iter(haystack)
    return all(any(word == candidate for candidate in remaining) for word in needles)


def new_pdf() -> FPDF:
    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    return pdf


def write_pdf(pdf: FPDF, path: Path) -> Path:
    pdf.output(str(path))
    return path


def text_pdf(path: Path, text: str = SOURCE_TEXT) -> Path:
    pdf = new_pdf()
    pdf.multi_cell(0, 6, text)
    pdf.add_page()
    pdf.multi_cell(0, 6, "Second page: the outlook for next year is steady.")
    return write_pdf(pdf, path)


def assert_one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(CKVError) as caught:
        read_document(path)
    message = str(caught.value)
    assert "\n" not in message and message.strip() == message
    assert path.name in message
    for needle in needles:
        assert needle.lower() in message.lower(), message
    return message


# PDF


def test_pdf_text_round_trips(tmp_path):
    text = read_document(text_pdf(tmp_path / "doc.pdf"))
    assert words(text) == words(SOURCE_TEXT) + words("Second page: the outlook for next year is steady.")
    assert "\r" not in text


def test_two_column_pdf_keeps_each_column_in_order(tmp_path):
    left = "Left column begins. " + "Apples ripen slowly in the cool valley air. " * 6
    right = "Right column begins. " + "Pears are stored cold for months before shipping. " * 6
    pdf = new_pdf()
    pdf.multi_cell(85, 6, left)
    pdf.set_xy(115, 10)
    pdf.multi_cell(85, 6, right)
    text_words = words(read_document(write_pdf(pdf, tmp_path / "columns.pdf")))
    assert is_subsequence(words(left), text_words)
    assert is_subsequence(words(right), text_words)
    assert not is_subsequence(words(right)[:3] + words(left)[:3], text_words)


def test_pdf_line_end_hyphen_joins_the_word(tmp_path):
    pdf = new_pdf()
    pdf.cell(0, 6, "The harvest was extra-", new_x="LMARGIN", new_y="NEXT")
    pdf.cell(0, 6, "ordinarily good this year.", new_x="LMARGIN", new_y="NEXT")
    text = read_document(write_pdf(pdf, tmp_path / "hyphen.pdf"))
    assert "extraordinarily good" in text
    assert "\x02" not in text and "\ufffe" not in text


def test_pdf_suffix_is_case_insensitive(tmp_path):
    assert "steady" in read_document(text_pdf(tmp_path / "DOC.PDF"))


def test_encrypted_pdf(tmp_path):
    pdf = new_pdf()
    pdf.multi_cell(0, 6, SOURCE_TEXT)
    pdf.set_encryption(owner_password="owner", user_password="secret")
    path = write_pdf(pdf, tmp_path / "locked.pdf")
    assert_one_line_error(path, "encrypted", "password", "qpdf --decrypt")


def test_scanned_pdf_needs_ocr(tmp_path):
    pdf = new_pdf()
    pdf.rect(20, 20, 170, 250, style="F")
    pdf.add_page()
    pdf.image(Image.new("L", (64, 64), color=128), x=20, y=20, w=170)
    path = write_pdf(pdf, tmp_path / "scan.pdf")
    assert_one_line_error(path, "no extractable text", "OCR", "ocrmypdf")


def test_blank_pdf_has_no_text(tmp_path):
    path = write_pdf(new_pdf(), tmp_path / "blank.pdf")
    message = assert_one_line_error(path, "no text")
    assert "OCR" not in message


def test_corrupt_pdf(tmp_path):
    path = tmp_path / "broken.pdf"
    path.write_bytes(b"%PDF-1.4\n\x00\x13garbage that is not a PDF body\n" * 20)
    assert_one_line_error(path, "not a valid PDF")


def test_pdf_reads_from_many_threads(tmp_path):
    path = text_pdf(tmp_path / "doc.pdf")
    expected = read_document(path)
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(read_document, [path] * 32))
    assert results == [expected] * 32


# Text and Markdown


def test_utf8_text_and_line_endings(tmp_path):
    path = tmp_path / "notes.md"
    path.write_bytes("# Récolte\r\n\r\nPommes – 12 €\r\nend\r".encode("utf-8"))
    assert read_document(path) == "# Récolte\n\nPommes – 12 €\nend\n"


def test_utf8_bom_is_dropped(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfPear orchard")
    assert read_document(path) == "Pear orchard"


@pytest.mark.parametrize(
    "text, encoding",
    [
        ("Le café du marché propose une crème brûlée à 4,50 €.\nNaïve façade, señor Müller's résumé, déjà vu.\n", "cp1252"),
        ("La cosecha de manzanas fue excelente este año. El señor Muñoz dirigió la expansión en España.\n", "latin-1"),
        ("Orchard report: café, crème, 日本の林檎.\n", "utf-16"),
        ("Orchard report for the year: apples, pears and cherries.\n", "utf-16-le"),  # no BOM: not UTF-8
    ],
)
def test_legacy_and_wide_encodings_decode(tmp_path, text, encoding):
    path = tmp_path / "legacy.txt"
    path.write_bytes(text.encode(encoding))
    assert read_document(path) == text


def test_empty_text_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    assert_one_line_error(path, "no text")


def test_whitespace_only_markdown(tmp_path):
    path = tmp_path / "blank.md"
    path.write_text(" \n\t\n\n")
    assert_one_line_error(path, "no text")


# Paths


def test_missing_file(tmp_path):
    assert_one_line_error(tmp_path / "nowhere.pdf", "not found")


def test_directory(tmp_path):
    folder = tmp_path / "folder.pdf"
    folder.mkdir()
    assert_one_line_error(folder, "directory")


@pytest.mark.parametrize("name", ["report.odt", "README"])
def test_unsupported_extension(tmp_path, name):
    path = tmp_path / name
    path.write_text("some text")
    message = assert_one_line_error(path, "unsupported", ".pdf", ".txt", ".md")
    assert ".docx" in message and ".html" in message and ".epub" in message


# HTML, Word, EPUB

PAGE = """<!doctype html><html><head><title>Tab title</title><style>p {color: red}</style></head>
<body><h1>Annual report</h1><script>var hidden = 1;</script>
<p>Revenue grew by <b>nine</b> percent.</p><ul><li>Yakima plant</li><li>Orchard Crisps</li></ul>
</body></html>"""


def test_html_keeps_visible_text_only(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(PAGE, encoding="utf-8")
    text = read_document(path)
    assert text.splitlines()[0] == "Annual report"
    assert "Revenue grew by" in text and "nine" in text and "Orchard Crisps" in text
    for hidden in ("Tab title", "color: red", "var hidden"):
        assert hidden not in text


def test_html_in_a_legacy_charset(tmp_path):
    path = tmp_path / "page.htm"
    path.write_bytes("<p>Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, r\u00e9sum\u00e9 d\u00e9j\u00e0 vu.</p>".encode("cp1252"))
    assert read_document(path) == "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e, na\u00efve fa\u00e7ade, r\u00e9sum\u00e9 d\u00e9j\u00e0 vu."


def test_docx_paragraphs_and_tables_in_order(tmp_path):
    import docx

    document = docx.Document()
    document.add_heading("Annual report", level=1)
    document.add_paragraph("Revenue grew by nine percent.")
    table = document.add_table(rows=2, cols=2)
    for row, cells in zip(table.rows, [("Product", "Share"), ("Orchard Crisps", "35.5 percent")]):
        for cell, value in zip(row.cells, cells):
            cell.text = value
    document.add_paragraph("The outlook is steady.")
    path = tmp_path / "report.docx"
    document.save(path)
    assert read_document(path).splitlines() == [
        "Annual report", "Revenue grew by nine percent.", "Product | Share",
        "Orchard Crisps | 35.5 percent", "The outlook is steady."]


def write_epub(path: Path, chapters: dict[str, str], spine: list[str]) -> Path:
    """A minimal EPUB 3: container, OPF in a subfolder, chapters in ``spine`` order."""
    manifest = "".join(f'<item id="{n}" href="text/{n}.xhtml" media-type="application/xhtml+xml"/>' for n in chapters)
    itemrefs = "".join(f'<itemref idref="{n}"/>' for n in spine)
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("mimetype", "application/epub+zip")
        book.writestr("META-INF/container.xml",
                      '<?xml version="1.0"?><container version="1.0" xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
                      '<rootfiles><rootfile full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/>'
                      "</rootfiles></container>")
        book.writestr("OEBPS/content.opf",
                      '<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" version="3.0">'
                      f"<manifest>{manifest}</manifest><spine>{itemrefs}</spine></package>")
        for name, body in chapters.items():
            book.writestr(f"OEBPS/text/{name}.xhtml",
                          f'<html xmlns="http://www.w3.org/1999/xhtml"><head><title>{name}</title></head>'
                          f"<body><p>{body}</p></body></html>")
    return path


def test_epub_chapters_in_spine_order(tmp_path):
    path = write_epub(tmp_path / "book.epub", {"b": "Second chapter.", "a": "First chapter."}, ["a", "b"])
    assert read_document(path) == "First chapter.\n\nSecond chapter."


@pytest.mark.parametrize("name", ["broken.docx", "broken.epub"])
def test_corrupt_office_and_epub_files(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"PK\x03\x04 not really a zip archive")
    assert_one_line_error(path, "not a valid")


def test_epub_without_container(tmp_path):
    path = tmp_path / "bare.epub"
    with zipfile.ZipFile(path, "w") as book:
        book.writestr("chapter.xhtml", "<p>text</p>")
    assert_one_line_error(path, "not a valid EPUB")


# Hash and samples


def test_document_hash_is_sha256_of_utf8():
    # FIPS 180-2 test vector for "abc".
    assert document_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert document_hash("café") != document_hash("cafe")


@pytest.mark.parametrize("name", ["report.txt", "report.pdf"])
def test_samples_contain_demo_facts(name):
    text = read_document(SAMPLES / name)
    flat = " ".join(words(text))
    for fact in DEMO_FACTS:
        assert fact in flat, fact
    same_sentence = r"(?:[^.]|\.\d)*"  # a decimal point does not end the sentence
    assert re.search(rf"Orchard Crisps{same_sentence}35\.5 percent{same_sentence}fastest", flat)


def test_sample_pdf_matches_sample_text():
    pdf_lines = read_document(SAMPLES / "report.pdf").splitlines()
    page_numbers = [line for line in pdf_lines if line.strip().isdigit()]
    pdf_words = words("\n".join(line for line in pdf_lines if line not in page_numbers))
    txt_words = words(read_document(SAMPLES / "report.txt"))
    assert pdf_words == txt_words
    assert page_numbers == [str(page) for page in range(1, len(page_numbers) + 1)]
    assert len(page_numbers) >= 3
    assert 1800 <= len(txt_words) <= 2700
