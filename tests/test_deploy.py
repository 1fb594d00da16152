"""deploy/: every manifest is valid against the Kubernetes schemas of KUBERNETES_VERSION (offline, from
the schemas kubernetes-validate ships), and the manifests say what prefd needs: gRPC probes on the
names prefd's health service reports, `prefd migrate` in the Job, settings from the ConfigMap and the
Secret that prefd's own Settings accept, a PodDisruptionBudget over the Deployment's pods, and
resource requests that hold PREFD_CACHE_BYTES."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from prefd_server.aiconfig.secretbox import parse_keyring
from prefd_server.preferences.service import PreferencesService
from prefd_server.settings import Settings
from tests.helpers.processes import ROOT

DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.31.0"
# Settings every replica must share and that must never sit in a ConfigMap (README, Container).
SECRET_KEYS = {"DATABASE_URL", "REDIS_URL", "PREFD_JWT_SECRET", "PREFD_SECRET_KEY"}
# The placeholder Secret is a template outside the kustomization (applying it would overwrite real keys).
TEMPLATES = {"secret.yaml"}

Manifest = dict[str, Any]


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml")


def _load(path: Path) -> list[Manifest]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _all() -> list[Manifest]:
    return [doc for path in _manifest_files() for doc in _load(path)]


def _one(kind: str, name: str | None = None) -> Manifest:
    found = [d for d in _all() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _container(workload: Manifest) -> Manifest:
    containers = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: Manifest = containers[0]
    return container


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (binary or decimal suffix, or plain bytes) in bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti|k|M|G|T)?", quantity)
    assert match, f"unsupported memory quantity {quantity!r}"
    factors = {
        None: 1,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "k": 10**3,
        "M": 10**6,
        "G": 10**9,
        "T": 10**12,
    }
    return int(match.group(1)) * factors[match.group(2)]


@pytest.mark.parametrize("path", _manifest_files(), ids=lambda p: p.name)
def test_every_manifest_is_valid_for_the_pinned_kubernetes(path: Path) -> None:
    documents = _load(path)
    assert documents, f"{path.name} holds no manifest"
    for document in documents:
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server.
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_validator_refuses_a_broken_manifest() -> None:
    deployment = _one("Deployment")
    broken = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    misspelt = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_but_the_secret_template() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Kustomization"
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in _manifest_files()} - TEMPLATES
    assert all((DEPLOY / name).is_file() for name in listed)


def test_deployment_runs_the_image_s_serve_with_replicas_and_a_rolling_update() -> None:
    deployment = _one("Deployment", "prefd")
    assert deployment["spec"]["replicas"] >= 2
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    container = _container(deployment)
    # The Dockerfile's ENTRYPOINT is `prefd`, so the arguments are the subcommand.
    assert 'ENTRYPOINT ["prefd"]' in (ROOT / "Dockerfile").read_text()
    assert container["args"] == ["serve"]
    assert "command" not in container


def test_probes_are_native_grpc_on_prefd_s_health_names() -> None:
    deployment = _one("Deployment", "prefd")
    config = _one("ConfigMap", "prefd")["data"]
    container = _container(deployment)
    port = int(config["PREFD_PORT"])
    grpc_ports = {p["containerPort"] for p in container["ports"] if p["name"] == "grpc"}
    assert grpc_ports == {port}
    readiness = container["readinessProbe"]["grpc"]
    liveness = container["livenessProbe"]["grpc"]
    startup = container["startupProbe"]["grpc"]
    assert readiness == {"port": port, "service": PreferencesService.SERVICE_NAME}
    assert liveness == {"port": port, "service": ""}
    assert startup == {"port": port, "service": ""}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert set(container[probe]) & {"exec", "httpGet", "tcpSocket"} == set()
    # A liveness that outlasts a short PostgreSQL outage (the server's status follows PostgreSQL).
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_graceful_shutdown_outlasts_the_grace_period_and_the_pre_stop_pause() -> None:
    pod = _one("Deployment", "prefd")["spec"]["template"]["spec"]
    config = _one("ConfigMap", "prefd")["data"]
    pre_stop = _container(_one("Deployment", "prefd"))["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = float(config["PREFD_GRACE_PERIOD_S"])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace


def test_pods_run_as_the_image_s_non_root_user_on_a_read_only_root() -> None:
    uid = int(re.search(r"useradd .*--uid (\d+)", (ROOT / "Dockerfile").read_text()).group(1))  # type: ignore[union-attr]
    data_dir = _one("ConfigMap", "prefd")["data"]["PREFD_DATA_DIR"]
    for workload in (_one("Deployment", "prefd"), _one("Job")):
        pod = workload["spec"]["template"]["spec"]
        container = _container(workload)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == uid
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        # The data directory and /tmp are the only writable places, and they are pod-local volumes.
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert set(mounts) == {data_dir, "/tmp"}
        assert all("emptyDir" in volumes[name] for name in mounts.values())


def test_the_job_runs_prefd_migrate_with_the_deployment_s_image_and_settings() -> None:
    job = _one("Job", "prefd-migrate")
    server = _container(_one("Deployment", "prefd"))
    migrate = _container(job)
    assert migrate["args"] == ["migrate"]
    assert "command" not in migrate
    assert migrate["image"] == server["image"]
    assert migrate["envFrom"] == server["envFrom"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"OnFailure", "Never"}


def test_settings_come_from_the_config_map_and_the_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    config_map = _one("ConfigMap", "prefd")
    secret = _one("Secret", "prefd")
    for workload in (_one("Deployment", "prefd"), _one("Job")):
        container = _container(workload)
        sources = container["envFrom"]
        assert {"configMapRef": {"name": "prefd"}} in sources
        assert {"secretRef": {"name": "prefd"}} in sources
        assert "env" not in container, "settings belong in the ConfigMap or the Secret"
    config: dict[str, str] = config_map["data"]
    secrets: dict[str, str] = secret["stringData"]
    assert set(secrets) == SECRET_KEYS
    assert not set(config) & SECRET_KEYS
    # Every ConfigMap key is a prefd setting: a misspelt name would be silently ignored.
    fields = {f"PREFD_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= fields, set(config) - fields
    # prefd's own Settings accept the ConfigMap's values (sizes, numbers, booleans) with the Secret's.
    for name in [n for n in os.environ if n.startswith("PREFD_") or n in SECRET_KEYS]:
        monkeypatch.delenv(name)
    for name, value in {**config, **secrets}.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.port == int(config["PREFD_PORT"])
    assert settings.metrics_port == int(config["PREFD_METRICS_PORT"])
    assert settings.workers == 1
    assert not settings.embedded
    assert settings.print_token is False
    assert str(settings.data_dir) == config["PREFD_DATA_DIR"]


def test_the_secret_template_holds_placeholders_prefd_refuses() -> None:
    secret = _one("Secret", "prefd")["stringData"]
    # A forgotten placeholder master key stops prefd at start instead of encrypting under a known key.
    with pytest.raises(ValueError, match="master key"):
        parse_keyring(secret["PREFD_SECRET_KEY"])
    assert ".invalid" in secret["DATABASE_URL"] and ".invalid" in secret["REDIS_URL"]
    assert "kubectl create secret generic prefd" in (DEPLOY / "secret.yaml").read_text()


def test_service_and_pdb_select_the_deployment_s_pods() -> None:
    deployment = _one("Deployment", "prefd")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    container = _container(deployment)
    named_ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = _one("ConfigMap", "prefd")["data"]
    assert named_ports == {"grpc": int(config["PREFD_PORT"]), "metrics": int(config["PREFD_METRICS_PORT"])}

    service = _one("Service", "prefd")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert set(ports) == {"grpc", "metrics"}
    assert all(p["targetPort"] in named_ports for p in ports.values())

    pdb = _one("PodDisruptionBudget", "prefd")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    # The migration Job's pods are not counted as serving replicas.
    job_labels = _one("Job")["spec"]["template"]["metadata"]["labels"]
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= job_labels.items()
    assert not service["spec"]["selector"].items() <= job_labels.items()


def test_resource_requests_hold_the_cache_budget_and_a_measured_base() -> None:
    config = _one("ConfigMap", "prefd")["data"]
    cache_bytes = Settings(cache_bytes=config["PREFD_CACHE_BYTES"]).cache_bytes
    readme = (DEPLOY / "README.md").read_text()
    for workload in (_one("Deployment", "prefd"), _one("Job")):
        resources = _container(workload)["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"])
        assert _quantity_bytes(resources["limits"]["memory"]) >= _quantity_bytes(resources["requests"]["memory"])
    server = _container(_one("Deployment", "prefd"))["resources"]
    request = _quantity_bytes(server["requests"]["memory"])
    # deploy/README.md records the measured base (RSS under load less the caches' bytes).
    match = re.search(r"measured base: (\d+) MiB", readme)
    assert match, "deploy/README.md must state the measured base"
    base = int(match.group(1)) * 2**20
    assert request >= cache_bytes + base
    # The request is the sum rounded up, not a multiple of it.
    assert request < cache_bytes + base + 64 * 2**20
