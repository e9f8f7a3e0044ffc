"""infra/compose.yaml, read for the native team stack (infra/team.py).

The topology is written once, in compose.yaml: the native start takes from it the commands
of the Prefect server, MLflow and the worker, the environment each of them gets, the worker's
pool, the buckets and the databases. A compose address (`http://mlflow:5000`,
`@mlflow-db:5432`, the published `127.0.0.1:4200`) becomes the loopback port of the native
process that plays the service's part, and `${VAR}` the team's value of VAR.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

import yaml

COMPOSE_FILE = Path(__file__).with_name("compose.yaml")
# ${NAME}, ${NAME:?message}, ${NAME:-default}, ... ($$ is an escaped dollar, not interpolation)
INTERPOLATION = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}")
ADDRESS = re.compile(r"(?<=[/@])([A-Za-z0-9.-]+):(\d+)(?=/|$)")  # a URL's host:port
LOOPBACK = "127.0.0.1"

# The native process that plays each service's part: one PostgreSQL cluster holds the three
# databases, and moto's S3 server stands in for MinIO (the bucket job's work is done by
# team.py). Label Studio and the worker are native too; the webhook receiver is not started.
NATIVE = {
    "prefect-db": "postgres",
    "mlflow-db": "postgres",
    "labelstudio-db": "postgres",
    "minio": "s3",
    "mlflow": "mlflow",
    "labelstudio": "labelstudio",
    "prefect-server": "prefect",
}


@cache
def _compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def service(name: str) -> dict:
    return _compose()["services"][name]


def option(name: str, flag: str) -> str:
    """The value of `flag` in a service's command (the worker's `--pool`, ...)."""
    command = service(name)["command"]
    return command[command.index(flag) + 1]


def buckets() -> tuple[str, ...]:
    """The buckets the one-shot job makes (`mb --ignore-existing <alias>/<bucket> ...`)."""
    return tuple(arg.split("/", 1)[1] for arg in service("minio-buckets")["command"] if "/" in arg)


def variable(value: str) -> str:
    """The name of the variable a value is made of alone (`${MLFLOW_DB_USER:?...}`)."""
    return INTERPOLATION.fullmatch(value)[1]


def databases() -> dict[str, dict[str, str]]:
    """{app: {"user", "password", "name"}: the variables that hold its role, password and
    database}, for each `<app>-db` service (app: prefect, mlflow, labelstudio)."""
    found = {}
    for name, spec in _compose()["services"].items():
        if name.endswith("-db"):
            env = spec["environment"]
            found[name.removesuffix("-db")] = {
                "user": variable(env["POSTGRES_USER"]),
                "password": variable(env["POSTGRES_PASSWORD"]),
                "name": variable(env["POSTGRES_DB"]),
            }
    return found


def variables(name: str) -> set[str]:
    """The variables a service's environment reads."""
    return {
        m[1] for value in _own_environment(name).values() for m in INTERPOLATION.finditer(value)
    }


def _own_environment(name: str) -> dict[str, str]:
    """A service's settings, less those every service merges in (x-offline): the native start
    puts its own telemetry switches into every process."""
    shared = _compose().get("x-offline", {})
    env = service(name).get("environment", {})
    return {k: "" if v is None else str(v) for k, v in env.items() if k not in shared}


def environment(name: str, values: dict[str, str], ports: dict[str, int]) -> dict[str, str]:
    """A service's own environment, run natively: compose addresses at the native ports,
    variables filled in from `values`."""
    return {k: resolve(v, values, ports) for k, v in _own_environment(name).items()}


def command(name: str, ports: dict[str, int], drop: tuple[str, ...] = ()) -> list[str]:
    """A service's command, run natively: on 127.0.0.1 and the native port, without the
    options in `drop` (each with the values that follow it, up to the next option)."""
    found, args = [], list(service(name)["command"])
    while args:
        arg = args.pop(0)
        if arg in drop:
            while args and not args[0].startswith("--"):
                args.pop(0)
            continue
        found.append(arg)
        if arg == "--host":
            found.append(LOOPBACK)
            args.pop(0)
        elif arg == "--port":
            found.append(str(ports[NATIVE[name]]))
            args.pop(0)
    return [resolve(arg, {}, ports) for arg in found]


def resolve(value: str, values: dict[str, str], ports: dict[str, int]) -> str:
    """A compose value with its addresses moved to the native ports (first, while a
    credential in a URL is still a ${VAR}), then its variables filled in."""
    return INTERPOLATION.sub(lambda m: _value(m, values), _native_addresses(value, ports))


def _native_addresses(text: str, ports: dict[str, int]) -> str:
    published = {
        port.rsplit(":", 1)[0]: name  # "127.0.0.1:4200:4200" -> "127.0.0.1:4200"
        for name, spec in _compose()["services"].items()
        for port in spec.get("ports", [])
    }

    def native(match: re.Match) -> str:
        name = match[1] if match[1] in NATIVE else published.get(match[0])
        return f"{LOOPBACK}:{ports[NATIVE[name]]}" if name in NATIVE else match[0]

    return ADDRESS.sub(native, text)


def _value(match: re.Match, values: dict[str, str]) -> str:
    name, operator, default = match[1], match[2], match[3]
    if values.get(name):
        return values[name]
    if operator in (":-", "-"):
        return default
    raise KeyError(f"compose.yaml reads ${{{name}}}, which the native team does not set")
