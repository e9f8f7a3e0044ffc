"""The team topology of infra/compose.yaml, started natively (no Docker): `xbl team up|down|status`.

The topology is compose.yaml's, read through infra/compose.py: the commands of the Prefect
server, MLflow and the worker, each one's environment, the worker's pool, the buckets and the
databases. What this module adds is how each part runs without Docker. What runs, each on a
free 127.0.0.1 port:

- PostgreSQL 15 (`initdb`/`pg_ctl`, as an unprivileged user when we are root), a throwaway
  cluster in a temp folder with one database and role each for MLflow, Label Studio and Prefect;
- moto's S3 server standing in for MinIO, with the buckets `mlflow` (artifacts) and `dvc` (the
  DVC remote);
- an MLflow tracking server on PostgreSQL, its artifacts proxied to `s3://mlflow/`;
- Label Studio on PostgreSQL, started by infra/labelstudio.sh;
- a Prefect server on PostgreSQL (basic auth) and a process worker on pool `xbl-pool`, limit 1.

Everything is throwaway: `down` stops the processes and deletes the cluster and the state
(moto keeps its objects in memory, so nothing would survive anyway). Secrets come from the
environment (the names of infra/team.env.example) or are generated per run; they reach each
process through its environment, never its argv, and are written only to 0600 files in the
team's home. Nothing here prints them.

No Prefect import: the Prefect server, worker and `prefect deploy` are processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from infra import compose
from services.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parent.parent
LS_SCRIPT = Path(__file__).with_name("labelstudio.sh")
PG_BIN = Path(os.environ.get("XBL_PG_BIN", "/usr/lib/postgresql/15/bin"))
BIN = Path(sys.executable).parent
POOL = compose.option("prefect-worker", "--pool")
WORKER_NAME = "xbl-native-worker"
BUCKETS = compose.buckets()
DATABASES = compose.databases()  # app (prefect, mlflow, labelstudio) -> its variables
REGION = "us-east-1"  # moto answers in any region, but boto3 must name one
START_TIMEOUT = float(os.environ.get("XBL_TEAM_START_TIMEOUT", "300"))
STATE_FILE = "team.json"
SECRETS_FILE = "secrets.env"
CLIENT_FILE = "client.env"
# What `down` removes from the home (and nothing else: the home may be a folder people chose).
_OWNED = (STATE_FILE, SECRETS_FILE, CLIENT_FILE, "logs", "labelstudio", "prefect", "worker")
# Settings a caller's shell may carry that would point a service at another store or server.
_FOREIGN = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_BACKEND_STORE_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "PREFECT_API_URL",
    "PREFECT_API_KEY",
    "PREFECT_API_AUTH_STRING",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_API_AUTH_STRING",
    "PREFECT_PROFILES_PATH",
    "LABEL_STUDIO_URL",
    "LABEL_STUDIO_API_KEY",
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
)
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class TeamError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def available() -> str | None:
    """None when the topology can start here, else why not."""
    for tool in ("initdb", "pg_ctl", "psql"):
        if not (PG_BIN / tool).is_file():
            return f"no PostgreSQL at {PG_BIN} (set XBL_PG_BIN; Debian: apt install postgresql-15)"
    for tool in ("mlflow", "prefect", "moto_server"):
        if not (BIN / tool).is_file():
            return f"no {tool} in {BIN}: install requirements.txt"
    ls_python = Path(os.environ.get("XBL_LABEL_STUDIO_VENV", REPO / ".labelstudio/venv"))
    if not (ls_python / "bin" / "label-studio").is_file():
        return f"Label Studio is not installed in {ls_python}: run infra/labelstudio.sh install"
    return None


# --- secrets ------------------------------------------------------------------------------------


def _generated_secrets() -> dict[str, str]:
    """infra/team.env.example's names: the environment's value, else a fresh one."""
    fresh = {"PG_SUPERUSER_PASSWORD": secrets.token_hex(16)}
    for app, names in DATABASES.items():
        fresh |= {names["user"]: app, names["password"]: secrets.token_hex(16), names["name"]: app}
    fresh |= {
        "MINIO_ROOT_USER": "xbl" + secrets.token_hex(4),
        "MINIO_ROOT_PASSWORD": secrets.token_hex(16),
        "LABEL_STUDIO_ADMIN_EMAIL": "admin@xbl.local",
        "LABEL_STUDIO_ADMIN_PASSWORD": secrets.token_hex(16),
        "LABEL_STUDIO_API_TOKEN": secrets.token_hex(20),
        "PREFECT_API_AUTH_STRING": "xbl:" + secrets.token_hex(16),
    }
    chosen = {k: os.environ.get(k) or v for k, v in fresh.items()}
    for key in (names[part] for names in DATABASES.values() for part in ("user", "name")):
        if not _IDENTIFIER.match(chosen[key]):
            raise TeamError(f"{key} must be a plain identifier (letters, digits, '_')")
    if ":" not in chosen["PREFECT_API_AUTH_STRING"]:
        raise TeamError("PREFECT_API_AUTH_STRING must be 'user:password'")
    if len(chosen["LABEL_STUDIO_API_TOKEN"]) <= 5:
        raise TeamError("LABEL_STUDIO_API_TOKEN must be longer than 5 characters")
    return chosen


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)


def _read_env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.removeprefix("export ").split("=", 1)
        for line in path.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    return {k.strip(): v.strip().strip("'") for k, v in pairs}


# --- processes ----------------------------------------------------------------------------------


def _alive(pid: int | None) -> bool:
    """A live process (a zombie, exited but not yet reaped, is not)."""
    if not pid:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _stop_group(pid: int | None, grace_s: float = 20.0) -> None:
    """SIGTERM the process group the service leads (setsid), then SIGKILL what is left."""
    if not _alive(pid):
        return
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            _reap(pid)
            if not _alive(pid):
                return
            time.sleep(0.2)


def _http_ok(url: str, auth: str | None = None, timeout: float = 3.0) -> bool:
    request = urllib.request.Request(url)
    if auth:
        import base64

        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    try:
        with opener.open(request, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _pg_user() -> tuple[int, int] | None:
    """(uid, gid) to run PostgreSQL as when we are root (it refuses root); None otherwise.
    The `postgres` account when it exists, else a system user `xbl-postgres` made for it."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "xbl-postgres"):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            continue
    subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "xbl-postgres"],
        check=True,
        capture_output=True,
    )
    entry = pwd.getpwnam("xbl-postgres")
    return entry.pw_uid, entry.pw_gid


_TOKEN_PLACEHOLDER = "xbl-template-token-placeholder"
_EMAIL_PLACEHOLDER = "template-admin@xbl.invalid"


def _sql(value: str) -> str:
    return value.replace("'", "''")


def _django_hash(password: str, iterations: int = 600_000) -> str:
    """Django's pbkdf2_sha256 password hash (what Label Studio's admin log-in checks)."""
    import base64
    import hashlib

    salt = secrets.token_hex(11)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def _ls_template() -> Path | None:
    """Where the migrated Label Studio database of the installed version is kept, or None
    (no template: XBL_TEAM_LS_TEMPLATE=0, or the version is unknown)."""
    if os.environ.get("XBL_TEAM_LS_TEMPLATE", "1") == "0":
        return None
    venv = Path(os.environ.get("XBL_LABEL_STUDIO_VENV", REPO / ".labelstudio/venv"))
    found = list((venv / "lib").glob("python3*/site-packages/label_studio-*.dist-info"))
    if len(found) != 1:
        return None
    version = found[0].name.removeprefix("label_studio-").removesuffix(".dist-info")
    return REPO / ".labelstudio" / "pg-template" / f"labelstudio-{version}.sql"


# --- the team -----------------------------------------------------------------------------------


@dataclass
class Team:
    """A running (or stopped) native team stack whose state lives in `home`."""

    home: Path
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    pg_dir: str | None = None
    project: str | None = None
    secrets: dict[str, str] = field(default_factory=dict, repr=False)

    # --- addresses -----------------------------------------------------------------------------

    def url(self, name: str) -> str:
        base = f"http://127.0.0.1:{self.ports[name]}"
        return base + "/api" if name == "prefect" else base

    def role(self, db: str) -> tuple[str, str, str]:
        """(role, password, database) of `mlflow`, `labelstudio` or `prefect` (secrets)."""
        names = DATABASES[db]
        return (
            self.secrets[names["user"]],
            self.secrets[names["password"]],
            self.secrets[names["name"]],
        )

    def database(self, db: str) -> str:
        return self.role(db)[2]

    def compose_env(self, service: str) -> dict[str, str]:
        """What compose.yaml sets for `service`, at this team's addresses and secrets."""
        return compose.environment(service, self.secrets, self.ports)

    def client_env(self) -> dict[str, str]:
        """What a client of the team needs (a developer's shell, the worker, a test): the
        worker's settings in compose.yaml (the servers' addresses and the credentials to use
        them), less its project folder and its poll interval, which are the worker's own."""
        env = self.compose_env("prefect-worker")
        del env["XBL_PROJECT_DIR"], env["PREFECT_WORKER_QUERY_SECONDS"]
        return env | {"AWS_DEFAULT_REGION": REGION}

    def secret_values(self) -> list[str]:
        """The passwords, the API token and the auth string (not the user and database names)."""
        return [
            v
            for k, v in self.secrets.items()
            if v and any(word in k for word in ("PASSWORD", "TOKEN", "AUTH_STRING"))
        ]

    def redact(self, text: str) -> str:
        for value in self.secret_values():
            text = text.replace(value, "***")
        return text

    # --- state ---------------------------------------------------------------------------------

    def save(self) -> None:
        state = {"ports": self.ports, "pids": self.pids, "pg_dir": self.pg_dir}
        state["project"] = self.project
        (self.home / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        _write_private(
            self.home / SECRETS_FILE,
            "# Secrets of the native team stack (generated per `xbl team up`; removed by down)\n"
            + "".join(f"{k}={v}\n" for k, v in self.secrets.items()),
        )
        if "prefect" in self.ports:
            _write_private(
                self.home / CLIENT_FILE,
                "# `source` this to use the team's servers from a shell\n"
                + "".join(f"export {k}='{v}'\n" for k, v in self.client_env().items()),
            )

    @classmethod
    def load(cls, home: Path) -> Team | None:
        home = Path(home).resolve()
        if not (home / STATE_FILE).is_file():
            return None
        state = json.loads((home / STATE_FILE).read_text())
        found = _read_env_file(home / SECRETS_FILE) if (home / SECRETS_FILE).is_file() else {}
        return cls(
            home,
            state["ports"],
            state["pids"],
            state.get("pg_dir"),
            state.get("project"),
            found,
        )

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
        env.update(OFFLINE_ENV)
        env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
        env.update(extra)
        return env

    def _command(self, service: str, drop: tuple[str, ...] = ()) -> list[str]:
        """compose.yaml's command for `service`, run by this venv's executable."""
        program, *args = compose.command(service, self.ports, drop)
        return [str(BIN / program), *args]

    def _spawn(self, name: str, cmd: list[str], env: dict, cwd: Path | None = None) -> None:
        logs = self.home / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                cmd,
                env=env,
                cwd=cwd or self.home,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # its own process group: `down` stops all it started
            )
        self.pids[name] = proc.pid
        self.save()

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.home / "logs" / f"{name}.log"
        if name == "postgres" and self.pg_dir:
            path = Path(self.pg_dir) / "data" / "server.log"
        try:
            text = "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
        return self.redact(text)

    def _wait(self, name: str, ready, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            pid = self.pids.get(name)
            if pid and not _alive(pid):
                _reap(pid)
                raise TeamError(f"{name} exited during start-up:\n{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise TeamError(f"{name} not ready after {timeout:.0f}s:\n{self.log_tail(name)}")
            time.sleep(0.5)

    # --- PostgreSQL ----------------------------------------------------------------------------

    def _pg(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """initdb / pg_ctl as the unprivileged user (when root)."""
        who = _pg_user()
        kwargs = {"user": who[0], "group": who[1], "extra_groups": []} if who else {}
        done = subprocess.run(
            [str(PG_BIN / tool), *args],
            cwd=self.pg_dir,
            env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C.UTF-8"},
            capture_output=True,
            text=True,
            **kwargs,
        )
        if check and done.returncode != 0:
            raise TeamError(f"{tool} failed:\n{self.redact(done.stdout + done.stderr)}")
        return done

    def psql(self, sql: str, database: str = "postgres", role: str | None = None) -> str:
        """Run SQL as the cluster's superuser, or as the database role of `mlflow`,
        `labelstudio` or `prefect` (password through the environment); stdout."""
        return self._pg_client("psql", "-v", "ON_ERROR_STOP=1", "-X", "-A", "-t", "-q",
                               database=database, role=role, stdin=sql)  # fmt: skip

    def _pg_client(
        self, tool: str, *args: str, database: str, role: str | None = None, stdin: str = ""
    ) -> str:
        user, password = "xbl", self.secrets["PG_SUPERUSER_PASSWORD"]
        if role:
            user, password, _ = self.role(role)
        done = subprocess.run(
            [str(PG_BIN / tool), "-h", "127.0.0.1", "-p", str(self.ports["postgres"])]
            + ["-U", user, "-d", database, *args],
            input=stdin,
            env={
                "PATH": os.environ.get("PATH", ""),
                "PGPASSWORD": password,
                "PGCONNECT_TIMEOUT": "5",
            },
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise TeamError(f"{tool} failed: {self.redact(done.stderr.strip()[-2000:])}")
        return done.stdout

    def _start_postgres(self) -> None:
        who = _pg_user()
        pg_dir = Path(tempfile.mkdtemp(prefix="xbl-team-pg-"))
        os.chmod(pg_dir, 0o711)  # the postgres user only needs to pass through to data/
        self.pg_dir = str(pg_dir)
        data, pwfile = pg_dir / "data", pg_dir / "pwfile"
        data.mkdir(mode=0o700)
        _write_private(pwfile, self.secrets["PG_SUPERUSER_PASSWORD"] + "\n")
        if who:
            os.chown(data, *who)
            os.chown(pwfile, *who)
        self.ports["postgres"] = free_port()
        self.save()
        try:
            self._pg(
                "initdb", "-D", str(data), "-U", "xbl", "--auth=scram-sha-256",
                f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        with open(data / "postgresql.conf", "a") as conf:
            conf.write(
                "\n# xbl team (throwaway): loopback only, no unix socket, speed over durability\n"
                f"port = {self.ports['postgres']}\nlisten_addresses = '127.0.0.1'\n"
                "unix_socket_directories = ''\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nmax_connections = 200\n"
            )
        self._pg(
            "pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-w", "-t", "60", "start"
        )
        pid = (data / "postmaster.pid").read_text().split()[0]
        self.pids["postgres"] = int(pid)
        self.save()
        statements = []
        for db in DATABASES:
            user, password, name = self.role(db)
            statements.append(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{_sql(password)}';")
            statements.append(f'CREATE DATABASE "{name}" OWNER "{user}";')
        self.psql("\n".join(statements))

    def restart_postgres(self) -> None:
        """`pg_ctl restart -m fast`: every open connection is cut, as in a failover or a
        minor upgrade; the same data and port afterwards."""
        data = Path(self.pg_dir) / "data"
        self._pg("pg_ctl", "-D", str(data), "-l", str(data / "server.log"), "-m", "fast",
                 "-w", "-t", "60", "restart")  # fmt: skip
        self.pids["postgres"] = int((data / "postmaster.pid").read_text().split()[0])
        self.save()

    def _stop_postgres(self) -> None:
        if self.pg_dir and (Path(self.pg_dir) / "data" / "postmaster.pid").is_file():
            self._pg("pg_ctl", "-D", str(Path(self.pg_dir) / "data"), "-m", "fast", "-w", "stop",
                     check=False)  # fmt: skip
        _stop_group(self.pids.get("postgres"))
        if self.pg_dir and Path(self.pg_dir).name.startswith("xbl-team-pg-"):
            shutil.rmtree(self.pg_dir, ignore_errors=True)

    # --- S3 (moto) -----------------------------------------------------------------------------

    def s3(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.url("s3"),
            aws_access_key_id=self.secrets["MINIO_ROOT_USER"],
            aws_secret_access_key=self.secrets["MINIO_ROOT_PASSWORD"],
            region_name=REGION,
        )

    def _start_s3(self) -> None:
        self.ports["s3"] = free_port()
        self._spawn(
            "s3",
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.ports["s3"])],
            self._env(),
        )
        self._wait("s3", lambda: _http_ok(self.url("s3") + "/moto-api/"), timeout=60)
        client = self.s3()
        for bucket in BUCKETS:
            client.create_bucket(Bucket=bucket)

    # --- MLflow --------------------------------------------------------------------------------

    def _start_mlflow(self) -> None:
        self.ports["mlflow"] = free_port()
        env = self._env(
            **self.compose_env("mlflow"),  # the store's URL too: its password stays out of `ps`
            AWS_DEFAULT_REGION=REGION,
            # its job runner (GenAI evaluation, prompt optimisation) would add seven processes
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        )
        # --allowed-hosts lists compose's host names, and MLflow's default already allows
        # 127.0.0.1 on any port; one worker process, as the stack is a throwaway
        command = self._command("mlflow", drop=("--allowed-hosts",)) + ["--workers", "1"]
        self._spawn("mlflow", command, env)

    def _wait_mlflow(self) -> None:
        self._wait("mlflow", lambda: _http_ok(self.url("mlflow") + "/health"))

    # --- Label Studio --------------------------------------------------------------------------

    def _labelstudio_script(self, action: str) -> subprocess.CompletedProcess:
        """infra/labelstudio.sh, the local server's script, on the team's PostgreSQL."""
        s = self.secrets
        user, password, name = self.role("labelstudio")
        env = self._env(
            XBL_LABEL_STUDIO_HOME=str(self.home / "labelstudio"),
            XBL_LABEL_STUDIO_PORT=str(self.ports["labelstudio"]),
            XBL_LABEL_STUDIO_USERNAME=s["LABEL_STUDIO_ADMIN_EMAIL"],
            XBL_LABEL_STUDIO_PASSWORD=s["LABEL_STUDIO_ADMIN_PASSWORD"],
            XBL_LABEL_STUDIO_TOKEN=s["LABEL_STUDIO_API_TOKEN"],
            XBL_LABEL_STUDIO_START_TIMEOUT=str(int(START_TIMEOUT)),
            XBL_LABEL_STUDIO_DJANGO_DB="default",  # PostgreSQL, from POSTGRE_*
            POSTGRE_NAME=name,
            POSTGRE_USER=user,
            POSTGRE_PASSWORD=password,
            POSTGRE_HOST="127.0.0.1",
            POSTGRE_PORT=str(self.ports["postgres"]),
        )
        return subprocess.run(
            ["bash", str(LS_SCRIPT), action], env=env, capture_output=True, text=True
        )

    def _start_labelstudio(self) -> int:
        """infra/labelstudio.sh start (returns once /health answers and the token works);
        the server's pid. An empty database takes a minute of migrations: the first start
        keeps a dump of the migrated database (with the admin's password and token blanked)
        in .labelstudio/pg-template/, and later starts restore it in a second."""
        template = _ls_template()
        restored = template is not None and template.is_file()
        if restored:
            try:
                self._restore_labelstudio(template)
            except TeamError:
                restored = False
                template.unlink(missing_ok=True)
                user, _, db = self.role("labelstudio")
                self.psql(f'DROP DATABASE "{db}";')
                self.psql(f'CREATE DATABASE "{db}" OWNER "{user}";')
        done = self._labelstudio_script("start")
        pid_file = self.home / "labelstudio" / "server.pid"
        if done.returncode == 0 and pid_file.is_file():
            if template is not None and not restored:
                with contextlib.suppress(TeamError, OSError):
                    self._save_labelstudio_template(template)
            return int(pid_file.read_text().strip())
        log = self.home / "labelstudio" / "server.log"
        tail = log.read_text(errors="replace").splitlines()[-30:] if log.is_file() else []
        raise TeamError(
            "Label Studio did not start:\n"
            + self.redact(done.stdout + done.stderr + "\n".join(tail))
        )

    def _save_labelstudio_template(self, template: Path) -> None:
        dump = self._pg_client(
            "pg_dump", "--no-owner", "--no-privileges", database=self.database("labelstudio")
        )
        token = self.secrets["LABEL_STUDIO_API_TOKEN"]
        digest = self.psql(
            f"SELECT password FROM htx_user WHERE email = '{_sql(self._admin_email())}'",
            self.database("labelstudio"),
        ).strip()
        if not digest or token not in dump or digest not in dump:
            return  # not the layout this code knows: no template
        dump = dump.replace(token, _TOKEN_PLACEHOLDER).replace(digest, "!")
        dump = dump.replace(self._admin_email(), _EMAIL_PLACEHOLDER)
        if any(value in dump for value in self.secret_values()):
            return
        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f"{template.name}.partial-{os.getpid()}")
        _write_private(partial, dump)
        partial.replace(template)

    def _restore_labelstudio(self, template: Path) -> None:
        db = self.database("labelstudio")
        self.psql(template.read_text(), db, role="labelstudio")
        email = _sql(self._admin_email())
        self.psql(
            f"UPDATE htx_user SET email = '{email}', "
            f"password = '{_django_hash(self.secrets['LABEL_STUDIO_ADMIN_PASSWORD'])}' "
            f"WHERE email = '{_EMAIL_PLACEHOLDER}';\n"
            f"UPDATE authtoken_token SET key = '{_sql(self.secrets['LABEL_STUDIO_API_TOKEN'])}' "
            f"WHERE key = '{_TOKEN_PLACEHOLDER}';",
            db,
        )

    def _admin_email(self) -> str:
        return self.secrets["LABEL_STUDIO_ADMIN_EMAIL"]

    # --- Prefect -------------------------------------------------------------------------------

    def prefect_api(self, method: str, path: str, body: dict | None = None):
        """A call to the Prefect server's REST API with the basic auth; the decoded answer."""
        import requests

        user, password = self.secrets["PREFECT_API_AUTH_STRING"].split(":", 1)
        response = requests.request(
            method, self.url("prefect") + path, json=body, auth=(user, password), timeout=30
        )
        if response.status_code >= 400:
            raise TeamError(f"Prefect {method} {path}: HTTP {response.status_code}")
        return response.json() if response.content else None

    def _start_prefect(self) -> None:
        self.ports["prefect"] = free_port()
        env = self._env(
            **self.compose_env("prefect-server"), PREFECT_HOME=str(self.home / "prefect")
        )
        self._spawn("prefect", self._command("prefect-server"), env)

    def _wait_prefect(self) -> None:
        self._wait("prefect", lambda: _http_ok(self.url("prefect") + "/health"))

    def worker_env(self) -> dict[str, str]:
        return self._env(
            **self.client_env(),
            PREFECT_HOME=str(self.home / "worker"),
            # how often it asks for scheduled runs (Prefect's default: every 10 s)
            PREFECT_WORKER_QUERY_SECONDS=os.environ.get("PREFECT_WORKER_QUERY_SECONDS", "2"),
            XBL_PROJECT_DIR=str(self.project),  # prefect.yaml's pull step runs the flows there
        )

    def _start_worker(self) -> None:
        # --with-healthcheck serves on a fixed port (8080); here the worker's registration
        # with the server is the check
        command = self._command("prefect-worker", drop=("--with-healthcheck",))
        command += ["--name", WORKER_NAME]
        self._spawn("worker", command, self.worker_env(), cwd=Path(self.project))

        def registered() -> bool:
            try:
                workers = self.prefect_api("POST", f"/work_pools/{POOL}/workers/filter", {})
            except Exception:
                return False
            return any(w["name"] == WORKER_NAME for w in workers or [])

        self._wait("worker", registered, timeout=120)

    def deploy(self, project: Path | None = None) -> str:
        """`prefect deploy --all` from the project: registers prefect.yaml's deployments."""
        project = Path(project or self.project)
        done = subprocess.run(
            [str(BIN / "prefect"), "--no-prompt", "deploy", "--all"],
            cwd=project,
            env=self.worker_env() | {"XBL_PROJECT_DIR": str(project)},
            capture_output=True,
            text=True,
            timeout=300,
        )
        output = self.redact(done.stdout + done.stderr)
        if done.returncode != 0:
            raise TeamError(f"prefect deploy --all failed in {project}:\n{output[-3000:]}")
        return output

    def restart_worker(self) -> list[str]:
        """Start the worker again after it died (what is left of it is stopped first). Flow
        runs of the pool still shown running or pending whose process is gone are marked
        CRASHED before: nothing else ends them, and the deployment's concurrency slot they hold
        would keep the next run waiting. Returns their ids."""
        _stop_group(self.pids.get("worker"))
        stuck = self.prefect_api(
            "POST",
            "/flow_runs/filter",
            {
                "work_pools": {"name": {"any_": [POOL]}},
                "flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING", "CANCELLING"]}}},
            },
        )
        crashed = []
        for run in stuck or []:
            pid = str(run.get("infrastructure_pid") or "").rsplit(":", 1)[-1]
            if pid.isdigit() and _alive(int(pid)):
                continue  # its process outlived the worker: it still reports its own end
            state = {"type": "CRASHED", "name": "Crashed", "message": "its worker died with it"}
            self.prefect_api(
                "POST", f"/flow_runs/{run['id']}/set_state", {"state": state, "force": True}
            )
            crashed.append(run["id"])
        self._start_worker()
        return crashed

    # --- DVC -----------------------------------------------------------------------------------

    def use_dvc_remote(self, project: Path, name: str = "team") -> None:
        """Make the bucket `dvc` the project's default DVC remote, in .dvc/config.local (the
        credentials stay in the environment: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
        from services import dvc

        dvc.ensure_repo(project)
        dvc.dvc(project, "remote", "add", "--local", "-f", "-d", name, "s3://dvc")
        dvc.dvc(project, "remote", "modify", "--local", name, "endpointurl", self.url("s3"))
        dvc.dvc(project, "remote", "modify", "--local", name, "region", REGION)

    # --- everything ----------------------------------------------------------------------------

    def status(self) -> dict[str, tuple[bool, str]]:
        """{service: (answering, address)} for every service of the topology."""
        probes = {
            "postgres": lambda: bool(self.psql("SELECT 1").strip()),
            "s3": lambda: _http_ok(self.url("s3") + "/moto-api/"),
            "mlflow": lambda: _http_ok(self.url("mlflow") + "/health"),
            "labelstudio": lambda: _http_ok(self.url("labelstudio") + "/health"),
            "prefect": lambda: _http_ok(self.url("prefect") + "/health"),
            "worker": lambda: _alive(self.pids.get("worker")),
        }
        found = {}
        for name, probe in probes.items():
            if name not in self.ports and name != "worker":
                found[name] = (False, "-")
                continue
            if name == "worker":
                where = f"pool {POOL}, project {self.project}"
            elif name == "postgres":
                where = f"127.0.0.1:{self.ports[name]}"
            else:
                where = self.url(name)
            try:
                ok = _alive(self.pids.get(name)) and probe()
            except Exception:
                ok = False
            found[name] = (ok, where)
        return found

    def stop(self) -> None:
        """Stop every service, newest first, and delete the cluster and the state."""
        _stop_group(self.pids.get("worker"))
        if "labelstudio" in self.ports:
            self._labelstudio_script("stop")
        _stop_group(self.pids.get("labelstudio"))
        for name in ("prefect", "mlflow", "s3"):
            _stop_group(self.pids.get(name))
        self._stop_postgres()
        for name in _OWNED:
            path = self.home / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if self.home.is_dir() and not [p for p in self.home.iterdir() if p.name != ".gitignore"]:
            shutil.rmtree(self.home, ignore_errors=True)


def up(home: Path, project: Path, *, deploy: bool = False, log=print) -> Team:
    """Start the whole topology (PostgreSQL, S3, MLflow, Label Studio, Prefect server and
    worker); the worker runs flows in `project`. On any failure, what started is stopped."""
    reason = available()
    if reason:
        raise TeamError(reason)
    home, project = Path(home).resolve(), Path(project).resolve()
    existing = Team.load(home)
    if existing is not None:
        if any(ok for ok, _ in existing.status().values()):
            raise TeamError(f"a team is already running from {home}: `xbl team down` first")
        existing.stop()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / ".gitignore").is_file():
        (home / ".gitignore").write_text("*\n")
    team = Team(home, project=str(project), secrets=_generated_secrets())
    team.ports["labelstudio"] = free_port()
    team.save()
    started = time.monotonic()
    try:
        team._start_postgres()
        log(f"team: postgres at 127.0.0.1:{team.ports['postgres']} (data in {team.pg_dir})")
        team._start_s3()
        log(f"team: s3 (moto) at {team.url('s3')}, buckets {', '.join(BUCKETS)}")
        team._start_mlflow()
        team._start_prefect()
        # Label Studio migrates an empty database (the slow part): meanwhile the others start.
        with ThreadPoolExecutor(1) as pool:
            labelstudio = pool.submit(team._start_labelstudio)
            team._wait_mlflow()
            log(f"team: mlflow at {team.url('mlflow')} (PostgreSQL, artifacts in s3://mlflow/)")
            team._wait_prefect()
            log(f"team: prefect at {team.url('prefect')}")
            team._start_worker()
            log(f"team: worker on pool {POOL}, running flows in {project}")
            team.pids["labelstudio"] = labelstudio.result()
        log(f"team: labelstudio at {team.url('labelstudio')} (PostgreSQL)")
        team.save()
        if deploy:
            team.deploy()
            log(f"team: registered the deployments of {project / 'prefect.yaml'}")
    except BaseException:
        team.save()
        team.stop()
        raise
    log(f"team: up in {time.monotonic() - started:.0f}s")
    return team


def down(home: Path) -> bool:
    """Stop the team started from `home`; False when there was none."""
    team = Team.load(home)
    if team is None:
        return False
    team.stop()
    return True
