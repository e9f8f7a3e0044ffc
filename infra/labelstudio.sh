#!/usr/bin/env bash
# The local Label Studio server for xbl: install | start | stop | status.
#
# Label Studio lives in its own venv (.labelstudio/venv) because its pins conflict with Prefect's.
# The server listens on 127.0.0.1 only, sends nothing to the internet (analytics, Sentry and the
# PyPI version check are off) and keeps its data in .labelstudio/data (git-ignored).
#
# Settings (environment):
#   XBL_LABEL_STUDIO_USERNAME / _PASSWORD / _TOKEN   admin account and its legacy API token; when
#       unset, development values are generated once into $XBL_LABEL_STUDIO_HOME/env and reused.
#       The token is fixed when the admin user is first created in a data dir.
#   XBL_LABEL_STUDIO_PORT           default 8089
#   XBL_LABEL_STUDIO_HOME           default <project>/.labelstudio (env file, data/, pid, log)
#   XBL_LABEL_STUDIO_VENV           default <project>/.labelstudio/venv
#   XBL_LABEL_STUDIO_VERSION        default 1.23.2 (what `install` puts in the venv)
#   XBL_LABEL_STUDIO_START_TIMEOUT  seconds to wait for /health, default 240 (first start migrates)
#   XBL_LABEL_STUDIO_DJANGO_DB      sqlite (default: data/label_studio.sqlite3) | default
#       (PostgreSQL, from POSTGRE_NAME/_USER/_PASSWORD/_HOST/_PORT; infra/team.py uses it)
# The token and password are never printed.
set -euo pipefail

PROJECT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
LS_HOME="${XBL_LABEL_STUDIO_HOME:-$PROJECT_DIR/.labelstudio}"
LS_VENV="${XBL_LABEL_STUDIO_VENV:-$PROJECT_DIR/.labelstudio/venv}"
LS_VERSION="${XBL_LABEL_STUDIO_VERSION:-1.23.2}"
START_TIMEOUT="${XBL_LABEL_STUDIO_START_TIMEOUT:-240}"
LS_PY="$LS_VENV/bin/python"
ENV_FILE="$LS_HOME/env"
DATA_DIR="$LS_HOME/data"
PID_FILE="$LS_HOME/server.pid"
PORT_FILE="$LS_HOME/server.port"
LOG_FILE="$LS_HOME/server.log"

die() { echo "labelstudio: $*" >&2; exit 1; }

usage() {
    echo "usage: $0 install|start|stop|status" >&2
    exit 2
}

installed() { [[ -x "$LS_PY" ]] && "$LS_PY" -c "import label_studio" 2>/dev/null; }

require_installed() {
    installed || die "Label Studio is not installed in $LS_VENV; run: $0 install"
}

# Everything under the home dir stays out of git, even before the project's .gitignore says so.
make_home() {
    mkdir -p "$LS_HOME"
    [[ -f "$LS_HOME/.gitignore" ]] || echo "*" > "$LS_HOME/.gitignore"
}

random_hex() {  # $1 = bytes
    python3 -c "import secrets, sys; print(secrets.token_hex(int(sys.argv[1])))" "$1" 2>/dev/null \
        || openssl rand -hex "$1"
}

file_value() {  # value of KEY in the env file, empty when absent (the file is parsed, not sourced)
    [[ -f "$ENV_FILE" ]] || return 0
    sed -n "s/^$1=//p" "$ENV_FILE" | tail -n 1
}

# Development defaults are written once; the environment always wins over the file.
load_settings() {
    if [[ -z "${XBL_LABEL_STUDIO_USERNAME:-}" || -z "${XBL_LABEL_STUDIO_PASSWORD:-}" \
          || -z "${XBL_LABEL_STUDIO_TOKEN:-}" ]] && [[ ! -f "$ENV_FILE" ]]; then
        make_home
        (
            umask 077
            {
                echo "# Development credentials for the local Label Studio server (generated once; git-ignored)."
                echo "XBL_LABEL_STUDIO_USERNAME=admin@xbl.local"
                echo "XBL_LABEL_STUDIO_PASSWORD=$(random_hex 16)"
                echo "XBL_LABEL_STUDIO_TOKEN=$(random_hex 20)"
            } > "$ENV_FILE"
        )
        echo "labelstudio: wrote development credentials to $ENV_FILE"
    fi
    LS_USERNAME="${XBL_LABEL_STUDIO_USERNAME:-$(file_value XBL_LABEL_STUDIO_USERNAME)}"
    LS_PASSWORD="${XBL_LABEL_STUDIO_PASSWORD:-$(file_value XBL_LABEL_STUDIO_PASSWORD)}"
    LS_TOKEN="${XBL_LABEL_STUDIO_TOKEN:-$(file_value XBL_LABEL_STUDIO_TOKEN)}"
    PORT="$(configured_port)"
    [[ -n "$LS_USERNAME" && -n "$LS_PASSWORD" ]] || die "no admin username/password (env or $ENV_FILE)"
    [[ ${#LS_TOKEN} -gt 5 ]] || die "XBL_LABEL_STUDIO_TOKEN must be longer than 5 characters"
    [[ "$PORT" =~ ^[0-9]+$ ]] || die "XBL_LABEL_STUDIO_PORT must be a number, got '$PORT'"
}

server_pid() {  # the pid from the pid file when that process is still our server
    [[ -f "$PID_FILE" ]] || return 1
    local pid
    pid="$(cat "$PID_FILE")"
    [[ "$pid" =~ ^[0-9]+$ ]] && ps -p "$pid" -o args= 2>/dev/null | grep -q "label-studio" || return 1
    echo "$pid"
}

configured_port() {
    local port="${XBL_LABEL_STUDIO_PORT:-$(file_value XBL_LABEL_STUDIO_PORT)}"
    echo "${port:-8089}"
}

running_url() { echo "http://127.0.0.1:$(cat "$PORT_FILE" 2>/dev/null || configured_port)"; }

# Label Studio silently moves to the next port when its port is taken: check first, fail clearly.
port_taken() {
    "$LS_PY" - "$1" <<'EOF'
import socket, sys
port = int(sys.argv[1])
with socket.socket() as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        sys.exit(0)
with socket.socket() as s:  # what Label Studio itself checks
    sys.exit(0 if s.connect_ex(("localhost", port)) == 0 else 1)
EOF
}

# GET $1 and succeed on HTTP 200; the token (if any) comes through the environment, never argv.
http_ok() {
    "$LS_PY" - "$1" <<'EOF'
import os, sys, urllib.request
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxies
request = urllib.request.Request(sys.argv[1])
if os.environ.get("XBL_CHECK_TOKEN"):
    request.add_header("Authorization", "Token " + os.environ["XBL_CHECK_TOKEN"])
try:
    with opener.open(request, timeout=3) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

cmd_install() {
    if installed; then
        echo "labelstudio: already installed in $LS_VENV ($("$LS_PY" -c 'import label_studio; print(label_studio.__version__)'))"
        return 0
    fi
    echo "labelstudio: installing label-studio==$LS_VERSION into $LS_VENV (about a minute)"
    "${PYTHON:-python3}" -m venv "$LS_VENV" \
        || die "could not create a virtualenv with ${PYTHON:-python3} (on Debian/Ubuntu: apt install python3-venv)"
    "$LS_VENV/bin/pip" install --quiet --disable-pip-version-check "label-studio==$LS_VERSION"
    installed || die "install finished but label_studio is not importable from $LS_VENV"
    echo "labelstudio: installed $("$LS_PY" -c 'import label_studio; print(label_studio.__version__)')"
}

cmd_start() {
    require_installed
    load_settings
    local pid
    if pid="$(server_pid)"; then
        echo "labelstudio: already running at $(running_url) (pid $pid)"
        return 0
    fi
    if port_taken "$PORT"; then
        die "port $PORT on 127.0.0.1 is already in use; free it or set XBL_LABEL_STUDIO_PORT"
    fi
    make_home
    mkdir -p "$DATA_DIR"
    echo "$PORT" > "$PORT_FILE"
    local started=$SECONDS
    # Settings through LABEL_STUDIO_* variables (checked before generic names like HOST or DEBUG
    # that a shell may carry); secrets through the environment, so they never show in `ps`.
    # Outgoing HTTP from the server (the UI's "tips" fetch from GitHub, anything we missed) goes
    # to a dead proxy; loopback (webhooks to the pipeline) stays direct.
    local BLACKHOLE="http://127.0.0.1:9" LOOPBACK="127.0.0.1,localhost,::1"
    LABEL_STUDIO_BASE_DATA_DIR="$DATA_DIR" \
    LABEL_STUDIO_DATABASE_NAME="$DATA_DIR/label_studio.sqlite3" \
    LABEL_STUDIO_DJANGO_DB="${XBL_LABEL_STUDIO_DJANGO_DB:-sqlite}" \
    LABEL_STUDIO_HOST="" \
    LABEL_STUDIO_DEBUG=false \
    LABEL_STUDIO_USERNAME="$LS_USERNAME" \
    LABEL_STUDIO_PASSWORD="$LS_PASSWORD" \
    LABEL_STUDIO_USER_TOKEN="$LS_TOKEN" \
    LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true \
    LABEL_STUDIO_SSRF_PROTECTION_ENABLED=false \
    LABEL_STUDIO_COLLECT_ANALYTICS=false \
    LABEL_STUDIO_LATEST_VERSION_CHECK=false \
    LABEL_STUDIO_SENTRY_DSN="" \
    LABEL_STUDIO_FRONTEND_SENTRY_DSN="" \
    LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=false \
    LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT="$DATA_DIR" \
    HTTP_PROXY="$BLACKHOLE" HTTPS_PROXY="$BLACKHOLE" http_proxy="$BLACKHOLE" https_proxy="$BLACKHOLE" \
    NO_PROXY="$LOOPBACK" no_proxy="$LOOPBACK" \
        setsid nohup "$LS_VENV/bin/label-studio" start --no-browser \
            --internal-host 127.0.0.1 --port "$PORT" --data-dir "$DATA_DIR" \
            --enable-legacy-api-token --log-level WARNING \
            >> "$LOG_FILE" 2>&1 < /dev/null &
    pid=$!
    echo "$pid" > "$PID_FILE"
    local url="http://127.0.0.1:$PORT"
    echo "labelstudio: starting at $url (pid $pid, log $LOG_FILE)"
    until http_ok "$url/health"; do
        if ! kill -0 "$pid" 2>/dev/null; then
            tail -n 20 "$LOG_FILE" >&2 || true
            rm -f "$PID_FILE"
            die "the server exited during start-up (log: $LOG_FILE)"
        fi
        if (( SECONDS - started > START_TIMEOUT )); then
            tail -n 20 "$LOG_FILE" >&2 || true
            cmd_stop > /dev/null
            die "no answer from $url/health after ${START_TIMEOUT}s (log: $LOG_FILE)"
        fi
        sleep 1
    done
    if ! XBL_CHECK_TOKEN="$LS_TOKEN" http_ok "$url/api/current-user/whoami"; then
        cmd_stop > /dev/null
        die "the server in $DATA_DIR does not accept the configured API token (the token is fixed" \
            "when the admin user is first created there; use the original token or remove $DATA_DIR)"
    fi
    echo "labelstudio: running at $url (pid $pid, ready in $((SECONDS - started))s)"
}

cmd_stop() {
    local pid
    if ! pid="$(server_pid)"; then
        rm -f "$PID_FILE"
        echo "labelstudio: not running"
        return 0
    fi
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$PID_FILE"
    echo "labelstudio: stopped (pid $pid)"
}

cmd_status() {
    local pid url
    if ! pid="$(server_pid)"; then
        echo "labelstudio: not running (would start at http://127.0.0.1:$(configured_port))"
        return 3
    fi
    url="$(running_url)"
    if http_ok "$url/health"; then
        echo "labelstudio: running at $url (pid $pid)"
    else
        echo "labelstudio: process $pid is up but $url/health does not answer (starting?)"
        return 1
    fi
}

case "${1:-}" in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) usage ;;
esac
