"""Scheduling files: KubeRay manifests use only fields of the v1 API, and every schedule runs the
commands that docs/scheduling.md documents."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCS = ROOT / "docs" / "scheduling.md"

# JSON field names of the KubeRay ray.io/v1 Go types at release v1.6.1
# (ray-operator/apis/ray/v1/rayjob_types.go, raycluster_types.go, raycronjob_types.go).
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "preRunningDeadlineSeconds", "shutdownAfterJobFinishes", "suspend",
}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
RAYCLUSTER_SPEC = {
    "upgradeStrategy", "authOptions", "suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
    "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec", "rayVersion", "workerGroupSpecs",
}
HEAD_GROUP_SPEC = {"template", "headService", "enableIngress", "resources", "labels", "rayStartParams", "serviceType"}
HEAD_GROUP_REQUIRED = {"template", "rayStartParams"}
WORKER_GROUP_SPEC = {
    "suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds", "resources", "labels",
    "rayStartParams", "template", "scaleStrategy", "numOfHosts",
}
WORKER_GROUP_REQUIRED = {"groupName", "minReplicas", "maxReplicas", "rayStartParams", "template"}
AUTOSCALER_OPTIONS = {
    "resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds", "upscalingMode", "version",
    "env", "envFrom", "volumeMounts",
}
# RayCronJob is alpha in v1.6 (feature gate RayCronJob); spec.timeZone only exists from v1.7.
RAYCRONJOB_SPEC = {"jobTemplate", "schedule", "suspend"}
RAYCRONJOB_REQUIRED = {"jobTemplate", "schedule"}


def manifests() -> list[tuple[str, dict]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path.name, doc))
    return found


def documented_commands() -> set[str]:
    """Every `python jobs/...` command in the docs' code blocks (also after `ray job submit ... --`)."""
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split(" -- ", 1)[-1].strip()
            if line.startswith("python jobs/"):
                commands.add(line)
    return commands


def check_keys(where: str, found: dict, allowed: set[str], required: set[str] = frozenset()) -> None:
    assert isinstance(found, dict), f"{where} must be a mapping"
    unknown, missing = set(found) - allowed, required - set(found)
    assert not unknown, f"{where}: fields not in the KubeRay v1 API: {sorted(unknown)}"
    assert not missing, f"{where}: required fields missing: {sorted(missing)}"


def check_pod_template(where: str, template: dict) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers), f"{where}: containers need an image"
    for container in containers:
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets == ["denoise-env"], f"{where}: the jobs need the denoise-env Secret"


def check_cluster_spec(where: str, spec: dict) -> None:
    check_keys(where, spec, RAYCLUSTER_SPEC, {"headGroupSpec"})
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the image's Ray"
    check_keys(f"{where}.headGroupSpec", spec["headGroupSpec"], HEAD_GROUP_SPEC, HEAD_GROUP_REQUIRED)
    check_pod_template(f"{where}.headGroupSpec", spec["headGroupSpec"]["template"])
    for group in spec.get("workerGroupSpecs", []):
        name = f"{where}.workerGroupSpecs[{group.get('groupName')}]"
        check_keys(name, group, WORKER_GROUP_SPEC, WORKER_GROUP_REQUIRED)
        assert group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"], name
        check_pod_template(name, group["template"])
    if "autoscalerOptions" in spec:
        check_keys(f"{where}.autoscalerOptions", spec["autoscalerOptions"], AUTOSCALER_OPTIONS)


def check_job_spec(where: str, spec: dict) -> str:
    check_keys(where, spec, RAYJOB_SPEC, {"entrypoint", "rayClusterSpec"})
    assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    assert yaml.safe_load(spec["runtimeEnvYAML"]) == {"working_dir": "/app"}, "code comes from the image"
    assert spec["shutdownAfterJobFinishes"] is True, f"{where}: per-run clusters must be deleted"
    check_cluster_spec(f"{where}.rayClusterSpec", spec["rayClusterSpec"])
    return spec["entrypoint"]


def test_every_manifest_is_known_and_uses_only_v1_fields():
    kinds = {}
    for name, doc in manifests():
        kinds.setdefault(doc["kind"], []).append(name)
        if doc["kind"] in ("RayJob", "RayCronJob", "RayCluster"):
            assert doc["apiVersion"] == "ray.io/v1", name
        if doc["kind"] == "RayJob":
            check_job_spec(f"{name}.spec", doc["spec"])
        elif doc["kind"] == "RayCronJob":
            check_keys(f"{name}.spec", doc["spec"], RAYCRONJOB_SPEC, RAYCRONJOB_REQUIRED)
            assert len(doc["spec"]["schedule"].split()) == 5, "standard five-field cron schedule"
            check_job_spec(f"{name}.spec.jobTemplate", doc["spec"]["jobTemplate"])
        elif doc["kind"] == "RayCluster":
            check_cluster_spec(f"{name}.spec", doc["spec"])
        elif doc["kind"] == "CronJob":
            assert doc["apiVersion"] == "batch/v1" and doc["spec"]["concurrencyPolicy"] == "Forbid"
        else:
            assert doc["kind"] == "Secret" and name.endswith(".example.yaml"), f"unexpected {doc['kind']} in {name}"
    assert sorted(kinds) == ["CronJob", "RayCluster", "RayCronJob", "RayJob", "Secret"]
    assert len(kinds["RayJob"]) == 2


def test_schedules_run_the_documented_commands():
    documented = documented_commands()
    train = "python jobs/train.py --config configs/sidd.yaml"
    assert train in documented
    entrypoints = {}
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            entrypoints[name] = doc["spec"]["entrypoint"]
        elif doc["kind"] == "RayCronJob":
            entrypoints[name] = doc["spec"]["jobTemplate"]["entrypoint"]
        elif doc["kind"] == "CronJob":
            [container] = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
            argv = container["command"]
            assert argv[:3] == ["ray", "job", "submit"] and "--working-dir" in argv
            entrypoints[name] = shlex.join(argv[argv.index("--") + 1:])
    assert entrypoints["rayjob-train.yaml"] == train
    nightly = {v for k, v in entrypoints.items() if k != "rayjob-train.yaml"}
    assert len(nightly) == 1 and nightly <= documented, (nightly, documented)
    assert "--date today" in nightly.pop()


def test_cron_script_submits_the_documented_command():
    script = (ROOT / "infra" / "cron" / "nightly-denoise.sh").read_text()
    defaults = dict(re.findall(r"(\w+)=\$\{DENOISE_\w+:-([^}]+)\}", script))
    tail = script.split("exec ray job submit", 1)[1]
    submit = " ".join(line.strip().rstrip("\\").strip() for line in tail.splitlines())
    assert "--working-dir ." in submit
    command = submit.split(" -- ", 1)[1].replace('"$@"', "").strip()
    for variable, value in defaults.items():
        command = command.replace(f'"${{{variable}}}"', value)
    assert command in documented_commands()
    crontab = (ROOT / "infra" / "cron" / "crontab").read_text()
    [line] = [ln for ln in crontab.splitlines() if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(line.split()[:5]) == 5 and "infra/cron/nightly-denoise.sh" in line


@pytest.mark.parametrize("command", sorted(documented_commands()))
def test_documented_commands_parse(command):
    """The job CLIs accept every documented command line (argument parsing only)."""
    argv = shlex.split(command)[2:]
    if "denoise.py" in command:
        from jobs.denoise import parse_args

        from pipeline.infer import DenoiseConfig

        DenoiseConfig.build(**vars(parse_args(argv)))
    else:
        assert Path(ROOT / argv[argv.index("--config") + 1]).is_file()


def test_image_installs_the_pinned_torch_and_python_311():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch_pin] = [p for p in pins if p.startswith("torch==")]
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in dockerfile
    assert re.search(r"^FROM python:3\.11", dockerfile, flags=re.M)
    assert dockerfile.index("download.pytorch.org/whl/${TORCH_VARIANT}") < dockerfile.index("-r /tmp/requirements.txt")
