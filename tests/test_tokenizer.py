"""clip_core.tokenizer gives exactly OpenAI's `clip.tokenize` ids (the installed reference is the oracle)."""
import json
import pickle
import random
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from openai_reference import openai_clip_module  # noqa: E402

from clip_core import tokenizer as T  # noqa: E402
from clip_core.tokenizer import ContextLengthError, SimpleTokenizer, tokenize  # noqa: E402

PROSE = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk, counting 117 steps "
    "as his father had done before him. From the lamp room he could see the fishing boats returning, "
    "their wakes drawn in white chalk across the grey water.",
    "Mr. O'Neill's bakery, on the corner of 5th Ave. & Main St., sells croissants for $3.50 each -- "
    "or 3 for $9 -- and it's open 24/7 (except on holidays). Don't be late; they're usually sold out by 10:30am!",
    "We've tested the model on 1,000,000 images; you'll find the results (accuracy: 76.2%, top-5: 93.1%) "
    "in Table 2. I'm fairly sure he'd agree that the U.S.-based e-mail survey [n=412] wasn't representative.",
    "A close-up photo of a golden retriever puppy chewing a red rubber ball on a freshly mown lawn.",
    "THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG... AGAIN?! #pangram @typist http://example.com/fox?id=42",
    "\"Well,\" she said, 'that's not what I meant.' Then—after a long pause—she laughed.",
]

EDGE_CASES = [
    "",
    " ",
    "Hello, World!!! ... ?!?! ;-) :) <3 (parenthesised) [bracketed] {braced} a/b\\c",
    "it's they're we've I'm you'll he'd can't IT'S THEY'RE 'S 'T 'RE 'ſ",
    "3.14159 2024-01-01 1e-9 +44 (0)20 7946 0958 ½ ² ٣ 五 Ⅻ",
    "😀 👍🏽 🇫🇷 👨‍👩‍👧 ❤️ emoji at the end 🎉",
    "我爱北京天安门。日本語のテキスト、カタカナ。한국어 문장입니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "Привет, мир! Съешь же ещё этих мягких французских булок.",
    "Ελληνικά κείμενα και ΚΕΦΑΛΑΙΑ, עברית, हिन्दी, ภาษาไทย",
    "fish &amp; chips &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A; &amp;amp;lt;",
    "<b>tag kept</b> &amp; entity",
    "cafÃ© naÃ¯ve â€œsmartâ€\x9d quotes Ã¼ber",  # UTF-8 read as Windows-1252
    "ﬁne ﬂower ＬＯＵＤ　ＮＯＩＳＥＳ “curly” ‘quotes’",
    "  lots   of\tspaces\n\nand\r\nnewlines\x0b\x0cand\u00a0nbsp\u2028sep   ",
    "control\x00chars\x07here\x1b[31mred\x1b[0m\x7f",
    "<|startoftext|> literal specials <|endoftext|> <|ENDOFTEXT|> <|endoftext",
    "a" * 300,
    "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
    "\ud800 lone surrogate",
]


@pytest.fixture(scope="module")
def reference():
    return openai_clip_module()


@pytest.fixture(scope="module")
def tok():
    return T.default_tokenizer()


def assert_same(reference, texts, context_length=77, truncate=False):
    ours = tokenize(texts, context_length, truncate)
    theirs = reference.tokenize(texts, context_length, truncate)
    assert ours.dtype == theirs.dtype == torch.int32
    assert ours.shape == theirs.shape
    mismatched = [i for i in range(len(ours)) if not torch.equal(ours[i], theirs[i])]
    assert not mismatched, f"rows differ: {mismatched[:5]}, e.g. {texts[mismatched[0]]!r}"


def clip_prompts() -> list[str]:
    prompts = json.loads((files("clip_core") / "assets" / "clip_prompts.json").read_text())
    assert len(prompts) == 27
    texts = []
    for dataset in prompts.values():
        templates = dataset["templates"]
        for template in {templates[0], templates[len(templates) // 2], templates[-1]}:
            texts += [template.format(c) for c in dataset["classes"]]
    return texts


def test_vocabulary_matches_openai(tok, reference):
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    assert tok.encoder == reference._tokenizer.encoder
    assert tok.bpe_ranks == reference._tokenizer.bpe_ranks


def test_prose(reference):
    assert_same(reference, PROSE)


def test_clip_prompts_of_all_datasets(reference):
    texts = clip_prompts()
    assert len(texts) > 5000
    assert_same(reference, texts)


@pytest.mark.parametrize("text", EDGE_CASES)
def test_edge_cases(reference, text):
    assert_same(reference, [text], truncate=True)


def test_single_string_and_empty_batch(reference):
    assert tokenize("a dog").shape == (1, 77)
    assert_same(reference, "a dog")
    assert tokenize([]).shape == (0, 77)
    assert torch.equal(tokenize("").flatten()[:3], torch.tensor([49406, 49407, 0], dtype=torch.int32))


@pytest.mark.parametrize("context_length", [1, 2, 8, 77, 128])
def test_truncation_keeps_eot_last(reference, context_length):
    long_text = " ".join(PROSE * 3)
    assert_same(reference, [long_text, "short", long_text.upper()], context_length, truncate=True)
    ids = tokenize(long_text, context_length, truncate=True)[0]
    assert ids[-1] == 49407


def test_exactly_full_row_fits():
    assert tokenize("a " * 75)[0, -1] == 49407  # 75 words + sot + eot = 77
    with pytest.raises(ContextLengthError):
        tokenize("a " * 76)


def test_too_long_names_the_text():
    long_text = "A dog " * 50
    with pytest.raises(ContextLengthError, match=r"texts\[1\] \('A dog A dog") as info:
        tokenize(["fine", long_text])
    assert "102 tokens" in str(info.value) and "context_length=77" in str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value, ValueError)  # as OpenAI, and as it should


@pytest.mark.parametrize("bad", [None, b"bytes", 3])
def test_non_string_raises_type_error_naming_index(bad):
    with pytest.raises(TypeError, match=r"texts\[2\]"):
        tokenize(["a", "b", bad])


def test_non_sequence_raises_type_error(tok):
    for bad in (None, b"bytes"):
        with pytest.raises(TypeError, match="texts must be"):
            tokenize(bad)
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(None)


@pytest.mark.parametrize("text", PROSE[:4] + ["a photo of a dog.", "naïve café: 东京 & москва"])
def test_decode_round_trip(tok, text):
    clean = T.clean_text(text)
    ids = tok.encode(clean)
    decoded = tok.decode(ids)
    assert "".join(decoded.split()) == "".join(clean.split())  # word ends become spaces
    assert tok.encode(decoded) == ids


def test_decode_matches_openai(tok, reference):
    ids = tokenize(PROSE[1] + " 😀 我爱", context_length=128)[0].tolist()
    assert tok.decode(ids) == reference._tokenizer.decode(ids)


def test_ascii_fast_paths_match_general_paths():
    # Reference beside the fast one: ftfy/unescape cleaning and the Unicode regex.
    rng = random.Random(0)
    printable = "".join(chr(c) for c in range(0x20, 0x7F) if c != ord("&")) + "\t\n\r"
    everything = "".join(map(chr, range(128))) + "'s'ts<|endoftext|>"
    for _ in range(3000):
        text = "".join(rng.choices(printable, k=rng.randint(0, 40)))
        assert T.clean_text(text) == T._full_clean(text)
        text = "".join(rng.choices(everything, k=rng.randint(0, 40))).lower()
        assert T._ASCII_PRETOKEN.findall(text) == T._PRETOKEN.findall(text)


def test_random_unicode_matches_openai(tok, reference):
    rng = random.Random(1)
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x6FF), (0x2000, 0x2BFF), (0x3000, 0x9FFF), (0x1F300, 0x1FAFF), (0, 0x10FFFF)]
    for _ in range(500):
        chars = [chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 30))]
        text = "".join(c if not 0xD800 <= ord(c) < 0xE000 else "?" for c in chars)
        assert tok.encode(text) == reference._tokenizer.encode(text), repr(text)


def test_property_random_text_matches_openai(tok, reference):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(strategies.text(max_size=60))
    def same_ids(text):
        assert tok.encode(text) == reference._tokenizer.encode(text)

    same_ids()


def test_small_cache_and_pickle_give_same_ids(tok):
    small = SimpleTokenizer(cache_size=2)
    assert small.encode(PROSE[2]) == tok.encode(PROSE[2])
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(PROSE), tok(PROSE))


def test_default_tokenizer_is_shared():
    assert T.default_tokenizer() is T.default_tokenizer()
