"""infra/ files checked by the validators of the tools that consume them, offline and without starting Ray:

- `infra/cluster.yaml` (`ray up`): the wheel's own `prepare_config` + `validate_config`
  (`ray.autoscaler._private.util`), the two calls `ray up` makes in `_bootstrap_config`. For `provider.type: aws`
  `prepare_config` only merges `ray/autoscaler/aws/defaults.yaml` (no boto3, no credentials); `validate_config`
  checks the result against the wheel's `ray/autoscaler/ray-schema.json` with jsonschema. What `ray up` does in
  between and after (`fillout_available_node_types_resources`, `bootstrap_config`: EC2 calls) is not run.
- `infra/kuberay/*.yaml`: each resource's `spec` against its CRD's `openAPIV3Schema` (the KubeRay CRDs in
  `../shared/schemas/kuberay`), made strict the way the API server's strict field validation is: unknown fields
  are errors; plus apiVersion/kind/metadata. The RayService's serveConfigV2 with Serve's `ServeDeploySchema`.
- `infra/prefect.yaml`: the models and helpers `prefect deploy` uses (`prefect.cli.deploy`: `PrefectYamlModel`,
  `_schedule_config_to_deployment_schedule`, `_initialize_deployment_triggers`), plus unknown-key checks (those
  models ignore extra keys) and the flows' parameter schemas read from source (`parameter_schema_from_entrypoint`).
- `infra/serve.yaml` with `ServeDeploySchema`; `infra/Dockerfile` and the launcher's setup commands against the
  Makefile's install lines, so they cannot drift.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import re
import shlex
import tomllib
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement

REPO_ROOT = Path(__file__).resolve().parents[2]
INFRA = REPO_ROOT / "infra"
CRD_DIR = Path(__file__).resolve().parents[3] / "shared" / "schemas" / "kuberay"
KUBERAY = {"raycluster.yaml": "RayCluster", "rayjob.yaml": "RayJob", "rayservice.yaml": "RayService"}
DATA_CLAIM, DATA_MOUNT = "forgeline-data", "/data"
CPU_IMAGE, GPU_IMAGE = "forgeline:0.1.0", "forgeline:0.1.0-cuda"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the CRDs are 1-1.4 MB each


def load(name: str) -> Any:
    return yaml.safe_load((INFRA / name).read_text())


def dropped_keys(raw: Any, parsed: Any, path: str = "") -> list[str]:
    """Keys of `raw` that a model which ignores extra fields left out of its dump (`parsed`)."""
    if isinstance(raw, dict) and isinstance(parsed, dict):
        out = [f"{path}.{key}".lstrip(".") for key in raw if key not in parsed]
        return out + [k for key in raw if key in parsed for k in dropped_keys(raw[key], parsed[key], f"{path}.{key}")]
    if isinstance(raw, list) and isinstance(parsed, list) and len(raw) == len(parsed):
        return [k for i, (r, p) in enumerate(zip(raw, parsed, strict=True)) for k in dropped_keys(r, p, f"{path}[{i}]")]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Ray cluster launcher


def ray_up_validate(config: dict[str, Any]) -> dict[str, Any]:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(config)  # the file as written: ray-schema.json forbids unknown keys at every level it declares
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_ups_validation() -> None:
    raw = load("cluster.yaml")
    config = ray_up_validate(raw)
    assert raw["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["max_workers"] == 0
    assert types["gpu-worker"]["resources"]["GPU"] >= 1 and "GPU" not in types["cpu-worker"]["resources"]
    assert sum(t["max_workers"] for name, t in types.items() if name != "head") >= config["max_workers"]
    init = " ".join(config["initialization_commands"])
    assert "mount -t nfs4" in init and "/mnt/forgeline" in init, "every node mounts the shared file system"
    assert config["file_mounts"] == {"~/forgeline": "."}
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address=$RAY_HEAD_IP:6379" in c for c in config["worker_start_ray_commands"])
    assert "boto3" in " ".join(config["head_setup_commands"]), "the head's autoscaler talks to EC2"


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(max_workers="twelve"),
    lambda c: c.update(max_worker=4),                                          # unknown top-level key
    lambda c: c["available_node_types"]["gpu-worker"].update(resource={"GPU": 4}),   # unknown node-type key
    lambda c: c["available_node_types"]["gpu-worker"]["resources"].update(GPU="4"),
    lambda c: c.update(head_node_type="missing"),
], ids=["max_workers-type", "unknown-key", "unknown-node-type-key", "gpu-count-type", "head-type"])
def test_cluster_yaml_validation_catches_mistakes(mutate: Callable[[dict[str, Any]], None]) -> None:
    config = load("cluster.yaml")
    mutate(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_up_validate(config)


# ---------------------------------------------------------------------------------------------------------------
# KubeRay


@pytest.fixture(scope="module")
def crds() -> Path:
    if not CRD_DIR.is_dir():
        message = f"KubeRay CRD schemas not found at {CRD_DIR} (they live in the shared/ folder beside the repo)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CRD_DIR


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """A CRD's OpenAPI v3 schema as a JSON schema that rejects unknown fields: `additionalProperties: false` on
    every object that declares `properties` (unless it says otherwise or preserves unknown fields); int-or-string
    and nullable spelled out for a JSON-schema validator."""
    out = dict(schema)
    if out.get("x-kubernetes-int-or-string") and not {"anyOf", "oneOf", "type"} & out.keys():
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if isinstance(out.get("properties"), dict):
        out["properties"] = {name: strict(sub) for name, sub in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = strict(out["items"])
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            out[key] = [strict(sub) for sub in out[key]]
    if isinstance(out.get("not"), dict):
        out["not"] = strict(out["not"])
    return out


@cache
def crd_version(kind: str) -> tuple[str, str, dict[str, Any]]:
    """(apiVersion, kind, openAPIV3Schema) of the CRD's storage version."""
    crd = yaml.load((CRD_DIR / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    return f"{crd['spec']['group']}/{version['name']}", kind, version["schema"]["openAPIV3Schema"]


@cache
def spec_validator(kind: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(strict(crd_version(kind)[2]["properties"]["spec"]))


def manifest(name: str) -> dict[str, Any]:
    docs = [d for d in yaml.safe_load_all((INFRA / "kuberay" / name).read_text()) if d]
    return next(d for d in docs if d["kind"] == KUBERAY[name])


def crd_errors(resource: dict[str, Any]) -> list[str]:
    """Everything the API server would reject: apiVersion/kind, unknown top-level fields, metadata (the CRD
    says only `type: object`: the name must be a DNS-1123 label, labels strings), and the strict spec schema."""
    api_version, kind, schema = crd_version(resource["kind"])
    errors = []
    if resource.get("apiVersion") != api_version:
        errors.append(f"apiVersion {resource.get('apiVersion')!r} is not {api_version!r}")
    unknown = set(resource) - set(schema["properties"]) - {"status"}
    errors += [f"unknown top-level field {key!r}" for key in sorted(unknown)]
    metadata = resource.get("metadata")
    name = metadata.get("name", "") if isinstance(metadata, dict) else ""
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name) or len(name) > 63:
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    labels = metadata.get("labels", {}) if isinstance(metadata, dict) else {}
    errors += [f"metadata.labels.{k}: not a string" for k, v in labels.items() if not isinstance(v, str)]
    errors += [f"spec.{'.'.join(map(str, e.absolute_path))}: {e.message}"
               for e in spec_validator(kind).iter_errors(resource.get("spec"))]
    return errors


def cluster_spec(resource: dict[str, Any]) -> dict[str, Any]:
    spec = resource["spec"]
    return {"RayCluster": lambda: spec, "RayJob": lambda: spec["rayClusterSpec"],
            "RayService": lambda: spec["rayClusterConfig"]}[resource["kind"]]()


def groups(resource: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    spec = cluster_spec(resource)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


@pytest.mark.parametrize("name", sorted(KUBERAY))
def test_kuberay_manifest_matches_its_crd(crds: Path, name: str) -> None:
    resource = manifest(name)
    assert crd_errors(resource) == []


@pytest.mark.parametrize("name", sorted(KUBERAY))
@pytest.mark.parametrize("mistake", ["wrong-type", "unknown-field", "deep-unknown-field", "start-param-int",
                                     "api-version"])
def test_kuberay_validation_catches_mistakes(crds: Path, name: str, mistake: str) -> None:
    resource = manifest(name)
    spec = cluster_spec(resource)
    worker = spec["workerGroupSpecs"][0]
    if mistake == "wrong-type":
        worker["maxReplicas"] = "eight"
    elif mistake == "unknown-field":
        resource["spec"]["workerGroupSpec" if name == "raycluster.yaml" else "entrypont"] = []
    elif mistake == "deep-unknown-field":
        worker["template"]["spec"]["containers"][0]["volumeMount"] = [{"name": "data", "mountPath": "/data"}]
    elif mistake == "start-param-int":
        spec["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0   # rayStartParams values are strings
    else:
        resource["apiVersion"] = "ray.io/v2"
    errors = crd_errors(resource)
    assert len(errors) == 1, errors


def test_kuberay_manifests_share_images_volumes_and_ray_version() -> None:
    import ray

    claim = next(d for d in yaml.safe_load_all((INFRA / "kuberay" / "raycluster.yaml").read_text())
                 if d and d["kind"] == "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == DATA_CLAIM and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for name in KUBERAY:
        resource = manifest(name)
        assert cluster_spec(resource)["rayVersion"] == ray.__version__, name
        for group_name, group in groups(resource):
            pod = group["template"]["spec"]
            container = pod["containers"][0]
            volumes = {v["name"]: v for v in pod["volumes"]}
            mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
            where = f"{name}: {group_name}"
            assert volumes[mounts[DATA_MOUNT]]["persistentVolumeClaim"]["claimName"] == DATA_CLAIM, where
            assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory", where
            assert pod["securityContext"]["runAsNonRoot"] is True, where
            gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert (container["image"], gpus > 0) == ((GPU_IMAGE, True) if group_name == "gpu" else (CPU_IMAGE, False))
            assert container["resources"]["requests"] == container["resources"]["limits"], where


def test_rayjob_runs_the_pipeline_on_the_mounted_config() -> None:
    job = manifest("rayjob.yaml")
    assert job["spec"]["entrypoint"] == "forgeline run /config/cluster.yaml --address auto"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    head = cluster_spec(job)["headGroupSpec"]["template"]["spec"]
    mounts = {m["mountPath"]: m["name"] for m in head["containers"][0]["volumeMounts"]}
    config_map = {v["name"]: v for v in head["volumes"]}[mounts["/config"]]["configMap"]
    assert config_map["name"] == "forgeline-config"
    assert {"key": "cluster.yaml", "path": "cluster.yaml"} in config_map["items"]


# ---------------------------------------------------------------------------------------------------------------
# Ray Serve


def serve_config(raw: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(raw)
    unknown = dropped_keys(raw, config.model_dump(exclude_unset=True))
    assert not unknown, f"fields Serve ignores: {unknown}"
    return config


def test_serve_yaml_and_rayservice_serve_config_are_serve_deploy_schemas() -> None:
    local = serve_config(load("serve.yaml"))
    cluster = serve_config(yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"]))
    (local_app,), (app,) = local.applications, cluster.applications
    assert app.import_path == local_app.import_path == "serving.app:app_builder"
    assert set(app.args) <= set(local_app.args), "app_builder ignores unknown args: only the ones serve.yaml uses"
    assert app.args["model"].startswith(DATA_MOUNT + "/") and app.args["engine_gpus"] == 1
    assert cluster.http_options.host == "0.0.0.0", "KubeRay's Serve Service reaches the proxy on the pod IP"


def test_serve_config_validation_catches_mistakes() -> None:
    import pydantic

    raw = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    with pytest.raises(pydantic.ValidationError):
        serve_config({**raw, "http_options": {"port": "eight thousand"}})
    with pytest.raises(AssertionError, match="aplications"):
        serve_config({**raw, "aplications": []})


# ---------------------------------------------------------------------------------------------------------------
# Prefect


def prefect_errors(raw: dict[str, Any]) -> list[str]:
    """What `prefect deploy --all` would reject or silently drop, checked with its own models and helpers."""
    import pydantic
    from prefect.cli.deploy._models import PrefectYamlModel, RawScheduleConfig
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    try:
        model = PrefectYamlModel.model_validate(raw)
    except pydantic.ValidationError as error:
        return [str(error)]
    # `definitions` holds YAML anchors (Prefect's documented pattern); prefect deploy ignores it.
    errors = [f"unknown key {k}" for k in dropped_keys(raw, model.model_dump(exclude_unset=True, by_alias=True))
              if k != "definitions"]
    for deployment in raw.get("deployments", []):
        name = deployment.get("name")
        for schedule in deployment.get("schedules") or []:
            try:
                RawScheduleConfig.model_validate(schedule)
                _schedule_config_to_deployment_schedule(copy.deepcopy(schedule))
            except (pydantic.ValidationError, ValueError) as error:
                errors.append(f"{name}: schedule {schedule}: {error}")
        try:
            triggers = _initialize_deployment_triggers(name, copy.deepcopy(deployment.get("triggers") or []))
        except pydantic.ValidationError as error:
            errors.append(f"{name}: triggers: {error}")
            continue
        for spec, trigger in zip(deployment.get("triggers") or [], triggers, strict=True):
            errors += [f"{name}: unknown trigger key {k}"
                       for k in dropped_keys(spec, trigger.model_dump(exclude_unset=True, mode="json"))]
    return errors


def test_prefect_yaml_passes_prefect_deploys_validation() -> None:
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.events import DeploymentEventTrigger
    from prefect.events.schemas.events import Resource

    raw = load("prefect.yaml")
    assert prefect_errors(raw) == []
    deployments = {d["name"]: d for d in raw["deployments"]}
    assert set(deployments) == {"evaluate-on-checkpoint", "pipeline", "rag-rebuild"}
    assert all(d["work_pool"]["name"] == "forgeline-local" for d in deployments.values())

    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    pipeline = deployments["pipeline"]
    assert pipeline["entrypoint"] == "flows/pipeline.py:pipeline_from_file_flow"
    (schedule,) = [_schedule_config_to_deployment_schedule(s)["schedule"] for s in pipeline["schedules"]]
    assert isinstance(schedule, CronSchedule) and schedule.cron == "0 3 * * *"

    rag = deployments["rag-rebuild"]
    assert rag["entrypoint"] == "flows/rag.py:rag_from_file_flow"
    (trigger,) = _initialize_deployment_triggers(rag["name"], copy.deepcopy(rag["triggers"]))
    assert isinstance(trigger, DeploymentEventTrigger) and trigger.expect == {"forgeline.stage.published"}
    assert trigger.match.matches(Resource({"prefect.resource.id": "forgeline.stage.filter-0123abcd"}))
    assert not trigger.match.matches(Resource({"prefect.resource.id": "forgeline.stage.dedup-0123abcd"}))


@pytest.mark.parametrize("mutate", [
    lambda d: d["pipeline"]["schedules"].__setitem__(0, {"cron": "61 3 * * *"}),
    lambda d: d["pipeline"]["schedules"].__setitem__(0, {"cron": "0 3 * * *", "tz": "UTC"}),
    lambda d: d["pipeline"].update(schedule_s=[]),
    lambda d: d["pipeline"]["work_pool"].update(job_vars={}),
    lambda d: d["rag-rebuild"]["triggers"][0].update(expects=["forgeline.stage.published"]),
    lambda d: d["rag-rebuild"]["triggers"][0].update(posture="Sideways"),
], ids=["bad-cron", "unknown-schedule-key", "unknown-deployment-key", "unknown-work-pool-key",
        "unknown-trigger-key", "bad-trigger"])
def test_prefect_validation_catches_mistakes(mutate: Callable[[dict[str, Any]], None]) -> None:
    raw = json.loads(json.dumps(load("prefect.yaml")))  # unshare the YAML aliases: mutate one deployment only
    mutate({d["name"]: d for d in raw["deployments"]})
    assert len(prefect_errors(raw)) == 1


def flow_parameters(source: Path, function: str) -> dict[str, tuple[str, bool]] | None:
    """{parameter: (annotation, required)} of a `@flow` function, read from its source (importing the flows
    module would import torch and Ray), or None when the file or function does not exist."""
    if not source.is_file():
        return None
    tree = ast.parse(source.read_text())
    node = next((n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == function),
                None)
    if node is None:
        return None
    decorators = [d.func if isinstance(d, ast.Call) else d for d in node.decorator_list]
    assert any(getattr(d, "id", getattr(d, "attr", None)) == "flow" for d in decorators), f"{function} is no @flow"
    positional = node.args.posonlyargs + node.args.args
    defaults = [False] * (len(positional) - len(node.args.defaults)) + [True] * len(node.args.defaults)
    params = zip(positional + node.args.kwonlyargs, defaults + [d is not None for d in node.args.kw_defaults],
                 strict=True)
    return {a.arg: (ast.unparse(a.annotation) if a.annotation else "Any", not has_default) for a, has_default in params}


@pytest.mark.parametrize("deployment", [d["name"] for d in load("prefect.yaml")["deployments"]])
def test_prefect_deployment_parameters_fit_the_flow(deployment: str) -> None:
    """Parameters (the deployment's, and each trigger's on top of them) against the flow's signature: no unknown
    name, every required one given, strings where the flow takes `str`."""
    spec = next(d for d in load("prefect.yaml")["deployments"] if d["name"] == deployment)
    path, _, function = spec["entrypoint"].partition(":")
    signature = flow_parameters(REPO_ROOT / path, function)
    if signature is None:
        pytest.skip(f"{spec['entrypoint']} is not written yet")
    runs = [spec["parameters"]] if not spec.get("triggers") else [
        {**spec["parameters"], **(t.get("parameters") or {})} for t in spec["triggers"]]
    for parameters in runs:
        assert set(parameters) <= set(signature), f"unknown parameters: {set(parameters) - set(signature)}"
        assert {p for p, (_, required) in signature.items() if required} <= set(parameters), parameters
        strings = [p for p, (kind, _) in signature.items() if kind == "str" and p in parameters]
        assert all(isinstance(parameters[p], str) for p in strings), parameters


# ---------------------------------------------------------------------------------------------------------------
# Install steps: Makefile = Dockerfile = cluster launcher


def pip_installs(commands: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(requirement, flags) per package of each `pip install` in `commands`; the local project is `PROJECT`."""
    out = []
    for command in commands:
        for part in re.split(r"&&|\|\||;", command):
            words = shlex.split(part.strip().strip("()"))
            starts = [i for i in range(len(words) - 1) if words[i].endswith("pip") and words[i + 1] == "install"]
            if not starts:
                continue
            args, flags, packages = iter(words[starts[0] + 2:]), [], []
            for arg in args:
                if arg in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint"):
                    next(args)
                elif arg == "--no-deps":
                    flags.append(arg)
                elif not arg.startswith("-"):
                    packages.append(arg)
            for package in packages:
                if package.startswith((".", "/", "$", "~")):
                    out.append(("PROJECT", tuple(flags)))
                elif Requirement(package).name != "pip":
                    out.append((str(Requirement(package)), tuple(flags)))
    return out


def makefile_installs() -> list[tuple[str, tuple[str, ...]]]:
    lines = [line.strip() for line in (REPO_ROOT / "Makefile").read_text().splitlines()]
    return pip_installs([line for line in lines if line.startswith("$(BIN)/pip install")])


def test_makefile_install_lines_are_the_expected_ones() -> None:
    assert makefile_installs() == [("torch==2.13.0", ()), ("PROJECT", ())]


def test_dockerfile_installs_what_the_makefile_installs() -> None:
    text = (INFRA / "Dockerfile").read_text()
    logical = re.sub(r"\\\n", " ", text).splitlines()
    assert logical[[line.startswith("FROM") for line in logical].index(True)].split()[1] == "python:3.11-slim"
    runs = [line.strip()[4:] for line in logical if line.strip().startswith("RUN ")]
    assert pip_installs(runs) == makefile_installs()
    assert "pip install '.[s3]'" in text
    apt_installs = [line for line in logical if "apt-get install" in line]
    assert apt_installs and "libtcmalloc-minimal4" in apt_installs[0], "the engine's allocator (engine_allocator)"
    users = [line.split()[1] for line in logical if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0"), "the image runs as a non-root user"
    copies = [line.split()[1:-1] for line in logical if line.startswith("COPY ")]
    sources = {source for sources in copies for source in sources}
    assert "." not in sources, "COPY . would copy .venv, runs/ and data/ into the image"
    assert all((REPO_ROOT / source).exists() for source in sources), sources
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    assert set(packages) <= sources and {"pyproject.toml", "README.md"} <= sources


def test_cluster_setup_commands_install_what_the_makefile_installs() -> None:
    config = load("cluster.yaml")
    assert pip_installs(config["setup_commands"]) == makefile_installs()
    gpu = config["available_node_types"]["gpu-worker"]["worker_setup_commands"]
    assert pip_installs(gpu) == makefile_installs()
    assert "download.pytorch.org/whl/cpu" in " ".join(config["setup_commands"])
    assert "whl/cpu" not in " ".join(gpu), "GPU nodes get torch's CUDA build"
