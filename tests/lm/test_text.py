"""Text sources of a harvest: files and their documents, folders of HTML pages, globs, and an HTML page's visible
text."""

from __future__ import annotations

from pathlib import Path

import pytest

from implicit_em.errors import DataError
from implicit_em.lm import text as tx

PYTHON_DOC = Path("/usr/share/doc/python3.11/html")

PAGE = """<!DOCTYPE html>
<html><head><title>Ignored title</title><style>p {color: red}</style>
<script>var x = "<p>not text</p>";</script></head>
<body>
<div role="navigation"><ul><li><a href="i.html">index</a></li><li><div>nested nav div</div></li></ul></div>
<nav>next | previous</nav>
<input role="search" name="q">
<h1>json &mdash; JSON   encoder</h1>
<p>Encode   a <code>dict</code>
   with &lt;dumps&gt;.</p>
<pre>x = 1
    y  = 2</pre>
<ul><li>one</li><li>two</li></ul>
<p>caf&eacute;<br>next line</p>
</body></html>
"""


def test_visible_text_keeps_what_a_reader_sees():
    assert tx.visible_text(PAGE) == (
        "json \u2014 JSON encoder\n\nEncode a dict with <dumps>.\n\nx = 1\n    y  = 2\n\none\n\ntwo\n\ncaf\u00e9\nnext line\n"
    )
    assert tx.visible_text("<html><head><title>t</title></head><body> </body></html>") == ""


def test_documents_are_files_or_pieces_between_separator_lines(tmp_path, monkeypatch):
    f = tmp_path / "a.txt"
    f.write_text("one two\n%\nthree\nfour\n%\n%\nfive %\n")
    assert list(tx.read_documents(f, "%")) == [(0, "one two\n"), (1, "three\nfour\n"), (3, "five %\n")]
    assert list(tx.read_documents(f, None)) == [(0, f.read_text())]
    monkeypatch.setattr(tx, "PIECE_CHARS", 10)  # a long document comes in pieces cut at line ends
    assert list(tx.read_documents(f, None))[:2] == [(0, "one two\n%\n"), (0, "three\nfour\n")]


def test_an_html_file_is_one_document_whatever_the_separator(tmp_path):
    page = tmp_path / "p.html"
    page.write_text(PAGE.replace("<p>Encode", "<p>%</p><p>Encode"))
    docs = list(tx.read_documents(page, "%"))
    assert len(docs) == 1 and docs[0][0] == 0 and docs[0][1].startswith("json") and "\n%\n" in docs[0][1]


def test_sources_are_files_folders_of_html_and_globs(tmp_path):
    (tmp_path / "site" / "sub").mkdir(parents=True)
    for name in ("b.html", "a.html", "sub/c.htm"):
        (tmp_path / "site" / name).write_text(f"<p>{name}</p>")
    (tmp_path / "site" / "style.css").write_text("p {}")
    (tmp_path / "notes.txt").write_text("x\n")
    site, notes = tmp_path / "site", tmp_path / "notes.txt"
    sources = tx.text_sources([notes, site])
    assert [s.name for s in sources] == ["notes.txt", "site"] and sources[0].files == (notes,)
    assert [p.relative_to(site).as_posix() for p in sources[1].files] == ["a.html", "b.html", "sub/c.htm"]
    assert [(key, text) for key, text in sources[1].documents(None)] == [
        ((0, 0), "a.html\n"), ((1, 0), "b.html\n"), ((2, 0), "sub/c.htm\n")
    ]  # fmt: skip
    assert set(sources[0].fingerprint()) == {"path", "size", "mtime_ns"}
    before = sources[1].fingerprint()
    assert before["files"] == 3 and before == tx.text_sources([site])[0].fingerprint()
    (site / "a.html").write_text("<p>changed</p>")
    assert tx.text_sources([site])[0].fingerprint()["sha1"] != before["sha1"]  # a changed page is seen


def test_a_glob_gives_a_source_per_text_file_as_the_shell_would(tmp_path):
    """As Debian's fortunes: cookie files, their binary .dat indexes and .u8 links to them."""
    for name in ("food", "art"):
        (tmp_path / name).write_text("a fortune\n%\nanother\n")
        (tmp_path / f"{name}.dat").write_bytes(b"\0\0\0\x02\0\0\x01" + b"%" * 20)
        (tmp_path / f"{name}.u8").symlink_to(tmp_path / name)
    sources = tx.text_sources([str(tmp_path / "*")])
    assert [s.name for s in sources] == ["art", "food"] and [s.files for s in sources] == [
        (tmp_path / "art",), (tmp_path / "food",)
    ]  # fmt: skip


def test_sources_sharing_a_name_are_named_by_enough_of_their_paths(tmp_path):
    for d in ("x/a", "y/a", "z"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "doc.txt").write_text("t\n")
    files = [tmp_path / "x/a/doc.txt", tmp_path / "y/a/doc.txt", tmp_path / "z/doc.txt"]
    assert [s.name for s in tx.text_sources(files)] == ["x/a/doc.txt", "y/a/doc.txt", "z/doc.txt"]
    docs = ["/usr/share/doc/python3.11/html", "/usr/share/doc/linux-doc-6.1/html", "/usr/share/games/fortunes/art"]
    assert tx.short_names(docs) == ["python3.11/html", "linux-doc-6.1/html", "art"]
    assert tx.short_names(["a/b", "b", "a/b"]) == ["a/b", "b", "a/b"]  # the same path twice: whole paths


def test_bad_sources_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="absent.txt: no such file"):
        tx.text_sources([tmp_path / "absent.txt"])
    with pytest.raises(DataError, match="a folder without .html files"):
        tx.text_sources([tmp_path / "empty"])
    with pytest.raises(DataError, match="the pattern matches no text file"):
        tx.text_sources([str(tmp_path / "*.html")])


def test_the_python_documentation_reads_as_text():
    if not PYTHON_DOC.is_dir():
        pytest.skip(f"Debian's python3.11-doc is not in {PYTHON_DOC} (apt-get install python3.11-doc)")
    text = tx.visible_text((PYTHON_DOC / "library" / "json.html").read_text())
    assert "json.dumps" in text and "JSON (JavaScript Object Notation)" in text
    assert "<" + "div" not in text and "var " not in text and "Navigation" not in text
