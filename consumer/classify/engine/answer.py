"""The model's completion, read: harmony channels first, then the final answer as a verdict.

`CompletionReader` streams the generated token ids through harmony's `StreamableParser` and
keeps the `analysis` channel (reasoning, for audit) apart from the `final` channel (the
answer). A completion that is not valid harmony, that stops in a tool call, that is cut off
at the token cap, or that never reaches the final channel has no answer.

gpt-oss-safeguard answers in one of three tiers, whichever the policy asks for:
1. a bare `0` or `1`;
2. `{"violation": 1, "policy_category": "harassment"}`;
3. tier 2 plus `"rule_ids": [...]`, `"confidence": "high"`, `"rationale": "..."`.

The parser accepts exactly these, wrapped in a Markdown code fence or surrounded by white
space at most. Anything else (prose around the answer, a truncated object, a violation that is
not 0 or 1) raises UnparseableAnswer carrying the text, which becomes an
`unparseable_output` dead letter once retries are spent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from consumer.classify import Classification

if TYPE_CHECKING:
    from openai_harmony import HarmonyEncoding

_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n?(?P<body>.*?)\n?[ \t]*```\Z", re.DOTALL)
_VIOLATION_VALUES: dict[Any, bool] = {0: False, 1: True, "0": False, "1": True}


class UnparseableAnswer(ValueError):
    """A final answer in none of the three tiers; `raw` is the text as the model wrote it."""

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(reason)
        self.raw = raw


@dataclass(frozen=True)
class Answer:
    violation: bool
    category: str | None = None
    rule_ids: list[str] = field(default_factory=list)
    confidence: str | None = None
    rationale: str | None = None


@dataclass(frozen=True)
class Channels:
    """A completion split by harmony channel; `problem` says why `final` is missing or unusable."""

    final: str | None
    analysis: str
    problem: str | None


class Finished(Protocol):
    """A finished completion, in process or from a server: its channels and token counts."""

    channels: Channels
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


def classification(answer: Answer, finished: Finished, model: str, keep_reasoning: bool) -> Classification:
    """The pipeline's `Classification` of a parsed answer, with the completion's token counts and
    its reasoning (the analysis channel) where `keep_reasoning` asks for it."""
    analysis = finished.channels.analysis
    return Classification(
        violation=answer.violation,
        category=answer.category,
        rule_ids=answer.rule_ids,
        confidence=answer.confidence,
        rationale=answer.rationale,
        reasoning=analysis if keep_reasoning and analysis else None,
        model=model,
        prompt_tokens=finished.prompt_tokens,
        cached_tokens=finished.cached_tokens,
        completion_tokens=finished.completion_tokens,
    )


class CompletionReader:
    """Reads one streamed completion; feed it tokens as they arrive, then call `channels()`."""

    def __init__(self, encoding: HarmonyEncoding) -> None:
        # Imported here so that `parse_answer` serves the chat-completions shape without harmony.
        from openai_harmony import HarmonyError, Role, StreamableParser

        self._harmony_error = HarmonyError
        self._parser = StreamableParser(encoding, role=Role.ASSISTANT)
        self._problem: str | None = None

    def feed(self, token_ids: Iterable[int]) -> bool:
        """Parse more tokens; False once the stream is not valid harmony (further tokens are pointless)."""
        if self._problem is not None:
            return False
        for token in token_ids:
            try:
                self._parser.process(token)
            except self._harmony_error as exc:
                self._problem = f"completion is not valid harmony: {exc}"
                return False
        return True

    def channels(self, truncated: bool = False) -> Channels:
        """The channels of the completed messages; `truncated`: generation stopped at the token cap."""
        finals: list[str] = []
        analysis: list[str] = []
        problem = self._problem
        for message in self._parser.messages:
            text = "".join(getattr(part, "text", "") for part in message.content)
            # Harmony reads a `<|constrain|>json` header as the recipient; only a named one is a tool call.
            if message.recipient and not message.recipient.startswith("<|"):
                problem = problem or f"model addressed a tool call to {message.recipient!r}"
            elif message.channel == "final":
                finals.append(text)
            elif message.channel == "analysis":
                analysis.append(text)
        if not finals and problem is None:
            cause = "reached the token cap before its final answer" if truncated else "has no final channel"
            problem = f"completion {cause}"
        return Channels(final="".join(finals) if finals else None, analysis="\n".join(analysis), problem=problem)


def parse_answer(raw: str) -> Answer:
    """Parse one final-channel text; raises UnparseableAnswer when it is no valid answer."""
    text = _unwrap(raw)
    if text in ("0", "1"):
        return Answer(violation=text == "1")
    if not text.startswith("{"):
        raise UnparseableAnswer("final answer is neither 0/1 nor a JSON object", raw)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UnparseableAnswer(f"final answer is not valid JSON ({exc.msg} at {exc.pos})", raw) from None
    if not isinstance(data, dict):
        raise UnparseableAnswer("final answer JSON is not an object", raw)
    return _from_object(data, raw)


def _unwrap(raw: str) -> str:
    text = raw.strip()
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group("body").strip()
    # A lone inline-code answer: `1`
    if len(text) == 3 and text[0] == text[2] == "`":
        text = text[1]
    return text


def _from_object(data: dict[str, Any], raw: str) -> Answer:
    if "violation" not in data:
        raise UnparseableAnswer('final answer has no "violation"', raw)
    violation = data["violation"]
    # bool is an int subclass: True/False are accepted as 1/0 on purpose.
    if isinstance(violation, bool):
        violation = int(violation)
    if not isinstance(violation, int | str) or violation not in _VIOLATION_VALUES:
        raise UnparseableAnswer(f'"violation" must be 0 or 1, not {violation!r}', raw)
    return Answer(
        violation=_VIOLATION_VALUES[violation],
        category=_optional_str(data, "policy_category", raw),
        rule_ids=_rule_ids(data.get("rule_ids"), raw),
        confidence=_optional_str(data, "confidence", raw),
        rationale=_optional_str(data, "rationale", raw),
    )


def _optional_str(data: dict[str, Any], key: str, raw: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise UnparseableAnswer(f'"{key}" must be a string, not {type(value).__name__}', raw)
    return value.strip() or None


def _rule_ids(value: Any, raw: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in value):
        raise UnparseableAnswer('"rule_ids" must be a list of strings', raw)
    return [str(v).strip() for v in value if str(v).strip()]
