"""Turning token bytes into text for a stream: UTF-8 across token boundaries, stop strings."""

from __future__ import annotations

import codecs


class StopMatcher:
    """Feeds text in, gives out what is safe to emit, and says when a stop string hit.

    Text that could still become the start of a stop string is held back until it
    cannot, so a client never sees part of a stop sequence.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, piece: bytes) -> tuple[str, bool]:
        text = self.pending + self._decoder.decode(piece)
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.pending = ""
                return text[:at], True
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:k]):
                    hold = k
                    break
        self.pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold], False

    def flush(self) -> str:
        text, self.pending = self.pending + self._decoder.decode(b"", final=True), ""
        return text
