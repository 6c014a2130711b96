"""The SAR pipeline of configs/pipeline/s3_sar.yaml as a Kubeflow Pipelines (kfp v2) pipeline.

Graph: the Fisher statistics of each model in parallel, then the merge, then the report.
Every task is one container of the project image (cluster/Dockerfile) running one stage,
``python -m pipelines.run configs/pipeline/s3_sar.yaml --stage STAGE [--model NAME] --json``,
as a Ray Client driver of the KubeRay cluster of cluster/kuberay/raycluster.yaml. Each stage
is idempotent, so rerunning the pipeline resumes it.

Compile (kfp lives in its own venv, .venv/kfp, made by ``make setup``):
    .venv/kfp/bin/python cluster/orchestrators/kubeflow_pipeline.py sar_pipeline.yaml
Run it with the service account that may read and write the buckets (drivers read checkpoint
headers and write manifests themselves), e.g.
    kfp.Client(host=...).create_run_from_pipeline_package("sar_pipeline.yaml",
        arguments={"ray_address": "ray://sar-dist-head-svc:10001"}, service_account="sar-dist")

This file imports only kfp: it does not need sar-dist installed.
"""

import sys

from kfp import compiler, dsl

IMAGE = "sar-dist:0.1.0"
PIPELINE_FILE = "configs/pipeline/s3_sar.yaml"
# The `name` of each entry of `models:` in PIPELINE_FILE (tests/test_orchestrators.py checks it).
MODELS = ["rl-math", "rl-code"]
# KubeRay's head service of the RayCluster `sar-dist`, Ray Client port.
RAY_ADDRESS = "ray://sar-dist-head-svc:10001"
ENTRYPOINT = ["python", "-m", "pipelines.run"]


@dsl.container_component
def fisher(model: str, ray_address: str):
    """Fisher statistics of one model of the pipeline file."""
    return dsl.ContainerSpec(
        image=IMAGE,
        command=ENTRYPOINT,
        args=[PIPELINE_FILE, "--stage", "fisher", "--model", model, "--ray-address", ray_address, "--json"],
    )


@dsl.container_component
def merge(ray_address: str):
    """The merge, from every model's statistics."""
    return dsl.ContainerSpec(
        image=IMAGE, command=ENTRYPOINT, args=[PIPELINE_FILE, "--stage", "merge", "--ray-address", ray_address, "--json"]
    )


@dsl.container_component
def analyze(ray_address: str):
    """The update-geometry report of the merged models."""
    return dsl.ContainerSpec(
        image=IMAGE,
        command=ENTRYPOINT,
        args=[PIPELINE_FILE, "--stage", "analyze", "--ray-address", ray_address, "--json"],
    )


def _driver(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    # The work runs on the Ray cluster; the pod is only the driver (planning, commit).
    # No caching: a stage's output lives in object storage, and only the stage itself can
    # tell whether it is complete (it exits 0 at once when it is).
    # RAY_AUTH_MODE as on every node of the cluster (raycluster.yaml).
    task.set_display_name(name).set_caching_options(False).set_env_variable("RAY_AUTH_MODE", "disabled")
    return task.set_cpu_request("1").set_memory_request("4G")


@dsl.pipeline(name="sar-dist-s3-sar", description="Fisher statistics per model, SAR merge, analyze report")
def sar_pipeline(ray_address: str = RAY_ADDRESS):
    fishers = [_driver(fisher(model=name, ray_address=ray_address), f"fisher-{name}") for name in MODELS]
    merged = _driver(merge(ray_address=ray_address), "merge").after(*fishers)
    _driver(analyze(ray_address=ray_address), "analyze").after(merged)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {sys.argv[0]} OUT.yaml")
    compiler.Compiler().compile(sar_pipeline, package_path=sys.argv[1])
