"""What the cascade keeps of texts it met before, where no reasoner's verdict is cached for them:
values by a text's cache digest (`cache.cache_key`'s last part), per state (what the values
depend on besides the text), within a bound.

`stage.ScoreMemo` keeps heads' scores, per set of weights; `cache.UndecidedAnswers` keeps
undecided answers, per policy version and the weights of its stages. Both hold a digest only for
a text whose features it stands for (`cascade._memo_digests`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

V = TypeVar("V")


class KeptByDigest(Generic[V]):
    """Values by digest, per state. At most `max_entries` values and states are held (a state
    counts too: new weights come with every online update of a head); beyond, all are dropped and
    it starts again."""

    def __init__(self, max_entries: int):
        self._by_state: dict[Hashable, dict[bytes, V]] = {}
        self._entries = 0
        self._max_entries = max_entries

    def __len__(self) -> int:
        return self._entries

    def known(self, state: Hashable) -> dict[bytes, V]:
        """The values held in this state, by digest (read only: `remember` adds to them)."""
        return self._by_state.get(state, _NONE_KNOWN)

    def remember(self, state: Hashable, fresh: dict[bytes, V]) -> None:
        """Keep these new values in this state."""
        known = self._by_state.get(state)
        if self._entries + len(fresh) + (known is None) > self._max_entries:
            self._by_state.clear()
            self._entries = 0
            known = None
        if known is None:
            known = self._by_state[state] = {}
            self._entries += 1
        held = len(known)
        known.update(fresh)
        self._entries += len(known) - held


_NONE_KNOWN: dict[bytes, Any] = {}  # a state nothing is held for (never written)
