"""The user message's text: what the model reviews, without harmony.

Both request shapes send it: the in-process and token-id renderers encode it as harmony text
(consumer.classify.engine.prompt), and the chat-completions shape sends it as the user
message, so a remote provider sees exactly what the local engine would. No openai_harmony
import here: a consumer that only talks to a chat-completions provider does not need it.
"""

from __future__ import annotations

import json

from consumer.events import ContentEvent

CONTEXT_PREAMBLE = (
    'The message under review is the JSON field "message". The field "context" holds earlier '
    "messages of the same conversation, oldest first: use them only to understand the message "
    "under review, and do not classify them.\n"
)


def user_text(event: ContentEvent) -> str:
    """The user message's text: the content alone, or context and message as one JSON object."""
    if not event.context:
        return event.content
    payload = {
        "context": [_entry(m.content, m.author_id) for m in event.context],
        "message": _entry(event.content, event.author_id),
    }
    return CONTEXT_PREAMBLE + json.dumps(payload, ensure_ascii=False, indent=1)


def _entry(content: str, author_id: str | None) -> dict[str, str]:
    return {"author": author_id, "text": content} if author_id else {"text": content}
