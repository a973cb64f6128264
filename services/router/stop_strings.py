"""Stop strings on a text stream (OpenAI's `stop`), applied by the HTTP front.

Invariant: the concatenation of everything `push` returns (and `flush` at a natural end) is the
stream's text up to, not including, the first occurrence of any stop string. Text that might be
the start of a stop string is held back until the next delta decides; nothing else is delayed.
"""


class StopMatcher:
    def __init__(self, stops: list[str]):
        self._stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to emit now. Sets `stopped` once a stop string appears (emit what is returned, then end)."""
        if not self._stops:
            return delta
        text = self._pending + delta
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[:min(hits)]
        held = self._held_suffix(text)
        self._pending = text[len(text) - held:] if held else ""
        return text[:len(text) - held]

    def flush(self) -> str:
        """Held-back text, at the natural end of the stream (it did not turn into a stop string)."""
        text, self._pending = self._pending, ""
        return text

    def _held_suffix(self, text: str) -> int:
        longest = max(len(s) for s in self._stops) - 1
        for size in range(min(longest, len(text)), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stops):
                return size
        return 0
