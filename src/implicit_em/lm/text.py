"""Text for a harvest: sources (a text file, a folder of HTML pages, a glob), their documents, and the visible text of
an HTML page.

A **source** is one label (one value of ``labels.npy``). A ``--text`` argument gives

- a file: one source; its documents are the whole file, or the pieces between lines equal to the separator; a
  ``.html`` / ``.htm`` file is one document, its visible text;
- a folder: one source of every ``.html`` / ``.htm`` file under it (recursively, in sorted path order), one
  document each, e.g. Debian's ``python3.11-doc`` (``/usr/share/doc/python3.11/html``);
- a glob (``*``, ``?`` or ``[``; ``**`` spans folders), quoted so that the shell leaves it alone: one source per
  matching file, in sorted order, as the shell's expansion would give, except binary files (a NUL byte in their
  first 4 KiB) and links to a file already matched, e.g. ``'/usr/share/games/fortunes/*'`` gives the fortune
  files without their ``.dat`` indexes and ``.u8`` links (a glob with a fixed config file needs no shell).

**Visible text** (:func:`visible_text`) is what a browser shows of the page's body: the text outside ``<head>``,
``<script>``, ``<style>``, ``<template>``, ``<noscript>``, and outside navigation (``<nav>`` and elements with
``role="navigation"`` or ``role="search"``, the same on every page of a site); block elements (paragraphs, list
items, headings, table rows, ...) end lines, runs of spaces become one space outside ``<pre>``, character
references are decoded. It uses the standard library's :mod:`html.parser` only.
"""

from __future__ import annotations

import glob
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from implicit_em.errors import DataError

#: a document longer than this many characters is tokenised in pieces cut at line ends
PIECE_CHARS = 100_000
HTML_SUFFIXES = (".html", ".htm")
GLOB_CHARS = "*?["
#: elements whose content is not shown
HIDDEN = {"head", "script", "style", "template", "noscript", "nav"}
#: roles of elements that are the site's navigation, not the page's text
HIDDEN_ROLES = {"navigation", "search"}
#: elements without content or end tag
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
#: elements that end a line of text
BLOCKS = {
    "address", "article", "aside", "blockquote", "br", "caption", "dd", "div", "dl", "dt", "figcaption", "figure",
    "footer", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "ol", "p", "pre", "section", "table",
    "tbody", "td", "th", "thead", "tr", "ul",
}  # fmt: skip


class _VisibleText(HTMLParser):
    """Collects the visible text of a page (see the module docstring)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden: list[str] = []  # tags of the hidden element being skipped and its open descendants of that tag
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if self.hidden:
            if tag == self.hidden[-1]:
                self.hidden.append(tag)
            return
        if tag not in VOID and (tag in HIDDEN or dict(attrs).get("role") in HIDDEN_ROLES):
            self.hidden.append(tag)
            return
        if tag == "pre":
            self.pre += 1
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if not self.hidden and tag in BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self.hidden:
            if tag == self.hidden[-1]:
                self.hidden.pop()
            return
        if tag == "pre":
            self.pre = max(0, self.pre - 1)
        if tag in BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.hidden:
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip(" ")  # no space at a line's start outside <pre>
        self.parts.append(data)


def visible_text(html: str) -> str:
    """The visible text of an HTML page (see the module docstring): no space at the end of a line (nor at its
    start outside ``<pre>``), at most one empty line in a row, no empty line first or last."""
    parser = _VisibleText()
    parser.feed(html)
    parser.close()
    lines = [line.rstrip() for line in "".join(parser.parts).splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines))
    return text.strip("\n") + "\n" if text.strip() else ""


def is_html(path: Path) -> bool:
    return path.suffix.lower() in HTML_SUFFIXES


def _pieces(lines: Iterator[str], separator: str | None) -> Iterator[tuple[int, str]]:
    """(document index, text) pieces of a stream of lines (see :func:`read_documents`)."""
    doc, kept, size = 0, [], 0
    for line in lines:
        if separator is not None and line.rstrip("\r\n") == separator:
            if kept:
                yield doc, "".join(kept)
            doc, kept, size = doc + 1, [], 0
            continue
        kept.append(line)
        size += len(line)
        if size >= PIECE_CHARS:
            yield doc, "".join(kept)
            kept, size = [], 0
    if kept:
        yield doc, "".join(kept)


def read_documents(path: Path, separator: str | None) -> Iterator[tuple[int, str]]:
    """(document index in the file, text) pieces of ``path``: a document is the whole file or the text between
    ``separator`` lines (an HTML file: its visible text, one document); one longer than :data:`PIECE_CHARS` comes
    in several pieces cut at line ends. A text file is read line by line."""
    if is_html(path):
        yield from _pieces(iter(visible_text(path.read_text(encoding="utf-8", errors="replace")).splitlines(True)),
                           None)  # fmt: skip
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        yield from _pieces(f, separator)


@dataclass(frozen=True)
class Source:
    """One ``--text`` argument: its label's name, what was passed, and its files in reading order."""

    name: str
    spec: str
    files: tuple[Path, ...]

    def documents(self, separator: str | None) -> Iterator[tuple[tuple[int, int], str]]:
        """((file index, document index in the file), text) pieces of every file, file after file."""
        for i, path in enumerate(self.files):
            for doc, text in read_documents(path, separator):
                yield (i, doc), text

    def fingerprint(self) -> dict:
        """What a resumed harvest compares: for one file its path, size and modification time (as before sources
        had more than one file); for a folder or a glob the number of files, their total size and a digest of
        their paths, sizes and modification times."""
        if len(self.files) == 1 and Path(self.spec).is_file():
            s = self.files[0].stat()
            return {"path": str(self.files[0].resolve()), "size": s.st_size, "mtime_ns": s.st_mtime_ns}
        digest, size = hashlib.sha1(), 0
        for p in self.files:
            s = p.stat()
            size += s.st_size
            digest.update(f"{p.resolve()}|{s.st_size}|{s.st_mtime_ns}\n".encode())
        return {"path": self.spec, "files": len(self.files), "size": size, "sha1": digest.hexdigest()}


def is_binary(path: Path) -> bool:
    """Whether ``path`` holds a NUL byte in its first 4 KiB (text files do not)."""
    with open(path, "rb") as f:
        return b"\0" in f.read(4096)


def _glob_files(spec: str) -> list[Path]:
    """The files a glob matches, sorted, but binary files and links to a file already matched."""
    files, seen = [], set()
    for p in sorted(Path(p) for p in glob.glob(spec, recursive=True)):
        if not p.is_file() or p.resolve() in seen or is_binary(p):
            continue
        seen.add(p.resolve())
        files.append(p)
    if not files:
        raise DataError(f"{spec}: the pattern matches no text file; pass existing text files, a folder or a glob")
    return files


def _specs(spec: str) -> list[tuple[str, tuple[Path, ...]]]:
    """(argument, files) of each source one ``--text`` argument gives."""
    path = Path(spec)
    if path.is_file():
        return [(spec, (path,))]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and is_html(p))
        if not files:
            raise DataError(f"{spec}: a folder without .html files; pass text files, a folder of HTML pages, or a glob")
        return [(spec, tuple(files))]
    if any(c in spec for c in GLOB_CHARS):
        return [(str(p), (p,)) for p in _glob_files(spec)]
    raise DataError(f"{spec}: no such file; pass existing text files, a folder of HTML pages, or a glob to --text")


def short_names(paths: list[str]) -> list[str]:
    """The last component of each path, or as many of its last components as tell it apart from the others
    (``/usr/share/doc/python3.11/html`` and ``/usr/share/doc/linux-doc-6.1/html``: ``python3.11/html`` and
    ``linux-doc-6.1/html``); the whole path where nothing shorter does."""
    parts = [Path(p).parts for p in paths]
    depth = [1] * len(paths)
    while True:
        names = ["/".join(q[-d:]) if d < len(q) else p for q, d, p in zip(parts, depth, paths)]
        clash = {n for n in names if names.count(n) > 1}
        grow = [i for i, n in enumerate(names) if n in clash and depth[i] < len(parts[i])]
        if not grow:
            return names
        for i in grow:
            depth[i] += 1


def text_sources(specs: list[str | Path]) -> list[Source]:
    """The sources of ``--text`` arguments (see the module docstring), named by :func:`short_names`."""
    found = [s for spec in specs for s in _specs(str(spec))]
    return [Source(n, spec, files) for n, (spec, files) in zip(short_names([f[0] for f in found]), found)]
