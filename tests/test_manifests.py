"""Scheduling files. Every workload directory of infra/k8s renders to one workload plus the shared
NetworkPolicy, validates against the KubeRay CRDs of its version floor and of the newest release and
against the Kubernetes schemas, and holds no Secret. The Ray clusters put all work on GPU workers,
are fenced and token-authenticated, are freed minutes after a run whatever its outcome, and are
never retried on a permanent failure. The schedules run the commands docs/scheduling.md documents,
with a model and alias that the documented training sets. The cron submitter retries only a
transient failure and never lets two nights overlap."""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCS = ROOT / "docs" / "scheduling.md"
CRON_SCRIPT = ROOT / "infra" / "cron" / "nightly-denoise.sh"
SCHEMAS = ROOT / "tests" / "schemas"

# The version floors docs/scheduling.md states, and the newest KubeRay release (tests/schemas).
KUBERAY_FLOOR = {"RayJob": "1.6.0", "RayCluster": "1.6.0", "RayCronJob": "1.7.0"}
KUBERAY_NEWEST = "1.7.0"
KUBERNETES_FLOOR = "1.31"  # podFailurePolicy GA: before, a cluster may have it off and drop it
CRD_FILE = {"RayJob": "rayjobs", "RayCluster": "rayclusters", "RayCronJob": "raycronjobs"}
# workload directory -> the one workload it applies
WORKLOADS = {"train": "RayJob", "nightly": "RayCronJob", "denoise-once": "RayJob", "cluster": "RayCluster",
             "cron-fallback": "CronJob"}
IMAGE = "denoise"  # the manifests' placeholder; each kustomization's `images:` names the real one
RAY_NODE = {"app": "denoise", "denoise-ray": "node"}
SUBMITTER = {"app": "denoise", "denoise-ray": "submitter"}
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
# The jobs' exit codes (docs/scheduling.md, "Retries").
EXIT_OK, EXIT_BUG, EXIT_PERMANENT, EXIT_TRANSIENT, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 75, 130, 143


def walk(node, path=""):
    """Every (path, mapping) in a parsed manifest."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def containers(node) -> list[dict]:
    """Every container and init container under ``node`` (where kustomize's `images:` applies)."""
    return [c for _, n in walk(node) for key in ("containers", "initContainers")
            if isinstance(n.get(key), list) for c in n[key]]


# ---------------------------------------------------------------- rendering the workload directories

KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "images"}


def image_name(ref: str) -> str:
    """``registry/name:tag@digest`` without tag and digest, as kustomize matches `images:` names."""
    ref = ref.split("@", 1)[0]
    head, _, last = ref.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIR` for what these kustomizations use: `resources` and `images`."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    assert set(kustomization) <= KUSTOMIZATION_KEYS, f"{directory}: renderer knows only {sorted(KUSTOMIZATION_KEYS)}"
    objects = []
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_relative_to(K8S), f"{directory}: {entry} is outside infra/k8s"
        objects += render(path) if path.is_dir() else [d for d in yaml.safe_load_all(path.read_text()) if d]
    for image in kustomization.get("images", []):
        for container in containers(objects):
            if image_name(container["image"]) == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return objects


@functools.cache
def _rendered(workload: str) -> str:
    return json.dumps(render(K8S / workload))


def rendered(workload: str) -> list[dict]:
    return json.loads(_rendered(workload))


def all_objects() -> list[tuple[str, dict]]:
    """(workload, object) for every object every workload directory applies."""
    return [(w, doc) for w in WORKLOADS for doc in rendered(w)]


def the_workload(workload: str) -> dict:
    [doc] = [d for d in rendered(workload) if d["kind"] == WORKLOADS[workload]]
    return doc


def job_specs() -> list[tuple[str, dict]]:
    """Every RayJob spec: the RayJobs' and the RayCronJob's template."""
    specs = []
    for workload, doc in all_objects():
        if doc["kind"] == "RayJob":
            specs.append((workload, doc["spec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((f"{workload}.jobTemplate", doc["spec"]["jobTemplate"]))
    return specs


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = [(n, s["rayClusterSpec"]) for n, s in job_specs()]
    return specs + [(w, d["spec"]) for w, d in all_objects() if d["kind"] == "RayCluster"]


def ray_pods(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def cron_pod(doc: dict) -> dict:
    return doc["spec"]["jobTemplate"]["spec"]["template"]


def test_every_workload_directory_applies_one_workload_and_the_network_policy():
    dirs = {p.parent.name for p in K8S.glob("*/kustomization.yaml")}
    assert dirs == {*WORKLOADS, "base"}
    for workload, kind in WORKLOADS.items():
        kinds = sorted(d["kind"] for d in rendered(workload))
        assert kinds == sorted([kind, "NetworkPolicy"]), (workload, kinds)
    assert [d["kind"] for d in render(K8S / "base")] == ["NetworkPolicy"]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_the_renderer_agrees_with_kubectl_kustomize(workload):
    out = subprocess.run(["kubectl", "kustomize", str(K8S / workload)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(yaml.safe_load_all(out.stdout), key=key) == sorted(rendered(workload), key=key)


def test_nothing_applies_everything_and_no_secret_is_applied():
    """`kubectl apply -f infra/k8s/` finds nothing to apply, and no workload carries a Secret: applying
    one never overwrites the real denoise-env with placeholders."""
    assert not [p.name for p in K8S.iterdir() if p.is_file() and p.suffix in (".yaml", ".yml", ".json")]
    assert all(d["kind"] != "Secret" for _, d in all_objects())
    example = K8S / "denoise-env.example.env"
    lines = [ln for ln in example.read_text().splitlines() if ln and not ln.startswith("#")]
    keys = dict(ln.split("=", 1) for ln in lines)
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DENOISE_S3_ENDPOINT", "MLFLOW_TRACKING_URI"} <= set(keys)
    assert "kubectl create secret generic denoise-env --from-env-file=" in example.read_text()
    assert "kubectl create secret generic denoise-env --from-env-file=" in DOCS.read_text()


def test_the_image_is_named_once_per_workload_directory():
    for path in K8S.glob("*/*.yaml"):
        if path.name != "kustomization.yaml":
            for doc in yaml.safe_load_all(path.read_text()):
                assert {c["image"] for c in containers(doc)} <= {IMAGE}, f"{path}: use the placeholder {IMAGE!r}"
    images = set()
    for workload in WORKLOADS:
        [entry] = yaml.safe_load((K8S / workload / "kustomization.yaml").read_text())["images"]
        assert entry["name"] == IMAGE
        images |= {c["image"] for c in containers(rendered(workload))}
    assert len(images) == 1 and IMAGE not in images, images    # every pod of every workload runs one image


# ---------------------------------------------------------------- schemas

def strict(schema: dict) -> dict:
    """A CRD's structural schema as a JSON Schema that rejects unknown fields, which the API server
    would otherwise drop without a word (a field of a newer KubeRay, a typo)."""
    out = dict(schema)
    if "properties" in schema:
        out["properties"] = {k: strict(v) for k, v in schema["properties"].items()}
        if "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(schema["additionalProperties"])
    if "items" in schema:
        out["items"] = strict(schema["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in schema:
            out[key] = [strict(s) for s in schema[key]]
    if schema.get("nullable") and "type" in schema:
        out["type"] = [schema["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str, version: str) -> jsonschema.Validator:
    vendored = json.loads((SCHEMAS / f"kuberay-{version}" / f"{CRD_FILE[kind]}.json").read_text())
    assert vendored["kind"] == kind and vendored["source"]["tag"] == f"v{version}"
    return jsonschema.Draft7Validator(strict(vendored["openAPIV3Schema"]))


def kuberay_versions(kind: str) -> list[str]:
    return sorted({KUBERAY_FLOOR[kind], KUBERAY_NEWEST})


@pytest.mark.parametrize("workload", sorted(w for w, kind in WORKLOADS.items() if kind in CRD_FILE))
def test_ray_workloads_validate_against_the_kuberay_crds_of_the_floor_and_the_newest_release(workload):
    doc = the_workload(workload)
    assert doc["apiVersion"] == "ray.io/v1"
    for version in kuberay_versions(doc["kind"]):
        errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
                  for e in crd_validator(doc["kind"], version).iter_errors(doc)]
        assert not errors, (f"KubeRay {version}", errors[:5])


def test_only_the_needed_crds_are_vendored():
    vendored = {(p.parent.name.removeprefix("kuberay-"), p.stem) for p in SCHEMAS.glob("kuberay-*/*.json")}
    assert vendored == {(v, CRD_FILE[kind]) for kind in CRD_FILE for v in kuberay_versions(kind)}
    assert all(p.stat().st_size < 5_000_000 for p in SCHEMAS.glob("kuberay-*/*.json"))


@pytest.mark.parametrize("version", [KUBERNETES_FLOOR, kubernetes_validate.utils.latest_version()])
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(version):
    seen = set()
    for workload, doc in all_objects():
        if doc["apiVersion"] == "ray.io/v1" or json.dumps(doc, sort_keys=True) in seen:
            continue
        seen.add(json.dumps(doc, sort_keys=True))
        kubernetes_validate.validate(doc, version, strict=True)
    assert {json.loads(d)["kind"] for d in seen} == {"NetworkPolicy", "CronJob"}


def test_the_kuberay_version_floor_is_stated_once():
    """docs/scheduling.md states each floor once; every other file points there instead."""
    claim = re.compile(r"KubeRay\s*(?:>=|≥|v)\s*\d|KubeRay\s+\d+\.\d+")
    files = [*ROOT.glob("docs/*.md"), ROOT / "README.md", *(p for p in (ROOT / "infra").rglob("*") if p.is_file())]
    elsewhere = [str(p.relative_to(ROOT)) for p in files if p != DOCS and claim.search(p.read_text(errors="ignore"))]
    assert not elsewhere, elsewhere
    text = DOCS.read_text()
    for floor in set(KUBERAY_FLOOR.values()):
        assert text.count(f"KubeRay >= {floor}") == 1, floor
    assert len(re.findall(r"KubeRay >= \d", text)) == len(set(KUBERAY_FLOOR.values()))


# ---------------------------------------------------------------- the Ray clusters

def test_every_ray_cluster_puts_work_on_autoscaled_gpu_workers():
    for name, spec in ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__, f"{name}: rayVersion must match the image's Ray"
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", f"{name}: no work on the head"
        assert spec["enableInTreeAutoscaling"] is True, name
        [group] = spec["workerGroupSpecs"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name
        assert group["maxReplicas"] >= 1, name
        pod = group["template"]["spec"]
        for container in pod["containers"]:
            for amounts in (container["resources"]["requests"], container["resources"]["limits"]):
                assert amounts["nvidia.com/gpu"] == "1", f"{name}: one GPU per worker"
        assert GPU_TOLERATION in pod["tolerations"], f"{name}: GPU nodes are tainted"
        assert "nvidia.com/gpu" not in json.dumps(spec["headGroupSpec"]), f"{name}: the head needs no GPU"


def test_every_ray_pod_has_a_memory_backed_dev_shm_and_the_settings_secret():
    for name, spec in ray_cluster_specs():
        for template in ray_pods(spec):
            pod = template["spec"]
            memory = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
            for container in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                assert mounts.get("/dev/shm") in memory, f"{name}.{container['name']}: /dev/shm must be RAM"
                secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
                assert secrets == ["denoise-env"], f"{name}: the jobs need the denoise-env Secret"
            assert template["metadata"]["labels"] == RAY_NODE, f"{name}: the NetworkPolicy selects Ray pods by label"


def test_ray_jobs_run_the_code_in_the_image():
    """No runtime environment: the image's WORKDIR holds the code, so nothing is uploaded."""
    for name, spec in job_specs():
        assert "runtimeEnvYAML" not in spec, name
        assert spec["submissionMode"] == "K8sJobMode", name
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^WORKDIR /app$", dockerfile, flags=re.M)
    assert all(re.search(rf"^COPY {d} \./{d}$", dockerfile, flags=re.M) for d in ("pipeline", "jobs", "configs"))


def test_the_one_off_run_is_one_night():
    assert the_workload("denoise-once")["spec"] == the_workload("nightly")["spec"]["jobTemplate"]


def test_kuberay_accepts_the_names():
    """KubeRay's limits (controllers/ray/utils/constant.go at v1.7.0): a RayCluster name of at most 53
    characters, a RayJob 47, a RayCronJob 36 (its RayJobs are named <name>-<minute>)."""
    limits = {"RayCluster": 53, "RayJob": 47, "RayCronJob": 36}
    for _, doc in all_objects():
        if doc["kind"] in limits:
            assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            assert len(doc["metadata"]["name"]) <= limits[doc["kind"]], doc["metadata"]["name"]


# ---------------------------------------------------------------- lifecycle and retries

# (outcome, the RayJob's status.jobStatus, status.jobDeploymentStatus) as KubeRay's RayJob controller
# sets them: a failed entrypoint is FAILED/Failed; activeDeadlineSeconds and a failed submitter fail
# the deployment whatever the job did; a job whose submitter did not finish in the grace period is
# Complete whatever it ended as.
OUTCOMES = [("succeeded", "SUCCEEDED", "Complete"), ("failed", "FAILED", "Failed"),
            ("past its deadline", "RUNNING", "Failed"), ("never submitted", "PENDING", "Failed"),
            ("failed, submitter late", "FAILED", "Complete")]
FREED_WITHIN = 600       # seconds from the end of a run to its GPUs' release
KEPT_AT_MOST = 7 * 86400  # a finished RayJob (and its submitter Job) is deleted by then


def deletion_delay(spec: dict, policy: str, job_status: str, deployment_status: str) -> int | None:
    """Seconds after the end until KubeRay applies ``policy``, as its handleDeletionRules matches rules."""
    delays = [r["condition"].get("ttlSeconds", 0) for r in spec["deletionStrategy"]["deletionRules"]
              if r["policy"] in (policy, "DeleteSelf")
              and (r["condition"].get("jobStatus") == job_status
                   or r["condition"].get("jobDeploymentStatus") == deployment_status)]
    return min(delays, default=None)


def test_every_rayjob_frees_its_gpus_within_minutes_and_deletes_itself_after_every_outcome():
    for name, spec in job_specs():
        # deletionRules exclude shutdownAfterJobFinishes and the global TTL (KubeRay validation.go)
        assert not spec.get("shutdownAfterJobFinishes") and not spec.get("ttlSecondsAfterFinished"), name
        rules = spec["deletionStrategy"]["deletionRules"]
        for rule in rules:
            assert len({"jobStatus", "jobDeploymentStatus"} & set(rule["condition"])) == 1, (name, rule)
            assert rule["policy"] in ("DeleteCluster", "DeleteSelf"), "DeleteWorkers fails with autoscaling"
        for condition in {json.dumps({k: v for k, v in r["condition"].items() if k != "ttlSeconds"}) for r in rules}:
            ttl = {r["policy"]: r["condition"].get("ttlSeconds", 0) for r in rules
                   if json.dumps({k: v for k, v in r["condition"].items() if k != "ttlSeconds"}) == condition}
            assert ttl.get("DeleteCluster", 0) <= ttl.get("DeleteSelf", KEPT_AT_MOST), (name, condition)
        for outcome, job_status, deployment in OUTCOMES:
            freed = deletion_delay(spec, "DeleteCluster", job_status, deployment)
            gone = deletion_delay(spec, "DeleteSelf", job_status, deployment)
            assert freed is not None and freed <= FREED_WITHIN, f"{name}: GPUs held when {outcome}"
            assert gone is not None and gone <= KEPT_AT_MOST, f"{name}: RayJob kept forever when {outcome}"


def test_nights_never_overlap_and_history_is_bounded():
    cron = the_workload("nightly")["spec"]
    assert cron["schedule"] == "30 2 * * *" and cron["timeZone"] == "Etc/UTC"
    template = cron["jobTemplate"]
    # activeDeadlineSeconds only marks the RayJob failed; the Ray job ends when its cluster is deleted
    ends_by = template["activeDeadlineSeconds"] + deletion_delay(template, "DeleteCluster", "RUNNING", "Failed")
    assert ends_by < 86400
    fallback = the_workload("cron-fallback")["spec"]
    assert fallback["schedule"] == cron["schedule"] and fallback["timeZone"] == cron["timeZone"]
    assert fallback["concurrencyPolicy"] == "Forbid"
    assert fallback["jobTemplate"]["spec"]["activeDeadlineSeconds"] < 86400
    assert 1 <= fallback["successfulJobsHistoryLimit"] <= 5 and 1 <= fallback["failedJobsHistoryLimit"] <= 5


def test_kuberay_never_retries_a_rayjob():
    """KubeRay resubmits a failed RayJob whatever the entrypoint's exit code (it reads only the Ray job's
    status), so a permanent failure would start a new GPU cluster: no RayJob retries."""
    for name, spec in job_specs():
        assert spec["backoffLimit"] == 0, name
        assert 1 <= spec["submitterConfig"]["backoffLimit"] <= 3, name
    assert "backoffLimit: 0" in DOCS.read_text()


def pod_failure_action(policy: dict, container: str, exit_code: int | None = None, conditions=()) -> str:
    """The action of Kubernetes' pod failure policy for a failed pod (first matching rule; else Count)."""
    for rule in policy["rules"]:
        if "onExitCodes" in rule and exit_code is not None:
            match = rule["onExitCodes"]
            if match.get("containerName", container) == container \
                    and (exit_code in match["values"]) == (match["operator"] == "In"):
                return rule["action"]
        for pattern in rule.get("onPodConditions", []):
            if pattern["type"] in conditions:
                return rule["action"]
    return "Count"


def test_the_cronjob_retries_only_a_transient_failure():
    job = the_workload("cron-fallback")["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    [container] = pod["containers"]
    assert pod["restartPolicy"] == "Never" and job["backoffLimit"] >= 1
    policy = job["podFailurePolicy"]
    actions = {code: pod_failure_action(policy, container["name"], code)
               for code in (EXIT_BUG, EXIT_PERMANENT, EXIT_TRANSIENT, EXIT_SIGINT, EXIT_SIGTERM)}
    assert actions == {EXIT_BUG: "FailJob", EXIT_PERMANENT: "FailJob", EXIT_TRANSIENT: "Count",
                       EXIT_SIGINT: "FailJob", EXIT_SIGTERM: "FailJob"}
    # an evicted or preempted pod (the script stopped its job and exited 143) starts again
    assert pod_failure_action(policy, container["name"], EXIT_SIGTERM, {"DisruptionTarget"}) == "Ignore"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DENOISE_RETRIES"] == "0", "one retry layer: the pod failure policy"


# ---------------------------------------------------------------- commands and models

def documented_commands() -> set[str]:
    """Every `python jobs/...` command in the docs' code blocks (also after `ray job submit ... --`)."""
    commands = set()
    for block in re.findall(r"```bash\n(.*?)```", DOCS.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split(" -- ", 1)[-1].strip()
            if line.startswith("python jobs/"):
                commands.add(line)
    return commands


TRAIN = "python jobs/train.py --config configs/sidd.yaml --name sidd-base --promote"


def entrypoints() -> dict[str, str]:
    found = {w: s["entrypoint"] for w, s in job_specs()}
    assert found.pop("nightly.jobTemplate") == found["denoise-once"]
    return found


def test_schedules_run_the_documented_commands():
    documented = documented_commands()
    assert TRAIN in documented
    commands = entrypoints()
    assert commands.pop("train") == TRAIN
    [nightly] = set(commands.values())
    assert nightly in documented
    from jobs.denoise import parse_args

    args = vars(parse_args(shlex.split(nightly)[2:]))
    assert args["date"] == "today" and args["workers"] == 2 and args["gpus_per_worker"] == 1


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


MODEL_URI = re.compile(r"models:/([A-Za-z0-9][\w.-]*)(?:@([\w-]+)|/\d+)?")


def train_commands(text: str) -> list[tuple[str, bool]]:
    """(config, --promote given) of every `jobs/train.py --config ...` line, outside comments."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if "jobs/train.py" in line and not line.lstrip().startswith("#"):
            tokens = line.split("jobs/train.py", 1)[1].split()
            if "--config" in tokens:
                found.append((tokens[tokens.index("--config") + 1], "--promote" in tokens))
    return found


def flows() -> dict[str, list[tuple[str, bool]]]:
    """The training each part of the project runs: production (the k8s workloads, which infra/k8s,
    infra/cron and docs/scheduling.md serve), the local demo (infra/local), and everything documented
    (docs, README)."""
    production = [t for w in WORKLOADS for d in rendered(w) if d["kind"] == "RayJob"
                  for t in train_commands(d["spec"]["entrypoint"])]
    local = [t for p in (ROOT / "infra" / "local").rglob("*") if p.is_file() for t in train_commands(p.read_text())]
    docs = [t for p in [*ROOT.glob("docs/*.md"), ROOT / "README.md"] for t in train_commands(p.read_text())]
    return {"production": production, "local": local, "documented": production + local + docs}


def flow_of(path: Path) -> str:
    relative = path.relative_to(ROOT).as_posix()
    if relative.startswith(("infra/k8s/", "infra/cron/")) or path == DOCS:
        return "production"
    return "local" if relative.startswith("infra/local/") else "documented"


def test_every_model_uri_names_a_model_and_alias_the_training_of_its_flow_sets():
    """A `models:/NAME@ALIAS` is loadable only if a config the same flow trains registers NAME, and
    ALIAS is `candidate` (every run sets it) or `champion` (runs with --promote move it)."""
    from pipeline.config import load_config

    registers = {p.relative_to(ROOT).as_posix(): load_config(p).mlflow.registered_model
                 for p in sorted((ROOT / "configs").glob("*.yaml"))}
    trained = flows()
    files = [*(p for p in (ROOT / "infra").rglob("*") if p.is_file()), *ROOT.glob("docs/*.md"), ROOT / "README.md"]
    uris = 0
    for path in files:
        flow = flow_of(path)
        names = {registers[c] for c, _ in trained[flow]} if flow != "documented" else set(registers.values())
        promoted = {registers[c] for c, promote in trained[flow] if promote}
        for match in MODEL_URI.finditer(path.read_text(errors="ignore")):
            name, alias = match.groups()
            if name.isupper():  # a placeholder: models:/NAME@ALIAS
                continue
            uris += 1
            where = f"{path.relative_to(ROOT)}: {match.group(0)} ({flow} flow)"
            assert name in names, f"{where}: no config this flow trains registers {name}"
            assert alias in (None, "candidate", "champion"), f"{where}: nothing sets alias {alias}"
            assert alias != "champion" or name in promoted, f"{where}: this flow never trains {name} with --promote"
    assert uris >= 5


def test_image_installs_the_pinned_torch_and_python_311():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    [torch_pin] = [p for p in pins if p.startswith("torch==")]
    assert f"ARG TORCH_VERSION={torch_pin.split('==')[1]}" in dockerfile
    assert re.search(r"^FROM python:3\.11", dockerfile, flags=re.M)
    assert dockerfile.index("download.pytorch.org/whl/${TORCH_VARIANT}") < dockerfile.index("-r /tmp/requirements.txt")


# ---------------------------------------------------------------- secrets, auth, network

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def test_secrets_reach_pods_only_from_kubernetes_secrets_never_runtime_env():
    """runtime_env env_vars show in the dashboard and the State API: no key, token or password there,
    and no literal secret value in any pod spec; they come from Secrets (envFrom / secretKeyRef)."""
    for workload, doc in all_objects():
        for where, node in walk(doc):
            assert not {"runtimeEnvYAML", "runtime_env", "runtimeEnv"} & set(node), f"{workload}{where}"
            if "name" in node and SECRET_NAME.search(str(node["name"])) and ("value" in node or "valueFrom" in node):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], \
                    f"{workload}{where}: {node['name']} must come from a Secret"
    script = CRON_SCRIPT.read_text()
    assert "--runtime-env" not in script and "env_vars" not in script


def test_jobs_do_not_put_s3_keys_into_runtime_env(monkeypatch):
    """What a job passes to ray.init is shown by the dashboard and the State API."""
    from pipeline import cluster
    from pipeline.settings import load_settings

    seen = {}
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: seen.update(kwargs))
    settings = load_settings(environ={"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value",
                                      "DENOISE_S3_ENDPOINT": "http://s3.example:8333"})
    cluster.init_ray(settings, attempts=1)
    assert "s3cr3t-value" not in str(seen["runtime_env"])


def test_every_ray_cluster_and_submitter_uses_token_auth():
    for name, spec in ray_cluster_specs():
        assert spec["authOptions"]["mode"] == "token", name
    for name, spec in job_specs():
        template = spec["submitterPodTemplate"]
        assert template["metadata"]["labels"] == SUBMITTER and template["spec"]["restartPolicy"] == "Never", name
        assert all(not c.get("envFrom") for c in template["spec"]["containers"]), f"{name}: no storage secrets"
    # the long-running cluster's token is a named Secret; its external submitter reads the same one
    cluster = the_workload("cluster")["spec"]
    cron = the_workload("cron-fallback")
    assert cron_pod(cron)["metadata"]["labels"] == SUBMITTER
    [container] = cron_pod(cron)["spec"]["containers"]
    assert not container.get("envFrom")
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster["authOptions"]["secretName"],
                                                                  "key": "auth_token"}
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == "http://denoise-cluster-head-svc:8265"


# The KubeRay operator pod's labels (kuberay v1.6.0 and v1.7.0): the Helm chart's
# helm-chart/kuberay-operator/templates/deployment.yaml with its default values, and the kustomize
# install's ray-operator/config/manager (labels from its kustomization.yaml).
OPERATOR_HELM = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                 "app.kubernetes.io/component": "kuberay-operator"}
OPERATOR_KUSTOMIZE = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}


def admitted(policy: dict, labels: dict, port: int, *, other_namespace: bool = False) -> bool:
    """Whether ``policy`` lets a pod with ``labels`` reach ``port``."""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: peers are pods"
            assert peer.get("namespaceSelector", {}) == {}, "any namespace, or this one"
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if (not other_namespace or "namespaceSelector" in peer) and wanted and wanted.items() <= labels.items():
                return True
    return False


def test_network_policy_admits_ray_ports_only_from_ray_pods_submitters_and_the_operator():
    [policy] = [d for d in render(K8S / "base") if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for name, spec in ray_cluster_specs():                    # every Ray pod is fenced
        for template in ray_pods(spec):
            assert selected.items() <= template["metadata"]["labels"].items(), name
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod"
    for port in (6379, 8265, 10001):
        assert admitted(policy, RAY_NODE, port), f"Ray pods must reach each other on {port}"
        assert not admitted(policy, {"app": "denoise"}, port) and not admitted(policy, {}, port)
        assert not admitted(policy, RAY_NODE, port, other_namespace=True)
    assert admitted(policy, SUBMITTER, 8265)
    assert not admitted(policy, SUBMITTER, 6379) and not admitted(policy, SUBMITTER, 10001)
    for operator in (OPERATOR_HELM, OPERATOR_KUSTOMIZE):      # however the operator was installed
        assert admitted(policy, operator, 8265, other_namespace=True)
        assert not admitted(policy, operator, 6379, other_namespace=True)
        assert not admitted(policy, operator, 10001, other_namespace=True)
    assert not admitted(policy, {"app.kubernetes.io/name": "kuberay"}, 8265, other_namespace=True)


def test_a_resubmitted_training_run_resumes_the_same_run():
    """Applying the training again runs the same entrypoint: a fixed --name makes it the same run (same
    checkpoint folder, same MLflow run) instead of a new train-<time> run from step 0."""
    from pipeline.config import load_config

    argv = shlex.split(the_workload("train")["spec"]["entrypoint"])
    name = argv[argv.index("--name") + 1]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), "a constant name, nothing computed per attempt"
    config = load_config(ROOT / argv[argv.index("--config") + 1], [f"run_name={name}"])
    assert config.run_name == name


def test_cronjob_image_has_the_submitter_script():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^COPY infra/cron \./infra/cron$", dockerfile, flags=re.M)
    assert os.access(CRON_SCRIPT, os.X_OK)
    [container] = cron_pod(the_workload("cron-fallback"))["spec"]["containers"]
    assert container["command"][0] == "infra/cron/nightly-denoise.sh"

# ---------------------------------------------------------------- the cron submitter, for real

# A stand-in for the `ray` CLI with the same output and exit codes for the calls the script makes
# (`ray job status|stop|submit|logs`): job states are files in $FAKE_RAY_JOBS ("STATE [exit code]"),
# each submitted job ends as the next line of $FAKE_RAY_JOBS/outcomes (default SUCCEEDED), and
# every call is logged. FAKE_RAY_DOWN makes every call fail as with an unreachable job server.
FAKE_RAY = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_RAY_JOBS/calls"
if [[ -n ${FAKE_RAY_DOWN:-} ]]; then
  echo "ConnectionError: Failed to connect to Ray at address: $4." >&2; exit 1
fi
id=${@: -1}
case "$2" in
  status)
    [[ -f $FAKE_RAY_JOBS/$id ]] || { echo "RuntimeError: Request failed with status code 404: Job $id does not exist." >&2; exit 1; }
    read -r state code < "$FAKE_RAY_JOBS/$id"
    case $state in
      SUCCEEDED) echo "Job '$id' succeeded" ;;
      FAILED) echo "Job '$id' failed"
              if [[ -n $code ]]; then echo "Status message: Job entrypoint command failed with exit code $code, last available logs (truncated to 20,000 chars):"; fi ;;
      STOPPED) echo "Job '$id' was stopped" ;;
      *) echo "Status for job '$id': $state" ;;
    esac ;;
  stop) echo STOPPED > "$FAKE_RAY_JOBS/$id" ;;
  submit)
    while [[ $1 != --submission-id ]]; do shift; done
    id=$2
    echo RUNNING > "$FAKE_RAY_JOBS/$id"
    for _ in $(seq "${FAKE_RAY_RUN_TICKS:-0}"); do
      sleep 0.1
      [[ $(cat "$FAKE_RAY_JOBS/$id") == RUNNING ]] || exit 0
    done
    outcome=SUCCEEDED
    if [[ -s $FAKE_RAY_JOBS/outcomes ]]; then
      outcome=$(head -n 1 "$FAKE_RAY_JOBS/outcomes"); sed -i 1d "$FAKE_RAY_JOBS/outcomes"
    fi
    echo "$outcome" > "$FAKE_RAY_JOBS/$id"
    [[ $outcome != FAILED* ]] ;;
  logs)
    while [[ $(cat "$FAKE_RAY_JOBS/$id") == RUNNING ]]; do sleep 0.1; done ;;
esac
"""


@pytest.fixture
def fake_ray(tmp_path):
    """Environment that runs the cron script against the fake `ray`; returns (env, jobs dir)."""
    bin_dir, jobs = tmp_path / "bin", tmp_path / "jobs"
    bin_dir.mkdir()
    jobs.mkdir()
    (bin_dir / "ray").write_text(FAKE_RAY)
    (bin_dir / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_RAY_JOBS": str(jobs),
           "DENOISE_LOCK_FILE": str(tmp_path / "nightly.lock"), "DENOISE_RETRY_DELAY": "0"}
    for key in [k for k in env if k.startswith(("DENOISE_", "RAY_")) and k not in ("DENOISE_LOCK_FILE",
                                                                                   "DENOISE_RETRY_DELAY")]:
        del env[key]
    return env, jobs


def utc_day(offset: int = 0) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=offset)).strftime("%Y-%m-%d")


def submits(jobs: Path) -> list[str]:
    calls = (jobs / "calls").read_text().splitlines() if (jobs / "calls").exists() else []
    return [c for c in calls if c.startswith("job submit")]


def run_script(env: dict, *args: str, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CRON_SCRIPT), *args], env={**env, **extra}, capture_output=True, text=True,
                          timeout=60)


def wait_for_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_cron_script_and_cronjob_submit_the_documented_nightly_run(fake_ray):
    env, jobs = fake_ray
    assert run_script(env).returncode == 0
    [submit] = submits(jobs)
    assert f"--submission-id nightly-denoise-{utc_day()} --working-dir . -- " in submit
    assert submit.split(" -- ", 1)[1] in documented_commands()
    crontab = (ROOT / "infra" / "cron" / "crontab").read_text()
    [line] = [ln for ln in crontab.splitlines() if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    assert len(line.split()[:5]) == 5 and "infra/cron/nightly-denoise.sh" in line
    # the CronJob's pod: its command and environment; the cluster's image holds the code
    [container] = cron_pod(the_workload("cron-fallback"))["spec"]["containers"]
    pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    (jobs / f"nightly-denoise-{utc_day()}").unlink()
    assert run_script(env, *container["command"][1:], **pod_env).returncode == 0
    submit = submits(jobs)[-1]
    assert "--working-dir" not in submit and "--address http://denoise-cluster-head-svc:8265" in submit
    from jobs.denoise import parse_args

    runs = {tuple(sorted(vars(parse_args(shlex.split(c)[2:])).items()))
            for c in (submit.split(" -- ", 1)[1], entrypoints()["denoise-once"])}
    assert len(runs) == 1, "the CronJob runs the same night as the RayCronJob"


def test_cron_second_start_while_one_runs_exits_2_and_a_signal_stops_the_ray_job(fake_ray):
    env, jobs = fake_ray
    tonight = f"nightly-denoise-{utc_day()}"
    first = subprocess.Popen(["bash", str(CRON_SCRIPT)], env={**env, "FAKE_RAY_RUN_TICKS": "600"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(jobs / tonight)                              # the first one submitted
        second = run_script(env)
        assert second.returncode == EXIT_PERMANENT, second.stdout + second.stderr
        assert "another nightly run holds" in second.stdout
        assert len(submits(jobs)) == 1
        first.send_signal(signal.SIGTERM)                          # cron host shutdown / the CronJob's deadline
        out, _ = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == EXIT_SIGTERM, out
    assert (jobs / tonight).read_text().strip() == "STOPPED"       # the Ray job did not outlive its submitter
    assert f"job stop --address http://127.0.0.1:8265 {tonight}" in (jobs / "calls").read_text()


def test_cron_never_runs_two_nights_or_two_jobs_of_one_night(fake_ray):
    env, jobs = fake_ray
    yesterday, tonight = f"nightly-denoise-{utc_day(-1)}", f"nightly-denoise-{utc_day()}"
    (jobs / yesterday).write_text("RUNNING\n")                     # its submitter was killed (SIGKILL: no trap)
    (jobs / tonight).write_text("FAILED 2\n")                      # tonight's first attempt failed
    run = run_script(env, "--workers", "4")
    assert run.returncode == EXIT_OK, run.stdout + run.stderr
    assert (jobs / yesterday).read_text().strip() == "STOPPED"
    [submit] = submits(jobs)
    assert f"--submission-id {tonight}-2 " in submit and submit.endswith("--date today --workers 4")
    assert (jobs / f"{tonight}-2").read_text().strip() == "SUCCEEDED"
    # a retried submitter the same night: nothing submitted again, the status says it is done
    again = run_script(env)
    assert again.returncode == EXIT_OK and "already succeeded tonight" in again.stdout
    assert len(submits(jobs)) == 1


def test_cron_follows_tonights_running_job_instead_of_submitting_a_second(fake_ray):
    env, jobs = fake_ray
    tonight = f"nightly-denoise-{utc_day()}"
    (jobs / tonight).write_text("RUNNING\n")                       # the previous submitter pod was deleted
    follower = subprocess.Popen(["bash", str(CRON_SCRIPT)], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)
        assert follower.poll() is None                             # following, not done
        (jobs / tonight).write_text("FAILED 1\n")
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == EXIT_BUG, out
    assert "following it instead of submitting another" in out and submits(jobs) == []


def test_cron_resubmits_only_after_a_transient_failure(fake_ray):
    env, jobs = fake_ray
    tonight = f"nightly-denoise-{utc_day()}"
    (jobs / "outcomes").write_text("FAILED 75\nFAILED 75\n")      # S3 down twice, then the run goes through
    run = run_script(env)
    assert run.returncode == EXIT_OK, run.stdout + run.stderr
    assert [s.split("--submission-id ")[1].split()[0] for s in submits(jobs)] == [tonight, f"{tonight}-2",
                                                                                 f"{tonight}-3"]
    assert "transient failure" in run.stdout


@pytest.mark.parametrize("outcomes, status, attempts", [
    ("FAILED 2\n", EXIT_PERMANENT, 1),                 # bad arguments, unknown model: never again
    ("FAILED 1\n", EXIT_BUG, 1),                       # a bug: a person looks first
    ("FAILED\n", EXIT_BUG, 1),                         # Ray failed it without an exit code
    ("FAILED 75\nFAILED 75\nFAILED 75\n", EXIT_TRANSIENT, 3),  # still down after the retries
])
def test_cron_passes_on_what_no_retry_fixes(fake_ray, outcomes, status, attempts):
    env, jobs = fake_ray
    (jobs / "outcomes").write_text(outcomes)
    run = run_script(env)
    assert run.returncode == status, run.stdout + run.stderr
    assert len(submits(jobs)) == attempts


def test_cron_exits_75_when_the_job_server_is_unreachable(fake_ray):
    env, jobs = fake_ray
    run = run_script(env, FAKE_RAY_DOWN="1")
    assert run.returncode == EXIT_TRANSIENT, run.stdout + run.stderr
    assert "does not answer" in run.stdout and submits(jobs) == []
