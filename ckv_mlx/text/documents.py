"""Read a document (PDF, plain text, Markdown, HTML, Word, EPUB) into one string of text."""

from __future__ import annotations

import hashlib
import posixpath
import re
import threading
import zipfile
from pathlib import Path
from typing import Callable
from xml.etree import ElementTree

import charset_normalizer
import docx
from docx.table import Table
import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
from bs4 import BeautifulSoup

from ..errors import CKVError

WESTERN_DEFAULT = "cp1252"
NEAR_TIE_CHAOS = 10.0  # percentage points of charset-normalizer's "chaos" score

# PDFium is not thread-safe: every call into it must hold this lock.
_PDFIUM_LOCK = threading.Lock()

# PDFium marks a hyphen that splits a word across lines with \x02 (\ufffe in some calls).
_LINE_END_HYPHEN = re.compile("[\x02\ufffe]\\s*")


def read_document(path: str | Path) -> str:
    """Return the text of the document at `path`; raise CKVError on bad input."""
    path = Path(path)
    if not path.exists():
        raise CKVError(f"{path}: file not found; check the path and try again.")
    if path.is_dir():
        raise CKVError(f"{path}: is a directory; give the path of one document file.")
    extract = EXTRACTORS.get(path.suffix.lower())
    if extract is None:
        raise CKVError(f"{path}: unsupported file type {path.suffix or '(no extension)'!r}; "
                       f"supported: {', '.join(sorted(EXTRACTORS))}. Convert it to PDF or plain text.")
    text = _normalise_newlines(extract(path))
    if not text.strip():
        raise CKVError(f"{path}: the file has no text; give a document that contains text.")
    return text


def document_hash(text: str) -> str:
    """SHA-256 hex digest of the text, to tell whether a session's document changed."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _normalise_newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise CKVError(f"{path}: cannot read the file ({error.strerror}); "
                       "check its permissions.") from None


def _read_text_file(path: Path) -> str:
    """Decode a text file: UTF-8 when it is valid, else the detected charset."""
    data = _read_bytes(path)
    try:
        text = data.decode("utf-8-sig")
        if "\x00" not in text:
            return text
    except UnicodeDecodeError:
        pass
    match = _detect_charset(data)
    if match is None:
        raise CKVError(f"{path}: not a text file (no character encoding fits); "
                       "give a UTF-8 text, Markdown or PDF file.")
    return str(match)


def _detect_charset(data: bytes) -> charset_normalizer.CharsetMatch | None:
    """The likeliest decoding; Windows-1252 (the common legacy default) wins near-ties,
    since short Western texts also decode cleanly as Baltic or Central European."""
    matches = charset_normalizer.from_bytes(data)
    best = matches.best()
    if best is None:
        return None
    for match in matches:
        if (WESTERN_DEFAULT in match.could_be_from_charset
                and match.percent_chaos <= best.percent_chaos + NEAR_TIE_CHAOS):
            return match
    return best


def _read_pdf(path: Path) -> str:
    """Text of every page of a PDF, pages separated by a newline."""
    with _PDFIUM_LOCK:
        document = _open_pdf(path)
        try:
            pages = [_page_text(document, index) for index in range(len(document))]
        finally:
            document.close()
    if not pages:
        raise CKVError(f"{path}: the PDF has no pages; give a PDF that contains text.")
    if not any(text.strip() for text, _ in pages) and any(drawn for _, drawn in pages):
        raise CKVError(f"{path}: the PDF has pages but no extractable text (a scan?); "
                       "it needs OCR first, e.g. `ocrmypdf in.pdf out.pdf`.")
    return "\n".join(_LINE_END_HYPHEN.sub("", text) for text, _ in pages)


def _open_pdf(path: Path) -> pdfium.PdfDocument:
    try:
        return pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as error:
        code = getattr(error, "err_code", None)
        if code in (pdfium_c.FPDF_ERR_PASSWORD, pdfium_c.FPDF_ERR_SECURITY):
            raise CKVError(f"{path}: the PDF is encrypted (password protected); decrypt it "
                           "first, e.g. `qpdf --decrypt --password=PW in.pdf out.pdf`.") from None
        raise CKVError(f"{path}: not a valid PDF (corrupt or another format); "
                       "re-export or re-download it.") from None


def _page_text(document: pdfium.PdfDocument, index: int) -> tuple[str, bool]:
    """The page's text, and whether it draws anything (images, paths) at all."""
    page = document[index]
    try:
        textpage = page.get_textpage()
        try:
            text = textpage.get_text_bounded()
        finally:
            textpage.close()
        drawn = next(iter(page.get_objects(max_depth=1)), None) is not None
    finally:
        page.close()
    return text, drawn


def _read_html(path: Path) -> str:
    return _html_text(_read_text_file(path))


def _html_text(markup: str | bytes) -> str:
    """Visible text of an HTML page, one block per line (no scripts, styles, head)."""
    soup = BeautifulSoup(markup, "html.parser")
    for hidden in soup(["script", "style", "head", "noscript", "template"]):
        hidden.decompose()
    lines = (line.strip() for line in soup.get_text("\n").splitlines())
    return "\n".join(line for line in lines if line)


def _read_docx(path: Path) -> str:
    """Paragraphs and table rows of a Word document, in document order."""
    try:
        document = docx.Document(str(path))
    except Exception:  # python-docx raises zipfile, KeyError and its own errors alike
        raise CKVError(f"{path}: not a valid .docx file (corrupt, or an old .doc?); "
                       "re-save it as .docx or PDF.") from None
    blocks = []
    for block in document.iter_inner_content():
        if isinstance(block, Table):
            blocks += [" | ".join(cell.text for cell in row.cells) for row in block.rows]
        else:
            blocks.append(block.text)
    return "\n".join(blocks)


_OPF = "{http://www.idpf.org/2007/opf}"
_CONTAINER = "{urn:oasis:names:tc:opendocument:xmlns:container}"


def _read_epub(path: Path) -> str:
    """The text of an EPUB's chapters in reading (spine) order."""
    try:
        with zipfile.ZipFile(path) as book:
            return "\n\n".join(_html_text(book.read(name)) for name in _spine(book))
    except (zipfile.BadZipFile, KeyError, ElementTree.ParseError):
        raise CKVError(f"{path}: not a valid EPUB (corrupt, or DRM-protected?); "
                       "re-download it or convert it to PDF.") from None


def _spine(book: zipfile.ZipFile) -> list[str]:
    """Archive names of the chapters, from META-INF/container.xml and the OPF spine."""
    container = ElementTree.fromstring(book.read("META-INF/container.xml"))
    opf_name = container.find(f".//{_CONTAINER}rootfile").get("full-path")
    opf = ElementTree.fromstring(book.read(opf_name))
    items = {item.get("id"): item.get("href") for item in opf.iter(f"{_OPF}item")}
    folder = posixpath.dirname(opf_name)
    return [posixpath.join(folder, items[ref.get("idref")]) for ref in opf.iter(f"{_OPF}itemref")]


EXTRACTORS: dict[str, Callable[[Path], str]] = {
    ".pdf": _read_pdf,
    ".txt": _read_text_file,
    ".md": _read_text_file,
    ".html": _read_html,
    ".htm": _read_html,
    ".docx": _read_docx,
    ".epub": _read_epub,
}
