"""Stop strings over a text stream: cut at the first stop string, never show any part of one.

The matcher sits after the detokenizer. Each `push` takes newly printable text and returns the
part of it that can be shown now, plus whether a stop string has matched. Text that could still
be the start of a stop string (a suffix of the stream that is a proper prefix of one) is held back
until the next push rules it in or out; `flush` releases it when the request ends for another
reason (EOS, max_tokens). When a stop string matches, everything from its first character on is
dropped and the matcher is finished.

Which stop string wins: matching is decided at the first push that completes any stop string;
among the stop strings complete in the text seen so far, the one that starts earliest wins, and
the shown text ends right before it.
"""
from __future__ import annotations


class StopStringMatcher:
    __slots__ = ("_stop", "_held", "matched")

    def __init__(self, stop: tuple[str, ...]):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = tuple(dict.fromkeys(stop))  # duplicates removed, order kept
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the stream, if any

    @property
    def finished(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> tuple[str, bool]:
        """New text in -> (text safe to show now, whether a stop string matched)."""
        if self.matched is not None:
            return "", True
        if not self._stop:
            return text, False
        buffer = self._held + text
        # A match must end in the new text (the held part is a proper prefix of a stop string),
        # and it starts at or after the held part, so searching `buffer` finds every candidate.
        best: tuple[int, str] | None = None
        for s in self._stop:
            at = buffer.find(s)
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is not None:
            self._held = ""
            self.matched = best[1]
            return buffer[:best[0]], True
        keep = self._longest_pending_suffix(buffer)
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at a finish that is not a stop-string match."""
        held, self._held = self._held, ""
        return "" if self.matched is not None else held

    def _longest_pending_suffix(self, buffer: str) -> int:
        """Length of the longest suffix of `buffer` that is a proper prefix of some stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(buffer)), longest, -1):
                if buffer.endswith(s[:n]):
                    longest = n
                    break
        return longest
