"""The orchestrator examples (cluster/orchestrators/, cluster/kuberay/rayjob-*.yaml) are checked even
though no orchestrator runs here: each one's task graph is the pipeline's (Fisher statistics per
model in parallel, then the merge, then the report), every container runs a command our CLI parses,
on the pipeline file they name, whose models are the graph's. The Kubeflow pipeline is compiled by
kfp itself, in its own venv (.venv/kfp, made by `make setup`: kfp pins protobuf and requests below
the main venv's). No network, no Ray."""

from __future__ import annotations

import argparse
import ast
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sar_dist.cli import _build_parser
from tests.conftest import REPO

ORCHESTRATORS = REPO / "cluster" / "orchestrators"
KUBERAY = REPO / "cluster" / "kuberay"
ENTRYPOINT = ["python", "-m", "pipelines.run"]
KFP_PYTHON = Path(os.environ.get("SAR_DIST_KFP_PYTHON", REPO / ".venv" / "kfp" / "bin" / "python"))


def _ray_cluster() -> dict:
    return yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())


def _parse_run(argv: list[str], where: str) -> argparse.Namespace:
    """`sar-dist run` arguments of one task; argparse exits (SystemExit) on a bad flag."""
    args = _build_parser().parse_args(["run", *argv])
    assert args.command == "run", where
    assert args.model is None or args.stage == "fisher", f"{where}: --model only with --stage fisher"
    assert args.json, f"{where}: orchestrators read --json events"
    return args


def _check_graph(tasks: dict[str, tuple[argparse.Namespace, list[str]]]) -> None:
    """tasks: name -> (parsed run arguments, names of the tasks it depends on). The graph must be
    fisher(model) for every model of the pipeline file, with no dependencies; merge after all of
    them; analyze after merge; and every task must name the same pipeline file, which exists."""
    files = {args.pipeline for args, _ in tasks.values()}
    assert len(files) == 1, f"tasks name different pipeline files: {files}"
    path = REPO / files.pop()
    assert path.is_file(), path
    models = [m["name"] for m in yaml.safe_load(path.read_text())["models"]]

    def label(args: argparse.Namespace) -> str:
        assert args.stage is not None, "each task runs one stage"
        return f"fisher-{args.model}" if args.stage == "fisher" else args.stage

    labels = {name: label(args) for name, (args, _) in tasks.items()}
    assert len(set(labels.values())) == len(labels), f"a stage runs twice: {labels}"
    graph = {labels[name]: sorted(labels[d] for d in deps) for name, (_, deps) in tasks.items()}
    fishers = [f"fisher-{m}" for m in models]
    assert graph == {**{f: [] for f in fishers}, "merge": sorted(fishers), "analyze": ["merge"]}


def _check_ray_address(address: str, where: str) -> None:
    """A Ray Client address of the head service KubeRay creates for raycluster.yaml's cluster."""
    cluster = _ray_cluster()
    ports = {p["name"]: p["containerPort"] for p in
             cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert address == f"ray://{cluster['metadata']['name']}-head-svc:{ports['client']}", where


def _head_image() -> str:
    return _ray_cluster()["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]


# --- Argo ---------------------------------------------------------------------------------------

def _argo_resolve(text: str, scopes: dict[str, dict[str, str]], where: str) -> str:
    def value(m: re.Match) -> str:
        scope, name = m.group(1), m.group(2)
        assert name in scopes[scope], f"{where}: {m.group(0)} is not defined"
        return scopes[scope][name]

    out = re.sub(r"\{\{\s*(inputs|workflow)\.parameters\.([\w-]+)\s*\}\}", value, text)
    assert "{{" not in out, f"{where}: unresolved {out}"
    return out


def test_argo_workflow_graph_and_commands():
    doc = yaml.safe_load((ORCHESTRATORS / "argo-workflow.yaml").read_text())
    assert doc["apiVersion"] == "argoproj.io/v1alpha1" and doc["kind"] == "Workflow"
    spec = doc["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    assert len(templates) == len(spec["templates"])
    dag = templates[spec["entrypoint"]]["dag"]["tasks"]
    workflow = {p["name"]: p["value"] for p in spec.get("arguments", {}).get("parameters", [])}
    tasks = {}
    for task in dag:
        where = f"argo task {task['name']}"
        template = templates[task["template"]]
        inputs = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
        declared = {p["name"] for p in template.get("inputs", {}).get("parameters", [])}
        assert set(inputs) == declared, where
        scopes = {"inputs": inputs, "workflow": workflow}
        container = template["container"]
        assert container["image"] == _head_image(), where  # Ray Client: the cluster's Ray and Python
        assert container["command"] == ENTRYPOINT, where
        args = _parse_run([_argo_resolve(str(a), scopes, where) for a in container["args"]], where)
        env = {e["name"]: _argo_resolve(str(e["value"]), scopes, where) for e in container.get("env", [])}
        _check_ray_address(args.ray_address or env.get("RAY_ADDRESS", ""), where)
        assert env.get("RAY_AUTH_MODE") == "disabled", where  # as on every node of the cluster
        tasks[task["name"]] = (args, task.get("dependencies", []))
    _check_graph(tasks)


# --- KubeRay --------------------------------------------------------------------------------------

RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_entrypoint_parses_with_its_cli(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    assert doc["spec"]["clusterSelector"]["ray.io/cluster"] == _ray_cluster()["metadata"]["name"]
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:2] == ["python", "-m"], path.name
    module = REPO / (argv[2].replace(".", "/") + ".py")
    command = argv[2].removeprefix("pipelines.")
    # each pipelines.X module is `sar-dist X`: it passes its argv to the CLI after that subcommand
    assert f'cli_main(["{command}", ' in module.read_text(), f"{path.name}: {argv[2]}"
    args = _build_parser().parse_args([command, *argv[3:]])
    assert args.command == command and args.json, path.name
    assert (REPO / (args.pipeline if command == "run" else args.config)).is_file(), path.name


def test_rayjob_pipeline_runs_every_stage():
    doc = yaml.safe_load((KUBERAY / "rayjob-pipeline.yaml").read_text())
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ENTRYPOINT
    args = _parse_run(argv[3:], "rayjob-pipeline.yaml")
    assert args.stage is None and args.model is None and args.ray_address is None  # RAY_ADDRESS of the job
    assert args.pipeline == "configs/pipeline/s3_sar.yaml"


# --- Kubeflow -----------------------------------------------------------------------------------

def test_kubeflow_pipeline_imports_only_kfp():
    tree = ast.parse((ORCHESTRATORS / "kubeflow_pipeline.py").read_text())
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    roots = {m.split(".")[0] for m in modules}
    assert roots - set(sys.stdlib_module_names) == {"kfp"}, roots


def _kfp_resolve(text: str, inputs: dict[str, dict], root_inputs: dict[str, dict], where: str) -> str:
    def value(m: re.Match) -> str:
        name = m.group(1)
        assert name in inputs, f"{where}: {m.group(0)} is not an input of the task"
        source = inputs[name]
        if "runtimeValue" in source:
            return str(source["runtimeValue"]["constant"])
        return str(root_inputs[source["componentInputParameter"]]["defaultValue"])

    out = re.sub(r"\{\{\$\.inputs\.parameters\['([\w-]+)'\]\}\}", value, text)
    assert "{{" not in out, f"{where}: unresolved {out}"
    return out


def test_kubeflow_pipeline_compiles_to_the_graph(tmp_path):
    if not KFP_PYTHON.is_file():
        pytest.fail(f"no kfp interpreter at {KFP_PYTHON}: run `make setup` (it creates .venv/kfp with kfp), "
                    "or point SAR_DIST_KFP_PYTHON at a Python that has kfp 2")
    out = tmp_path / "pipeline.yaml"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # kfp's venv only; no sar_dist
    proc = subprocess.run([str(KFP_PYTHON), str(ORCHESTRATORS / "kubeflow_pipeline.py"), str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    ir = yaml.safe_load(out.read_text())
    executors = ir["deploymentSpec"]["executors"]
    root_inputs = ir["root"].get("inputDefinitions", {}).get("parameters", {})
    tasks = {}
    for name, task in ir["root"]["dag"]["tasks"].items():
        where = f"kfp task {name}"
        component = ir["components"][task["componentRef"]["name"]]
        container = executors[component["executorLabel"]]["container"]
        assert container["image"] == _head_image(), where  # Ray Client: the cluster's Ray and Python
        assert container["command"] == ENTRYPOINT, where
        assert task.get("cachingOptions", {}).get("enableCache") is not True, f"{where}: only the stage knows if it is done"
        inputs = task.get("inputs", {}).get("parameters", {})
        args = _parse_run([_kfp_resolve(str(a), inputs, root_inputs, where) for a in container["args"]], where)
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        _check_ray_address(args.ray_address or env.get("RAY_ADDRESS", ""), where)
        assert env.get("RAY_AUTH_MODE") == "disabled", where  # as on every node of the cluster
        tasks[name] = (args, task.get("dependentTasks", []))
    _check_graph(tasks)
