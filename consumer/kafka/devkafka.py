"""A real single-node Apache Kafka (KRaft) on 127.0.0.1, for development, tests and the demo.

The broker's jars come from Maven Central through Maven (`org.apache.kafka:kafka_2.13` and
its runtime dependencies) into the cache folder, never into the repository. Storage is
formatted with Kafka's own StorageTool and the broker runs as `java kafka.Kafka`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from consumer.errors import Fatal

KAFKA_VERSION = "4.1.2"
LOG4J_VERSION = "2.25.3"
SCALA_BINARY = "2.13"


class DevKafkaError(Fatal, RuntimeError):
    """The development broker cannot be fetched or started."""


def cache_dir() -> Path:
    root = os.environ.get("SAFEGUARD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "safeguard-consumer"
    )
    return Path(root)


_POM = """<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>local.safeguard-consumer</groupId><artifactId>dev-kafka</artifactId><version>1</version>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_{scala}</artifactId><version>{kafka}</version></dependency>
    <dependency><groupId>org.apache.logging.log4j</groupId><artifactId>log4j-slf4j-impl</artifactId><version>{log4j}</version></dependency>
  </dependencies>
</project>
"""

_LOG4J2 = """status = warn
appender.console.type = Console
appender.console.name = STDOUT
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.console.ref = STDOUT
logger.started.name = kafka.server.KafkaRaftServer
logger.started.level = INFO
"""


def ensure_jars(version: str = KAFKA_VERSION) -> Path:
    """Fetch the broker's jars with Maven into the cache (once); returns the folder of jars."""
    home = cache_dir() / f"kafka-{version}"
    libs = home / "libs"
    done = home / ".complete"
    if done.exists():
        return libs
    if shutil.which("mvn") is None:
        raise DevKafkaError("Maven (mvn) is needed to fetch the Kafka jars; install it (apt-get install maven)")
    home.mkdir(parents=True, exist_ok=True)
    (home / "pom.xml").write_text(_POM.format(scala=SCALA_BINARY, kafka=version, log4j=LOG4J_VERSION))
    shutil.rmtree(libs, ignore_errors=True)
    command = [
        "mvn", "-q", "-B", "-f", str(home / "pom.xml"),
        f"-Dmaven.repo.local={cache_dir() / 'm2'}",
        "dependency:copy-dependencies", f"-DoutputDirectory={libs}", "-DincludeScope=runtime",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise DevKafkaError(f"fetching Kafka {version} jars with Maven failed:\n{result.stdout[-3000:]}{result.stderr[-2000:]}")
    done.write_text(version)
    return libs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class SecureListener:
    """A SASL_SSL listener: the broker's key and certificate chain in one PEM file, SCRAM users."""

    port: int
    keystore_pem: Path
    users: dict[str, str]


@dataclass
class BrokerState:
    pid: int
    port: int
    controller_port: int
    data_dir: str
    log_file: str

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"


class KafkaBroker:
    """One KRaft broker+controller process listening on 127.0.0.1 only."""

    def __init__(
        self,
        data_dir: Path,
        port: int | None = None,
        extra_properties: dict[str, str] | None = None,
        secure: SecureListener | None = None,
    ):
        """`secure`: also listen with SASL_SSL (SCRAM-SHA-512 over TLS) on its own port."""
        self.data_dir = data_dir
        self.secure = secure
        # A formatted data dir keeps its ports, so a restarted broker is where clients left it.
        ports_file = data_dir / "ports.json"
        saved = json.loads(ports_file.read_text()) if ports_file.exists() else {}
        self.port = port or saved.get("port") or free_port()
        self.controller_port = saved.get("controller_port") or free_port()
        self.extra_properties = extra_properties or {}
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _properties(self) -> str:
        listeners = f"PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}"
        advertised = f"PLAINTEXT://127.0.0.1:{self.port}"
        protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        secure: dict[str, str] = {}
        if self.secure is not None:
            listeners += f",SASL_SSL://127.0.0.1:{self.secure.port}"
            advertised += f",SASL_SSL://127.0.0.1:{self.secure.port}"
            protocols += ",SASL_SSL:SASL_SSL"
            secure = {
                "sasl.enabled.mechanisms": "SCRAM-SHA-512",
                "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config":
                    "org.apache.kafka.common.security.scram.ScramLoginModule required;",
                "ssl.keystore.type": "PEM",
                "ssl.keystore.location": str(self.secure.keystore_pem),
            }  # fmt: skip
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{self.controller_port}",
            "listeners": listeners,
            "advertised.listeners": advertised,
            "controller.listener.names": "CONTROLLER",
            "listener.security.protocol.map": protocols,
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir / "logs"),
            "num.partitions": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "4",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "group.initial.rebalance.delay.ms": "0",
            "auto.create.topics.enable": "false",
            **secure,
            **self.extra_properties,
        }
        return "".join(f"{k}={v}\n" for k, v in props.items())

    def start(self, timeout: float = 90.0, detach: bool = False) -> str:
        """Format storage (first time), start the broker, wait until it answers metadata requests."""
        libs = ensure_jars()
        java = shutil.which("java")
        if java is None:
            raise DevKafkaError("Java 17+ is needed to run Kafka; install it (apt-get install openjdk-17-jre-headless)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.data_dir / "ports.json").write_text(json.dumps({"port": self.port, "controller_port": self.controller_port}))
        config = self.data_dir / "server.properties"
        config.write_text(self._properties())
        (self.data_dir / "log4j2.properties").write_text(_LOG4J2)
        classpath = f"{libs}/*"
        if not (self.data_dir / "logs" / "meta.properties").exists():
            scram = []
            if self.secure is not None:
                for user, password in self.secure.users.items():
                    scram += ["--add-scram", f"SCRAM-SHA-512=[name={user},password={password}]"]
            result = subprocess.run(
                [java, "-cp", classpath, "kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config),
                 *scram],
                capture_output=True, text=True,
            )  # fmt: skip
            if result.returncode != 0:
                raise DevKafkaError(f"kafka-storage format failed: {result.stdout}{result.stderr}")
        log_path = self.data_dir / "broker.log"
        with open(log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [
                    java, "-Xms256m", "-Xmx768m", "-XX:+UseSerialGC", "-Djava.awt.headless=true",
                    f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
                    "-cp", classpath, "kafka.Kafka", str(config),
                ],  # fmt: skip
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, close_fds=True,
            )  # fmt: skip
        self._wait_ready(timeout, log_path)
        if detach:
            state = BrokerState(self.process.pid, self.port, self.controller_port, str(self.data_dir), str(log_path))
            _state_file().write_text(json.dumps(asdict(state)))
        return self.bootstrap

    def _wait_ready(self, timeout: float, log_path: Path) -> None:
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise DevKafkaError(f"Kafka exited with code {self.process.returncode}:\n{_tail(log_path)}")
            try:
                if admin.list_topics(timeout=2).brokers:
                    return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        self.stop()
        raise DevKafkaError(f"Kafka did not answer within {timeout:.0f}s:\n{_tail(log_path)}")

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            _terminate(self.process.pid, timeout)
            try:
                self.process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
            self.process = None

    def kill(self) -> None:
        """SIGKILL, for fault tests: no clean shutdown."""
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def restart(self, timeout: float = 90.0) -> None:
        self.stop()
        self.start(timeout)


def create_topics(bootstrap: str, *names: str, partitions: int = 1, timeout: float = 30.0) -> None:
    """Create topics (replication 1) and wait until every partition is visible."""
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names])
    for future in futures.values():
        future.result(timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        topics = admin.list_topics(timeout=5).topics
        if all(n in topics and len(topics[n].partitions) == partitions for n in names):
            return
        time.sleep(0.1)
    raise DevKafkaError(f"topics {', '.join(names)} did not become visible within {timeout:.0f}s")


def _cluster_id() -> str:
    import base64

    # As Kafka's own Uuid.randomUuid: never one starting with "-", which the storage tool's
    # argument parser takes for an option (1 start in 64 failed before).
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _terminate(pid: int, timeout: float) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the detached broker behind `safeguard-consumer dev-kafka` ---------------------------------


def _state_file() -> Path:
    path = cache_dir() / "dev-kafka" / "state.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def running_broker() -> BrokerState | None:
    path = _state_file()
    if not path.exists():
        return None
    state = BrokerState(**json.loads(path.read_text()))
    if not _alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def start_detached(port: int | None = None, data_dir: Path | None = None, timeout: float = 90.0) -> BrokerState:
    existing = running_broker()
    if existing is not None:
        return existing
    broker = KafkaBroker(data_dir or cache_dir() / "dev-kafka" / "data", port=port)
    broker.start(timeout=timeout, detach=True)
    state = running_broker()
    assert state is not None
    return state


def stop_detached(timeout: float = 30.0) -> bool:
    state = running_broker()
    if state is None:
        return False
    _terminate(state.pid, timeout)
    _state_file().unlink(missing_ok=True)
    return True
