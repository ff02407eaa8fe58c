"""Substring matching: the numpy hash matcher against the pure-Python oracle on real English
(WordNet glosses) and adversarial strings; MetaCLIP's spacing rules; bad input."""
import collections
import pickle
import re
from pathlib import Path

import ahocorasick
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clip_core.curation import matching
from clip_core.curation.matching import QueryMatcher, clean_captions, load_query_list, reference_match, reference_match_many, spacing
from clip_core.curation.wordnet import read_synsets
from clip_core.errors import InputError

WORDNET = Path("/usr/share/wordnet")


@pytest.fixture(scope="module")
def noun_synsets():
    if not (WORDNET / "data.noun").exists():
        pytest.fail(f"WordNet 3.0 not found under {WORDNET}: apt-get install wordnet-base")
    return list(read_synsets(str(WORDNET), pos="n"))


def _gloss_queries(synsets, captions, n_lemmas, n_words):
    """WordNet lemmas (every k-th) plus the most frequent words and bigrams of the glosses."""
    lemmas = list(dict.fromkeys(l for s in synsets for l in s.lemmas))
    counts = collections.Counter(w for c in captions for w in re.findall(r"\w+", c))
    pairs = collections.Counter(p for c in captions for p in re.findall(r"(?=\b(\w+ \w+))", c))
    extra = ["U.S.", "e.g.", "(", "a . b", "", "dog", "dog", " dog", "Dog"]
    return lemmas[:: max(1, len(lemmas) // n_lemmas)][:n_lemmas] + [w for w, _ in counts.most_common(n_words)] \
        + [p for p, _ in pairs.most_common(n_words // 4)] + extra


def test_spacing_is_metaclips():
    assert spacing("a,b.\tc\nd`e") == " a , b .  c d ` e "
    assert spacing("") == "  "


def test_oracle_agrees_with_fast_matcher_on_wordnet_glosses(noun_synsets):
    captions = [s.gloss for s in noun_synsets[::4]][:12000]  # definitions and "quoted examples"
    queries = _gloss_queries(noun_synsets, captions, 1500, 600)
    fast = QueryMatcher(queries).match_lists(captions)
    assert fast == reference_match_many(captions, queries)
    assert sum(map(len, fast)) > 5 * len(captions)  # real text: many matches per caption


def test_case_insensitive_agrees_with_oracle_on_glosses(noun_synsets):
    captions = [s.gloss for s in noun_synsets[1::7]][:3000]
    queries = _gloss_queries(noun_synsets, captions, 500, 300)
    assert QueryMatcher(queries, case_sensitive=False).match_lists(captions) == reference_match_many(captions, queries, False)


@pytest.mark.slow
def test_every_noun_gloss_against_metaclip_aho_corasick(noun_synsets):
    """All 82,115 noun glosses vs every noun lemma and frequent gloss word, MetaCLIP's own way."""
    captions = [s.gloss for s in noun_synsets]
    queries = list(dict.fromkeys(q for q in _gloss_queries(noun_synsets, captions, 10**6, 5000) if q.strip()))
    automaton = ahocorasick.Automaton()
    for i, query in enumerate(queries):
        automaton.add_word(f" {query} ", i)
    automaton.make_automaton()
    expected = [sorted({i for _, i in automaton.iter(spacing(c))}) for c in captions]
    assert QueryMatcher(queries).match_lists(captions) == expected


def test_overlapping_and_nested_matches():
    queries = ["a b", "b c", "a", "b", "c", "a b c", "a b c d"]
    assert QueryMatcher(queries).match_lists(["a b c"]) == [[0, 1, 2, 3, 4, 5]]
    assert QueryMatcher(["New York", "York", "New York City"]).match_lists(["New York City, NY"]) == [[0, 1, 2]]


def test_short_queries_whose_raw_hashes_are_neighbours():
    letters = [chr(c) for c in range(33, 127)]
    queries = letters + [a + b for a in "abcxyz" for b in "abcxyz"] + ["a b", "b a", "a  b"]
    captions = [" ".join(letters[i:i + 5]) + " ab ba a b b a" for i in range(0, 90, 3)] + ["x y z", "a  b", "zz"]
    assert QueryMatcher(queries).match_lists(captions) == reference_match_many(captions, queries)


def test_punctuation_and_whitespace_rules():
    queries = ["dog", "U.S.", "a . b", " dog", "dog  cat", "x\ty"]
    captions = ["the dog, barked.", "U.S. army", "a.b", "a  dog", "dog  cat", "x\ty", "dogs"]
    fast = QueryMatcher(queries).match_lists(captions)
    assert fast == [reference_match(c, queries) for c in captions]
    assert fast == [[0], [], [2], [0, 3], [0, 4], [], []]


def test_duplicates_and_empty_queries_are_rejected_and_counted():
    matcher = QueryMatcher(["dog", "", None, "  ", "dog", "cat", "hot\tdog"])
    assert matcher.rejected == {"empty": 3, "duplicate": 1, "unmatchable": 1}
    assert matcher.match_lists(["dog and cat"]) == [[0, 5]]
    folded = QueryMatcher(["Dog", "dog"], case_sensitive=False)
    assert folded.rejected["duplicate"] == 1 and folded.match_lists(["DOG"]) == [[0]]


def test_empty_query_list_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        QueryMatcher([])
    pq.write_table(pa.table({"query": pa.array([], pa.string())}), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match="empty"):
        load_query_list(str(tmp_path / "q.parquet"))
    pq.write_table(pa.table({"term": ["dog"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="term"):
        load_query_list(str(tmp_path / "bad.parquet"))


def test_query_list_with_nothing_matchable_is_refused_by_name(tmp_path):
    pq.write_table(pa.table({"query": ["", "  ", None, "a\tb"]}), tmp_path / "blank.parquet")
    with pytest.raises(InputError, match=r"blank.parquet: has no usable query: all 4 are blank or hold a tab"):
        load_query_list(str(tmp_path / "blank.parquet"))
    pq.write_table(pa.table({"query": [["dog"]]}), tmp_path / "lists.parquet")
    with pytest.raises(InputError, match=r"lists.parquet: column 'query' is list<.*>, it must be a string column"):
        load_query_list(str(tmp_path / "lists.parquet"))
    pq.write_table(pa.table({"query": ["", "dog"]}), tmp_path / "one.parquet")
    assert load_query_list(str(tmp_path / "one.parquet"))[0] == ["", "dog"]  # one usable query is enough


def test_chunked_batches_and_pickle_give_the_same_matches(monkeypatch):
    queries = ["red", "red car", "car", "blue sky", "sky"]
    captions = [f"a red car under a blue sky {i}" if i % 3 else None for i in range(500)]
    whole = QueryMatcher(queries).match_lists(captions)
    monkeypatch.setattr(matching, "CHUNK_BYTES", 64)
    assert pickle.loads(pickle.dumps(QueryMatcher(queries))).match_lists(captions) == whole
    assert whole[1] == [0, 1, 2, 3, 4] and whole[0] == []


def test_clean_captions_counts_bad_input():
    raw = pa.array([b"fine", None, b"", b"  ", b"bad \xff\xfe bytes", b"x" * 50], pa.binary())
    cleaned, counts = clean_captions(raw, max_chars=10)
    assert counts == {"null_caption": 1, "empty_caption": 2, "invalid_utf8": 1, "truncated": 2}
    assert cleaned.to_pylist() == ["fine", "", "", "  ", "bad \ufffd\ufffd byt", "x" * 10]
    as_string, counts = clean_captions(raw.view(pa.string()), max_chars=100)  # invalid bytes typed as string
    assert counts["invalid_utf8"] == 1 and as_string[4].as_py() == "bad \ufffd\ufffd bytes"
    with pytest.raises(TypeError, match="caption"):
        clean_captions(pa.array([1, 2]))
    encoded, counts = clean_captions(pa.array(["dog", None, "dog"]).dictionary_encode())
    assert encoded.to_pylist() == ["dog", "", "dog"] and counts["null_caption"] == 1


ALPHABET = st.sampled_from(list("ab A,.;:?!`\t\n\r-'é😀İß") + ["  ", "ab", "a b"])
TEXT = st.lists(ALPHABET, max_size=12).map("".join)


@settings(max_examples=300, deadline=None)
@given(captions=st.lists(st.one_of(TEXT, st.none()), min_size=1, max_size=8),
       queries=st.lists(st.lists(ALPHABET, max_size=4).map("".join), min_size=1, max_size=10),
       case_sensitive=st.booleans())
def test_adversarial_strings_agree_with_oracle(captions, queries, case_sensitive):
    fast = QueryMatcher(queries, case_sensitive).match_lists(captions)
    assert fast == [reference_match(c, queries, case_sensitive) for c in captions]
