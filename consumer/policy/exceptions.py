"""The policy layer's errors, each `Fatal` in the consumer's family (`consumer.errors`): a policy,
route or labelled-data file that cannot be used stops the command that loads it (exit 2 at
start; a reload that meets one keeps the policies in force and says why). They stay
`ValueError`s too, as callers have caught them."""

from __future__ import annotations

from consumer.errors import Fatal


class PolicyError(Fatal, ValueError):
    """A policy file that cannot be used; the message starts with `file:line:`."""


class RoutingError(Fatal, ValueError):
    """Routes that name policies which do not exist."""


class DataError(Fatal, ValueError):
    """A labelled-data file that cannot be read; the message names the line."""
