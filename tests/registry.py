"""A real Schema Registry for the tests: Apicurio Registry on 127.0.0.1, in-memory storage
(or, with `data_dir`, an H2 database in files there, so a restart keeps its schemas and their ids).

Like the Kafka broker (consumer.kafka.devkafka), it comes from Maven Central
(`io.apicurio:apicurio-registry-app:3.3.3:tar.gz:all`) into the cache folder, never into the
repository, and nothing comes from a container hub. It is built for Java 21+, so it runs under the
Temurin 25 JDK beside the default Java 17. confluent-kafka's SchemaRegistryClient talks to its
Confluent-compatible API, `/apis/ccompat/v7`.
"""

from __future__ import annotations

import glob
import shutil
import signal
import subprocess
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from consumer.kafka.devkafka import cache_dir, free_port

APICURIO_VERSION = "3.3.3"
_ARTIFACT = f"io.apicurio:apicurio-registry-app:{APICURIO_VERSION}:tar.gz:all"
CLIENT_TIMEOUT_S = 30  # a test client's request timeout, seconds
_JAVA_CANDIDATES = ("/usr/lib/jvm/temurin-25-jdk-amd64/bin/java", "/usr/lib/jvm/*-2[5-9]*/bin/java")


class RegistryError(RuntimeError):
    pass


def ensure_registry(version: str = APICURIO_VERSION) -> Path:
    """Fetch and unpack the registry into the cache (once); returns the folder holding quarkus-run.jar."""
    home = cache_dir() / f"apicurio-registry-{version}"
    if (home / ".complete").exists():
        return home
    if shutil.which("mvn") is None:
        raise RegistryError("Maven (mvn) is needed to fetch Apicurio Registry; install it (apt-get install maven)")
    download = cache_dir() / "apicurio-download"
    command = ["mvn", "-q", "-B", f"-Dmaven.repo.local={cache_dir() / 'm2'}", "dependency:copy",
               f"-Dartifact={_ARTIFACT}", f"-DoutputDirectory={download}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RegistryError(f"fetching {_ARTIFACT} with Maven failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    shutil.rmtree(home, ignore_errors=True)
    with tarfile.open(download / f"apicurio-registry-app-{version}-all.tar.gz") as archive:
        archive.extractall(home, filter="data")
    (home / ".complete").write_text(version)
    return home


def java25() -> str:
    for pattern in _JAVA_CANDIDATES:
        for java in sorted(glob.glob(pattern)):
            return java
    raise RegistryError("Apicurio Registry needs Java 21 or later; the Temurin 25 JDK was not found under /usr/lib/jvm")


class SchemaRegistry:
    """One registry process on 127.0.0.1; `url` is what SchemaRegistryClient takes."""

    def __init__(self, log_file: Path, port: int | None = None, data_dir: Path | None = None):
        self.port = port or free_port()
        self.log_file = log_file
        self.data_dir = data_dir
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/apis/ccompat/v7"

    def client(self):
        """confluent-kafka's client for this registry, with a timeout: its default waits for ever,
        so a registry that stopped answering would show as pytest's timeout, not as the request."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient({"url": self.url, "timeout": CLIENT_TIMEOUT_S})

    def start(self, timeout: float = 120.0) -> None:
        home = ensure_registry()
        # One registry serves the whole ~18-minute suite from memory (H2): give it room, so a long
        # run cannot end in a collector that thrashes while connections are still accepted.
        command = [
            java25(), "-Xmx768m",
            f"-Dquarkus.http.port={self.port}", "-Dquarkus.http.host=127.0.0.1",
            # The management interface is built in (enabled=false does not turn it off at run time):
            # on 127.0.0.1 and a free port of its own, else every registry wants 0.0.0.0:9000.
            "-Dquarkus.management.host=127.0.0.1", f"-Dquarkus.management.port={free_port()}",
        ]  # fmt: skip
        if self.data_dir is not None:  # the same storage as in memory, in files that outlive the process
            command.append(f"-Dapicurio.datasource.url=jdbc:h2:file:{self.data_dir / 'registry'}")
        command += ["-jar", str(home / "quarkus-run.jar")]
        with self.log_file.open("ab") as log:
            self._process = subprocess.Popen(command, cwd=home, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RegistryError(f"the registry exited with {self._process.returncode}; see {self.log_file}")
            if self.answers():
                return
            time.sleep(0.3)
        self.stop()
        raise RegistryError(f"the registry did not answer within {timeout:.0f} s; see {self.log_file}")

    def answers(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/subjects", timeout=timeout) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def restart_if_silent(self, timeout: float = 10.0) -> str | None:
        """Restart the registry (on the same port, so URLs stay valid) when it does not answer a
        fresh connection within `timeout`; returns why it was restarted, else None. Its thread dump
        goes to its log first (SIGQUIT), which is kept: on a loaded CI machine the session's
        registry was once seen to accept a connection and never answer (300 s)."""
        if self._process is None or self.answers(timeout):
            return None
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGQUIT)  # the JVM prints every thread's stack and goes on
            time.sleep(1.0)
            what = f"did not answer within {timeout:.0f} s; restarted (thread dump and log: {self.log_file})"
        else:
            what = f"had exited with {self._process.returncode}; restarted (log: {self.log_file})"
        self.stop()
        self.start()
        return f"the schema registry on port {self.port} {what}"

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.send_signal(signal.SIGCONT)  # a stopped JVM (see the tests) handles SIGTERM only once continued
        self._process.terminate()
        try:
            self._process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None
