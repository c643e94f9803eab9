"""The two request shapes of the remote reasoner: what is sent, and how the reply is read.

- `TokenIdShape` (api=completions; vLLM and servers that take token ids): the harmony prompt
  the in-process engine renders, as token ids, to `/completions`; the generated token ids
  come back (vLLM's `return_token_ids`) and go through the same harmony reader. Prompt
  rendering, injection safety (user text is never control tokens), the policy prefix that the
  server's prefix cache reuses, and answer parsing are the in-process engine's own code.
- `ChatShape` (api=chat; hosted providers, any chat-completions server): the policy as the
  system (or developer) message, the content as the user message, the policy's reasoning
  effort as `reasoning_effort`; the provider renders harmony itself and returns the final
  answer as `message.content` and the analysis channel as `message.reasoning` (or
  `reasoning_content`, the older name). The answer is parsed by the same `parse_answer`.

Both produce a `Reply`; neither logs content, policy text or model output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from consumer.classify import ClassifyRequest
from consumer.classify.engine.answer import Channels, CompletionReader
from consumer.classify.engine.content import user_text
from consumer.classify.engine.remote.settings import RemoteSettings

if TYPE_CHECKING:
    from consumer.classify.engine.prompt import PromptRenderer


class BadReply(Exception):
    """The server answered 200 with a body that is not the documented shape."""


@dataclass
class Reply:
    """One finished completion, whichever shape it came in."""

    channels: Channels
    raw_output: str  # the completion as text (harmony markup included for token ids), for dead letters
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_token_ids: list[int] | None = None  # what the server says it received (vLLM's return_token_ids)


@dataclass
class Prepared:
    """A request body ready to send, and what reading its reply needs."""

    path: str
    body: dict[str, Any]
    prompt_tokens: int | None  # known before sending for token ids


class TokenIdShape:
    """Harmony token ids to /completions; the reply's token ids through the harmony reader."""

    path = "/completions"

    def __init__(self, settings: RemoteSettings) -> None:
        from consumer.classify.engine.prompt import PromptRenderer
        from consumer.classify.engine.vocab import harmony_encoding

        self._settings = settings
        self._encoding = harmony_encoding()
        self.renderer: PromptRenderer = PromptRenderer(self._encoding)
        self._stop_token_ids = self._encoding.stop_tokens_for_assistant_actions()

    def prepare(self, request: ClassifyRequest, model: str, max_model_len: int | None) -> Prepared:
        """Raises PromptError (from the renderer) and PromptTooLong."""
        prompt = self.renderer.render(request.policy, request.event)
        max_tokens = self._settings.max_tokens
        if max_model_len is not None:
            room = max_model_len - len(prompt)
            if room < 1:
                raise PromptTooLong(len(prompt), max_model_len)
            max_tokens = min(max_tokens, room)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": self._settings.temperature,
            "stop_token_ids": self._stop_token_ids,
            "skip_special_tokens": False,
            "return_token_ids": True,
        }
        return Prepared(self.path, body, len(prompt))

    def read(self, data: Any, prepared: Prepared) -> Reply:
        try:
            choice = data["choices"][0]
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise BadReply(f"completion reply without choices[0] ({type(exc).__name__})") from None
        token_ids = choice.get("token_ids")
        if token_ids is None:
            # A server without vLLM's return_token_ids: its text, with special tokens kept
            # (skip_special_tokens false), encodes back to the same harmony tokens.
            text = choice.get("text")
            if not isinstance(text, str):
                raise BadReply("completion reply holds neither token_ids nor text")
            token_ids = self._encoding.encode(text, allowed_special="all")
        reader = CompletionReader(self._encoding)
        reader.feed(token_ids)
        details = usage.get("prompt_tokens_details") or {}
        return Reply(
            channels=reader.channels(truncated=choice.get("finish_reason") == "length"),
            raw_output=self._encoding.decode(token_ids),
            prompt_tokens=int(usage.get("prompt_tokens") or prepared.prompt_tokens or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or len(token_ids)),
            prompt_token_ids=choice.get("prompt_token_ids"),
        )


class ChatShape:
    """Chat messages to /chat/completions; the provider's content and reasoning fields back."""

    path = "/chat/completions"

    def __init__(self, settings: RemoteSettings) -> None:
        self._settings = settings

    def prepare(self, request: ClassifyRequest, model: str, max_model_len: int | None) -> Prepared:
        del max_model_len  # the provider renders the prompt, so only it knows its length
        body = {
            "model": model,
            "messages": [
                {"role": self._settings.policy_role, "content": request.policy.text},
                {"role": "user", "content": user_text(request.event)},
            ],
            "reasoning_effort": request.policy.reasoning_effort,
            "max_completion_tokens": self._settings.max_tokens,
            "temperature": self._settings.temperature,
        }
        return Prepared(self.path, body, None)

    def read(self, data: Any, prepared: Prepared) -> Reply:
        del prepared
        try:
            choice = data["choices"][0]
            message = choice["message"]
            usage = data.get("usage") or {}
        except (KeyError, IndexError, TypeError) as exc:
            raise BadReply(f"chat reply without choices[0].message ({type(exc).__name__})") from None
        final = message.get("content")
        reasoning = message.get("reasoning") or message.get("reasoning_content") or ""
        problem = None
        if message.get("tool_calls"):
            problem = "model made a tool call"
        elif not isinstance(final, str) or not final.strip():
            cut = choice.get("finish_reason") == "length"
            problem = "completion reached the token cap before its final answer" if cut else "reply has no content"
            final = None
        details = usage.get("prompt_tokens_details") or {}
        return Reply(
            channels=Channels(final=final, analysis=str(reasoning), problem=problem),
            raw_output=final if isinstance(final, str) else "",
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )


class PromptTooLong(Exception):
    def __init__(self, tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"prompt of {tokens} tokens leaves no room for an answer within the server's max_model_len {max_model_len}"
        )
