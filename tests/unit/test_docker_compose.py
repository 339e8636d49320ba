"""docker/: the production compose file and image, read the way `docker compose config` reads them.

No Docker engine runs on the development and CI machines, so this is a small model of compose's
reading: YAML with anchors and ``<<:`` merges (PyYAML does both as YAML defines them), ``${VAR}``
interpolation (``:-``, ``-``, ``:?``, ``?``, ``:+``, ``+``, ``$$``), and the short syntaxes
(``depends_on`` lists, ``environment`` lists, string healthchecks, ``ports`` strings) turned into the
long ones. The Dockerfile is read instruction by instruction.
"""

from __future__ import annotations

import graphlib
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.production.yaml"
DOCKERFILE = DOCKER / "Dockerfile"
README = DOCKER / "README.md"
ENV_EXAMPLE = DOCKER / ".env.example"

# What docker/.env provides (test values); the optional variables keep their defaults.
REQUIRED_VARS = ("POSTGRES_PASSWORD", "AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY")
ENV = {name: f"test-{name.lower()}" for name in REQUIRED_VARS}

AIRFLOW_COMPONENTS = {"api-server", "scheduler", "dag-processor"}  # long-running, all need the database
INIT = "airflow-init"
MUST_HAVE_HEALTHCHECK = {"postgres", "redis"} | AIRFLOW_COMPONENTS
CPU_INDEX = re.compile(r"--(?:extra-)?index-url[= ]+[\"']?https://download\.pytorch\.org/whl/cpu/?[\"']?(?:\s|$)")


# --- compose's reading ------------------------------------------------------------------------------

class MissingVariableError(Exception):
    """A ``${NAME:?message}`` (or ``?``) whose variable is unset (or empty): compose stops with the message."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name, self.message = name, message


_DOLLAR = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.DOTALL)


def _substitute(match: re.Match, env: dict[str, str]) -> str:
    if match["escaped"]:
        return "$"
    if match["plain"]:
        return env.get(match["plain"], "")
    parsed = _BRACED.fullmatch(match["braced"])
    assert parsed, f"not a compose variable: {match[0]!r}"
    name, op, arg = parsed["name"], parsed["op"], parsed["arg"] or ""
    value = env.get(name)
    is_set = value is not None
    is_set_nonempty = bool(value)
    present = is_set_nonempty if op and op.startswith(":") else is_set
    if op is None:
        return value or ""
    if op.endswith("-"):
        return value if present else arg
    if op.endswith("?"):
        if not present:
            raise MissingVariableError(name, arg)
        return value
    return arg if present else ""  # + / :+


def interpolate(node: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over every string value (keys are left alone, as compose does)."""
    if isinstance(node, dict):
        return {key: interpolate(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(value, env) for value in node]
    if isinstance(node, str):
        return _DOLLAR.sub(lambda m: _substitute(m, env), node)
    return node


def normalize_service(service: dict) -> dict:
    """The long syntax of depends_on, environment and healthcheck.test, as `docker compose config` prints."""
    service = dict(service)
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        depends = {name: {"condition": "service_started"} for name in depends}
    service["depends_on"] = {name: {"condition": "service_started", **(spec or {})} for name, spec in depends.items()}
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    service["environment"] = {key: None if value is None else str(value) for key, value in env.items()}
    check = service.get("healthcheck")
    if check and isinstance(check.get("test"), str):
        check = {**check, "test": ["CMD-SHELL", check["test"]]}
        service["healthcheck"] = check
    return service


def load_compose(env: dict[str, str]) -> dict:
    config = interpolate(yaml.safe_load(COMPOSE.read_text()), env)
    config["services"] = {name: normalize_service(svc) for name, svc in config["services"].items()}
    return config


@pytest.fixture(scope="module")
def raw() -> dict:
    """The file as YAML reads it (anchors and merges resolved), before interpolation."""
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose(ENV)


@pytest.fixture(scope="module")
def services(compose) -> dict[str, dict]:
    return compose["services"]


def built_here(services: dict[str, dict]) -> set[str]:
    """The services that run the project's image (docker/Dockerfile; its entrypoint is `airflow`)."""
    return {name for name, svc in services.items()
            if str((svc.get("build") or {}).get("dockerfile", "")).endswith("Dockerfile")}


def container_port(port: str | int | dict) -> int:
    """The container side of a ``ports`` entry (``[ip:][host:]container[/proto]`` or the long syntax)."""
    if isinstance(port, dict):
        return int(port["target"])
    return int(str(port).split("/")[0].rsplit(":", 1)[-1])


def published_port(port: str | dict) -> int:
    if isinstance(port, dict):
        return int(port["published"])
    parts = str(port).split("/")[0].split(":")
    assert len(parts) >= 2, f"{port!r} publishes no host port"
    return int(parts[-2])


def healthcheck_urls(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    words = shlex.split(test[1]) if test[0] == "CMD-SHELL" else test[1:]
    return [w for w in words if re.match(r"https?://", w)]


def hosts_referenced(value: str) -> set[str]:
    """Host names in a connection string or URL (``scheme://[user:pass@]host:port``, ``host:port``)."""
    without_credentials = re.sub(r"//[^/@]*@", "//", value)
    return set(re.findall(r"(?:^|//)([A-Za-z][A-Za-z0-9_.-]*):\d+", without_credentials))


# --- the compose file ----------------------------------------------------------------------------------

def test_the_expected_services_exist_and_run_the_project_image(services):
    assert {"postgres", "redis", INIT} | AIRFLOW_COMPONENTS <= set(services)
    assert AIRFLOW_COMPONENTS | {INIT} <= built_here(services), "an Airflow service does not build docker/Dockerfile"


def test_every_airflow_service_shares_the_jwt_secret_and_the_execution_api_url(services):
    airflow = built_here(services)
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL"):
        values = {name: services[name]["environment"].get(key) for name in airflow}
        assert all(values.values()), f"{key} is not set for {sorted(n for n, v in values.items() if not v)}"
        assert len(set(values.values())) == 1, f"{key} differs between Airflow services: {values}"
    assert services[INIT]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"] == ENV["AIRFLOW_JWT_SECRET"]

    url = urlsplit(services["api-server"]["environment"]["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"])
    assert url.hostname == "api-server" and url.path.rstrip("/") == "/execution", url.geturl()
    ports = {container_port(p) for p in services["api-server"].get("ports", [])}
    assert url.port in ports, f"the execution API URL's port {url.port} is not the api-server's {ports}"


def test_secrets_come_from_the_environment_never_from_the_file(raw):
    """Secret-looking settings are `${VAR:?message}` interpolations; compose stops naming docker/.env."""
    pattern = re.compile(r"SECRET|PASSWORD|TOKEN|FERNET", re.IGNORECASE)
    for name, svc in raw["services"].items():
        env = svc.get("environment") or {}
        if isinstance(env, list):
            env = dict(item.split("=", 1) for item in env if "=" in item)
        for key, value in env.items():
            value = str(value)
            if pattern.search(key) and not key.endswith("_FILE"):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", value), f"{name}: {key} is not a required variable"
            for password in re.findall(r"://[^:/@]+:([^@]*)@", value):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]+\}", password), f"{name}: {key} has a literal password"
    jwt = raw["services"]["scheduler"]["environment"]["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert jwt.startswith("${AIRFLOW_JWT_SECRET:?")

    for missing in REQUIRED_VARS:
        with pytest.raises(MissingVariableError) as err:
            load_compose({k: v for k, v in ENV.items() if k != missing})
        assert err.value.name == missing and "docker/.env" in err.value.message
        with pytest.raises(MissingVariableError):  # an empty value counts as missing (`:?`)
            load_compose({**ENV, missing: ""})


def strings(node: Any):
    if isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)
    elif isinstance(node, str):
        yield node


def test_env_example_lists_every_required_variable_empty_and_env_is_git_ignored(raw):
    declared = dict(re.findall(r"^([A-Z0-9_]+)=(.*)$", ENV_EXAMPLE.read_text(), re.MULTILINE))
    used = {name for value in strings(raw) for name in re.findall(r"\$\{([A-Z0-9_]+):?\?", value)}
    assert used == set(REQUIRED_VARS), f"update REQUIRED_VARS: the compose file requires {sorted(used)}"
    for name in used:
        assert name in declared, f"docker/.env.example does not list {name}"
        assert declared[name].strip() == "", f"docker/.env.example gives {name} a value: leave the placeholder empty"
    assert ".env" in (DOCKER / ".gitignore").read_text().split()


def test_services_needing_the_database_wait_for_postgres_and_airflow_init(services):
    needs_db = {name for name, svc in services.items()
                if any("postgres" in hosts_referenced(v or "") for v in svc["environment"].values())}
    assert AIRFLOW_COMPONENTS | {INIT} <= needs_db
    for name in needs_db:
        deps = services[name]["depends_on"]
        assert deps.get("postgres", {}).get("condition") == "service_healthy", f"{name} does not wait for postgres"
        if name != INIT:
            assert deps.get(INIT, {}).get("condition") == "service_completed_successfully", (
                f"{name} does not wait for {INIT} to complete")

    init = services[INIT]
    assert "db migrate" in " ".join(map(str, init["command"])), f"{INIT} does not migrate the database"
    assert init.get("restart", "no") == "no", f"{INIT} must not restart: it has to stay exited for the others"
    assert not init.get("healthcheck"), f"{INIT} is one-shot: the others wait for its exit, not its health"


def test_long_running_services_depend_on_every_service_they_connect_to(services):
    """postgres, redis and the API server (execution API) named in the environment are healthy dependencies."""
    for name in AIRFLOW_COMPONENTS:
        svc = services[name]
        referenced = set().union(*(hosts_referenced(v or "") for v in svc["environment"].values())) & set(services)
        assert {"postgres", "redis"} <= referenced | {name}
        for other in referenced - {name}:
            assert svc["depends_on"].get(other, {}).get("condition") == "service_healthy", (
                f"{name} connects to {other} but does not wait for it to be healthy")
    assert services["scheduler"]["depends_on"]["api-server"]["condition"] == "service_healthy"


def test_healthchecks(services):
    for name in MUST_HAVE_HEALTHCHECK:
        check = services[name].get("healthcheck") or {}
        assert not check.get("disable") and check.get("test"), f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, f"{name}: {check['test']}"
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    redis = services["redis"]["healthcheck"]["test"]
    assert "redis-cli" in redis and "ping" in redis
    dag_processor = " ".join(services["dag-processor"]["healthcheck"]["test"])
    assert "jobs check" in dag_processor and "DagProcessorJob" in dag_processor

    scheduler_urls = healthcheck_urls(services["scheduler"])
    assert scheduler_urls and all(urlsplit(u).path == "/health" for u in scheduler_urls)
    assert services["scheduler"]["environment"]["AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"].lower() == "true", (
        "the scheduler serves /health only with AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK")
    assert {urlsplit(u).port for u in scheduler_urls} == {8974}


def test_api_server_healthcheck_targets_the_api_server_port(services):
    api = services["api-server"]
    ports = {container_port(p) for p in api.get("ports", [])}
    assert len(ports) == 1, f"api-server publishes {ports}"
    command = list(map(str, api["command"]))
    listen = int(command[command.index("--port") + 1]) if "--port" in command else 8080  # Airflow's default
    assert ports == {listen}, f"api-server listens on {listen} but publishes container port {ports}"
    urls = healthcheck_urls(api)
    assert urls, "the api-server healthcheck requests no URL"
    for url in map(urlsplit, urls):
        assert url.hostname in ("localhost", "127.0.0.1") and url.port == listen, url.geturl()
        assert url.path in ("/api/v2/version", "/api/v2/monitor/health"), url.geturl()


def test_healthy_conditions_point_at_services_with_a_healthcheck(services):
    """Compose refuses `condition: service_healthy` on a service without a healthcheck."""
    for name, svc in services.items():
        for dep, spec in svc["depends_on"].items():
            if spec["condition"] == "service_healthy":
                assert services.get(dep, {}).get("healthcheck", {}).get("test"), f"{name} -> {dep}: no healthcheck"
            assert spec["condition"] in ("service_started", "service_healthy", "service_completed_successfully")


def test_no_dependency_on_a_missing_service_and_no_cycle(services):
    for name, svc in services.items():
        missing = set(svc["depends_on"]) - set(services)
        assert not missing, f"{name} depends on services that do not exist: {missing}"
    graph = {name: set(svc["depends_on"]) for name, svc in services.items()}
    try:
        order = list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        pytest.fail(f"dependency cycle: {err.args[1]}")
    assert order.index(INIT) < min(order.index(n) for n in AIRFLOW_COMPONENTS)


def test_helpers_read_compose_semantics():
    """The model above, on the cases the file uses."""
    env = {"SET": "v", "EMPTY": ""}
    assert interpolate("a${SET}b$SET$$x", env) == "avbv$x"
    assert interpolate("${EMPTY:-d}|${EMPTY-d}|${UNSET-d}|${SET:+alt}|${EMPTY:+alt}", env) == "d||d|alt|"
    with pytest.raises(MissingVariableError):
        interpolate("${EMPTY:?say}", env)
    assert interpolate("${EMPTY?say}", env) == ""
    svc = normalize_service({"depends_on": ["a"], "environment": ["K=V"], "healthcheck": {"test": "x y"}})
    assert svc["depends_on"] == {"a": {"condition": "service_started"}}
    assert svc["environment"] == {"K": "V"} and svc["healthcheck"]["test"] == ["CMD-SHELL", "x y"]
    assert container_port("127.0.0.1:9000:8080/tcp") == 8080 and published_port("127.0.0.1:9000:8080") == 9000
    assert hosts_referenced("postgresql+psycopg2://u:p@postgres:5432/db") == {"postgres"}
    assert hosts_referenced("redis:6379") == {"redis"}
    assert hosts_referenced("http://api-server:8080/x") == {"api-server"}
    assert shell_commands("a 'x && y' && pip install -c c.txt \"t==1\"; b") == [
        ["a", "x && y"], ["pip", "install", "-c", "c.txt", "t==1"], ["b"]]
    merged = yaml.safe_load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  y: 3\n")
    assert merged["b"] == {"x": 1, "y": 3}


# --- the image -----------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


_OPTION_WITH_VALUE = {"-c", "--constraint", "-r", "--requirement", "-i", "--index-url", "--extra-index-url",
                      "-f", "--find-links", "-t", "--target", "--prefix", "--root"}


def shell_commands(script: str) -> list[list[str]]:
    """The simple commands of a RUN line, split at ``&&``, ``||``, ``;``, ``|``, ``&`` outside quotes."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    for token in lexer:
        if token in ("&&", "||", ";", "|", "&"):
            commands.append([])
        else:
            commands[-1].append(token)
    return [words for words in commands if words]


def pip_installs() -> list[tuple[int, str, list[str]]]:
    """(instruction index, the `pip install ...` command, its requirements) for every pip install in a RUN."""
    found = []
    for i, (keyword, args) in enumerate(dockerfile_instructions()):
        if keyword != "RUN":
            continue
        for words in shell_commands(args):
            if "install" not in words or not re.fullmatch(r"(?:\S*/)?(?:pip3?|python3?)", words[0]):
                continue
            if words[0].startswith("python") and words[1:3] != ["-m", "pip"]:
                continue
            requirements, skip = [], False
            for word in words[words.index("install") + 1:]:
                if skip:
                    skip = False
                elif word in _OPTION_WITH_VALUE:
                    skip = True
                elif not word.startswith("-"):
                    requirements.append(word)
            found.append((i, shlex.join(words), requirements))
    return found


def project_install() -> tuple[int, str, set[str]]:
    found = [(i, command, {e.strip() for e in m[1].split(",")})
             for i, command, requirements in pip_installs() for r in requirements
             if (m := re.fullmatch(r"\.\[([^\]]*)\]", r))]
    assert len(found) == 1, f"expected one `pip install .[extras]` in the Dockerfile, found {len(found)}"
    return found[0]


def test_dockerfile_installs_torch_from_the_cpu_index_before_the_project():
    torch_runs = [(i, command, reqs) for i, command, reqs in pip_installs()
                  if any(re.fullmatch(r"torch(?:[=<>!~].*)?", r) for r in reqs)]
    assert torch_runs, "the Dockerfile does not install torch explicitly (the project install would get the CUDA build)"
    for _, command, _ in torch_runs:
        assert CPU_INDEX.search(command), f"torch installed without PyTorch's CPU index: {command}"
    index, _, _ = project_install()
    assert min(i for i, _, _ in torch_runs) < index, "torch must be installed from the CPU index before the project"

    pinned = re.search(r"^torch==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)
    assert pinned, "constraints.txt pins no torch"
    for _, command, reqs in torch_runs:
        assert f"torch=={pinned[1]}" in reqs, f"{command}: not the torch {pinned[1]} of constraints.txt"


def test_dockerfile_installs_the_pipeline_extra_with_constraints():
    instructions = dockerfile_instructions()
    index, command, extras = project_install()
    assert re.search(r"(?:-c|--constraint)[= ]+constraints\.txt\b", command), "the install ignores constraints.txt"
    assert {"cpu", "pipeline"} <= extras and "gpu" not in extras, extras
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras <= set(declared), f"extras not in pyproject.toml: {extras - set(declared)}"
    copied_before = " ".join(a for kw, a in instructions[:index] if kw in ("COPY", "ADD"))
    assert "constraints.txt" in copied_before and "pyproject.toml" in copied_before


def test_dockerfile_base_entrypoint_and_healthcheck_tools(services):
    instructions = dockerfile_instructions()
    base = next(args for kw, args in instructions if kw == "FROM")
    apt = " ".join(args for kw, args in instructions if kw == "RUN" and "apt-get install" in args)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert re.match(r"python:3\.11-", base) and "3.11" in requires, base
    if "openjdk-17" in apt:  # Debian 13 (the floating python:3.11-slim since 2025) has no openjdk-17
        assert "bookworm" in base, f"{base} may be Debian 13, which has no openjdk-17"
    assert [args for kw, args in instructions if kw == "ENTRYPOINT"][-1] == '["airflow"]'
    for name in built_here(services):
        check = services[name].get("healthcheck") or {}
        test = check.get("test") or []
        if test and test[0] == "CMD" and test[1] == "curl":
            assert re.search(r"\bcurl\b", apt), f"{name}'s healthcheck runs curl, which the image does not install"


# --- how to log in -------------------------------------------------------------------------------------

def test_readme_says_how_to_log_in(services):
    env = services["api-server"]["environment"]
    text = README.read_text()
    assert re.search(r"^#+ .*log(ging)? ?in", text, re.IGNORECASE | re.MULTILINE), "docker/README.md: no login section"
    assert env["AIRFLOW__CORE__AUTH_MANAGER"].endswith("SimpleAuthManager")
    assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"].lower() == "false", "everyone would be admin"
    users = [pair.split(":")[0] for pair in env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS"].split(",")]
    assert users and all(f"`{user}`" in text for user in users), f"the README does not name the users {users}"
    passwords_file = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
    assert passwords_file.startswith("/data/") and passwords_file in text, "the README does not say where it is"
    assert any(v.endswith(":/data") for v in services["api-server"]["volumes"]), "the passwords file would not persist"
    assert f"exec api-server cat {passwords_file}" in text
    host_port = published_port(services["api-server"]["ports"][0])
    assert f"http://localhost:{host_port}" in text, f"the README does not give the UI's address (port {host_port})"
