"""gpt-oss-safeguard on a served fleet: `classifier.reasoner: remote` (docs/engine.md, "Served").

- `settings.py`: `RemoteSettings` and `EndpointSettings`, the `engine:` section (no HTTP import);
- `shapes.py`: the two request shapes, token ids to /completions and chat messages to
  /chat/completions, and reading their replies;
- `fleet.py`: the endpoints, least outstanding requests, learned concurrency, back-off, priorities;
- `classifier.py`: `RemoteClassifier`, the `Classifier` over them.

Importing this package imports neither httpx nor openai_harmony; `make_remote_classifier`
in the engine package imports them when a remote classifier is built.
"""

from consumer.classify.engine.remote.settings import EndpointSettings, Priority, RemoteSettings

__all__ = ["EndpointSettings", "Priority", "RemoteSettings"]
