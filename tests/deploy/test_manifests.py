"""Kubernetes and KServe manifests: rendered, schema-checked and held to the deployment policy.

Each kustomize overlay is rendered with kubectl's built-in kustomize and every object is validated
(strictly: unknown fields are errors) against the API schemas of KUBERNETES_VERSION with
kubernetes-validate. The KServe InferenceService is validated against the openAPIV3Schema of
KServe's CRD in ../shared, closed the same way. Tools missing from the environment fail the test:
they are dev dependencies (see conftest.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from service.settings import Settings

# The Kubernetes release whose API schemas the manifests must satisfy (docs/DEPLOY.md says it too).
KUBERNETES_VERSION = "1.33.0"
ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu")
KSERVE_MANIFEST = DEPLOY / "kserve" / "inferenceservice.yaml"
KSERVE_CRD = ROOT.parent / "shared" / "reference" / "schemas" / "kserve-inferenceservices-crd.yaml"
CONTAINER_PORT = 8080
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, kubectl: str) -> tuple[str, dict[str, Obj]]:
    """(overlay name, rendered objects by kind); each kind occurs once."""
    path = DEPLOY / "overlays" / request.param
    run = subprocess.run(
        [kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60, check=False
    )
    assert run.returncode == 0, f"kubectl kustomize {path} failed:\n{run.stderr}"
    objects = [o for o in yaml.safe_load_all(run.stdout) if o]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), f"a kind occurs twice in {request.param}"
    return request.param, by_kind


def pod_spec(objects: dict[str, Obj]) -> Obj:
    return objects["Deployment"]["spec"]["template"]["spec"]


def settings(objects: dict[str, Obj]) -> dict[str, str]:
    return objects["ConfigMap"]["data"]


def test_overlay_objects_are_valid_kubernetes(overlay: tuple[str, dict[str, Obj]]) -> None:
    _, objects = overlay
    assert set(objects) == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Service",
    }
    for obj in objects.values():
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(map(str, exc.absolute_path))
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} {where}: {exc.message}")


def test_pod_runs_locked_down(overlay: tuple[str, dict[str, Obj]]) -> None:
    _, objects = overlay
    pod = pod_spec(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    # service links would inject MCSERVE_PORT=tcp://... into the service's own settings
    assert pod["enableServiceLinks"] is False
    (container,) = pod["containers"]
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}
    assert context["runAsNonRoot"] is True
    assert context["seccompProfile"] == {"type": "RuntimeDefault"}
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = (m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]


def test_probes_and_settings_agree_on_the_port(overlay: tuple[str, dict[str, Obj]]) -> None:
    _, objects = overlay
    (container,) = pod_spec(objects)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert list(ports.values()) == [CONTAINER_PORT]
    assert settings(objects)["MCSERVE_PORT"] == str(CONTAINER_PORT)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert ports.get(get["port"], get["port"]) == CONTAINER_PORT, probe
    service_port = objects["Service"]["spec"]["ports"][0]["targetPort"]
    assert ports.get(service_port, service_port) == CONTAINER_PORT


def test_settings_come_from_the_config_map(overlay: tuple[str, dict[str, Obj]]) -> None:
    _, objects = overlay
    (container,) = pod_spec(objects)["containers"]
    refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
    assert refs == [objects["ConfigMap"]["metadata"]["name"]]
    assert all(key.startswith("MCSERVE_") for key in settings(objects))


def shutdown_s(env: dict[str, str]) -> float:
    """The longest a shutdown takes: the grace, the drain, then the audit queue's flush (each
    the manifest's setting, else the service's default), and closing the compute process and
    the audit store (their limits in the code)."""
    import inspect

    from service.audit.sink import SinkClient
    from service.engine.worker import CLOSE_S

    names = ("drain_grace_s", "drain_timeout_s", "audit_flush_timeout_s")
    fields = Settings.model_fields
    settings_s = sum(float(env.get(f"MCSERVE_{n.upper()}", fields[n].default)) for n in names)
    # The store's close: its answer, then the writer process's exit, each within timeout_s.
    store_s = 2 * inspect.signature(SinkClient.close).parameters["timeout_s"].default
    return settings_s + CLOSE_S + store_s


def test_grace_period_outlasts_the_drain_and_the_audit_flush(
    overlay: tuple[str, dict[str, Obj]],
) -> None:
    """40 s covered the grace and the drain (25 s) but not the audit flush after them (30 s by
    default): the kubelet could kill a pod while it wrote the records of answers it gave."""
    _, objects = overlay
    assert pod_spec(objects)["terminationGracePeriodSeconds"] > shutdown_s(settings(objects))


def test_the_startup_budget_covers_loading(overlay: tuple[str, dict[str, Obj]]) -> None:
    """uvicorn opens the port after the bundles load and warm up: 2 minutes of startup probe
    restarted pods whose bundles took longer, in a loop."""
    _, objects = overlay
    (container,) = pod_spec(objects)["containers"]
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600


def test_resources_and_gpu_only_in_the_gpu_overlay(overlay: tuple[str, dict[str, Obj]]) -> None:
    name, objects = overlay
    (container,) = pod_spec(objects)["containers"]
    resources = container["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources[kind]), kind
    if name == "gpu":
        assert int(resources["limits"][GPU]) == 1
        assert container["image"].endswith("-cuda")
        assert settings(objects)["MCSERVE_DEVICE"] == "cuda"
    else:
        assert GPU not in resources["limits"] and GPU not in resources.get("requests", {})
        assert not container["image"].endswith("-cuda")
        assert settings(objects)["MCSERVE_DEVICE"] == "cpu"


def test_autoscaler_budget_and_service_select_the_pods(overlay: tuple[str, dict[str, Obj]]) -> None:
    _, objects = overlay
    deployment = objects["Deployment"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"

    hpa = objects["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]

    for selector in (
        objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        deployment["spec"]["selector"]["matchLabels"],
        objects["Service"]["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()


# ---- KServe ----


def closed(schema: Any) -> Any:
    """A copy of an OpenAPI schema that rejects unknown fields, as strict field validation does."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def crd_schema(api_version: str) -> Obj:
    if not KSERVE_CRD.is_file():
        pytest.fail(f"KServe CRD not found at {KSERVE_CRD} (the shared reference beside the repo)")
    with KSERVE_CRD.open() as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (served,) = (v for v in crd["spec"]["versions"] if v["name"] == version)
    schema: Obj = closed(served["schema"]["openAPIV3Schema"])
    return schema


@pytest.fixture(scope="module")
def isvc() -> Obj:
    with KSERVE_MANIFEST.open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    assert len(docs) == 1
    return docs[0]


def test_inference_service_matches_the_crd(isvc: Obj) -> None:
    assert isvc["kind"] == "InferenceService"
    schema = crd_schema(isvc["apiVersion"])
    errors = sorted(
        jsonschema.Draft7Validator(schema).iter_errors(isvc), key=lambda e: list(e.absolute_path)
    )
    assert not errors, "\n".join(
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors[:10]
    )


def test_inference_service_runs_the_image_with_the_v2_protocol(isvc: Obj) -> None:
    predictor = isvc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"
    assert container["image"].startswith("registry.example.com/mcserve:")
    assert [p["containerPort"] for p in container["ports"]] == [CONTAINER_PORT]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2"
    assert env["MCSERVE_PORT"] == str(CONTAINER_PORT)
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert predictor["terminationGracePeriodSeconds"] > shutdown_s(env)
    probe = container["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 600
    assert predictor["enableServiceLinks"] is False
    assert predictor["securityContext"]["runAsNonRoot"] is True
    context = container["securityContext"]
    assert context["allowPrivilegeEscalation"] is False
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"] == {"drop": ["ALL"]}


def test_closed_schema_rejects_unknown_fields() -> None:
    schema = closed({"type": "object", "properties": {"a": {"type": "object", "properties": {}}}})
    assert jsonschema.Draft7Validator(schema).is_valid({"a": {}})
    assert not jsonschema.Draft7Validator(schema).is_valid({"a": {"typo": 1}})
