"""The Kubernetes manifests of deploy/k8s, checked offline: every built-in object validates against the Kubernetes
1.30 JSON schemas (kubernetes-validate, strict: unknown fields rejected); the KEDA ScaledObject, which has no
schema there, is checked field by field against KEDA's documented redis scaler; and the manifests agree with
each other (selectors, ports, names), with the services' own settings loaders and with docker-compose.yml."""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from cxr.stack import health
from cxr.stack.redis_config import durability_args
from services.ingestion import settings as ingestion_settings
from services.worker import settings as worker_settings

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"
KEDA_SPEC_KEYS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "idleReplicaCount", "initialCooldownPeriod",
                  "minReplicaCount", "maxReplicaCount", "fallback", "advanced", "triggers"}  # fmt: skip
KEDA_REDIS_KEYS = {"address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "usernameFromEnv",
                   "passwordFromEnv", "listName", "listLength", "activationListLength", "databaseIndex",
                   "enableTLS", "unsafeSsl"}  # fmt: skip


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    yield from (d for d in yaml.safe_load_all(path.read_text()) if d)


ALL_FILES = sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
OBJECTS = [(p, d) for p in ALL_FILES for d in _documents(p)]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [d for _, d in OBJECTS if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, (kind, name)
    return found[0]


def _container(workload: str, kind: str = "Deployment") -> dict[str, Any]:
    containers = _find(kind, workload)["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def _env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment, ConfigMaps of envFrom resolved."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(_find("ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: str(e["value"]) for e in container.get("env", [])})
    return env


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(yaml.safe_load((REPO / "docker-compose.yml").read_text()))


def test_kustomization_lists_every_base_file_and_the_optional_parts_stay_apart() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml"
    )
    assert {p.parent.name for p in ALL_FILES} == {"k8s", "keda", "orthanc"}
    assert all(
        d["metadata"].get("namespace") == kustomization["namespace"] for _, d in OBJECTS if d["kind"] != "Namespace"
    )


def _is_builtin(doc: dict[str, Any]) -> bool:
    group = doc["apiVersion"].split("/")[0]
    return "." not in group or group.endswith(".k8s.io")


def _object_id(value: Any) -> str:
    return f"{value['kind']}/{value['metadata']['name']}" if isinstance(value, dict) else str(value.name)


@pytest.mark.parametrize(("path", "doc"), [o for o in OBJECTS if _is_builtin(o[1])], ids=_object_id)
def test_every_builtin_object_validates_against_the_kubernetes_schemas(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises ValidationError


def test_the_validator_rejects_a_wrong_manifest() -> None:
    broken = yaml.safe_load((K8S / "worker.yaml").read_text().split("---")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "metrics"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = yaml.safe_load((K8S / "worker.yaml").read_text().split("---")[0])
    broken["spec"]["template"]["spec"]["containers"][0]["replicas"] = 2  # an unknown field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_only_keda_objects_are_custom_resources() -> None:
    custom = [d for _, d in OBJECTS if not _is_builtin(d)]
    assert [(d["apiVersion"], d["kind"]) for d in custom] == [("keda.sh/v1alpha1", "ScaledObject")]


def test_keda_scales_the_workers_on_the_celery_queue_in_redis() -> None:
    scaled = _find("ScaledObject", "cxr-worker")
    spec = scaled["spec"]
    assert set(spec) <= KEDA_SPEC_KEYS
    target = spec["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert "replicas" not in _find("Deployment", target["name"])["spec"], "KEDA owns the replica count"
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    [trigger] = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "redis" and set(meta) <= KEDA_REDIS_KEYS
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values are strings"
    assert meta["listName"] == worker_settings.QUEUE
    assert int(meta["listLength"]) > 0 and int(meta["activationListLength"]) >= 0
    # the address is the Redis Service, in the namespace, on its port, and the same database as the workers use
    host, port = meta["address"].rsplit(":", 1)
    service = _find("Service", "cxr-redis")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == service["spec"]["ports"][0]["port"]
    assert _env(_container("cxr-worker"))["CXR_REDIS_URL"] == f"redis://{meta['address']}/{meta['databaseIndex']}"


def test_services_select_pods_and_target_named_ports() -> None:
    workloads = [d for _, d in OBJECTS if d["kind"] in ("Deployment", "StatefulSet")]
    for _, svc in ((p, d) for p, d in OBJECTS if d["kind"] == "Service"):
        selector = svc["spec"]["selector"].items()
        matches = [w for w in workloads if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, svc["metadata"]["name"]
        ports = {p["name"]: p["containerPort"] for c in matches[0]["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}  # fmt: skip
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports and ports[port["targetPort"]] == port["port"], port
    for w in workloads:
        assert w["spec"]["selector"]["matchLabels"].items() <= w["spec"]["template"]["metadata"]["labels"].items()


def test_the_services_accept_their_cluster_environment(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "manifest.json").write_text("{}")
    for workload, module in (("cxr-ingestion", ingestion_settings), ("cxr-worker", worker_settings)):
        env = {k: v for k, v in _env(_container(workload)).items() if k.startswith("CXR_")}
        module.load_settings([], environ={**env, "CXR_MODEL_DIR": str(model)})
        documented = module.build_parser().format_help()
        assert all(f"[{var}]" in documented for var in env), (workload, env)


def test_same_image_commands_and_ports_as_compose(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for workload, name in (("cxr-ingestion", "ingestion"), ("cxr-worker", "worker"), ("cxr-torchserve", "torchserve")):
        container = _container(workload)
        assert container["image"] == services[name]["image"] == "cxr:0.1.0"
        if name != "torchserve":
            assert container["command"] == services[name]["command"]
            cluster, local = _env(container), {k: str(v) for k, v in services[name]["environment"].items()}
            for var in ("CXR_INGESTION_ADDR", "CXR_INGESTION_METRICS_PORT", "CXR_WORKER_METRICS_PORT",
                        "CXR_TORCHSERVE_MODEL", "CXR_MODEL_DIR"):  # fmt: skip
                assert cluster.get(var) == local.get(var), (workload, var)
    assert _env(_container("cxr-ingestion"))["CXR_TORCHSERVE_GRPC"].endswith(":7470")
    assert {str(p) for p in _find("StatefulSet", "cxr-redis")["spec"]["template"]["spec"]["containers"][0]["args"]
            } >= set(durability_args("2gb")) - {""}  # fmt: skip


def _window(args: list[str], sub: list[str]) -> bool:
    return any(args[i : i + len(sub)] == sub for i in range(len(args) - len(sub) + 1))


def test_redis_keeps_queued_work_like_the_local_stack() -> None:
    args = _container("cxr-redis", "StatefulSet")["args"]
    for flag in ("--appendonly", "--appendfsync", "--maxmemory-policy"):
        i = durability_args().index(flag)
        assert _window(args, durability_args()[i : i + 2]), flag
    claim = _find("StatefulSet", "cxr-redis")["spec"]["volumeClaimTemplates"][0]
    assert claim["metadata"]["name"] == "data" and claim["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_torchserve_runs_on_a_gpu_node_and_is_ready_only_with_the_model() -> None:
    pod = _find("Deployment", "cxr-torchserve")["spec"]["template"]["spec"]
    container = _container("cxr-torchserve")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for probe in ("startupProbe", "readinessProbe"):
        code = container[probe]["exec"]["command"][2]
        tree = ast.parse(code)
        imported = {a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for a in node.names}
        assert imported == {"torchserve_model_ready"} and all(hasattr(health, n) for n in imported)
        assert "r(8481, 'cxr', None)" in code  # management port, model name, no token (auth off in the cluster)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    text = _find("ConfigMap", "cxr-torchserve")["data"]["config.properties"]
    properties = dict(line.split("=", 1) for line in text.splitlines() if line)
    assert properties["management_address"].endswith(f":{ports['management']}")
    assert int(properties["grpc_inference_port"]) == ports["grpc-inference"]
    assert properties["metrics_mode"] == "prometheus" and properties["enable_model_api"] == "false"
    assert "--ts-config" in container["command"] and "/etc/cxr/torchserve/config.properties" in container["command"]


def test_torchserve_config_is_compose_s_except_token_authorisation() -> None:
    def props(text: str) -> dict[str, str]:
        return dict(line.split("=", 1) for line in text.splitlines() if line and not line.startswith("#"))

    cluster = props(_find("ConfigMap", "cxr-torchserve")["data"]["config.properties"])
    local = props((REPO / "deploy" / "torchserve.properties").read_text())
    assert cluster["disable_token_authorization"] == "true"
    differ = {k for k in cluster.keys() | local.keys() if cluster.get(k) != local.get(k)}
    assert differ <= {"disable_token_authorization", "token_expiration_min", "metrics_config"}
    assert cluster["metrics_config"] == "/etc/cxr/torchserve/metrics.yaml"
    metrics = yaml.safe_load(_find("ConfigMap", "cxr-torchserve")["data"]["metrics.yaml"])
    assert metrics == yaml.safe_load((REPO / "deploy" / "torchserve-metrics.yaml").read_text())
    policy = _find("NetworkPolicy", "cxr-torchserve")["spec"]["ingress"]
    inference = [rule for rule in policy if any(p["port"] == 7470 for p in rule["ports"])]
    assert inference == [{"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "cxr-ingestion"}}}],
                          "ports": [{"port": 7470, "protocol": "TCP"}]}]  # fmt: skip


def test_workers_scale_safely() -> None:
    deployment = _find("Deployment", "cxr-worker")
    env = _env(_container("cxr-worker"))
    assert "CXR_WORKER_HOSTNAME" not in env, "Celery node names must stay unique per pod"
    limit = worker_settings.WorkerSettings(model_dir=Path(".")).time_limit_s
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > limit
    ready = _container("cxr-worker")["readinessProbe"]["exec"]["command"]
    assert ready == ["test", "-f", env["CXR_WORKER_READY_FILE"]]


def test_pods_run_unprivileged_and_metrics_are_annotated() -> None:
    for _, doc in OBJECTS:
        if doc["kind"] not in ("Deployment", "StatefulSet") or doc["metadata"]["name"] == "cxr-orthanc":
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert "limits" in c["resources"] and "requests" in c["resources"]
        annotations = doc["spec"]["template"]["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            ports = {str(p["containerPort"]) for c in pod["containers"] for p in c["ports"] if p["name"] == "metrics"}
            assert ports == {annotations["prometheus.io/port"]}, doc["metadata"]["name"]


def test_readme_tells_how_to_apply() -> None:
    text = (K8S / "README.md").read_text()
    for needle in ("kubectl apply -k deploy/k8s", "deploy/k8s/keda", "deploy/k8s/orthanc", "KServe"):
        assert needle in text, needle
    assert re.search(r"NOT FOR CLINICAL USE", text)
