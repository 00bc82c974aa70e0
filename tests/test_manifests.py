"""Scheduling files: KubeRay manifests use only fields of the v1 API, run the commands that
docs/scheduling.md documents, keep secrets out of runtime_env, turn Ray token auth on and fence the
Ray ports with a NetworkPolicy; the cron submitter never lets two nights overlap."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "infra" / "k8s"
DOCS = ROOT / "docs" / "scheduling.md"
CRON_SCRIPT = ROOT / "infra" / "cron" / "nightly-denoise.sh"

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
# AuthOptions of the v1.6.2 API reference (mode: disabled|token; secretName: a Secret with key auth_token).
AUTH_OPTIONS = {"mode", "secretName", "enableK8sTokenAuth"}
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


RAY_NODE = {"app": "denoise", "denoise-ray": "node"}
SUBMITTER = {"app": "denoise", "denoise-ray": "submitter"}


def check_pod_template(where: str, template: dict) -> None:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("image") for c in containers), f"{where}: containers need an image"
    for container in containers:
        secrets = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
        assert secrets == ["denoise-env"], f"{where}: the jobs need the denoise-env Secret"
    assert template.get("metadata", {}).get("labels") == RAY_NODE, f"{where}: the NetworkPolicy selects Ray pods by label"


def check_submitter_template(where: str, template: dict) -> None:
    """A pod that submits jobs: labelled for the job server, and no S3 keys (it never touches storage)."""
    assert template["metadata"]["labels"] == SUBMITTER, where
    assert template["spec"]["restartPolicy"] == "Never", where
    for container in template["spec"]["containers"]:
        assert not container.get("envFrom"), f"{where}: a submitter needs no storage secrets"


def check_cluster_spec(where: str, spec: dict) -> None:
    check_keys(where, spec, RAYCLUSTER_SPEC, {"headGroupSpec", "authOptions"})
    assert spec["rayVersion"] == ray.__version__, f"{where}: rayVersion must match the image's Ray"
    check_keys(f"{where}.authOptions", spec["authOptions"], AUTH_OPTIONS, {"mode"})
    assert spec["authOptions"]["mode"] == "token", f"{where}: Ray token auth must be on"
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
    check_submitter_template(f"{where}.submitterPodTemplate", spec["submitterPodTemplate"])
    return spec["entrypoint"]


def cron_pod(doc: dict) -> dict:
    return doc["spec"]["jobTemplate"]["spec"]["template"]


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
            check_submitter_template(name, cron_pod(doc))
        elif doc["kind"] == "NetworkPolicy":
            assert doc["apiVersion"] == "networking.k8s.io/v1", name
        else:
            assert doc["kind"] == "Secret" and name.endswith(".example.yaml"), f"unexpected {doc['kind']} in {name}"
    assert sorted(kinds) == ["CronJob", "NetworkPolicy", "RayCluster", "RayCronJob", "RayJob", "Secret"]
    assert len(kinds["RayJob"]) == 2


def cron_script_command() -> str:
    """The `python jobs/denoise.py ...` line the cron script submits, with its defaults filled in."""
    script = CRON_SCRIPT.read_text()
    defaults = dict(re.findall(r"(\w+)=\$\{DENOISE_\w+:-([^}]+)\}", script))
    tail = script.split("ray job submit", 1)[1]
    submit = " ".join(line.strip().rstrip("\\").strip() for line in tail.splitlines()[:2])
    assert "--working-dir ." in submit and '--submission-id "${id}"' in submit
    command = submit.split(" -- ", 1)[1].replace('"$@" &', "").strip()
    for variable, value in defaults.items():
        command = command.replace(f'"${{{variable}}}"', value)
    return command


def test_schedules_run_the_documented_commands():
    documented = documented_commands()
    train = "python jobs/train.py --config configs/sidd.yaml --name sidd-base"
    assert train in documented
    entrypoints = {}
    for name, doc in manifests():
        if doc["kind"] == "RayJob":
            entrypoints[name] = doc["spec"]["entrypoint"]
        elif doc["kind"] == "RayCronJob":
            entrypoints[name] = doc["spec"]["jobTemplate"]["entrypoint"]
        elif doc["kind"] == "CronJob":
            [container] = cron_pod(doc)["spec"]["containers"]
            argv = container["command"]
            assert argv[0] == "infra/cron/nightly-denoise.sh"    # the submitter that stops its job on SIGTERM
            entrypoints[name] = shlex.join([*shlex.split(cron_script_command()), *argv[1:]])
    assert entrypoints["rayjob-train.yaml"] == train
    nightly = {v for k, v in entrypoints.items() if k != "rayjob-train.yaml"}
    assert nightly <= documented, (nightly, documented)
    from jobs.denoise import parse_args

    # the same run everywhere (the CronJob's extra options come after the script's own)
    runs = {tuple(sorted(vars(parse_args(shlex.split(command)[2:])).items())) for command in nightly}
    assert len(runs) == 1, nightly
    assert dict(runs.pop())["date"] == "today"


def test_cron_script_submits_the_documented_command():
    assert cron_script_command() in documented_commands()
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


# ---------------------------------------------------------------- secrets, auth, network

SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.I)


def walk(node, path=""):
    """Every (path, mapping) in a parsed manifest."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def ray_cluster_specs() -> list[tuple[str, dict]]:
    specs = []
    for name, doc in manifests():
        if doc["kind"] == "RayCluster":
            specs.append((name, doc["spec"]))
        elif doc["kind"] == "RayJob":
            specs.append((name, doc["spec"]["rayClusterSpec"]))
        elif doc["kind"] == "RayCronJob":
            specs.append((name, doc["spec"]["jobTemplate"]["rayClusterSpec"]))
    return specs


def test_secrets_reach_pods_only_from_kubernetes_secrets_never_runtime_env():
    """runtime_env env_vars show in the dashboard and the State API: no key, token or password there,
    and no literal secret value in any pod spec; they come from Secrets (envFrom / secretKeyRef)."""
    for name, doc in manifests():
        if doc["kind"] == "Secret":
            continue
        for where, node in walk(doc):
            for key in ("runtimeEnvYAML", "runtime_env", "runtimeEnv"):
                if key in node:
                    runtime_env = yaml.safe_load(node[key]) if isinstance(node[key], str) else node[key]
                    assert "env_vars" not in runtime_env, f"{name}{where}.{key} sets env_vars"
            if "name" in node and SECRET_NAME.search(str(node["name"])) and ("value" in node or "valueFrom" in node):
                assert "value" not in node and "secretKeyRef" in node["valueFrom"], \
                    f"{name}{where}: {node['name']} must come from a Secret"
    script = CRON_SCRIPT.read_text()
    assert "--runtime-env" not in script and "env_vars" not in script
    # the keys the jobs need are in the Secret that every Ray container loads (check_pod_template)
    example = next(doc for name, doc in manifests() if doc["kind"] == "Secret")
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(example["stringData"])


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
        for where, node in walk(spec):
            if node.get("name") == "RAY_AUTH_MODE":
                assert node.get("value") == "token", f"{name}{where}"
    # the long-running cluster's token is a named Secret; its external submitter reads the same one
    [(_, cluster)] = [(n, d["spec"]) for n, d in manifests() if d["kind"] == "RayCluster"]
    [cron] = [d for n, d in manifests() if d["kind"] == "CronJob"]
    [container] = cron_pod(cron)["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": cluster["authOptions"]["secretName"],
                                                                  "key": "auth_token"}
    assert env["RAY_API_SERVER_ADDRESS"]["value"] == "http://denoise-cluster-head-svc:8265"


def admitted(policy: dict, labels: dict, port: int) -> bool:
    """Whether ``policy`` lets a pod with ``labels`` (same namespace) reach ``port``."""
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        if ports and port not in ports:
            continue
        for peer in rule["from"]:
            assert "ipBlock" not in peer, "no address ranges: peers are pods"
            wanted = peer.get("podSelector", {}).get("matchLabels", {})
            if "namespaceSelector" not in peer and wanted and wanted.items() <= labels.items():
                return True
    return False


def test_network_policy_admits_ray_ports_only_from_ray_pods_and_submitters():
    [policy] = [doc for name, doc in manifests() if doc["kind"] == "NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    pods = [(n, spec["headGroupSpec"]["template"]) for n, spec in ray_cluster_specs()]
    pods += [(n, group["template"]) for n, spec in ray_cluster_specs() for group in spec.get("workerGroupSpecs", [])]
    for name, template in pods:                              # every Ray pod is fenced
        assert selected.items() <= template["metadata"]["labels"].items(), name
    for rule in policy["spec"]["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod"
    for port in (6379, 8265, 10001):
        assert admitted(policy, RAY_NODE, port), f"Ray pods must reach each other on {port}"
        assert not admitted(policy, {"app": "denoise"}, port) and not admitted(policy, {}, port)
    assert admitted(policy, SUBMITTER, 8265)
    assert not admitted(policy, SUBMITTER, 6379) and not admitted(policy, SUBMITTER, 10001)
    # from other namespaces only the KubeRay operator, and only to the job server
    foreign = [(peer, rule) for rule in policy["spec"]["ingress"] for peer in rule["from"] if "namespaceSelector" in peer]
    assert [peer["podSelector"]["matchLabels"] for peer, _ in foreign] == [{"app.kubernetes.io/name": "kuberay-operator"}]
    assert all([p["port"] for p in rule["ports"]] == [8265] for _, rule in foreign)


def test_a_retried_training_rayjob_resumes_the_same_run():
    """KubeRay resubmits the same entrypoint on a new cluster: a fixed --name makes it the same run
    (same checkpoint folder, same MLflow run) instead of a new train-<time> run from step 0."""
    from pipeline.config import load_config

    [job] = [doc for name, doc in manifests() if name == "rayjob-train.yaml"]
    assert job["spec"]["backoffLimit"] >= 1
    argv = shlex.split(job["spec"]["entrypoint"])
    name = argv[argv.index("--name") + 1]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", name), "a constant name, nothing computed per attempt"
    config = load_config(ROOT / argv[argv.index("--config") + 1], [f"run_name={name}"])
    assert config.run_name == name


def test_cronjob_image_has_the_submitter_script():
    dockerfile = (ROOT / "infra" / "docker" / "Dockerfile").read_text()
    assert re.search(r"^COPY infra/cron \./infra/cron$", dockerfile, flags=re.M)
    assert os.access(CRON_SCRIPT, os.X_OK)

# ---------------------------------------------------------------- the cron submitter, for real

# A stand-in for the `ray` CLI with the same output and exit codes for the calls the script makes
# (`ray job status|stop|submit|logs`): job states are files in $FAKE_RAY_JOBS, every call is logged.
FAKE_RAY = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_RAY_JOBS/calls"
id=${@: -1}
case "$2" in
  status)
    [[ -f $FAKE_RAY_JOBS/$id ]] || { echo "RuntimeError: Request failed with status code 404: Job $id does not exist." >&2; exit 1; }
    case $(cat "$FAKE_RAY_JOBS/$id") in
      SUCCEEDED) echo "Job '$id' succeeded" ;;
      FAILED) echo "Job '$id' failed" ;;
      STOPPED) echo "Job '$id' was stopped" ;;
      *) echo "Status for job '$id': $(cat "$FAKE_RAY_JOBS/$id")" ;;
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
    echo "${FAKE_RAY_RESULT:-SUCCEEDED}" > "$FAKE_RAY_JOBS/$id"
    [[ ${FAKE_RAY_RESULT:-SUCCEEDED} != FAILED ]] ;;
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
           "DENOISE_LOCK_FILE": str(tmp_path / "nightly.lock")}
    return env, jobs


def utc_day(offset: int = 0) -> str:
    return (datetime.now(timezone.utc) + timedelta(days=offset)).strftime("%Y-%m-%d")


def submits(jobs: Path) -> list[str]:
    calls = (jobs / "calls").read_text().splitlines() if (jobs / "calls").exists() else []
    return [c for c in calls if c.startswith("job submit")]


def wait_for_file(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_cron_second_start_while_one_runs_exits_75_and_a_signal_stops_the_ray_job(fake_ray):
    env, jobs = fake_ray
    tonight = f"nightly-denoise-{utc_day()}"
    first = subprocess.Popen(["bash", str(CRON_SCRIPT)], env={**env, "FAKE_RAY_RUN_TICKS": "600"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_file(jobs / tonight)                              # the first one submitted
        second = subprocess.run(["bash", str(CRON_SCRIPT)], env=env, capture_output=True, text=True, timeout=30)
        assert second.returncode == 75, second.stdout + second.stderr
        assert "another nightly run holds" in second.stdout
        assert len(submits(jobs)) == 1
        first.send_signal(signal.SIGTERM)                          # cron host shutdown / the CronJob's deadline
        out, _ = first.communicate(timeout=30)
    finally:
        first.kill()
    assert first.returncode == 143, out
    assert (jobs / tonight).read_text().strip() == "STOPPED"       # the Ray job did not outlive its submitter
    assert f"job stop --address http://127.0.0.1:8265 {tonight}" in (jobs / "calls").read_text()


def test_cron_never_runs_two_nights_or_two_jobs_of_one_night(fake_ray):
    env, jobs = fake_ray
    yesterday, tonight = f"nightly-denoise-{utc_day(-1)}", f"nightly-denoise-{utc_day()}"
    (jobs / yesterday).write_text("RUNNING\n")                     # its submitter was killed (SIGKILL: no trap)
    (jobs / tonight).write_text("FAILED\n")                        # tonight's first attempt failed
    run = subprocess.run(["bash", str(CRON_SCRIPT), "--workers", "4"], env=env, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert (jobs / yesterday).read_text().strip() == "STOPPED"
    [submit] = submits(jobs)
    assert f"--submission-id {tonight}-2 " in submit and submit.endswith("--date today --workers 4")
    assert (jobs / f"{tonight}-2").read_text().strip() == "SUCCEEDED"
    # a retried submitter the same night: nothing submitted again, the status says it is done
    again = subprocess.run(["bash", str(CRON_SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and "already succeeded tonight" in again.stdout
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
        (jobs / tonight).write_text("FAILED\n")
        out, _ = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 1, out
    assert "following it instead of submitting another" in out and submits(jobs) == []
