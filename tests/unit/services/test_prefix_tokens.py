"""The router's prefix token cache: exactly the tokenizer's ids, with shared prefixes served from the cache."""

import pathlib
import random

import pytest

from services.router.prefix_tokens import PrefixTokenCache, safe_splits, vocabulary_joiners

README = (pathlib.Path(__file__).parents[3] / "README.md").read_text()
# Every kind of text next to a space that could matter: runs of spaces, ">" before a space (the
# vocabulary's one piece that joins a character to "▁" is ">▁</"), markup, newlines and tabs,
# added tokens, byte-fallback characters, text with no spaces at all.
FRAGMENTS = ["<b> </b>", "<p> </p>", "a> </b", "a > b", ">  <", "x  ", "   ", "\n\n", "\t", "<start_of_turn>user\n", "<end_of_turn>",
             "naïve café", "東京タワーは高い", "🤖 🚀", "\U00010348 \U00011000", "if (a>b) { return; }", "--> </",
             "word", "Word.", " ", "> ", " >", "x</ y", "▁", "a▁", "▁▁ "]


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    words = README.split(" ")
    out = []
    for _ in range(n):
        parts = [rng.choice(FRAGMENTS) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randrange(20, 400))]
        out.append("".join(p + rng.choice(["", " ", "  ", "\n"]) for p in parts))
    return out


def test_the_vocabulary_joins_only_spaces_and_one_angle_bracket_to_a_following_space(tokenizer):
    # "▁" typed in the text: the normalizer makes a space "▁" too, so "▁" + " " is the piece "▁▁"
    assert vocabulary_joiners(tokenizer.vocabulary()) == {" ", "▁", ">"}


def test_a_typed_space_symbol_before_a_space_is_no_split(tokenizer):
    cache = PrefixTokenCache(tokenizer, chunk_chars=8, min_chars=0)
    text = "aaaa bbb▁ cccc▁  dddd"
    assert 8 not in safe_splits(text, cache.joiners, chunk_chars=8)
    assert cache.encode(text) == cache.encode(text) == tokenizer.encode(text)


def test_an_entry_with_a_space_disables_splitting():
    assert vocabulary_joiners(["ab", "▁c", "d▁e"]) == {" ", "▁", "d"}
    assert vocabulary_joiners(["ab", "two words"]) is None


def test_splits_are_spaces_after_a_non_joiner_about_a_chunk_apart():
    text = "aaaa bbbb>  cccc dddd  eeee ffff"
    splits = safe_splits(text, {" ", ">"}, chunk_chars=8)
    assert splits == [4, 16, 21]  # at 24 the last space, 22, is inside a run of spaces: 21 starts it
    assert safe_splits("aaaa bbb> cccc", {" ", ">"}, chunk_chars=10) == [4]  # not 9, right after ">"
    assert all(text[i] == " " and text[i - 1] not in " >" for i in splits)
    assert safe_splits("no-spaces-at-all-here", {" "}, chunk_chars=4) == []
    # a prefix shared by two texts gets the same splits
    assert safe_splits(text + " and more", {" ", ">"}, chunk_chars=8)[:3] == splits


@pytest.mark.parametrize("chunk_chars", [8, 64, 1024])
def test_ids_equal_the_tokenizers_on_varied_texts(tokenizer, chunk_chars):
    cache = PrefixTokenCache(tokenizer, chunk_chars=chunk_chars, min_chars=0)
    for text in _texts(chunk_chars, 40):
        assert cache.encode(text) == tokenizer.encode(text)
        assert cache.encode(text, add_bos=False) == tokenizer.encode(text, add_bos=False)
    assert cache.hit_chars > 0  # the second encode of each text came from the cache


def test_a_shared_prefix_is_served_from_the_cache_and_the_rest_tokenized(tokenizer):
    cache = PrefixTokenCache(tokenizer, chunk_chars=256)
    system = " ".join(_texts(1, 12))
    assert len(system) > 4 * cache.min_chars
    first = system + " First question: what is the capital of France?"
    second = system + " Second one >  </b> entirely different."
    assert cache.encode(first) == tokenizer.encode(first)
    cached_before = cache.hit_chars
    assert cache.encode(second) == tokenizer.encode(second)
    served = cache.hit_chars - cached_before
    assert len(system) - 256 <= served <= len(system)  # all of the shared prefix but the last partial chunk


def test_short_prompts_bypass_the_cache_and_size_0_turns_it_off(tokenizer):
    cache = PrefixTokenCache(tokenizer)
    assert cache.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    off = PrefixTokenCache(tokenizer, max_tokens=0)
    long_text = _texts(3, 1)[0] * 4
    assert off.encode(long_text) == off.encode(long_text) == tokenizer.encode(long_text)
    assert cache.hit_chars == cache.missed_chars == off.hit_chars == off.missed_chars == 0


def test_the_cache_holds_at_most_max_tokens(tokenizer):
    cache = PrefixTokenCache(tokenizer, chunk_chars=64, min_chars=0, max_tokens=500)
    for text in _texts(7, 20):
        assert cache.encode(text) == tokenizer.encode(text)
        assert cache._tokens <= 500
    assert sum(len(ids) for ids in cache._chunks.values()) == cache._tokens
