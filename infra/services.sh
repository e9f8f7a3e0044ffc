#!/usr/bin/env bash
# The UIs on one machine: a Prefect server and an MLflow tracking server, on 127.0.0.1 only.
#   infra/services.sh start|stop|status
# Settings: XBL_PREFECT_PORT (4200), XBL_MLFLOW_PORT (5000), XBL_SERVICES_HOME (.xbl-services),
# XBL_PROJECT (the project whose runs MLflow serves; default: this checkout).
# MLflow serves the project's SQLite store and artifacts, so runs made before it started show up.
set -euo pipefail

PROJECT_DIR="$(cd "$(dirname "$0")/.." && pwd)"
STORE_DIR="$(cd "${XBL_PROJECT:-$PROJECT_DIR}" && pwd)"
HOME_DIR="${XBL_SERVICES_HOME:-$STORE_DIR/.xbl-services}"
BIN="${XBL_VENV:-$PROJECT_DIR/.venv}/bin"
PREFECT_PORT="${XBL_PREFECT_PORT:-4200}"
MLFLOW_PORT="${XBL_MLFLOW_PORT:-5000}"
START_TIMEOUT="${XBL_SERVICES_START_TIMEOUT:-120}"

export DO_NOT_TRACK=true PREFECT_SERVER_ANALYTICS_ENABLED=false MLFLOW_DISABLE_TELEMETRY=true
export PREFECT_HOME="${PREFECT_HOME:-$PROJECT_DIR/.prefect}"

die() { echo "services: $*" >&2; exit 1; }

port_taken() { "$BIN/python" -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1',$1))==0 else 1)"; }

alive() { [[ -f "$HOME_DIR/$1.pid" ]] && kill -0 "$(cat "$HOME_DIR/$1.pid")" 2>/dev/null; }

wait_http() {  # name url
    local deadline=$((SECONDS + START_TIMEOUT))
    until "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" "$2" 2>/dev/null; do
        alive "$1" || die "$1 exited; see $HOME_DIR/$1.log"
        (( SECONDS < deadline )) || die "$1 did not answer at $2 within ${START_TIMEOUT}s; see $HOME_DIR/$1.log"
        sleep 1
    done
}

launch() {  # name port health-url command...
    local name=$1 port=$2 url=$3; shift 3
    if alive "$name"; then echo "services: $name already running at http://127.0.0.1:$port"; return; fi
    port_taken "$port" && die "port $port on 127.0.0.1 is in use; set XBL_${name^^}_PORT"
    mkdir -p "$HOME_DIR"
    # exec: the pid recorded is the server's own (a subshell in between would be what `stop` kills)
    (cd "$PROJECT_DIR" && exec setsid "$@" >"$HOME_DIR/$name.log" 2>&1 </dev/null) &
    echo $! >"$HOME_DIR/$name.pid"
    wait_http "$name" "$url"
    echo "services: $name at http://127.0.0.1:$port"
}

cmd_start() {
    [[ -x "$BIN/prefect" ]] || die "no project venv at $BIN; run 'make setup' first"
    launch prefect "$PREFECT_PORT" "http://127.0.0.1:$PREFECT_PORT/api/health" \
        "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
    launch mlflow "$MLFLOW_PORT" "http://127.0.0.1:$MLFLOW_PORT/health" \
        "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" \
        --backend-store-uri "sqlite:///$STORE_DIR/mlflow.db" \
        --default-artifact-root "$STORE_DIR/mlartifacts"
    echo "services: export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api  (for xbl serve)"
    echo "services: export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT  (runs log through the server)"
}

cmd_stop() {
    for name in mlflow prefect; do
        if alive "$name"; then
            local pid; pid="$(cat "$HOME_DIR/$name.pid")"
            kill -- -"$pid" 2>/dev/null || kill "$pid"
            # wait until it is gone, so a `start` right after finds the port free
            for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
            if kill -0 "$pid" 2>/dev/null; then kill -9 -- -"$pid" 2>/dev/null || true; fi
            echo "services: stopped $name"
        fi
        rm -f "$HOME_DIR/$name.pid"
    done
}

cmd_status() {
    local code=0
    for pair in "prefect:$PREFECT_PORT" "mlflow:$MLFLOW_PORT"; do
        local name=${pair%%:*} port=${pair##*:}
        if alive "$name"; then echo "services: $name running at http://127.0.0.1:$port"
        else echo "services: $name not running"; code=3; fi
    done
    return $code
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
