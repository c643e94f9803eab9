"""Harmony prompts for gpt-oss-safeguard: (policy, event) to token ids.

Layout, as the model's guide prescribes:
- system: harmony's default identity and the policy's reasoning effort. No conversation
  date and nothing else that varies per request, so that every request of a policy starts
  with the same tokens;
- developer: the policy text;
- user: the content under review. When the event carries conversation context, the user
  message is a JSON object that keeps the earlier messages apart from the message under
  review, so no text inside a message can pretend to start or end another one.

System plus developer form a prefix shared by all requests of a policy, which vLLM's
automatic prefix caching computes once. Text written by users is encoded as ordinary text:
the rendering is checked to hold exactly the control tokens of its own message frames, so
a message containing `<|start|>`, `<|channel|>`, `<|message|>`, `<|end|>`, `<|return|>` or
`<|call|>` cannot open, close or answer a turn.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from openai_harmony import (
    Conversation,
    DeveloperContent,
    HarmonyEncoding,
    Message,
    ReasoningEffort,
    Role,
    SystemContent,
)

from consumer.classify.engine.content import CONTEXT_PREAMBLE, user_text
from consumer.classify.engine.vocab import harmony_encoding
from consumer.events import ContentEvent
from consumer.policy import Policy

# user_text and its preamble live in content.py (no harmony there); re-exported for callers of this module.
__all__ = ["CONTEXT_PREAMBLE", "PromptError", "PromptPreview", "PromptRenderer", "user_text"]

# Each rendered message is framed by <|start|> ... <|message|> ... <|end|>, and the prompt ends
# with <|start|> to open the assistant's turn: 3 control tokens a message, plus one.
_FRAME_CONTROL_TOKENS = 3
# Prefixes are keyed by what they are made of (text and effort), so communities that share a
# policy's text share one entry; least recently used first out. About 20 KB an entry.
MAX_CACHED_PREFIXES = 1024
_EFFORT = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}


class PromptError(ValueError):
    """A rendering that would break the harmony framing (never expected; checked to be sure)."""


@dataclass(frozen=True)
class PromptPreview:
    """A rendered prompt as text, for people: `policy render` shows it."""

    text: str
    tokens: int
    policy_prefix_tokens: int  # tokens every request of this policy shares


class PromptRenderer:
    """Renders classification prompts in harmony.

    Guarantees: (1) two requests of the same policy share every token up to the end of the
    developer message; (2) no control-token id comes from the policy text or from user
    content (checked on every rendering; PromptError otherwise).
    """

    def __init__(self, encoding: HarmonyEncoding | None = None) -> None:
        self._encoding = encoding or harmony_encoding()
        self._control_ids = frozenset(
            self._encoding.encode(token, allowed_special="all")[0] for token in self._encoding.special_tokens_set
        )
        self._prefixes: OrderedDict[tuple[str, str], list[int]] = OrderedDict()  # (effort, text) -> token ids
        self._assistant_opening = self._encoding.render_conversation_for_completion(
            Conversation.from_messages([]), Role.ASSISTANT
        )

    @property
    def encoding(self) -> HarmonyEncoding:
        return self._encoding

    def render(self, policy: Policy, event: ContentEvent) -> list[int]:
        """Token ids of the whole prompt, ending with the opening of the assistant's turn.

        The same tokens as rendering the three messages as one conversation for completion
        (a test holds it to that), but the policy prefix is encoded once per policy text and
        effort: encoding a 600-token policy for every request cost five times the rest.
        """
        key = (policy.reasoning_effort, policy.text)
        prefix = self._prefixes.get(key)
        if prefix is None:
            if len(self._prefixes) >= MAX_CACHED_PREFIXES:
                self._prefixes.popitem(last=False)
            prefix = self._prefixes[key] = self.policy_prefix(policy)
        else:
            self._prefixes.move_to_end(key)
        token_ids = prefix + self._encoding.render(_user_message(event)) + self._assistant_opening
        self._check_framing(token_ids, 3)
        return token_ids

    def policy_prefix(self, policy: Policy) -> list[int]:
        """Token ids of system + developer: the prefix every request of `policy` starts with."""
        messages = self._policy_messages(policy)
        token_ids = self._encoding.render_conversation(Conversation.from_messages(messages))
        self._check_framing(token_ids, len(messages), opens_turn=False)
        return token_ids

    def preview(self, policy: Policy, event: ContentEvent | None = None) -> PromptPreview:
        """The prompt as text with its token counts; without an event, only the policy prefix."""
        prefix = self.policy_prefix(policy)
        token_ids = prefix if event is None else self.render(policy, event)
        return PromptPreview(
            text=self._encoding.decode(token_ids), tokens=len(token_ids), policy_prefix_tokens=len(prefix)
        )

    def _policy_messages(self, policy: Policy) -> list[Message]:
        system = SystemContent.new().with_reasoning_effort(_EFFORT[policy.reasoning_effort])
        developer = DeveloperContent.new().with_instructions(policy.text)
        return [
            Message.from_role_and_content(Role.SYSTEM, system),
            Message.from_role_and_content(Role.DEVELOPER, developer),
        ]

    def _check_framing(self, token_ids: list[int], messages: int, opens_turn: bool = True) -> None:
        expected = messages * _FRAME_CONTROL_TOKENS + (1 if opens_turn else 0)
        found = sum(1 for token in token_ids if token in self._control_ids)
        if found != expected:
            raise PromptError(
                f"rendered prompt holds {found} control tokens where its {messages} message frames "
                f"account for {expected}: text was encoded as harmony control tokens"
            )


def _user_message(event: ContentEvent) -> Message:
    return Message.from_role_and_content(Role.USER, user_text(event))
