"""Tokenizing long prompts that share a prefix with earlier ones: the shared part comes from a cache.

Chat and RAG traffic repeats long prefixes (a system prompt, a document) in text, and the router
tokenizes every text prompt before placement: ~0.3 ms per KB here, 16-20 ms for 64 KB. The cache
cuts a prompt into chunks of about CHUNK_CHARS at *safe splits*, keys each chunk by a digest
chained over every chunk before it (as the engine chains block hashes), and keeps each chunk's
token ids. A new prompt takes the ids of its longest cached chain of chunks and tokenizes only
the rest.

A safe split is a position i where text[i] is a space whose previous character can never join it in
one token. Gemma's normalizer spells spaces "▁" and its BPE pieces join a character to a following
"▁" only for a few characters (the vocabulary's "joiners": "▁" itself, for runs of spaces, and ">"
for the piece ">▁</"), and no added token contains a space. A "▁" typed in the text reads as a
space once normalized, so it joins a following space as a space does. So no token, and no BPE
merge, crosses a safe split, and tokenizing the two sides apart gives exactly the ids of tokenizing
the whole: the ids are the uncached tokenizer's, token for token, not an approximation (a test
checks this on real texts). The joiners are computed from the vocabulary when the cache is built; a
vocabulary where an added token contains a space disables the cache.

llm-d's KV-cache manager keeps a similar prefix store for its scorer, where approximate tokens
only blur a score; here the ids go on to the workers, hence exact splits only.
"""

import hashlib
import threading
from array import array
from collections import OrderedDict

from services.common.metrics import PROMPT_TEXT_CHARS

CHUNK_CHARS = 1024  # about 250 tokens of English per cached chunk
MIN_CHARS = 2 * CHUNK_CHARS  # shorter prompts tokenize directly: nothing to save
MAX_CACHED_TOKENS = 1 << 20  # LRU bound: ~4 MiB of ids


def vocabulary_joiners(vocab) -> set[str] | None:
    """Characters that some token joins to a following space (as raw text: "▁" reads " "; a space,
    and a "▁" in the text, always join), or None when an entry contains a space where splitting at
    spaces cannot be safe (an added token)."""
    joiners = set()
    for piece in vocab:
        if " " in piece:
            return None
        for j in range(1, len(piece)):
            if piece[j] == "▁" and piece[j - 1] != "▁":
                joiners.add(piece[j - 1])
    return joiners | {" ", "▁"}


def safe_splits(text: str, joiners: set[str], chunk_chars: int = CHUNK_CHARS) -> list[int]:
    """Positions, about chunk_chars apart, where the text can be tokenized in two independent parts:
    for each multiple of chunk_chars, the last space at or before it whose previous character is
    not a joiner. Each position depends only on the text before it (and the character at it), so
    two prompts sharing a prefix share its splits."""
    splits, previous = [], 0
    for target in range(chunk_chars, len(text), chunk_chars):
        position = text.rfind(" ", previous + 1, target + 1)
        while position > previous and text[position - 1] in joiners:
            position = text.rfind(" ", previous + 1, position)
        if position > previous:
            splits.append(position)
            previous = position
    return splits


class PrefixTokenCache:
    """tokenizer.encode with long shared prefixes served from an LRU of at most max_tokens chunk
    ids (0: off, every prompt tokenized whole). Thread-safe."""

    def __init__(self, tokenizer, chunk_chars: int = CHUNK_CHARS, min_chars: int = MIN_CHARS,
                 max_tokens: int = MAX_CACHED_TOKENS) -> None:
        self._tokenizer = tokenizer
        self.chunk_chars, self.min_chars, self.max_tokens = chunk_chars, min_chars, max_tokens
        self.joiners = vocabulary_joiners(tokenizer.vocabulary())
        self.enabled = self.joiners is not None and max_tokens > 0
        self._chunks: OrderedDict[bytes, array] = OrderedDict()
        self._tokens = 0
        self._lock = threading.Lock()
        self.hit_chars = self.missed_chars = 0  # text served from the cache / tokenized

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        if not self.enabled or len(text) < self.min_chars:
            return self._tokenizer.encode(text, add_bos)
        splits = safe_splits(text, self.joiners, self.chunk_chars)
        bounds = [0, *splits]
        keys, digest = [], b""
        for start, end in zip(bounds, splits):
            digest = hashlib.blake2b(text[start:end].encode(), key=digest, digest_size=16).digest()
            keys.append(digest)
        ids = [self._tokenizer.bos_token_id] if add_bos else []
        cached = 0
        with self._lock:
            for key in keys:
                chunk = self._chunks.get(key)
                if chunk is None:
                    break
                self._chunks.move_to_end(key)
                ids.extend(chunk)
                cached += 1
        pieces = [text[start:end] for start, end in zip(bounds[cached:], [*splits[cached:], len(text)])]
        encoded = self._tokenizer.encode_many(pieces)
        for piece_ids in encoded:
            ids.extend(piece_ids)
        PROMPT_TEXT_CHARS.labels("cache").inc(bounds[cached])
        PROMPT_TEXT_CHARS.labels("tokenized").inc(len(text) - bounds[cached])
        with self._lock:
            self.hit_chars += bounds[cached]
            self.missed_chars += len(text) - bounds[cached]
            for key, piece_ids in zip(keys[cached:], encoded):  # the tail after the last split stays out
                self._chunks[key] = array("I", piece_ids)
                self._tokens += len(piece_ids)
            while self._tokens > self.max_tokens and self._chunks:
                self._tokens -= len(self._chunks.popitem(last=False)[1])
        return ids
