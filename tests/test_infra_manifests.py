"""The container and cluster manifests agree with each other and with prefect.yaml.

Neither Docker nor a Kubernetes cluster runs where this project is tested, so these tests parse
infra/docker-compose.yml, infra/.env.example, the Dockerfiles and infra/k8s/gpu-work-pool.json
(PyYAML, json; no network) and check the references between them: services, volumes, ports,
work pools, workspaces, the train deployment, the bucket, the GPU, and that no secret is written
down. Each check is a function returning the problems it found (empty: none), so the tests at the
end can show that every check also fails on a deliberately broken copy.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_infra_manifests.py
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

PROJECT = Path(__file__).resolve().parents[1]
COMPOSE = PROJECT / "infra" / "docker-compose.yml"
ENV_EXAMPLE = PROJECT / "infra" / ".env.example"
K8S_POOL = PROJECT / "infra" / "k8s" / "gpu-work-pool.json"
PREFECT_YAML = PROJECT / "prefect.yaml"
TRAIN_FLOW = PROJECT / "flows" / "train_stage.py"

# Which compose worker serves each prefect.yaml deployment (by entrypoint).
WORKER_OF_ENTRYPOINT = {"flows/pipeline.py:pipeline": "worker-cpu", "flows/ablation.py:ablation": "worker-cpu",
                        "flows/train_stage.py:train_stage": "worker-gpu"}
TRAIN_ENTRYPOINT = "flows/train_stage.py:train_stage"
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_PASSWORD",
              "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")
# What a GPU job needs besides PREFECT_API_URL (which the Kubernetes worker adds itself).
JOB_ENV_NEEDED = {"MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL", "STAGEWISE_S3_BUCKET",
                  "STAGEWISE_WORKSPACE", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}

# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}
VAR_REF = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
DEPLOY_VAR = re.compile(r"\{\{\s*\$(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*\}\}")  # prefect.yaml, filled in at deploy time
JOB_PLACEHOLDER = re.compile(r"\{\{\s*(?P<name>[A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")  # work-pool job template
LOOPBACK_PORT = re.compile(r"127\.0\.0\.1:(?:\d+|\$\{[A-Za-z_][A-Za-z0-9_]*(?::-\d+)?\}):\d+(?:/(?:tcp|udp))?")
URL_PASSWORD = re.compile(r"://[^/:@\s]+:(?P<password>[^@\s]+)@")


# ---------------------------------------------------------------------------------------- reading

def load_compose(path: Path = COMPOSE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())  # resolves the file's anchors and `<<` merges


def load_prefect_yaml(path: Path = PREFECT_YAML) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def load_job_template(path: Path = K8S_POOL) -> dict[str, Any]:
    return json.loads(path.read_text())


def strings(node: Any) -> Iterator[str]:
    """Every string value in a parsed YAML or JSON tree."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's `environment`, in either of compose's two forms."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {key: "" if value is None else str(value) for key, value in env.items()}


def command_text(service: dict[str, Any]) -> str:
    command = service.get("command") or ""
    return " ".join(command) if isinstance(command, list) else str(command)


def compose_defaults(compose: dict[str, Any]) -> dict[str, set[str]]:
    """For each variable, the defaults its `${VAR:-default}` references give anywhere in the file."""
    found: dict[str, set[str]] = {}
    for text in strings(compose):
        for ref in VAR_REF.finditer(text):
            if ref["op"] in (":-", "-"):
                found.setdefault(ref["name"], set()).add(ref["arg"])
    return found


def deploy_var(text: str, where: str) -> str:
    match = DEPLOY_VAR.fullmatch(text.strip())
    if not match:
        raise AssertionError(f"prefect.yaml {where}: expected a deploy-time variable like '{{{{ $NAME }}}}', "
                             f"found {text!r}")
    return match["name"]


def pull_directory(deployment: dict[str, Any]) -> str:
    for step in deployment.get("pull") or []:
        for name, args in step.items():
            if name.endswith("set_working_directory"):
                return args["directory"]
    raise AssertionError(f"prefect.yaml deployment {deployment['name']!r}: no set_working_directory pull step")


def registering_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services that run `prefect deploy` (where prefect.yaml's `{{ $VAR }}` get their values)."""
    return {name: service for name, service in compose["services"].items()
            if re.search(r"\bprefect\b.*\bdeploy\b", command_text(service))}


def flow_name(source: str, function: str) -> str | None:
    """`name=` of the @flow decorating `function`, read from the source text (no import)."""
    match = re.search(r"@flow\(\s*name\s*=\s*[\"']([^\"']+)[\"'][^)]*\)\s*\n(?:\s*@.*\n)*\s*(?:async\s+)?def\s+"
                      + re.escape(function) + r"\b", source)
    return match[1] if match else None


# ---------------------------------------------------------------------------------- compose checks

def check_depends_on(compose: dict[str, Any]) -> list[str]:
    services = compose.get("services", {})
    problems = []
    for name, service in services.items():
        for target in service.get("depends_on") or []:  # a list, or a dict keyed by service
            if target not in services:
                problems.append(f"services.{name}.depends_on: {target!r} is not a service "
                                f"(have: {', '.join(sorted(services))})")
    return problems


def check_named_volumes(compose: dict[str, Any]) -> list[str]:
    declared = set(compose.get("volumes") or {})
    problems = []
    for name, service in compose.get("services", {}).items():
        for volume in service.get("volumes") or []:
            if isinstance(volume, dict):
                source = volume.get("source") if volume.get("type", "volume") == "volume" else None
            else:
                source = volume.split(":", 1)[0] if ":" in volume else None
            if not source or source[0] in "/.~$":  # a bind mount or an anonymous volume
                continue
            if source not in declared:
                problems.append(f"services.{name}.volumes: named volume {source!r} is not declared under the top-level "
                                f"`volumes:` (declared: {', '.join(sorted(declared)) or 'none'})")
    return problems


def check_ports_on_loopback(compose: dict[str, Any]) -> list[str]:
    problems = []
    for name, service in compose.get("services", {}).items():
        for port in service.get("ports") or []:
            if isinstance(port, dict):
                ok = port.get("host_ip") == "127.0.0.1" and "published" in port
            else:
                ok = isinstance(port, str) and LOOPBACK_PORT.fullmatch(port) is not None
            if not ok:
                problems.append(f"services.{name}.ports: {port!r} is not bound to 127.0.0.1; write "
                                "\"127.0.0.1:${PORT_VAR:-1234}:1234\" so that it is not reachable from the network")
        if service.get("network_mode") == "host":
            problems.append(f"services.{name}: network_mode host publishes every port it opens")
    return problems


def check_consistent_defaults(compose: dict[str, Any]) -> list[str]:
    return [f"${{{name}}} has different defaults in {COMPOSE.name}: {sorted(values)}; use one"
            for name, values in compose_defaults(compose).items() if len(values) > 1]


def check_worker_pools(compose: dict[str, Any], prefect_yaml: dict[str, Any]) -> list[str]:
    """Each deployment's pool variable (prefect.yaml) is the one its worker's `--pool` reads, with
    the default compose gives it everywhere."""
    services = compose["services"]
    defaults = compose_defaults(compose)
    problems = []
    for deployment in prefect_yaml["deployments"]:
        worker = WORKER_OF_ENTRYPOINT.get(deployment["entrypoint"])
        if worker is None:
            problems.append(f"prefect.yaml deployment {deployment['name']!r}: entrypoint {deployment['entrypoint']!r} "
                            f"has no compose worker (known: {WORKER_OF_ENTRYPOINT})")
            continue
        var = deploy_var(deployment["work_pool"]["name"], f"{deployment['name']}.work_pool.name")
        if worker not in services:
            problems.append(f"services.{worker}: missing; it serves deployment {deployment['name']!r}")
            continue
        pool = re.search(r"--pool[= ](\S+)", command_text(services[worker]))
        ref = VAR_REF.fullmatch(pool[1]) if pool else None
        if not ref or ref["name"] != var or ref["op"] != ":-":
            found = pool[1] if pool else "no --pool"
            problems.append(f"services.{worker}.command: expected `--pool ${{{var}:-<default>}}` (prefect.yaml "
                            f"deployment {deployment['name']!r} uses {var}), found {found!r}")
        elif defaults.get(var) != {ref["arg"]}:
            problems.append(f"${{{var}}}: the worker's default {ref['arg']!r} differs from others in compose: "
                            f"{defaults.get(var)}")
    return problems


def check_deploy_environment(compose: dict[str, Any], prefect_yaml: dict[str, Any]) -> list[str]:
    """Where `prefect deploy` runs, every `{{ $VAR }}` of prefect.yaml is set, and each pull-step
    workspace is the STAGEWISE_WORKSPACE of the worker that runs that deployment's flows."""
    registering = registering_services(compose)
    if not registering:
        return [f"no service in {COMPOSE.name} runs `prefect deploy`: prefect.yaml's deployments are never registered"]
    needed = {m["name"] for text in strings(prefect_yaml) for m in DEPLOY_VAR.finditer(text)}
    problems = []
    for name, service in registering.items():
        env = environment(service)
        problems += [f"services.{name}.environment: {var} is not set; prefect.yaml reads it when deploying"
                     for var in sorted(needed - set(env))]
        for deployment in prefect_yaml["deployments"]:
            var = deploy_var(pull_directory(deployment), f"{deployment['name']}.pull.directory")
            worker = compose["services"].get(WORKER_OF_ENTRYPOINT.get(deployment["entrypoint"], ""), {})
            workspace = environment(worker).get("STAGEWISE_WORKSPACE")
            if var in env and env[var] != workspace:
                problems.append(f"services.{name}.environment.{var} is {env[var]!r}, but the worker running "
                                f"{deployment['name']!r} keeps its workspace at STAGEWISE_WORKSPACE={workspace!r}")
    return problems


def check_train_deployment(compose: dict[str, Any], prefect_yaml: dict[str, Any], flow_source: str) -> list[str]:
    flow = flow_name(flow_source, TRAIN_ENTRYPOINT.rsplit(":", 1)[1])
    deployments = [d["name"] for d in prefect_yaml["deployments"] if d["entrypoint"] == TRAIN_ENTRYPOINT]
    if flow is None or len(deployments) != 1:
        return [(f"cannot tell the train deployment: flow name {flow!r} in {TRAIN_FLOW.name}, "
                 f"deployments with entrypoint {TRAIN_ENTRYPOINT}: {deployments}")]
    expected = f"{flow}/{deployments[0]}"
    found = environment(compose["services"].get("worker-cpu", {})).get("STAGEWISE_TRAIN_DEPLOYMENT")
    if found != expected:
        return [(f"services.worker-cpu.environment.STAGEWISE_TRAIN_DEPLOYMENT is {found!r}; expected {expected!r} "
                 "(<@flow name>/<prefect.yaml deployment name>), or training never reaches the GPU pool")]
    return []


def check_bucket(compose: dict[str, Any]) -> list[str]:
    """MLflow's artifact store, the bucket minio-init creates and the workers' DVC remote are one bucket."""
    services = compose["services"]
    artifacts = re.search(r"--artifacts-destination[= ]s3://(\$\{[^}]+\})/", command_text(services.get("mlflow", {})))
    created = re.search(r"\bmc mb\b[^\n]*?[\w-]+/(\$\{[^}]+\})", command_text(services.get("minio-init", {})))
    workers = {name: environment(services.get(name, {})).get("STAGEWISE_S3_BUCKET")
               for name in ("worker-cpu", "worker-gpu")}
    if not artifacts or not created:
        return [(f"expected mlflow's --artifacts-destination=s3://${{VAR}}/... and minio-init's "
                 f"`mc mb <alias>/${{VAR}}`; found {artifacts and artifacts[1]!r} and {created and created[1]!r}")]
    refs = {"mlflow": artifacts[1], "minio-init": created[1], **workers}
    if len(set(refs.values())) != 1:
        return [f"the bucket differs between services: {refs}; use one ${{STAGEWISE_S3_BUCKET:-...}} everywhere"]
    return []


def check_gpu_reservation(compose: dict[str, Any]) -> list[str]:
    service = compose["services"].get("worker-gpu", {})
    devices = (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
    if any(d.get("driver") == "nvidia" and "gpu" in (d.get("capabilities") or [])
           and (d.get("count") or d.get("device_ids")) for d in devices):
        return []
    return [f"services.worker-gpu.deploy.resources.reservations.devices: no nvidia GPU reserved (found {devices})"]


def check_builds(compose: dict[str, Any], compose_dir: Path) -> list[str]:
    """Each `build:` names a Dockerfile that exists, and what its COPY lines take from the context exists."""
    problems = []
    for name, service in compose.get("services", {}).items():
        build = service.get("build")
        if build is None:
            continue
        build = {"context": build} if isinstance(build, str) else build
        context = (compose_dir / build.get("context", ".")).resolve()
        dockerfile = context / build.get("dockerfile", "Dockerfile")
        if not dockerfile.is_file():
            problems.append(f"services.{name}.build: {dockerfile} does not exist")
            continue
        for number, line in enumerate(dockerfile.read_text().splitlines(), 1):
            words = line.split()
            if not words or words[0].upper() not in ("COPY", "ADD") or any(w.startswith("--from") for w in words):
                continue
            for source in (w for w in words[1:-1] if not w.startswith("--")):
                if not (context / source).exists():
                    problems.append(f"{dockerfile.name}:{number}: {source!r} is not in the build context {context}")
    return problems


def check_no_literal_secrets(compose: dict[str, Any]) -> list[str]:
    """Credentials are `${VAR}` / `${VAR:?message}` references (no default), never values."""
    problems = []
    for name, service in compose.get("services", {}).items():
        for key, value in environment(service).items():
            ref = VAR_REF.fullmatch(value)
            if key in SECRET_ENV and not (ref and ref["op"] in (None, ":?", "?")):
                problems.append(f"services.{name}.environment.{key}: expected a reference like "
                                f"${{{key}:?set {key}}}, found a value")
    for text in strings(compose):
        for match in URL_PASSWORD.finditer(text):
            ref = VAR_REF.fullmatch(match["password"])
            if not (ref and ref["op"] in (None, ":?", "?")):
                problems.append(f"a URL in {COMPOSE.name} holds a literal password: {text[:60]}...")
    return problems


def check_env_example(text: str, compose: dict[str, Any]) -> list[str]:
    """.env.example holds placeholders only, and names every variable compose requires."""
    listed: set[str] = set()
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        listed.add(key)
        if SECRET_NAME.search(key) and not value.startswith("change-me"):
            problems.append(f"{ENV_EXAMPLE.name}:{number}: {key} must be a placeholder starting with change-me")
    required = {ref["name"] for s in strings(compose) for ref in VAR_REF.finditer(s) if ref["op"] in (":?", "?")}
    problems += [f"{ENV_EXAMPLE.name}: {name} is required by compose (${{{name}:?...}}) but not listed"
                 for name in sorted(required - listed)]
    return problems


# -------------------------------------------------------------------------------------- k8s checks

def job_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]


def check_job_template(template: dict[str, Any], gpu_workspace: str | None) -> list[str]:
    if set(template) != {"job_configuration", "variables"} or "job_manifest" not in template["job_configuration"]:
        return [(f"{K8S_POOL.name}: expected {{'job_configuration': {{..., 'job_manifest': ...}}, 'variables': ...}}, "
                 f"found keys {sorted(template)}")]
    problems = []
    declared = set(template["variables"].get("properties", {}))
    used = {m["name"] for m in JOB_PLACEHOLDER.finditer(json.dumps(template["job_configuration"]))}
    problems += [f"{K8S_POOL.name}: {{{{ {name} }}}} is used in job_configuration but not declared in "
                 "variables.properties" for name in sorted(used - declared)]
    manifest = template["job_configuration"]["job_manifest"]
    if manifest.get("kind") != "Job":
        problems.append(f"{K8S_POOL.name}: job_manifest.kind is {manifest.get('kind')!r}, expected 'Job'")
    container = job_container(template)
    resources = container.get("resources") or {}
    for part in ("requests", "limits"):  # an extended resource: requests, if given, must equal limits
        gpus = (resources.get(part) or {}).get("nvidia.com/gpu")
        if gpus != "{{ gpu_count }}":
            problems.append(f"{K8S_POOL.name}: container resources.{part}['nvidia.com/gpu'] is {gpus!r}, "
                            "expected '{{ gpu_count }}'")
    gpu_count = template["variables"].get("properties", {}).get("gpu_count", {})
    if gpu_count.get("type") != "integer" or not isinstance(gpu_count.get("default"), int) or gpu_count["default"] < 1:
        problems.append(f"{K8S_POOL.name}: variables.properties.gpu_count must be an integer with default >= 1, "
                        f"found {gpu_count}")
    tolerations = manifest["spec"]["template"]["spec"].get("tolerations") or []
    if not any(t.get("key") == "nvidia.com/gpu" for t in tolerations):
        problems.append(f"{K8S_POOL.name}: no toleration for nvidia.com/gpu, so tainted GPU nodes refuse the job")
    env = {e["name"]: e for e in container.get("env") or [] if isinstance(e, dict)}
    for name, entry in env.items():
        if SECRET_NAME.search(name) and ("value" in entry or "secretKeyRef" not in (entry.get("valueFrom") or {})):
            problems.append(f"{K8S_POOL.name}: env {name} must come from valueFrom.secretKeyRef, not a value")
    problems += [f"{K8S_POOL.name}: the job container lacks env {name}" for name in sorted(JOB_ENV_NEEDED - set(env))]
    workspace = env.get("STAGEWISE_WORKSPACE", {}).get("value")
    if gpu_workspace is not None and workspace != gpu_workspace:
        problems.append(f"{K8S_POOL.name}: STAGEWISE_WORKSPACE is {workspace!r} but deployments are registered with "
                        f"STAGEWISE_GPU_WORKSPACE={gpu_workspace!r}; the job's flow would run elsewhere")
    return problems


# ------------------------------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def compose():
    return load_compose()


@pytest.fixture(scope="module")
def prefect_yaml():
    return load_prefect_yaml()


@pytest.fixture(scope="module")
def job_template():
    return load_job_template()


def gpu_workspace_of(compose: dict[str, Any]) -> str | None:
    values = {environment(s).get("STAGEWISE_GPU_WORKSPACE") for s in registering_services(compose).values()}
    return values.pop() if len(values) == 1 else None


class TestCompose:
    def test_depends_on_names_services(self, compose):
        assert check_depends_on(compose) == []

    def test_named_volumes_are_declared(self, compose):
        assert check_named_volumes(compose) == []

    def test_published_ports_listen_on_loopback_only(self, compose):
        assert check_ports_on_loopback(compose) == []
        assert any(s.get("ports") for s in compose["services"].values())  # the check saw some

    def test_each_variable_has_one_default(self, compose):
        assert check_consistent_defaults(compose) == []

    def test_workers_poll_the_pools_prefect_yaml_deploys_to(self, compose, prefect_yaml):
        assert check_worker_pools(compose, prefect_yaml) == []
        assert compose_defaults(compose)["STAGEWISE_CPU_POOL"] == {"cpu-pool"}
        assert compose_defaults(compose)["STAGEWISE_GPU_POOL"] == {"gpu-pool"}

    def test_deployments_are_registered_with_every_deploy_time_variable(self, compose, prefect_yaml):
        assert check_deploy_environment(compose, prefect_yaml) == []
        env = environment(registering_services(compose)["deploy"])
        assert env["STAGEWISE_CPU_WORKSPACE"] == env["STAGEWISE_GPU_WORKSPACE"] == "/workspace"

    def test_cpu_worker_dispatches_training_to_the_train_stage_deployment(self, compose, prefect_yaml):
        assert check_train_deployment(compose, prefect_yaml, TRAIN_FLOW.read_text()) == []

    def test_mlflow_minio_and_workers_share_one_bucket(self, compose):
        assert check_bucket(compose) == []

    def test_gpu_worker_reserves_an_nvidia_gpu(self, compose):
        assert check_gpu_reservation(compose) == []

    def test_builds_name_existing_dockerfiles_and_sources(self, compose):
        assert check_builds(compose, COMPOSE.parent) == []
        assert sum("build" in s for s in compose["services"].values()) >= 3

    def test_no_literal_secrets(self, compose):
        assert check_no_literal_secrets(compose) == []

    def test_env_example_holds_placeholders_for_every_required_variable(self, compose):
        assert check_env_example(ENV_EXAMPLE.read_text(), compose) == []


class TestGpuWorkPool:
    def test_template_is_consistent(self, job_template, compose):
        assert check_job_template(job_template, gpu_workspace_of(compose)) == []

    def test_prefect_accepts_and_renders_it(self, job_template):
        """Prefect's own server-side validation, then its templating with the variables' defaults
        (as a worker does, None defaults dropped): the job asks for one GPU and nothing is left unfilled."""
        from prefect.server.schemas.actions import validate_base_job_template
        from prefect.utilities.templating import apply_values

        validate_base_job_template(job_template)
        defaults = {name: spec["default"] for name, spec in job_template["variables"]["properties"].items()
                    if spec.get("default") is not None}
        rendered = apply_values(job_template["job_configuration"], defaults | {"command": "prefect flow-run execute"})
        container = rendered["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"] == {"limits": {"nvidia.com/gpu": 1}, "requests": {"nvidia.com/gpu": 1}}
        assert container["image"] == "stagewise-worker:gpu"
        assert "{{" not in json.dumps(rendered)


class TestChecksCatchMistakes:
    """Each check, run on a broken copy of the real manifests, reports the break."""

    @staticmethod
    def broken(compose: dict[str, Any], service: str, key: str, value: Any) -> dict[str, Any]:
        copied = copy.deepcopy(compose)
        copied["services"][service][key] = value
        return copied

    def test_depends_on_a_missing_service(self, compose):
        bad = self.broken(compose, "mlflow", "depends_on", {"mlflow-database": {"condition": "service_healthy"}})
        have = ", ".join(sorted(bad["services"]))
        expected = f"services.mlflow.depends_on: 'mlflow-database' is not a service (have: {have})"
        assert check_depends_on(bad) == [expected]

    def test_undeclared_volume(self, compose):
        bad = self.broken(compose, "worker-cpu", "volumes", ["workspace:/workspace", "./local:/x"])
        assert [p.split(":")[0] for p in check_named_volumes(bad)] == ["services.worker-cpu.volumes"]

    @pytest.mark.parametrize("port", ["4200:4200", "0.0.0.0:4200:4200", "${PORT:-4200}:4200", 4200])
    def test_port_open_to_the_network(self, compose, port):
        assert len(check_ports_on_loopback(self.broken(compose, "prefect-server", "ports", [port]))) == 1

    def test_worker_polling_another_pool(self, compose, prefect_yaml):
        command = "prefect worker start --pool ${STAGEWISE_GPU_POOL:-gpu} --type process"
        bad = self.broken(compose, "worker-gpu", "command", command)
        assert check_consistent_defaults(bad) != []
        assert "differs" in " ".join(check_worker_pools(bad, prefect_yaml))
        bad = self.broken(compose, "worker-gpu", "command", "prefect worker start --pool gpu-pool --type process")
        assert "expected `--pool ${STAGEWISE_GPU_POOL:-<default>}`" in " ".join(check_worker_pools(bad, prefect_yaml))

    def test_deploy_without_a_workspace_variable(self, compose, prefect_yaml):
        env = environment(compose["services"]["deploy"])
        del env["STAGEWISE_GPU_WORKSPACE"]
        bad = self.broken(compose, "deploy", "environment", env)
        assert check_deploy_environment(bad, prefect_yaml) == [
            "services.deploy.environment: STAGEWISE_GPU_WORKSPACE is not set; prefect.yaml reads it when deploying"]
        bad = self.broken(compose, "deploy", "environment", env | {"STAGEWISE_GPU_WORKSPACE": "/srv/gpu"})
        problems = " ".join(check_deploy_environment(bad, prefect_yaml))
        assert "keeps its workspace at STAGEWISE_WORKSPACE='/workspace'" in problems
        assert check_deploy_environment(self.broken(compose, "deploy", "command", "true"), prefect_yaml) != []

    def test_train_deployment_with_the_wrong_flow_name(self, compose, prefect_yaml):
        source = TRAIN_FLOW.read_text().replace('name="stagewise-train-stage"', 'name="train"')
        assert "expected 'train/train-stage'" in " ".join(check_train_deployment(compose, prefect_yaml, source))

    def test_bucket_differs(self, compose):
        command = [a.replace("STAGEWISE_S3_BUCKET", "MLFLOW_BUCKET") for a in compose["services"]["mlflow"]["command"]]
        assert "the bucket differs" in " ".join(check_bucket(self.broken(compose, "mlflow", "command", command)))

    def test_gpu_worker_without_a_gpu(self, compose):
        assert check_gpu_reservation(self.broken(compose, "worker-gpu", "deploy", {})) != []

    def test_build_of_a_missing_dockerfile(self, compose):
        bad = self.broken(compose, "mlflow", "build", {"context": "docker", "dockerfile": "missing.Dockerfile"})
        assert check_builds(bad, COMPOSE.parent)[0].endswith("missing.Dockerfile does not exist")

    @pytest.mark.parametrize("key, value", [("AWS_SECRET_ACCESS_KEY", "minio123"),
                                            ("AWS_SECRET_ACCESS_KEY", "${AWS_SECRET_ACCESS_KEY:-minio123}"),
                                            ("MLFLOW_BACKEND", "postgresql://mlflow:hunter2@db/mlflow")])
    def test_literal_secret(self, compose, key, value):
        env = environment(compose["services"]["mlflow"]) | {key: value}
        assert len(check_no_literal_secrets(self.broken(compose, "mlflow", "environment", env))) == 1

    def test_env_example_with_a_real_looking_secret(self, compose):
        text = ENV_EXAMPLE.read_text().replace("AWS_SECRET_ACCESS_KEY=change-me", "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI")
        assert check_env_example(text, compose)[0].endswith(
            "AWS_SECRET_ACCESS_KEY must be a placeholder starting with change-me")
        text = ENV_EXAMPLE.read_text().replace("MLFLOW_DB_PASSWORD=", "# MLFLOW_DB_PASSWORD=")
        missing = f"{ENV_EXAMPLE.name}: MLFLOW_DB_PASSWORD is required by compose (${{MLFLOW_DB_PASSWORD:?...}}) "
        assert check_env_example(text, compose) == [missing + "but not listed"]

    def test_job_template_mistakes(self, job_template):
        bad = copy.deepcopy(job_template)
        container = job_container(bad)
        container["image"] = "{{ gpu_image }}"
        del container["resources"]["limits"]["nvidia.com/gpu"]
        container["env"].append({"name": "HF_TOKEN", "value": "hf_abc"})
        bad["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["tolerations"] = []
        problems = check_job_template(bad, "/workspace")
        assert any("{{ gpu_image }} is used in job_configuration but not declared" in p for p in problems)
        assert any("resources.limits['nvidia.com/gpu'] is None" in p for p in problems)
        assert any("env HF_TOKEN must come from valueFrom.secretKeyRef" in p for p in problems)
        assert any("no toleration" in p for p in problems)
        assert any("STAGEWISE_GPU_WORKSPACE='/srv'" in p for p in check_job_template(job_template, "/srv"))
