"""Incremental detokenization with stop strings, for streaming text out of the engine.

Decoding each new token alone loses what depends on its neighbours (SentencePiece drops the
leading space of a text's first piece; a character split over byte-fallback pieces is incomplete
until its last byte). As in vLLM and HF's TextStreamer, the new text is the difference between
decoding a short window of recent tokens with and without the new ones, and nothing is emitted
while the window ends in an incomplete character (U+FFFD).

Stop strings (OpenAI's `stop`) are matched in the text, across token boundaries: the text is cut
before the first match. While streaming, the last `max(len(stop)) - 1` characters are held back
(they may be the start of a stop string) until more text or the end shows they are not.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence


class IncrementalText:
    """The text of a growing token list. `append(token)` returns True when a stop string matched
    (then `text` ends before it); `take_delta(final)` hands out text not handed out before."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self._decode = decode
        self._stop = tuple(stop)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self._tokens: list[int] = []
        self._prefix = self._read = 0  # window start; tokens before `_read` are already in `text`
        self._sent = 0
        self._stopped = False
        self.text = ""

    def append(self, token: int) -> bool:
        self._tokens.append(int(token))
        return self._advance(final=False)

    def _advance(self, final: bool) -> bool:
        """Move the window over new tokens unless their text ends mid-character (and not `final`)."""
        before = self._decode(self._tokens[self._prefix:self._read])
        after = self._decode(self._tokens[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return False
        start = max(0, len(self.text) - self._hold)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self._tokens)
        found = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if found:
            self.text = self.text[:min(found)]
            self._stopped = True
        return self._stopped

    def take_delta(self, final: bool) -> str:
        """Text not handed out yet; unless `final`, minus a tail that may start a stop string.
        `final` also flushes an incomplete last character (as a full decode shows it)."""
        if final and not self._stopped and self._read < len(self._tokens):
            self._advance(final=True)
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        delta, self._sent = self.text[self._sent:end], end
        return delta
