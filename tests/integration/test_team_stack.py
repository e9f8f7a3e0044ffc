"""The team stack's wiring (infra/compose.yaml, infra/team.env.example), checked without Docker:
variables, secrets, credentials shared between services, addresses, ports, volumes, order."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE_FILE = INFRA / "compose.yaml"
EXAMPLE_FILE = INFRA / "team.env.example"
WORKER_DOCKERFILE = INFRA / "prefect-worker.Dockerfile"
PREFECT_YAML = REPO / "prefect.yaml"

# ${NAME}, ${NAME:?message}, ${NAME:-default}, ... ($$ is an escaped dollar, not interpolation)
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
# Names that hold a secret; a switch such as LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN does not.
SECRET_NAME = re.compile(
    r"^(?!.*_(?:ENABLE|DISABLE)_).*(?:PASSWORD|SECRET|TOKEN|API_KEY|AUTH_STRING|ACCESS_KEY)"
)
ONE_SHOT = {"minio-buckets"}
TELEMETRY_OFF = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


@pytest.fixture(scope="module")
def example() -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in EXAMPLE_FILE.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def strings(node):
    """Every string value in the document (comments are already gone)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from strings(value)


def used_variables(compose) -> list[tuple[str, str | None]]:
    """(name, operator) of each interpolation in the file."""
    return [(m[1], m[2]) for text in strings(compose) for m in INTERPOLATION.finditer(text)]


def plain(value: str) -> str:
    """The value with each interpolation written {NAME}: comparable, and parseable as a URL."""
    return INTERPOLATION.sub(lambda m: "{" + m[1] + "}", str(value))


def env(services, name: str) -> dict[str, str]:
    environment = services[name].get("environment", {})
    assert isinstance(environment, dict), f"{name}: write environment as a mapping"
    return {key: "" if value is None else str(value) for key, value in environment.items()}


def listen_port(services, name: str) -> int:
    """The port the service listens on inside its container."""
    command = services[name].get("command", [])
    if "--port" in command:
        return int(command[command.index("--port") + 1])
    return {"labelstudio": 8080, "minio": 9000}[name]


def networks(services, name: str) -> set[str]:
    declared = services[name].get("networks", ["default"])
    return set(declared)


def host_ports(services) -> list[tuple[str, str]]:
    return [
        (name, str(port)) for name, service in services.items() for port in service.get("ports", [])
    ]


# --- the files -------------------------------------------------------------------------------


def test_the_compose_file_parses(compose):
    assert {"services", "volumes", "networks"} <= set(compose)
    assert all(isinstance(service, dict) for service in compose["services"].values())


def test_every_image_is_pinned(services):
    for name, service in services.items():
        image = service.get("image", "")
        assert ":" in image and not image.endswith(":latest"), (
            f"{name}: pin the image tag ({image!r})"
        )


def test_label_studio_runs_the_pinned_1_23_release(services):
    assert re.fullmatch(r"heartexlabs/label-studio:1\.23\.\d+", services["labelstudio"]["image"])


def test_build_files_exist(services):
    for name, service in services.items():
        build = service.get("build")
        if build and "dockerfile" in build:
            assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).is_file(), name


# --- variables and secrets ---------------------------------------------------------------------


def test_every_variable_used_is_in_the_example(compose, example):
    missing = {name for name, _ in used_variables(compose)} - set(example)
    assert not missing, f"used in compose.yaml, not in team.env.example: {sorted(missing)}"


def test_every_example_variable_is_used(compose, example):
    unused = set(example) - {name for name, _ in used_variables(compose)}
    assert not unused, f"in team.env.example, never used by compose.yaml: {sorted(unused)}"


def test_secret_settings_are_required_interpolations(services):
    for name in services:
        for key, value in env(services, name).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+:\?[^}]*\}", value), (
                    f"{name}.{key} must be ${{VAR:?...}} from team.env, not a literal"
                )


def test_secret_variables_are_never_optional(compose):
    for name, operator in used_variables(compose):
        if SECRET_NAME.search(name) or name.endswith("_USER"):
            assert operator == ":?", f"${{{name}}} must be ${{{name}:?...}}: no silent empty secret"


def test_credentials_in_urls_are_interpolated(compose):
    for text in strings(compose):
        userinfo = re.search(r"://([^/@\s]+)@", plain(text))
        if userinfo:
            for part in userinfo[1].split(":"):
                assert re.fullmatch(r"\{[A-Z0-9_]+\}", part), f"literal credential in {text!r}"


def test_example_secrets_are_placeholders(example):
    for key, value in example.items():
        if SECRET_NAME.search(key):
            assert "change-me" in value, f"team.env.example {key}: use a change-me placeholder"


def test_team_env_is_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "infra/team.env"], cwd=REPO)
    assert ignored.returncode == 0, "add infra/team.env to .gitignore"


# --- credentials shared between services -------------------------------------------------------


@pytest.mark.parametrize(
    "app, key, database",
    [
        ("prefect-server", "PREFECT_API_DATABASE_CONNECTION_URL", "prefect-db"),
        ("mlflow", "MLFLOW_BACKEND_STORE_URI", "mlflow-db"),
    ],
)
def test_database_url_matches_its_postgres(services, app, key, database):
    url = urlsplit(plain(env(services, app)[key]))
    db = {k: plain(v) for k, v in env(services, database).items()}
    assert url.scheme.startswith("postgresql")
    assert (url.username, url.password, url.path.lstrip("/")) == (
        db["POSTGRES_USER"],
        db["POSTGRES_PASSWORD"],
        db["POSTGRES_DB"],
    )
    assert (url.hostname, url.port) == (database, 5432)
    assert networks(services, app) & networks(services, database)


def test_label_studio_database_settings_match_its_postgres(services):
    ls = {k: plain(v) for k, v in env(services, "labelstudio").items()}
    db = {k: plain(v) for k, v in env(services, "labelstudio-db").items()}
    assert ls["DJANGO_DB"] == "default"
    assert (ls["POSTGRE_USER"], ls["POSTGRE_PASSWORD"], ls["POSTGRE_NAME"]) == (
        db["POSTGRES_USER"],
        db["POSTGRES_PASSWORD"],
        db["POSTGRES_DB"],
    )
    assert (ls["POSTGRE_HOST"], ls["POSTGRE_PORT"]) == ("labelstudio-db", "5432")
    assert networks(services, "labelstudio") & networks(services, "labelstudio-db")


@pytest.mark.parametrize("client", ["mlflow", "prefect-worker"])
def test_s3_clients_use_the_minio_account(services, client):
    minio, s3 = env(services, "minio"), env(services, client)
    assert plain(s3["AWS_ACCESS_KEY_ID"]) == plain(minio["MINIO_ROOT_USER"])
    assert plain(s3["AWS_SECRET_ACCESS_KEY"]) == plain(minio["MINIO_ROOT_PASSWORD"])
    assert s3["MLFLOW_S3_ENDPOINT_URL"] == f"http://minio:{listen_port(services, 'minio')}"


def test_bucket_job_uses_the_minio_account(services):
    url = urlsplit(plain(env(services, "minio-buckets")["MC_HOST_team"]))
    minio = env(services, "minio")
    assert (url.username, url.password) == (
        plain(minio["MINIO_ROOT_USER"]),
        plain(minio["MINIO_ROOT_PASSWORD"]),
    )
    assert (url.hostname, url.port) == ("minio", listen_port(services, "minio"))


def test_buckets_exist_for_dvc_and_mlflow_artifacts(services):
    created = {
        arg.split("/", 1)[1]
        for arg in services["minio-buckets"]["command"]
        if arg.startswith("team/")
    }
    command = services["mlflow"]["command"]
    artifacts = urlsplit(command[command.index("--artifacts-destination") + 1])
    assert artifacts.scheme == "s3" and artifacts.hostname in created
    assert {"dvc", "mlflow"} <= created


@pytest.mark.parametrize(
    "client, key, server, server_key",
    [
        (
            "prefect-worker",
            "PREFECT_API_AUTH_STRING",
            "prefect-server",
            "PREFECT_SERVER_API_AUTH_STRING",
        ),
        ("webhook", "PREFECT_API_AUTH_STRING", "prefect-server", "PREFECT_SERVER_API_AUTH_STRING"),
        ("prefect-worker", "LABEL_STUDIO_API_KEY", "labelstudio", "LABEL_STUDIO_USER_TOKEN"),
        ("webhook", "LABEL_STUDIO_API_KEY", "labelstudio", "LABEL_STUDIO_USER_TOKEN"),
    ],
)
def test_api_credentials_match_the_server(services, client, key, server, server_key):
    assert plain(env(services, client)[key]) == plain(env(services, server)[server_key])


# --- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "client, key, server, path",
    [
        ("prefect-worker", "PREFECT_API_URL", "prefect-server", "/api"),
        ("webhook", "PREFECT_API_URL", "prefect-server", "/api"),
        ("prefect-worker", "MLFLOW_TRACKING_URI", "mlflow", ""),
        ("prefect-worker", "LABEL_STUDIO_URL", "labelstudio", ""),
        ("webhook", "LABEL_STUDIO_URL", "labelstudio", ""),
    ],
)
def test_clients_point_at_the_right_service_and_port(services, client, key, server, path):
    url = urlsplit(env(services, client)[key])
    assert (url.scheme, url.hostname, url.port, url.path) == (
        "http",
        server,
        listen_port(services, server),
        path,
    )
    assert networks(services, client) & networks(services, server), (
        f"{client} cannot reach {server}"
    )


@pytest.mark.parametrize("name", ["prefect-server", "mlflow", "labelstudio", "minio"])
def test_published_port_is_the_port_the_service_listens_on(services, name):
    container_ports = {int(str(port).rsplit(":", 1)[1]) for port in services[name]["ports"]}
    assert listen_port(services, name) in container_ports


def test_worker_polls_the_xbl_pool_as_a_process_worker(services):
    command = services["prefect-worker"]["command"]
    assert command[:3] == ["prefect", "worker", "start"]
    assert command[command.index("--pool") + 1] == "xbl-pool"
    assert command[command.index("--type") + 1] == "process"


def test_worker_runs_flows_in_the_mounted_project(services):
    project_dir = env(services, "prefect-worker")["XBL_PROJECT_DIR"]
    mounts = [volume.split(":")[1] for volume in services["prefect-worker"]["volumes"]]
    assert project_dir in mounts
    pull = yaml.safe_load(PREFECT_YAML.read_text())["pull"]
    assert "$XBL_PROJECT_DIR" in str(pull), (
        "prefect.yaml no longer takes the project dir from the env"
    )


def test_the_webhook_starts_a_deployment_the_worker_pool_runs(services):
    default = INTERPOLATION.fullmatch(env(services, "webhook")["XBL_WEBHOOK_DEPLOYMENT"])[3]
    flow_name, deployment = default.split("/")
    declared = {d["name"]: d for d in yaml.safe_load(PREFECT_YAML.read_text())["deployments"]}
    entry_file, entry_func = declared[deployment]["entrypoint"].split(":")
    assert re.search(
        rf'@flow\(name="{flow_name}".*\n(?:async )?def {entry_func}\b',
        (REPO / entry_file).read_text(),
    ), f"{entry_func} is not the flow {flow_name!r}"
    command = services["prefect-worker"]["command"]
    assert declared[deployment]["work_pool"]["name"] == command[command.index("--pool") + 1]


def test_webhook_runs_the_receiver_where_label_studio_can_post(services):
    webhook = services["webhook"]
    assert webhook["command"][:2] == ["xbl", "webhook"]
    assert "XBL_WEBHOOK_SECRET" in env(services, "webhook")
    shared = networks(services, "webhook") & networks(services, "labelstudio")
    aliases = [
        alias for net in shared for alias in (webhook["networks"][net] or {}).get("aliases", [])
    ]
    # Label Studio accepts only URLs whose host has a dot (Django's URL validator).
    assert any("." in alias for alias in aliases), (
        "give the webhook a dotted alias on a shared network"
    )


# --- ports, volumes, networks, order -----------------------------------------------------------


def test_host_ports_bind_to_loopback(services):
    for name, port in host_ports(services):
        assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this machine"


def test_host_ports_do_not_collide(services):
    counts = Counter(port.rsplit(":", 1)[0] for _, port in host_ports(services))
    assert not [port for port, n in counts.items() if n > 1]


def test_named_volumes_are_declared(compose, services):
    used = {
        volume.split(":", 1)[0]
        for service in services.values()
        for volume in service.get("volumes", [])
        if not volume.startswith((".", "/", "~"))
    }
    assert used <= set(compose["volumes"]), f"undeclared: {sorted(used - set(compose['volumes']))}"


def test_declared_volumes_are_used(compose, services):
    used = {
        volume.split(":", 1)[0]
        for service in services.values()
        for volume in service.get("volumes", [])
    }
    assert set(compose["volumes"]) <= used


def test_networks_are_declared(compose, services):
    used = set().union(*(networks(services, name) for name in services))
    assert used <= set(compose["networks"])


def test_depends_on_names_existing_services(services):
    for name, service in services.items():
        assert set(service.get("depends_on", {})) <= set(services) - {name}, name


def test_depends_on_conditions_can_be_met(services):
    for name, service in services.items():
        for target, rule in service.get("depends_on", {}).items():
            if rule["condition"] == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits for {target}'s health"
            elif rule["condition"] == "service_completed_successfully":
                assert target in ONE_SHOT and services[target]["restart"] == "no"


def test_long_running_services_have_healthchecks(services):
    for name in set(services) - ONE_SHOT:
        assert "test" in services[name].get("healthcheck", {}), name


def test_telemetry_is_off_in_every_service(services):
    for name in services:
        assert TELEMETRY_OFF.items() <= env(services, name).items(), name
    assert env(services, "labelstudio")["LABEL_STUDIO_COLLECT_ANALYTICS"] == "false"


def test_worker_image_copies_code_but_no_secrets():
    sources = [
        part
        for line in WORKER_DOCKERFILE.read_text().splitlines()
        if line.startswith("COPY ")
        for part in line.split()[1:-1]
    ]
    assert sources and not [s for s in sources if s.startswith(("infra", ".", "data", "runs"))]


# --- the native team (infra/team.py) reads this file --------------------------------------------

NATIVE_PORTS = {
    "postgres": 15432,
    "s3": 19000,
    "mlflow": 15000,
    "labelstudio": 18080,
    "prefect": 14200,
}


@pytest.fixture(scope="module")
def native_team(tmp_path_factory):
    """A native team's addresses and secrets, never started: what it would run is read."""
    from infra import team

    return team.Team(
        tmp_path_factory.mktemp("team"),
        dict(NATIVE_PORTS),
        project="/srv/project",
        secrets=team._generated_secrets(),
    )


def compose_hosts(text: str) -> list[str]:
    """Compose's own addresses left in a native value (a service name, 0.0.0.0)."""
    names = "|".join(
        re.escape(name) for name in yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    )
    return re.findall(rf"(?<=[/@])(?:{names}):\d+(?=[/\s]|$)|0\.0\.0\.0", text)


@pytest.mark.parametrize("service", ["prefect-server", "mlflow", "prefect-worker"])
def test_every_variable_a_native_service_reads_has_a_value(native_team, service):
    from infra import compose

    assert compose.variables(service) <= set(native_team.secrets)


@pytest.mark.parametrize(
    "service, drop", [("prefect-server", ()), ("mlflow", ("--allowed-hosts",))]
)
def test_native_servers_run_composes_command_on_loopback(native_team, services, service, drop):
    command = native_team._command(service, drop)
    assert Path(command[0]).name == services[service]["command"][0]
    assert command[command.index("--host") + 1] == "127.0.0.1"
    port = int(command[command.index("--port") + 1])
    assert port in NATIVE_PORTS.values() and not compose_hosts(" ".join(command))


def test_the_native_worker_polls_composes_pool(native_team, services):
    from infra import team

    command = native_team._command("prefect-worker", ("--with-healthcheck",))
    compose_command = services["prefect-worker"]["command"]
    assert command[1:] == [arg for arg in compose_command[1:] if arg != "--with-healthcheck"]
    assert team.POOL == "xbl-pool"


@pytest.mark.parametrize("service", ["prefect-server", "mlflow", "prefect-worker"])
def test_native_environments_are_composes_at_native_addresses(native_team, services, service):
    native = native_team.compose_env(service)
    own = set(env(services, service)) - set(yaml.safe_load(COMPOSE_FILE.read_text())["x-offline"])
    assert set(native) == own
    assert not compose_hosts(" ".join(native.values())), native
    assert not INTERPOLATION.search(" ".join(native.values()))


def test_a_native_client_reaches_every_server_with_its_credentials(native_team):
    client, s = native_team.client_env(), native_team.secrets
    assert client["PREFECT_API_URL"] == native_team.url("prefect")
    assert client["MLFLOW_TRACKING_URI"] == native_team.url("mlflow")
    assert client["LABEL_STUDIO_URL"] == native_team.url("labelstudio")
    assert client["MLFLOW_S3_ENDPOINT_URL"] == native_team.url("s3")
    assert (client["AWS_ACCESS_KEY_ID"], client["AWS_SECRET_ACCESS_KEY"]) == (
        s["MINIO_ROOT_USER"],
        s["MINIO_ROOT_PASSWORD"],
    )
    assert client["LABEL_STUDIO_API_KEY"] == s["LABEL_STUDIO_API_TOKEN"]
    assert client["PREFECT_API_AUTH_STRING"] == s["PREFECT_API_AUTH_STRING"]
    assert "XBL_PROJECT_DIR" not in client


@pytest.mark.parametrize("app", ["prefect", "mlflow"])
def test_native_servers_use_their_database_on_the_native_cluster(native_team, app):
    service = {"prefect": "prefect-server", "mlflow": "mlflow"}[app]
    url = next(v for v in native_team.compose_env(service).values() if v.startswith("postgres"))
    user, password, database = native_team.role(app)
    assert url.endswith(f"://{user}:{password}@127.0.0.1:{NATIVE_PORTS['postgres']}/{database}")


def test_the_native_team_makes_composes_buckets_and_databases(services):
    from infra import team

    assert set(team.BUCKETS) == {"dvc", "mlflow"}
    assert set(team.DATABASES) == {
        name.removesuffix("-db") for name in services if name.endswith("-db")
    }
