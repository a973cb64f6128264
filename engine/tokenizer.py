"""Gemma's tokenizer, rebuilt from the GGUF with the `tokenizers` library.

The GGUF stores a SentencePiece-BPE vocabulary ("llama" model): tokens, scores and token types,
but no merges. SentencePiece BPE repeatedly joins the adjacent pair whose joined piece ranks
best; a `tokenizers` BPE does the same given merges ranked by the piece they make. Gemma's
pieces are ranked by their position in the vocabulary, so every split of a piece into two
in-vocabulary halves becomes a merge ranked by that piece's id (longer left half first).

Other details: spaces become "▁" with no prefix space, unknown bytes fall back to <0xNN> tokens,
control tokens (<bos>, <start_of_turn>, ...) are special, user-defined tokens ("\n\n", "<b>", ...)
match whole, and pieces made only of spaces are spelled with "▁" as the normalized text is.
Building takes ~20 s, so prepare() does it once and saves tokenizer.json.
"""

import functools
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

_CONTROL, _USER_DEFINED = 3, 4


def build_tokenizer_json(gguf_path: Path | str, out_path: Path | str) -> None:
    import gguf
    fields = gguf.GGUFReader(str(gguf_path)).fields
    tokens = [_spell_spaces(t) for t in fields["tokenizer.ggml.tokens"].contents()]
    token_types = fields["tokenizer.ggml.token_type"].contents()
    unk = tokens[fields["tokenizer.ggml.unknown_token_id"].contents()]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=_merges_by_rank(tokens, vocab), unk_token=unk,
                                     fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                  for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False)
                          for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED and "▁" not in t])
    tokenizer.save(str(out_path))


def _spell_spaces(token: str) -> str:
    return "▁" * len(token) if token and not token.strip(" ") else token


def _merges_by_rank(tokens: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    merges = []
    for piece in tokens:
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((left, right))
    return merges


class Tokenizer:
    """Text <-> token ids. BOS is prepended by default, as the model expects."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, bos_token_id: int = 2, eos_token_ids: tuple[int, ...] = (1, 106)):
        self._tokenizer = tokenizer
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @functools.cached_property
    def max_token_chars(self) -> int:
        """Characters of the longest vocabulary entry: no token covers more text, so a text longer
        than n * max_token_chars cannot fit in n tokens (checked before tokenizing it)."""
        return max(len(token) for token in self._tokenizer.get_vocab(with_added_tokens=True))

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of text. The library's batch-of-one "fast" encode computes no character
        offsets (the router needs none): 30% less time than its encode() at 1 KB, the same ids.
        It also releases the GIL while it works, so a long prompt tokenized on another thread
        does not stall the caller's."""
        ids = self.encode_many([text])[0]
        return [self.bos_token_id, *ids] if add_bos else ids

    def encode_many(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text, without BOS, in one batch call (the library spreads it over the
        cores and releases the GIL)."""
        return [encoding.ids for encoding in self._tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def vocabulary(self) -> list[str]:
        """Every token's text as the model sees it (spaces spelled "▁"), added tokens included."""
        return list(self._tokenizer.get_vocab(with_added_tokens=True))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text.

    `push(ids)` returns only newly completed text: a trailing incomplete UTF-8 character (byte
    fallback tokens arrive one byte at a time) is held back until it completes. The concatenation
    of all pushes equals `tokenizer.decode(all_ids)` once the stream ends on a complete character.
    Decoding re-reads the ids from the last emitted boundary, so a step costs O(tokens since then).
    (A stream whose text really ends in U+FFFD holds that character back until more text follows.)
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # ids before this are emitted and never re-read

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids[self._prefix_offset:], self._skip_special_tokens)
        if text.endswith("\ufffd"):  # an incomplete character: wait for its remaining bytes
            return ""
        # Gemma's decoder is context-free (no prefix-space stripping), so text decoded up to a
        # complete character never changes: emit it and restart from here.
        self._prefix_offset = len(self._ids)
        return text


def load_tokenizer(path: Path | str | None = None) -> Tokenizer:
    """The tokenizer from tokenizer.json (default: the one prepare() builds)."""
    if path is None:
        from engine.weights import prepare
        path = prepare().tokenizer_path
    return Tokenizer(tokenizers.Tokenizer.from_file(str(path)))
