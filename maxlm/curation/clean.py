"""Format cleaning: Unicode normalisation, control characters, whitespace, HTML to Markdown-ish text, and
the line / paragraph hashes that corpus-level boilerplate and repeated-span removal count.

Boilerplate (navigation bars, cookie banners, "all rights reserved") is recognised the way CCNet (Wenzek et
al. 2020) and RefinedWeb (Penedo et al. 2023) recognise it: a line that appears in many *different*
documents of the corpus is site furniture, not content. The corpus pass counts, for every normalised line,
the number of documents containing it; lines at or above `min_docs` are removed everywhere.

Repeated spans across documents (Baichuan-7B's sentence/paragraph-level dedup) are long paragraphs that
occur in more than one document: the first document in input order keeps the paragraph, later ones lose it.
"""

from __future__ import annotations

import hashlib
import html
import html.parser
import re
import unicodedata

import numpy as np

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"), None)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[^\S\n]+")  # whitespace other than newlines (tabs, no-break spaces, ideographic space)
_BLANK_RUNS = re.compile(r"\n{3,}")
_LOOKS_HTML = re.compile(r"<(?:html|body|div|p|br|span|table|article|h[1-6]|li|a\s)[\s>/]", re.IGNORECASE)


def normalize(text: str) -> str:
    """NFC; no control or zero-width characters; CRLF -> LF; runs of spaces/tabs -> one space; lines
    stripped; at most one blank line between paragraphs; no leading/trailing blank lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text.replace("\t", " "))
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _BLANK_RUNS.sub("\n\n", text).strip("\n")


def normalize_code(text: str) -> str:
    """Source code keeps its layout: NFC, no zero-width or control characters (tabs kept), CRLF -> LF, trailing
    whitespace stripped per line, no leading/trailing blank lines -- indentation is syntax and stays."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n").translate(_ZERO_WIDTH)
    text = _CONTROL.sub("", text)
    return "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")


def looks_like_html(text: str) -> bool:
    return bool(_LOOKS_HTML.search(text[:4096]))


_SKIP = {"script", "style", "noscript", "template", "svg", "head", "nav", "footer", "header", "aside", "form",
         "button", "iframe", "select"}
_BLOCK = {"p", "div", "section", "article", "main", "blockquote", "pre", "table", "tr", "ul", "ol", "dl", "dd",
          "dt", "figure", "figcaption", "address", "hr", "br", "li", "h1", "h2", "h3", "h4", "h5", "h6"}
_VOID = {"br", "hr", "img", "input", "meta", "link", "area", "base", "col", "embed", "source", "track", "wbr"}


class _Extractor(html.parser.HTMLParser):
    """Visible text with block structure: paragraphs split by blank lines, headings as '#' lines, list
    items as '- ' lines, table cells separated by ' | '; scripts, styles and page furniture dropped."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in _SKIP and tag not in _VOID:
            self.skip += 1
        elif not self.skip:
            if tag in _BLOCK:
                self.parts.append("\n\n" if tag not in ("br", "li", "tr") else "\n")
            if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
                self.parts.append("#" * int(tag[1]) + " ")
            elif tag == "li":
                self.parts.append("- ")
            elif tag in ("td", "th"):
                self.parts.append(" | ")

    def handle_endtag(self, tag):
        if tag in _SKIP and tag not in _VOID:
            self.skip = max(self.skip - 1, 0)
        elif not self.skip and tag in _BLOCK and tag not in ("li", "tr"):  # their start tags broke the line
            self.parts.append("\n\n" if tag.startswith("h") or tag in ("p", "pre", "table", "ul", "ol") else "\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.lasttag == "pre" else re.sub(r"\s+", " ", data))


def html_to_text(text: str) -> str:
    """Plain text (with light Markdown for headings and lists) of an HTML document, normalised."""
    parser = _Extractor()
    parser.feed(text)
    parser.close()
    lines = [re.sub(r"^(\s*\|\s*)", "", line) for line in "".join(parser.parts).split("\n")]
    return normalize(html.unescape("\n".join(lines)))


def text_hash(text: str) -> int:
    """A stable 63-bit hash (blake2b) of a string: the same on every machine and process, unlike hash()."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little") >> 1


def lines_of(text: str) -> list[str]:
    """The non-empty lines of a normalised text."""
    return [line for line in text.split("\n") if line]


def paragraphs_of(text: str) -> list[str]:
    """The paragraphs (blank-line separated blocks) of a normalised text."""
    return [p for p in text.split("\n\n") if p.strip()]


def drop_lines(text: str, boilerplate: np.ndarray) -> tuple[str, int]:
    """`text` without the lines whose hash is in `boilerplate` (a sorted int64 array), blank-line structure
    kept; returns the text and the number of lines removed."""
    lines = text.split("\n")
    hashes = np.array([text_hash(line) if line else -1 for line in lines], np.int64)
    hit = np.isin(hashes, boilerplate, assume_unique=False)
    if not hit.any():
        return text, 0
    kept = [line for line, h in zip(lines, hit) if not h]
    return _BLANK_RUNS.sub("\n\n", "\n".join(kept)).strip("\n"), int(hit.sum())


def drop_paragraphs(text: str, owner: dict[int, int], doc: int, min_chars: int) -> tuple[str, int]:
    """`text` without the long paragraphs that another, earlier document owns (or that repeat earlier in
    this one); returns the text and the number of characters removed."""
    kept, seen, removed = [], set(), 0
    for p in paragraphs_of(text):
        if len(p) >= min_chars:
            h = text_hash(p)
            if owner.get(h, doc) != doc or h in seen:
                removed += len(p)
                continue
            seen.add(h)
        kept.append(p)
    return "\n\n".join(kept), removed
