"""The Gemma tokenizer built from the GGUF: encoding, BOS, decoding and streaming detokenization."""

import pathlib

import pytest

from engine.tokenizer import IncrementalDetokenizer

TEXTS = ["The capital of France is", "  two leading spaces,  and double", "naïve café — 東京タワー",
         "emoji 🤖🚀 and a family 👨‍👩‍👧", "line one\n\nline two\tTabbed", "x = [1, 2, 3]; print(x ** 2)"]
# A rare character the vocabulary lacks, so it is spelled with byte-fallback tokens.
RARE = "\U00010348\U00011000"  # Gothic hwair, Brahmi sign candrabindu


def test_known_encoding_with_bos(tokenizer):
    assert tokenizer.encode("The capital of France is") == [2, 818, 5279, 529, 7001, 563]
    assert tokenizer.encode("The capital of France is", add_bos=False) == [818, 5279, 529, 7001, 563]
    assert tokenizer.bos_token_id == 2
    assert 1 in tokenizer.eos_token_ids
    assert tokenizer.vocab_size == 262_144


@pytest.mark.parametrize("text", TEXTS + [RARE])
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids) == text


def test_special_tokens_are_single_ids_and_skippable(tokenizer):
    ids = tokenizer.encode("<start_of_turn>user\nhi<end_of_turn>", add_bos=False)
    assert ids[0] == 105 and ids[-1] == 106
    assert tokenizer.decode(ids) == "user\nhi"
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<start_of_turn>user\nhi<end_of_turn>"


def test_rare_characters_use_byte_fallback(tokenizer):
    ids = tokenizer.encode(RARE, add_bos=False)
    byte_tokens = [i for i in ids if 0 <= i - tokenizer.token_to_id("<0x00>") < 256]
    assert len(byte_tokens) >= 4


@pytest.mark.parametrize("text", TEXTS + [RARE, "a" + RARE + "é🤖 z"])
def test_incremental_detokenizer_streams_whole_characters(tokenizer, text):
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_incremental_detokenizer_holds_back_a_partial_character(tokenizer):
    ids = tokenizer.encode(RARE[0], add_bos=False)
    assert len(ids) == 4  # four UTF-8 bytes, one token each
    detok = IncrementalDetokenizer(tokenizer)
    assert [detok.push([i]) for i in ids] == ["", "", "", RARE[0]]


@pytest.mark.parametrize("text", TEXTS + [RARE, "<start_of_turn>user\nhi<end_of_turn>",
                                  pathlib.Path(__file__).read_text() * 3 + " héllo 🤖 你好\n\n"])
def test_encode_gives_the_ids_of_the_librarys_full_encode(tokenizer, text):
    """encode() takes the library's offset-free batch path; the ids are those of its plain encode()."""
    full = tokenizer._tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.encode(text, add_bos=False) == full
    assert tokenizer.encode(text) == [tokenizer.bos_token_id, *full]
