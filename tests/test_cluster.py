"""The local stack is a real multi-node cluster: a head without CPU, worker nodes that do not share the
driver's disk, and jobs that refuse to hand a local path to tasks on other nodes."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from pipeline.errors import PipelineError

from .conftest import STACK, run_job

pytestmark = pytest.mark.stack


def worker_nodes(ray) -> list[dict]:
    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU")]


def test_the_head_offers_no_cpu_and_two_worker_nodes_do_the_work(stack_env, ray_cluster):
    ray = ray_cluster
    alive = [n for n in ray.nodes() if n["Alive"]]
    here = ray.get_runtime_context().get_node_id()
    head = next(n for n in alive if n["NodeID"] == here)
    assert head["Resources"].get("CPU", 0) == 0  # the driver's node runs no task
    workers = worker_nodes(ray)
    assert sorted(n["NodeManagerAddress"] for n in workers) == ["127.0.0.2", "127.0.0.3"]

    status = subprocess.run([*STACK, "status"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.count("ALIVE") == 3 and "ray nodes      3 alive" in status.stdout
    for ip in ("127.0.0.2", "127.0.0.3"):
        assert any(line.split()[:2] == [ip, "worker"] for line in status.stdout.splitlines()), status.stdout
    # Ray's own view agrees: three active nodes, the workers' CPUs in all
    ray_status = subprocess.run([str(Path(sys.executable).parent / "ray"), "status"], capture_output=True,
                                text=True, timeout=120, env={**os.environ, **stack_env}).stdout
    active = ray_status.split("Active:")[1].split("Pending:")[0]
    assert len([line for line in active.splitlines() if "node_" in line]) == 3, ray_status
    assert f"/{sum(n['Resources']['CPU'] for n in workers):.1f} CPU" in ray_status, ray_status


def test_a_file_the_driver_writes_to_tmp_is_not_there_for_tasks(ray_cluster):
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray = ray_cluster
    path = f"/tmp/driver-only-{uuid.uuid4().hex}.txt"
    with open(path, "w") as out:
        out.write("only on the driver's disk")
    try:
        @ray.remote(num_cpus=0.1)
        def look(p: str) -> tuple[bool, str, str]:
            return os.path.exists(p), ray.util.get_node_ip_address(), os.getcwd()

        seen = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                        .remote(path) for n in worker_nodes(ray)])
    finally:
        os.unlink(path)
    assert sorted(ip for _, ip, _ in seen) == ["127.0.0.2", "127.0.0.3"]
    assert not any(exists for exists, _, _ in seen)  # each worker node has a /tmp of its own
    assert len({cwd for _, _, cwd in seen}) == 2 and all(cwd.startswith("/tmp/") for _, _, cwd in seen)


def test_local_paths_handed_to_tasks_are_refused_before_any_work(tmp_path, ray_cluster, settings, s3_prefix):
    from pipeline.cluster import require_shared

    require_shared(settings, INPUT=f"{s3_prefix}/in", MODEL="models:/denoiser@champion")  # shared places pass
    with pytest.raises(PipelineError, match=r"OUTPUT .* is a path on this machine.*s3://"):
        require_shared(settings, INPUT=f"{s3_prefix}/in", OUTPUT=str(tmp_path / "out"))

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(b"not read")
    proc = run_job("denoise.py", str(tmp_path / "in"), f"{s3_prefix}/out")
    assert proc.returncode == 2
    out = proc.stdout + proc.stderr
    assert "error:" in out and "is a path on this machine" in out, out[-2000:]
    assert (tmp_path / "in" / "a.png").read_bytes() == b"not read"
