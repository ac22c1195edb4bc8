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

Cost: an Aho-Corasick automaton over the stop strings (built once per distinct set, shared by
the requests that use it) is walked one character at a time, and its state persists between
pushes. Its state is the longest suffix of the stream that is a prefix of some stop string,
which is exactly the text to hold back. So a push costs O(its text), whatever the number or
length of the stop strings; nothing is rescanned. (The PyPI automata, pyahocorasick among them,
match whole strings only and cannot resume mid-stream, which a token stream needs.)
tests/service/engine/test_stop_strings.py checks it against a from-the-definition reference.
"""
from __future__ import annotations

from collections import deque
from functools import lru_cache


class _Automaton:
    """Aho-Corasick over a set of strings: a trie whose every state also knows its failure link
    and the longest string that ends there (itself, or a suffix reached through failure links)."""

    __slots__ = ("goto", "fail", "depth", "match")

    def __init__(self, words: tuple[str, ...]):
        self.goto: list[dict[str, int]] = [{}]
        self.depth = [0]
        self.match: list[str | None] = [None]  # the longest word ending at this state
        for word in words:
            state = 0
            for ch in word:
                nxt = self.goto[state].get(ch)
                if nxt is None:
                    nxt = self.goto[state][ch] = len(self.goto)
                    self.goto.append({})
                    self.depth.append(self.depth[state] + 1)
                    self.match.append(None)
                state = nxt
            self.match[state] = word
        self.fail = [0] * len(self.goto)
        queue = deque(self.goto[0].values())
        while queue:  # breadth first: a state's failure target is shallower, so already done
            state = queue.popleft()
            for ch, nxt in self.goto[state].items():
                f = self.fail[state]
                while f and ch not in self.goto[f]:
                    f = self.fail[f]
                target = self.goto[f].get(ch, 0)
                self.fail[nxt] = target if target != nxt else 0
                if self.match[nxt] is None:
                    self.match[nxt] = self.match[self.fail[nxt]]
                queue.append(nxt)

    def step(self, state: int, ch: str) -> int:
        goto, fail = self.goto, self.fail
        while state and ch not in goto[state]:
            state = fail[state]
        return goto[state].get(ch, 0)


@lru_cache(maxsize=256)
def _automaton(stop: tuple[str, ...]) -> _Automaton:
    return _Automaton(stop)


class StopStringMatcher:
    __slots__ = ("_stop", "_automaton", "_state", "_held", "matched")

    def __init__(self, stop: tuple[str, ...]):
        if any(not s for s in stop):
            raise ValueError("stop strings must not be empty")
        self._stop = tuple(dict.fromkeys(stop))  # duplicates removed, order kept
        self._automaton = _automaton(self._stop) if self._stop else None
        self._state = 0      # automaton state: len(self._held) == its depth
        self._held = ""
        self.matched: str | None = None  # the stop string that ended the stream, if any

    @property
    def finished(self) -> bool:
        return self.matched is not None

    def push(self, text: str) -> tuple[str, bool]:
        """New text in -> (text safe to show now, whether a stop string matched)."""
        if self.matched is not None:
            return "", True
        automaton = self._automaton
        if automaton is None:
            return text, False
        buffer = self._held + text
        # Every match ends in the new text (before it, none was complete), so walking the new
        # text finds them all; the longest one ending at a position starts earliest there.
        base, state = len(self._held), self._state
        best_start, best = len(buffer), None
        for i, ch in enumerate(text):
            state = automaton.step(state, ch)
            word = automaton.match[state]
            if word is not None and base + i + 1 - len(word) < best_start:
                best_start, best = base + i + 1 - len(word), word
        if best is not None:
            self._held, self._state = "", 0
            self.matched = best
            return buffer[:best_start], True
        keep = automaton.depth[state]
        self._state = state
        self._held = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, at a finish that is not a stop-string match."""
        held, self._held, self._state = self._held, "", 0
        return "" if self.matched is not None else held
