"""The policies in force: one directory of policy files, reloaded when they change."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from consumer.policy.parse import Policy
from consumer.policy.exceptions import PolicyError
from consumer.policy.validate import DEFAULT_MAX_TOKENS, check_policy

log = logging.getLogger(__name__)


class PolicyStore:
    """The policies in force, from one directory; `reload()` picks up edits.

    A file whose new content does not validate keeps its previous version in force (and is
    reported through `on_reload`); a new file that does not validate is not loaded; a deleted
    file's policy is withdrawn. The policies dict is replaced atomically, so an event sees
    either the old or the new set, never a mix.
    """

    def __init__(
        self,
        directory: Path,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        on_reload: Callable[[dict[str, Policy], list[str]], None] | None = None,
        pattern: str = "*.md",
    ):
        """`pattern`: which files of the directory are policies; `policy eval` names one file."""
        self.directory = directory
        self.max_tokens = max_tokens
        self.pattern = pattern
        self._on_reload = on_reload
        self._fingerprint: tuple = ()
        self._by_path: dict[Path, Policy] = {}
        self._from_files: dict[str, Policy] = {}
        self.current: dict[str, Policy] = {}  # by `Policy.key`: the id, scoped by its community
        self.reloads = 0
        # A reload (the watcher's thread) and a topic record (the policy topic's thread) may swap at once.
        self._swap = threading.Lock()
        errors = self._load(strict=True)
        if errors:
            raise PolicyError(errors[0])

    def get(self) -> dict[str, Policy]:
        return self.current

    def reload(self) -> bool:
        """Re-read the directory if any file changed; True if the policies in force changed."""
        if self._snapshot() == self._fingerprint:
            return False
        with self._swap:
            before = {pid: p.version for pid, p in self.current.items()}
            errors = self._load(strict=False)
        for error in errors:
            log.error("policy reload: %s (the previous version stays in force)", error)
        return self._announce(before, errors)

    def _in_force(self) -> dict[str, Policy]:
        """The policies in force, from what was loaded: the files' (a subclass adds its own)."""
        return dict(self._from_files)

    def _announce(self, before: dict[str, str], errors: list[str]) -> bool:
        """Count, log and report a change of the policies in force since `before` (key -> version)."""
        after = {pid: p.version for pid, p in self.current.items()}
        if before == after:
            return False
        self.reloads += 1
        # What changed, not every policy: with a thousand communities' policies, a line of its own each edit.
        changed = [f"{key}@{v}" for key, v in sorted(after.items()) if before.get(key) != v]
        withdrawn = sorted(before.keys() - after.keys())
        log.info("policies reloaded (%d in force): %s%s", len(after), ", ".join(changed) or "none changed",
                 f"; withdrawn {', '.join(withdrawn)}" if withdrawn else "")  # fmt: skip
        if self._on_reload:
            self._on_reload(self.current, errors)
        return True

    def _snapshot(self) -> tuple:
        entries = []
        for path in sorted(self.directory.glob(self.pattern)):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    def _load(self, strict: bool) -> list[str]:
        if not self.directory.is_dir():
            return [f"{self.directory}:0: policies directory does not exist"]
        self._fingerprint = self._snapshot()
        errors: list[str] = []
        by_path: dict[Path, Policy] = {}
        for path in sorted(self.directory.glob(self.pattern)):
            try:
                data = path.read_bytes()
            except OSError as exc:
                errors.append(f"{path}:0: cannot read ({exc.strerror})")
                continue
            policy, found = check_policy(data, path, self.max_tokens)
            problems = [p for p in found if p.severity == "error"]
            if problems or policy is None:
                errors.extend(str(p) for p in problems)
                if path in self._by_path:
                    by_path[path] = self._by_path[path]  # keep the last good version
                continue
            by_path[path] = policy
        by_key: dict[str, Policy] = {}
        for path, policy in by_path.items():
            if policy.key in by_key:
                errors.append(f"{path}:2: policy id {policy.key!r} is also used by {by_key[policy.key].path}")
                continue
            by_key[policy.key] = policy
        if strict and errors:
            return errors
        self._by_path = by_path
        self._from_files = by_key
        self.current = self._in_force()
        return errors


class PolicyWatcher:
    """Polls a PolicyStore for changes every `interval_s` on a daemon thread.

    Polling (not inotify) on purpose: Kubernetes ConfigMap volumes swap a symlink, which
    file-event watchers miss or see as deletions.
    """

    def __init__(self, store: PolicyStore, interval_s: float):
        self._store = store
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="policy-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._store.reload()
            except Exception:  # noqa: BLE001 - a reload must never stop the consumer
                log.exception("policy reload failed; the previous policies stay in force")
