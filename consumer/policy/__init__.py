"""Policies: Markdown files with YAML front matter, written by the platform ("bring your own policy").

- `parse`: one file into a `Policy`, versioned by the hash of its bytes;
- `validate`: every problem of a file against the structure the model's guide recommends;
- `examples`: labelled examples, from a policy's EXAMPLES section and from JSONL files;
- `sections`: a policy body's Markdown sections, the one parser of its headings;
- `store`: the policies in force, reloaded when the files change (a bad edit keeps the last
  good version);
- `topic`: the policy topic's records (`policies.topic`), checked as files are and merged with
  them (a bad record keeps the last good version);
- `route`: which policies apply to an event;
- `actions`: the platform actions in rising severity;
- `exceptions`: the layer's errors (`PolicyError`, `RoutingError`, `DataError`), all fatal.
"""

from consumer.policy.actions import ACTIONS, most_severe
from consumer.policy.exceptions import PolicyError
from consumer.policy.parse import Policy, load_policy, parse_policy
from consumer.policy.store import PolicyStore, PolicyWatcher
from consumer.policy.validate import count_tokens, validate_policy

__all__ = [
    "ACTIONS", "Policy", "PolicyError", "PolicyStore", "PolicyWatcher", "count_tokens", "load_policy",
    "most_severe", "parse_policy", "validate_policy",
]  # fmt: skip
