"""The manifests under deploy/kuberay/ against KubeRay v1.7's CRDs (tests/kuberay/, Apache-2.0, from
ray-project/kuberay ray-operator/config/crd/bases/), offline: no Kubernetes API server here.

A CRD's ``openAPIV3Schema`` does not say ``additionalProperties: false``: the API server prunes unknown fields
silently, so a misspelled field would be dropped, not reported. The validator here closes every object schema that
has ``properties`` and neither ``additionalProperties`` nor ``x-kubernetes-preserve-unknown-fields`` (as
``kubectl apply --validate=strict`` does on a live cluster), so a misspelled field anywhere, pod templates included,
is an error. Not checked: CEL rules (``x-kubernetes-validations``) and what the operator does at run time.

cronjob.yaml is a plain batch/v1 CronJob, not a CRD: its pod template is checked against the Kubernetes
PodTemplateSpec schema embedded in the RayJob CRD, and the CronJob / Job fields around it against the batch/v1 field
lists written out below (from the Kubernetes API reference)."""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CRDS = Path(__file__).parent / "kuberay"
MANIFESTS = ROOT / "deploy" / "kuberay"


def closed(schema):
    """A copy of an OpenAPI v3 schema in which every object with ``properties`` rejects unknown fields."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if "properties" in schema and isinstance(schema["properties"], dict):
        out["properties"] = {name: closed(s) for name, s in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


@functools.cache
def crd_schema(name: str) -> dict:
    # the safe loader, in its C implementation when PyYAML has one (2 MB of CRD: about 7x faster)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((CRDS / f"ray.io_{name}.yaml").read_text(), Loader=loader)  # a safe loader
    [version] = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [f"{group}/{version['name']}"]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    return closed(schema)


POD_TEMPLATE = crd_schema("rayjobs")["properties"]["spec"]["properties"]["submitterPodTemplate"]
OBJECT_META = POD_TEMPLATE["properties"]["metadata"]
INT = {"type": "integer"}
JOB_SPEC = {  # batch/v1 JobSpec
    "type": "object",
    "required": ["template"],
    "additionalProperties": False,
    "properties": {
        **{k: INT for k in ("activeDeadlineSeconds", "backoffLimit", "backoffLimitPerIndex", "completions")},
        **{k: INT for k in ("maxFailedIndexes", "parallelism", "ttlSecondsAfterFinished")},
        "completionMode": {"enum": ["NonIndexed", "Indexed"]},
        "podReplacementPolicy": {"enum": ["TerminatingOrFailed", "Failed"]},
        **{k: {"type": "object"} for k in ("podFailurePolicy", "selector", "successPolicy")},
        **{k: {"type": "boolean"} for k in ("manualSelector", "suspend")},
        "managedBy": {"type": "string"},
        "template": POD_TEMPLATE,
    },
}
CRONJOB = {  # batch/v1 CronJob
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"enum": ["batch/v1"]},
        "kind": {"enum": ["CronJob"]},
        "metadata": OBJECT_META,
        "spec": {
            "type": "object",
            "required": ["schedule", "jobTemplate"],
            "additionalProperties": False,
            "properties": {
                "schedule": {"type": "string", "minLength": 1},
                "timeZone": {"type": "string"},
                "concurrencyPolicy": {"enum": ["Allow", "Forbid", "Replace"]},
                **{k: INT for k in ("startingDeadlineSeconds", "successfulJobsHistoryLimit", "failedJobsHistoryLimit")},
                "suspend": {"type": "boolean"},
                "jobTemplate": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"metadata": OBJECT_META, "spec": JOB_SPEC},
                },
            },
        },
    },
}
SCHEMAS = {"RayJob": crd_schema("rayjobs"), "RayCronJob": crd_schema("raycronjobs"), "CronJob": CRONJOB}


def errors(manifest: dict) -> list[str]:
    validator = jsonschema.Draft7Validator(SCHEMAS[manifest["kind"]])  # the schemas are never mutated
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(manifest)]


def load(name: str) -> dict:
    return yaml.safe_load((MANIFESTS / name).read_text())


def test_every_manifest_validates():
    names = sorted(p.name for p in MANIFESTS.glob("*.yaml"))
    assert names == ["cronjob.yaml", "raycronjob.yaml", "rayjob.yaml"]
    for name in names:
        assert errors(load(name)) == [], name


def test_what_the_manifests_run():
    job, cron, plain = load("rayjob.yaml"), load("raycronjob.yaml"), load("cronjob.yaml")
    assert job["spec"]["entrypoint"].startswith("python -m deploy.cli run ")
    assert cron["spec"]["jobTemplate"]["entrypoint"].startswith("python -m deploy.cli retrain ")
    assert "--once" in cron["spec"]["jobTemplate"]["entrypoint"].split()
    assert plain["spec"]["concurrencyPolicy"] == "Forbid"
    [container] = plain["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["command"][:4] == ["python", "-m", "deploy.cli", "retrain"] and "--once" in container["args"]
    for spec in (job["spec"], cron["spec"]["jobTemplate"]):
        [gpu] = spec["rayClusterSpec"]["workerGroupSpecs"]
        [worker] = gpu["template"]["spec"]["containers"]
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert spec["shutdownAfterJobFinishes"] is True
    assert "RayCronJob" in (MANIFESTS / "raycronjob.yaml").read_text().split("feature gate")[1][:40]


def _head_container(m):
    return m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


def _cron_container(m):
    return m["spec"]["jobTemplate"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


def _plain_container(m):
    return m["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def _rename(d: dict, old: str, new: str) -> None:
    d[new] = d.pop(old)


@pytest.mark.parametrize(
    ("name", "mutate", "where"),
    [
        ("rayjob.yaml", lambda m: _rename(m["spec"], "entrypoint", "entrypiont"), "spec"),
        ("rayjob.yaml", lambda m: _rename(m["spec"]["rayClusterSpec"], "workerGroupSpecs", "workerGroupSpec"), ""),
        # deep inside the embedded pod template: a container's resources, a volume mount
        ("rayjob.yaml", lambda m: _rename(_head_container(m)["resources"], "limits", "limts"), "resources"),
        ("rayjob.yaml", lambda m: _head_container(m)["volumeMounts"][0].update(mountpath="/x"), "volumeMounts"),
        ("rayjob.yaml", lambda m: _head_container(m).update(image=7), "image"),  # a wrong type
        ("rayjob.yaml", lambda m: m["spec"]["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"), ""),
        ("raycronjob.yaml", lambda m: _rename(m["spec"], "schedule", "schedual"), "spec"),
        ("raycronjob.yaml", lambda m: _cron_container(m).update(imagePullPolicyy="Always"), "containers"),
        ("raycronjob.yaml", lambda m: m["spec"].update(concurrencyPolicy="Forbid"), "spec"),  # not in v1.7's CRD
        ("cronjob.yaml", lambda m: m["spec"].update(concurrencyPolicy="forbid"), "concurrencyPolicy"),
        ("cronjob.yaml", lambda m: _rename(m["spec"]["jobTemplate"]["spec"], "backoffLimit", "backofLimit"), ""),
        ("cronjob.yaml", lambda m: _rename(_plain_container(m), "args", "arguments"), "containers"),
        ("cronjob.yaml", lambda m: _plain_container(m)["env"][0].update(valu="x"), "env"),
    ],
)
def test_a_misspelled_field_fails(name, mutate, where):
    manifest = load(name)
    mutate(manifest)
    found = errors(manifest)
    assert found, f"{name}: the broken manifest passed"
    assert any(where in e for e in found), found


def test_the_crds_schemas_are_closed_only_where_they_list_properties():
    schema = SCHEMAS["RayJob"]
    limits = _head_container_schema(schema)["properties"]["resources"]["properties"]["limits"]
    assert limits["additionalProperties"] != False  # noqa: E712 - a map (cpu, memory, nvidia.com/gpu): stays open
    assert _head_container_schema(schema)["additionalProperties"] is False


def _head_container_schema(schema):
    spec = schema["properties"]["spec"]["properties"]["rayClusterSpec"]["properties"]["headGroupSpec"]
    return spec["properties"]["template"]["properties"]["spec"]["properties"]["containers"]["items"]
