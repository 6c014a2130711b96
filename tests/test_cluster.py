"""Every file in cluster/ is checked even where it cannot run here: YAML parses, the Ray cluster
launcher config passes Ray's own schema, the runtime_env builds, every job entrypoint names a
module that exists and arguments that the CLI parses, with configs that validate."""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
import yaml

from sar_dist.cli import _build_parser, _load_yaml
from sar_dist.config import MergeJob
from sar_dist.fisher.config import FisherJob
from tests.conftest import REPO

CLUSTER = REPO / "cluster"


def _entrypoints() -> list[tuple[str, list[str]]]:
    """(file, argv) of every `python -m pipelines.X ...` the cluster files run."""
    found = []
    for path in sorted(CLUSTER.rglob("*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if isinstance(doc, dict) and doc.get("kind") == "RayJob":
            found.append((path.name, shlex.split(doc["spec"]["entrypoint"])))
    script = (CLUSTER / "submit.sh").read_text().replace("\\\n", " ")
    for line in script.splitlines():
        if "python -m pipelines." in line:
            cmd = line[line.index("python -m"):]
            cmd = re.sub(r'"\$\{\d+:-([^}]*)\}"', r"\1", cmd)  # a positional argument's default
            found.append(("submit.sh", shlex.split(cmd.replace('"$model"', "m").replace("$model", "m"))))
    return found


def test_every_yaml_parses():
    files = sorted(CLUSTER.rglob("*.yaml"))
    assert len(files) >= 5
    for path in files:
        assert yaml.safe_load(path.read_text()) is not None, path


@pytest.mark.parametrize("where,argv", _entrypoints(), ids=lambda x: x if isinstance(x, str) else " ".join(x[2:4]))
def test_entrypoint_module_exists_and_arguments_parse(where, argv):
    assert argv[:2] == ["python", "-m"], where
    module = argv[2]
    assert module in ("pipelines.merge", "pipelines.fisher", "pipelines.run"), where
    assert (REPO / (module.replace(".", "/") + ".py")).is_file()
    stage = module.split(".")[1]
    args = _build_parser().parse_args([stage, *argv[3:]])  # argparse exits (SystemExit) on bad flags
    if stage == "run":  # the pipeline file is loaded here; its task graphs: tests/test_orchestrators.py
        from sar_dist.pipeline.config import load_pipeline

        job = load_pipeline(str(REPO / args.pipeline))
        assert [m.name for m in job.models] == ["rl-math", "rl-code"], where
        return
    assert (REPO / args.config).is_file(), f"{where}: {args.config}"
    raw = _load_yaml(str(REPO / args.config))
    if stage == "merge":
        MergeJob.from_dict(raw, where=args.config, output=args.output)
    else:
        FisherJob.from_dict(raw, where=args.config, model=args.model, data=args.data, output=args.output,
                            groups=args.groups, ranks_per_group=args.ranks_per_group, device=args.device,
                            dtype=args.dtype)


def test_kuberay_manifests():
    cluster = yaml.safe_load((CLUSTER / "kuberay" / "raycluster.yaml").read_text())
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    name = cluster["metadata"]["name"]
    groups = cluster["spec"]["workerGroupSpecs"]
    assert {g["groupName"] for g in groups} == {"cpu", "gpu"}
    for spec in [cluster["spec"]["headGroupSpec"], *groups]:
        for c in spec["template"]["spec"]["containers"]:
            env = {e["name"]: e["value"] for e in c.get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "disabled"  # the same auth mode on every node
            assert not any("SECRET" in k or "KEY" in k for k in env)
    for job in ("rayjob-merge.yaml", "rayjob-fisher.yaml"):
        doc = yaml.safe_load((CLUSTER / "kuberay" / job).read_text())
        assert doc["kind"] == "RayJob" and doc["spec"]["clusterSelector"]["ray.io/cluster"] == name


def test_cluster_launcher_config_passes_rays_schema():
    from jsonschema.exceptions import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "ray-cluster-aws.yaml").read_text())
    validate_config(prepare_config(config))
    with pytest.raises(ValidationError):  # the check can fail: an unknown key breaks the schema
        validate_config(prepare_config({**config, "head_node_typ": "head"}))


def test_runtime_env_builds():
    from ray.runtime_env import RuntimeEnv

    env = RuntimeEnv(**yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()))
    assert env["working_dir"] == "."
    assert any(p.startswith("torch==") for p in env["pip"]["packages"])


def test_dockerfile_copies_what_exists_and_submit_script_parses():
    lines = (CLUSTER / "Dockerfile").read_text().splitlines()
    assert lines[[i for i, line in enumerate(lines) if line.strip() and not line.startswith("#")][0]].startswith("FROM ")
    for line in lines:
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            for src in sources:
                assert (REPO / src).exists(), src
    subprocess.run(["bash", "-n", str(CLUSTER / "submit.sh")], check=True)
