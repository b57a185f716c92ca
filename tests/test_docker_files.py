"""Static checks of docker/: the image recipe, the Ray cluster launcher config and the KubeRay RayJob.

No docker engine or cluster exists where these tests run, so nothing is built or started: the files
are parsed and checked against Ray's own cluster schema and config preparation, the KubeRay RayJob
fields, the installed Ray version, pyproject.toml and the featrec-grid Click CLI itself.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib
import json
import re
import shlex
import sys
from pathlib import Path

import click
import jsonschema
import ray
import ray.autoscaler
import yaml
from packaging.requirements import Requirement

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
BASE_IMAGE = re.compile(r"rayproject/ray:(?P<ray>\d+\.\d+\.\d+)-py311-(?P<cuda>cu\d{3,})")
PLACEHOLDERS = re.compile(r"registry\.example\.com|REPLACE_WITH_[A-Z_]+|\b000000000000\b")

# RayJob / RayCluster fields of KubeRay's ray.io/v1 API (ray-operator/apis/ray/v1/*_types.go).
# fmt: off
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint",
    "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus",
    "entrypointNumGpus", "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend",
}
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend",
}
# fmt: on


# ---------------------------------------------------------------- helpers


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@functools.cache
def dockerfile() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, arguments) of docker/Dockerfile: continuations joined, comments dropped,
    ${ARG} references replaced by the ARG defaults declared above them."""
    lines, pending = [], ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"

    args: dict[str, str] = {}

    def expand(text: str) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], text)

    out = []
    for line in lines:
        name, _, rest = line.partition(" ")
        rest = expand(rest.strip())
        if name.upper() == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        out.append((name.upper(), rest))
    return tuple(out)


def instructions(name: str) -> list[str]:
    return [rest for inst, rest in dockerfile() if inst == name]


def base_image() -> re.Match:
    (image,) = instructions("FROM")
    match = BASE_IMAGE.fullmatch(image)
    assert match, f"FROM {image!r} is not rayproject/ray:<x.y.z>-py311-cu<NNN>"
    return match


def arg_default(name: str) -> str:
    for rest in instructions("ARG"):
        key, eq, value = rest.partition("=")
        if key == name and eq:
            return value.strip('"')
    raise AssertionError(f"no ARG {name}=<default> in the Dockerfile")


def expected_image(registry: str) -> str:
    """The image name docker/README.md builds: featrec-grid:<version>-ray<ray>-py311-<cuda>."""
    base = base_image()
    version = pyproject()["project"]["version"]
    return f"{registry}/featrec-grid:{version}-ray{base['ray']}-py311-{base['cuda']}"


@functools.cache
def cluster() -> dict:
    return yaml.safe_load((DOCKER / "cluster.yaml").read_text())


@functools.cache
def manifests() -> tuple[dict, ...]:
    return tuple(doc for doc in yaml.safe_load_all((DOCKER / "rayjob.yaml").read_text()) if doc)


def rayjob() -> dict:
    (job,) = [doc for doc in manifests() if doc.get("kind") == "RayJob"]
    return job


def pod_templates() -> list[tuple[str, dict]]:
    spec = rayjob()["spec"]["rayClusterSpec"]
    groups = [("head", spec["headGroupSpec"])]
    groups += [(group["groupName"], group) for group in spec["workerGroupSpecs"]]
    return [(name, group["template"]["spec"]) for name, group in groups]


def readme() -> str:
    return (DOCKER / "README.md").read_text()


def console_script() -> tuple[str, click.Command]:
    """The featrec-grid entry point declared in pyproject.toml, imported."""
    ((name, target),) = pyproject()["project"]["scripts"].items()
    module, _, attr = target.partition(":")
    return name, getattr(importlib.import_module(module), attr)


def check_cli_command(argv: list[str]) -> click.Command:
    """Assert argv is a featrec-grid call the Click CLI accepts: known subcommands, known options
    (with a value where one is needed) and the right number of positional arguments."""
    name, command = console_script()
    assert argv[0] == name, f"{argv} does not start with the console script {name!r}"
    rest = argv[1:]
    while isinstance(command, click.Group) and rest and not rest[0].startswith("-"):
        sub = command.commands.get(rest[0])
        assert sub is not None, f"{rest[0]!r} is not a command of {name}: {sorted(command.commands)}"
        command, rest = sub, rest[1:]
    params = command.get_params(click.Context(command))
    options = {opt: p for p in params if isinstance(p, click.Option) for opt in p.opts + p.secondary_opts}
    arguments = [p for p in params if isinstance(p, click.Argument)]
    positionals = []
    i = 0
    while i < len(rest):
        token = rest[i]
        if token.startswith("-"):
            opt, has_value, _ = token.partition("=")
            assert opt in options, f"{opt} is not an option of {command.name}: {sorted(options)}"
            if not (options[opt].is_flag or options[opt].count or has_value):
                i += 1
                assert i < len(rest), f"{opt} needs a value in {argv}"
        else:
            positionals.append(token)
        i += 1
    required = sum(1 for a in arguments if a.required)
    unbounded = any(a.nargs == -1 for a in arguments)
    assert required <= len(positionals), f"{argv}: {command.name} needs {required} argument(s)"
    assert unbounded or len(positionals) <= sum(a.nargs for a in arguments), f"{argv}: too many arguments"
    return command


def readme_cli_calls() -> list[list[str]]:
    """Every `featrec-grid ...` call inside a fenced code block of docker/README.md."""
    calls = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", readme(), flags=re.S):
        for line in block.splitlines():
            match = re.search(r"(?<![\w/.:-])featrec-grid(?=\s)(.*)$", line)
            if match:
                command = re.split(r"\s(?:\||&&|;|>)\s", "featrec-grid" + match.group(1))[0]
                calls.append(shlex.split(command.rstrip("\\"), comments=True))
    return calls


def dockerignored(path: str) -> bool:
    """Whether docker/Dockerfile.dockerignore keeps `path` (relative to the repo) out of the context."""
    patterns = [
        p.strip().lstrip("/")
        for p in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    assert not any(p.startswith("!") for p in patterns), "exceptions (!) are not handled here"
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(part, pattern[3:]) for part in parts):
                return True
        elif any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
            return True
    return False


# ---------------------------------------------------------------- Dockerfile


def test_base_image_is_a_maintained_ray_gpu_image_with_a_concrete_version():
    base = base_image()
    assert base["ray"].count(".") == 2
    assert int(base["cuda"][2:4]) >= 11, "a CUDA 11+ platform tag (cu118, cu121, cu128, ...)"


def test_base_image_ray_matches_the_installed_ray_and_pyproject():
    version = base_image()["ray"]
    assert version == ray.__version__
    (ray_req,) = [
        Requirement(r) for r in pyproject()["project"]["dependencies"] if Requirement(r).name == "ray"
    ]
    assert version in ray_req.specifier, f"{ray_req} does not admit the image's Ray {version}"


def test_torch_wheels_match_the_base_image_cuda():
    cuda = base_image()["cuda"]
    index = arg_default("TORCH_INDEX_URL")
    assert index == f"https://download.pytorch.org/whl/{cuda}"
    runs = instructions("RUN")
    torch_runs = [i for i, r in enumerate(runs) if "torch" in shlex.split(r) and index in r]
    package_runs = [i for i, r in enumerate(runs) if "." in shlex.split(r)]
    assert torch_runs and package_runs and torch_runs[0] < package_runs[0]


def test_dockerfile_copies_the_repo_and_pip_installs_the_package():
    order = [inst for inst, _ in dockerfile()]
    copy_at = next(
        i for i, (inst, rest) in enumerate(dockerfile()) if inst == "COPY" and rest.split()[-2:] == [".", "."]
    )
    install_at = next(
        i
        for i, (inst, rest) in enumerate(dockerfile())
        if inst == "RUN" and re.search(r"pip install --no-cache-dir \.(\s|$)", rest)
    )
    assert "WORKDIR" in order[:copy_at]
    assert copy_at < install_at
    install = dockerfile()[install_at][1]
    assert f'"ray[tune]=={base_image()["ray"]}"' in install, "Ray must stay at the base image's version"


def test_dockerignore_keeps_what_the_install_needs_and_drops_local_state():
    for needed in ("pyproject.toml", "README.md", "featrec_grid/cli.py", "grid_specs/demo.yaml"):
        assert not dockerignored(needed), needed
    for dropped in (
        ".git/config",
        "store/shards/x.arrow",
        "reports/demo/index.html",
        "featrec_grid/__pycache__/a.pyc",
    ):
        assert dockerignored(dropped), dropped


def test_command_is_the_cli_and_there_is_no_entrypoint():
    # Ray's cluster launcher runs `docker run ... IMAGE bash`, KubeRay sets its own command:
    # an ENTRYPOINT would swallow both.
    assert instructions("ENTRYPOINT") == []
    cmd = json.loads(instructions("CMD")[-1])
    check_cli_command(cmd)


def test_image_runs_as_a_non_root_user():
    users = instructions("USER")
    assert users and users[-1] not in {"root", "0", "0:0"}
    for rest in instructions("COPY"):
        assert "--chown=" in rest and "root" not in rest


# ---------------------------------------------------------------- cluster.yaml (ray up)


def test_cluster_yaml_validates_against_rays_schema():
    schema_path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(cluster())


def test_cluster_yaml_passes_the_checks_ray_up_runs_before_calling_aws():
    # Ray's private helpers, pinned with the image's Ray version: defaults, docker and node-type checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster()))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_cluster_has_a_cpu_head_and_gpu_worker_types():
    config = cluster()
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    assert types[head]["resources"].get("GPU", 0) == 0
    gpu_types = {name: t for name, t in types.items() if name != head and t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no worker node type with a GPU"
    assert any(t.get("min_workers", 0) >= 1 for t in gpu_types.values()), "no GPU worker at start"
    assert sum(t.get("max_workers", 0) for t in gpu_types.values()) <= config["max_workers"]
    for name, node_type in gpu_types.items():
        assert node_type.get("min_workers", 0) <= node_type["max_workers"], name
        assert "--gpus all" in node_type["docker"]["worker_run_options"], name
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} cannot reach an s3:// store"
    assert not any("--gpus" in opt for opt in config["docker"].get("run_options", [])), (
        "CPU head cannot start"
    )


def test_cluster_start_commands_start_a_head_and_join_it():
    head = " ".join(cluster()["head_start_ray_commands"])
    worker = " ".join(cluster()["worker_start_ray_commands"])
    assert "ray start --head --port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker


def test_cluster_placeholders_are_all_filled_by_the_readme_command():
    text = (DOCKER / "cluster.yaml").read_text()
    uncommented = "\n".join(line.split("#")[0] for line in text.splitlines())
    found = set(PLACEHOLDERS.findall(uncommented))
    assert found == {"registry.example.com", "REPLACE_WITH_DLAMI_ID", "000000000000"}
    (sed,) = [line for line in readme().splitlines() if "docker/cluster.yaml >" in line]
    for placeholder in found:
        assert f"s#{placeholder}#" in sed, placeholder


# ---------------------------------------------------------------- images


def test_cluster_and_rayjob_use_the_image_the_dockerfile_builds():
    image = expected_image("registry.example.com")
    assert cluster()["docker"]["image"] == image
    for name, pod in pod_templates():
        for container in pod["containers"]:
            assert container["image"] == image, name
    local_tag = image.removeprefix("registry.example.com/")
    assert f"docker build -f docker/Dockerfile -t {local_tag} ." in readme()


# ---------------------------------------------------------------- rayjob.yaml (KubeRay)


def test_rayjob_uses_the_kuberay_v1_fields():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert set(spec) <= RAYJOB_SPEC_FIELDS, set(spec) - RAYJOB_SPEC_FIELDS
    assert spec["shutdownAfterJobFinishes"] is True
    cluster_spec = spec["rayClusterSpec"]
    assert set(cluster_spec) <= RAYCLUSTER_SPEC_FIELDS, set(cluster_spec) - RAYCLUSTER_SPEC_FIELDS
    assert cluster_spec["rayVersion"] == base_image()["ray"]
    assert set(cluster_spec["headGroupSpec"]) <= HEAD_GROUP_FIELDS
    for group in [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]:
        assert set(group) - {"groupName"} <= WORKER_GROUP_FIELDS | HEAD_GROUP_FIELDS
        # rayStartParams is a map[string]string: a YAML number there is rejected by the CRD.
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
    for group in cluster_spec["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP_FIELDS
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_rayjob_has_a_gpu_worker_group():
    gpus = []
    for name, pod in pod_templates():
        for container in pod["containers"]:
            resources = container.get("resources", {})
            limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
            if "nvidia.com/gpu" in resources.get("requests", {}):
                assert int(resources["requests"]["nvidia.com/gpu"]) == limit, name
            if limit:
                assert name != "head", "the head should not hold a GPU"
                gpus.append(limit)
    assert gpus and min(gpus) >= 1


def test_rayjob_volumes_and_claims_are_defined():
    claims = {doc["metadata"]["name"] for doc in manifests() if doc.get("kind") == "PersistentVolumeClaim"}
    for name, pod in pod_templates():
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for container in pod["containers"]:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes, f"{name}: volume {mount['name']} is not defined"
        for volume in volumes.values():
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims


def test_rayjob_entrypoint_is_a_featrec_grid_run_the_cli_accepts():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    command = check_cli_command(argv)
    assert command.name == "run"
    assert "--address" in argv and argv[argv.index("--address") + 1] == "auto"


def test_rayjob_reads_its_spec_from_the_configmap_the_readme_creates():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    (spec_path,) = [a for a in argv[2:] if a.endswith((".yaml", ".yml"))]
    (head,) = [pod for name, pod in pod_templates() if name == "head"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {
        m["mountPath"].rstrip("/"): m["name"] for c in head["containers"] for m in c.get("volumeMounts", [])
    }
    directory, _, key = spec_path.rpartition("/")
    configmap = volumes[mounts[directory]]["configMap"]["name"]
    created = re.findall(r"kubectl create configmap (\S+) --from-file=(\S+?)=(\S+)", readme())
    assert (configmap, key) in [(name, k) for name, k, _ in created], created


def test_rayjob_writes_the_report_to_a_claim_and_reads_the_readmes_secret():
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    output = argv[argv.index("--output") + 1]
    (head,) = [pod for name, pod in pod_templates() if name == "head"]
    volumes = {v["name"]: v for v in head["volumes"]}
    mounts = {m["mountPath"]: m["name"] for c in head["containers"] for m in c.get("volumeMounts", [])}
    (mount,) = [path for path in mounts if output.startswith(path.rstrip("/") + "/")]
    assert "persistentVolumeClaim" in volumes[mounts[mount]], f"{output} would vanish with the head pod"
    assert head.get("securityContext", {}).get("fsGroup") == 100, (
        "uid 1000 (group 100) cannot write the claim"
    )
    secrets = re.findall(r"kubectl create secret generic (\S+)", readme())
    for name, pod in pod_templates():
        for container in pod["containers"]:
            refs = [e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e]
            assert refs and set(refs) <= set(secrets), name


# ---------------------------------------------------------------- README


def test_readme_commands_match_the_cli_and_their_specs_exist():
    calls = readme_cli_calls()
    written = set(re.findall(r">\s*(\S+\.ya?ml)\b", readme()))
    assert any(call[1:2] == ["run"] and "--address" in call for call in calls)
    for call in calls:
        check_cli_command(call)
        for token in call[2:]:
            if token.endswith((".yaml", ".yml")):
                assert (ROOT / token).is_file() or token in written, token


def test_readme_s3_copy_of_the_demo_spec_is_a_valid_spec_with_an_s3_store(tmp_path):
    from featrec_grid.spec import load_spec

    match = re.search(r'sed "s#(.+?)#(.+?)#" (grid_specs/\S+\.yaml) > (\S+\.yaml)', readme())
    assert match, "no sed command that writes a copy of a spec in docker/README.md"
    pattern, replacement, source, target = match.groups()
    text = re.sub(
        pattern, replacement.replace("$BUCKET", "some-bucket"), (ROOT / source).read_text(), flags=re.M
    )
    (tmp_path / target).write_text(text)
    copy_spec, original = load_spec(str(tmp_path / target)), load_spec(str(ROOT / source))
    assert copy_spec.store.startswith("s3://some-bucket/")
    assert copy_spec.models == original.models and copy_spec.pairs == original.pairs


def test_readme_names_the_base_image_and_the_files_it_documents_exist():
    text = readme()
    assert base_image().group(0) in text
    assert "not built" in text or "never been built" in text
    for path in set(re.findall(r"docker/[\w.-]+", text)):
        assert (ROOT / path).is_file(), path
