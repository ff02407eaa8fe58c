"""CLIP's text tokenizer: lower-cased byte-level BPE (Radford et al. 2021, sec. 2.4).

Gives the same ids as OpenAI's `clip.tokenize`: ftfy + HTML-unescape cleaning, whitespace
collapse, lower-casing, the same pre-tokenisation regex, GPT-2's byte-to-unicode map and the
first 49152 - 256 - 2 merges of `bpe_simple_vocab_16e6.txt.gz` (49408 ids in all, the last two
being <|startoftext|> and <|endoftext|>). Rows are [sot, ids..., eot] zero-padded to
`context_length`. Faster than the reference: BPE ids are cached per pre-token, text that ftfy
cannot change skips it, and a batch is packed into one array in a single step.
"""
import functools
import gzip
import html
import importlib.resources
import itertools
import re as stdlib_re
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2
WORD_CACHE_SIZE = 1 << 18

# OpenAI's pre-tokenisation: specials, English contractions, letter runs, single digits,
# runs of other non-space symbols. IGNORECASE is kept because it also changes what matches
# after lower-casing (e.g. "'ſ" matches 's under simple case folding).
_PRETOKEN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The same split for lower-cased ASCII text, about twice as fast with the stdlib engine: there
# \s is [\t\n\v\f\r ], \p{L} is [a-z], \p{N} is [0-9], and case folding adds nothing.
_ASCII_PRETOKEN = stdlib_re.compile(
    r"<\|(?:startoftext|endoftext)\|>|'(?:s|t|re|ve|m|ll|d)|[a-z]+|[0-9]|[^\t\n\x0b\x0c\r a-z0-9]+"
)
_WHITESPACE = regex.compile(r"\s+")
# A character outside printable ASCII + \t\n\r, or '&': only then can ftfy or html.unescape
# change the text (mojibake, entities, controls, width, ligatures and curly quotes all need one).
_NEEDS_FIXING = stdlib_re.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")


class ContextLengthError(ValueError, RuntimeError):
    """A text is longer than context_length (RuntimeError too, as OpenAI raises)."""


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable, non-space characters."""
    # Printable Latin-1 bytes map to themselves, the rest to chr(256), chr(257), ...; the
    # dict's order (kept bytes first) is the order of the first 256 vocabulary ids.
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in kept]
    return {b: chr(b) for b in kept} | {b: chr(256 + n) for n, b in enumerate(shifted)}


def clean_text(text: str) -> str:
    """ftfy, HTML-unescape twice, collapse whitespace, strip and lower-case, as OpenAI does."""
    if not _NEEDS_FIXING.search(text):
        return " ".join(text.split()).lower()  # what _full_clean gives for such text
    return _full_clean(text)


def _full_clean(text: str) -> str:
    """OpenAI's cleaning, step by step."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


def default_bpe_path() -> Path:
    """The merges file shipped in clip_core/assets (OpenAI's, MIT licence beside it)."""
    return Path(str(importlib.resources.files("clip_core") / "assets" / "bpe_simple_vocab_16e6.txt.gz"))


def load_merges(path: str | Path) -> list[tuple[str, str]]:
    """The merge pairs, lines [1 : NUM_MERGES + 1] of the gzipped file as OpenAI takes them."""
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


class SimpleTokenizer:
    """Byte-level BPE with OpenAI CLIP's vocabulary; `__call__` gives the (N, context_length) ids."""

    def __init__(self, bpe_path: str | Path | None = None, cache_size: int = WORD_CACHE_SIZE):
        self._init_args = (bpe_path, cache_size)
        merges = load_merges(bpe_path or default_bpe_path())
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        symbols = list(self.byte_encoder.values())
        vocab = [*symbols, *(s + "</w>" for s in symbols), *("".join(m) for m in merges), SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = dict(enumerate(vocab))
        self.bpe_ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.sot_token_id, self.eot_token_id = self.encoder[SOT], self.encoder[EOT]
        self._word_ids = functools.lru_cache(maxsize=cache_size)(self._bpe_ids)

    def __reduce__(self):
        """Pickle as the constructor arguments (workers rebuild the tables and an empty cache)."""
        return type(self), self._init_args

    @property
    def vocab_size(self) -> int:
        """49408 for CLIP's file."""
        return len(self.encoder)

    def bpe(self, symbols: list[str]) -> list[str]:
        """Merge adjacent symbols, lowest-ranked pair first, until no pair is a merge."""
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, NUM_MERGES))
            if pair not in ranks:
                break
            symbols = _merge_pair(symbols, pair)
        return symbols

    def _bpe_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token; only the exact special strings map to the special ids."""
        if word in (SOT, EOT):
            return (self.encoder[word],)
        symbols = [self.byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        return tuple(self.encoder[s] for s in self.bpe(symbols))

    def encode(self, text: str) -> list[int]:
        """BPE ids of one text, without <|startoftext|> and <|endoftext|>."""
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        text = clean_text(text)
        words = (_ASCII_PRETOKEN if text.isascii() else _PRETOKEN).findall(text)
        return list(itertools.chain.from_iterable(map(self._word_ids, words)))

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; each word end becomes a space, invalid UTF-8 becomes U+FFFD."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def encode_batch(self, texts: Sequence[str], context_length: int, truncate: bool) -> list[list[int]]:
        """[sot, ids..., eot] per text, cut to context_length (eot kept last) when truncate."""
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
            row = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(row) > context_length:
                if not truncate:
                    raise ContextLengthError(
                        f"texts[{i}] ({text[:40]!r}{'...' if len(text) > 40 else ''}) has {len(row)} tokens "
                        f"with <|startoftext|> and <|endoftext|>, more than context_length={context_length}; "
                        "pass truncate=True to cut it"
                    )
                row = row[:context_length]
                row[-1] = self.eot_token_id
            rows.append(row)
        return rows

    def __call__(self, texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
        """Int32 ids of shape (N, context_length), zero-padded, as `clip.tokenize`."""
        if context_length < 1:
            raise ValueError(f"context_length must be positive, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        elif not isinstance(texts, Sequence) or isinstance(texts, (bytes, bytearray)):
            raise TypeError(f"texts must be str or a sequence of str, got {type(texts).__name__}")
        return _pack(self.encode_batch(texts, context_length, truncate), context_length)


def _merge_pair(symbols: list[str], pair: tuple[str, str]) -> list[str]:
    """Replace each non-overlapping occurrence of pair, left to right, by its concatenation."""
    first, second = pair
    merged, out, i, last = first + second, [], 0, len(symbols) - 1
    while i <= last:
        if i < last and symbols[i] == first and symbols[i + 1] == second:
            out.append(merged)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _pack(rows: list[list[int]], context_length: int) -> torch.Tensor:
    """Zero-padded (N, context_length) int32 tensor from rows of at most context_length ids."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum()))
    out = np.zeros((len(rows), context_length), dtype=np.int32)
    out[np.arange(context_length) < lengths[:, None]] = flat  # row-major fill keeps each row's order
    return torch.from_numpy(out)


@functools.lru_cache(maxsize=None)
def default_tokenizer() -> SimpleTokenizer:
    """The shared tokenizer, built on first use (loads the merges file once)."""
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = 77, truncate: bool = False) -> torch.Tensor:
    """OpenAI's `clip.tokenize`: (N, context_length) int32 ids; too long raises unless truncate."""
    return default_tokenizer()(texts, context_length, truncate)
