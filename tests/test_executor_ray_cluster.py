"""The Ray executor on a real multi-node Ray cluster, on one machine (ray.cluster_utils.Cluster: a head
node and two worker nodes, each its own raylet and worker processes), joined through RAY_ADDRESS as a
worker on a team's first machine would join one; a worker node is killed while it runs a job.

The head node has no CPUs for tasks, as the first machine of a cluster that keeps the web, the database
and the queue would be set up; jobs run on the worker nodes only.
"""
from __future__ import annotations

import pytest

from conftest import ray_worker_in_thread, wait_until
from services import api
from storage import queue as q

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(ray_home):
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    from services.executor_ray import local_ray_files

    from ray._private.authentication_test_utils import reset_auth_token_state

    temp = local_ray_files(ray_home)  # the session files and auth token in the (short) data folder
    reset_auth_token_state()  # ray.init re-reads RAY_AUTH_MODE itself; a Cluster started in-process does not
    made = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "temp_dir": temp,
                                                         "include_dashboard": False})
    for _ in range(2):
        made.add_node(num_cpus=1)
    yield made
    ray.shutdown()
    made.shutdown()


@pytest.fixture
def cluster_worker(cluster, prepared_db, monkeypatch):
    """A worker joining the cluster through RAY_ADDRESS (services.executor_ray.connect), one job in flight."""
    monkeypatch.setenv("RAY_ADDRESS", cluster.address)
    monkeypatch.setenv("EXPLORER_JOBS_IN_FLIGHT", "1")
    yield from ray_worker_in_thread(prepared_db)


def test_a_job_whose_node_dies_is_retried_on_another_node_and_ends_once(cluster, cluster_worker, prepared_db):
    import ray

    assert ray.cluster_resources()["CPU"] == 2 and len([n for n in ray.nodes() if n["Alive"]]) == 3
    recipe = {"steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 600}}]}
    submitted = api.submit_compress(prepared_db, "digits-cnn", recipe)

    def started():
        found = cluster_worker.in_flight.get(submitted["job_id"])
        return found and found[1].started
    first = wait_until(started, timeout=120, what="the job's Ray task to start")
    wait_until(lambda: q.get_job(prepared_db, submitted["job_id"])["progress"] > 0, timeout=120,
               what="progress from the task on the worker node")
    victim = next(node for node in cluster.worker_nodes if node.node_id == first["node_id"])
    cluster.remove_node(victim, allow_graceful=False)  # its raylet and every process on it are killed

    job = wait_until(lambda: (j := q.get_job(prepared_db, submitted["job_id"]))["status"] in q.FINISHED and j,
                     timeout=400, what="the job to end after its retry")
    assert job["status"] == "succeeded" and job["attempts"] == 2, job
    runs = list(prepared_db.query("SELECT id FROM runs WHERE job_id = ?", [submitted["job_id"]]))
    assert [r["id"] for r in runs] == [submitted["run_id"]]
    run = api.get_run(prepared_db, submitted["run_id"])
    survivor = next(node.node_id for node in cluster.worker_nodes)
    assert run["runner"]["executor"] == "ray" and run["runner"]["node_id"] == survivor != first["node_id"]
    assert run["metrics"]["score"] > 0.9


def test_a_recipe_asking_for_a_gpu_runs_on_the_node_that_has_one(cluster, cluster_worker, prepared_db):
    """A node joins with a GPU (a logical one: Ray schedules by declared resources; this machine has no CUDA
    device). The job's task is placed there holding GPU 0, and since PyTorch sees no CUDA device on that
    node the job fails with the reason rather than training on the CPU while holding a GPU."""
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    submitted = api.submit_compress(prepared_db, "digits-cnn", {
        "steps": [{"method": "distill.student", "params": {"width": 0.5, "steps": 50}}], "gpus": 1})
    seen = {}

    def started():
        found = cluster_worker.in_flight.get(submitted["job_id"])
        if found and found[1].started:
            seen.update(found[1].started)
        return q.get_job(prepared_db, submitted["job_id"])["status"] in q.FINISHED
    wait_until(started, timeout=120, interval=0.02, what="the GPU job to end")
    job = q.get_job(prepared_db, submitted["job_id"])
    assert seen["node_id"] == gpu_node.node_id and seen["gpu_ids"] == ["0"]
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "asks for a GPU (gpus), but PyTorch sees none" in job["error"]
