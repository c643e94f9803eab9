"""The registry of stage names: which stage decided a result (`Classification.stage`, a verdict's
`results[].stage`), the one list every other module reads.

A stage name is written here and nowhere else: the cascade counts and names its decisions with
these, its settings switch the cheap ones on and off by these, and review tells the reasoner's
own answers from the others' by these. `tests/test_architecture.py` fails when a module compares
a stage, or names one, with a literal, and when the cascade's settings lack a switch for a
switchable stage. Adding a cascade stage starts here. At the bottom of the layers, beside the
output contract (`consumer.events`), so that the settings below `classify` may read it too.
"""

from __future__ import annotations

from typing import Final

CACHE: Final = "cache"  # an answer given before, repeated (also a copy of content decided in the same batch)
LEXICAL: Final = "lexical"  # hashed n-grams + a calibrated logistic head
EMBEDDING: Final = "embedding"  # sentence embeddings + a calibrated logistic head
REASONER: Final = "reasoner"  # gpt-oss-safeguard (or the classifier the cascade escalates to)
UNDECIDED: Final = "undecided"  # no stage reached the target precision and no reasoner was there to ask
HUMAN: Final = "human"  # a person's decision, learned from review

# The cheap learned stages, in the order the cascade asks them.
LEARNED: Final = (LEXICAL, EMBEDDING)
# The stages a policy can switch on and off (`cascade:` settings, per policy too).
SWITCHABLE: Final = (CACHE, *LEARNED)
# What the cascade counts its decisions by, per policy.
CASCADE: Final = (CACHE, *LEARNED, REASONER, UNDECIDED)
# Every stage name a result may carry.
ALL: Final = (*CASCADE, HUMAN)
# Answers that are not the reasoner's own: its confidence tiers do not apply to them.
NOT_REASONER: Final = frozenset(ALL) - {REASONER}
