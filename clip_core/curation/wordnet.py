"""WordNet 3.0 synsets read straight from the database files (CLIP Sec. 2.2: "all WordNet synsets
not already in the query list"; MetaCLIP `build_metadata.py` took them through nltk).

A data.{noun,verb,adj,adv} line is `offset lex_filenum ss_type w_cnt word lex_id [word lex_id]...
p_cnt ... | gloss`, w_cnt in hex; the licence header lines start with two spaces. Lemmas keep their
case (the data files have it; the index files are lower-cased); underscores become spaces and
the adjective markers (a), (p), (ip) are dropped. No nltk, no download: Debian's wordnet-base
puts the files under /usr/share/wordnet.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import fsspec

from clip_core.errors import InputError

POS_FILES = {"n": "data.noun", "v": "data.verb", "a": "data.adj", "r": "data.adv"}
DEFAULT_DIR = "/usr/share/wordnet"
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class Synset:
    """One synset: its byte offset, part of speech, lemmas (spaces, case kept) and gloss."""
    offset: int
    pos: str
    lemmas: tuple[str, ...]
    gloss: str


def parse_data_line(line: str) -> Synset | None:
    """A Synset from one data.* line (None for a licence header line)."""
    if line.startswith("  ") or not line.strip():
        return None
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    n_words = int(fields[3], 16)
    words = fields[4: 4 + 2 * n_words: 2]
    lemmas = tuple(_ADJ_MARKER.sub("", w).replace("_", " ") for w in words)
    return Synset(int(fields[0]), fields[2], lemmas, gloss.strip())


def check_wordnet(wordnet_dir: str) -> None:
    """InputError unless wordnet_dir holds WordNet 3.0's data files."""
    fs, path = fsspec.core.url_to_fs(wordnet_dir)
    missing = [name for name in POS_FILES.values() if not fs.exists(f"{path.rstrip('/')}/{name}")]
    if missing:
        raise InputError("--wordnet", f"{wordnet_dir} lacks {', '.join(missing)}",
                         "install WordNet 3.0 with apt-get install wordnet-base, or pass its folder")


def read_synsets(wordnet_dir: str = DEFAULT_DIR, pos: str = "nvar") -> Iterator[Synset]:
    """Every synset of the parts of speech in pos (n, v, a, r), in file order."""
    for p in pos:
        uri = f"{wordnet_dir.rstrip('/')}/{POS_FILES[p]}"
        try:
            f = fsspec.open(uri, "r", encoding="utf-8").open()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{uri} not found: install WordNet 3.0 (apt-get install wordnet-base) "
                                    "or pass its folder") from err
        with f:
            for line in f:
                synset = parse_data_line(line)
                if synset is not None:
                    yield synset


def wordnet_queries(wordnet_dir: str = DEFAULT_DIR, lemmas: str = "all") -> list[str]:
    """Unique synset names in file order: every lemma ("all") or each synset's first ("head", MetaCLIP's)."""
    if lemmas not in ("all", "head"):
        raise ValueError(f"lemmas must be 'all' or 'head', got {lemmas!r}")
    names = (name for s in read_synsets(wordnet_dir) for name in (s.lemmas if lemmas == "all" else s.lemmas[:1]))
    return list(dict.fromkeys(names))
