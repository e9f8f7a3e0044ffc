"""How long a triggered run waits to start under `xbl serve`: flow run created → RUNNING.

A real `prefect server` on loopback (a temporary PREFECT_HOME), `xbl serve` against it, and,
for each poll interval studied, a fresh runner: the interval `xbl serve` sets
(flows/cli.py RUNNER_POLL_S) and Prefect's own default of 10 s. Each trial creates a run of
the `baseline` deployment as the webhook and the UI do (`run_deployment`, timeout 0) and reads
back, from the server, the run's creation time and its RUNNING state's time.

What a run does once RUNNING does not bear on when it starts, so each trial's run is given a
settings file that does not exist: it fails at once and frees the runner's one slot (limit 1)
instead of training. Trials wait for the previous run to end, then a random 0-2 s, so that
creation falls anywhere in the runner's poll cycle. The 1-minute load average is recorded
beside each trial: the machine is shared, and a loaded machine starts processes late.

    python -m bench.prefect_start [--trials 5] [--polls 1,10]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import yaml

from bench.render import RESULTS, machine, machine_line, table, write_json
from flows.cli import RUNNER_POLL_S

REPO = Path(__file__).resolve().parent.parent
DEPLOYMENT = "xbl-baseline/baseline"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def start_server(home: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    api = f"http://127.0.0.1:{port}/api"
    wait_for(lambda: _healthy(api), 300, "the Prefect server")
    return server, api


def _healthy(api: str) -> bool:
    try:
        return requests.get(f"{api}/health", timeout=2).ok
    except requests.RequestException:
        return False


def make_project(root: Path) -> Path:
    """params.yaml with the round's schedule far away: no scheduled run competes for the slot."""
    root.mkdir(parents=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["schedule"] = {"cron": "0 0 1 1 *", "interval_s": None}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


def start_serve(project: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--project", str(project), "serve"],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(process: subprocess.Popen, grace_s: float = 15) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(grace_s)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def one_trial(client, deployment_id) -> dict:
    """Create a run; wait until it has ended; its created → RUNNING seconds, by the server."""
    load = os.getloadavg()[0]
    run = client.create_flow_run_from_deployment(
        deployment_id, parameters={"params_file": "bench-no-such-file.yaml"}
    )

    def ended():
        state = client.read_flow_run(run.id).state
        return state if state is not None and state.is_final() else None

    final = wait_for(ended, 120, f"flow run {run.id} to end", poll=0.2)
    states = client.read_flow_run_states(run.id)
    running = [s for s in states if s.type.value == "RUNNING"]
    if not running:
        raise RuntimeError(f"flow run {run.id} ended {final.name} without running")
    created = client.read_flow_run(run.id).created
    return {
        "seconds": (running[0].timestamp - created).total_seconds(),
        "load_1min": round(load, 2),
        "final": final.name,
    }


def measure(api: str, project: Path, poll_s: float, trials: int, logs: Path) -> list[dict]:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(logs / "client")}
    env["PREFECT_RUNNER_POLL_FREQUENCY"] = f"{poll_s:g}"
    serve = start_serve(project, env, logs / f"serve-{poll_s:g}.log")
    try:
        with (
            temporary_settings(updates={PREFECT_API_URL: api}),
            get_client(sync_client=True) as client,
        ):
            deployment = wait_for(
                lambda: _deployment(client), 300, "xbl serve to register its deployments"
            )
            time.sleep(poll_s + 2)  # the runner is polling: its first poll is behind it
            results = []
            for i in range(trials):
                time.sleep(random.uniform(0, 2))
                results.append({"trial": i + 1, "poll_s": poll_s, **one_trial(client, deployment)})
                print(results[-1], flush=True)
            return results
    finally:
        stop(serve)


def _deployment(client):
    from prefect.exceptions import ObjectNotFound

    try:
        return client.read_deployment_by_name(DEPLOYMENT).id
    except ObjectNotFound:
        return None


def import_seconds(module: str, repeats: int = 3) -> dict:
    """What a served run's process pays before RUNNING: Prefect spawns it, and it imports the
    flow's module (for the baseline: torch, MLflow, Captum through the steps) to unpickle the
    flow. Median of `repeats` fresh interpreters, with `prefect` alone for contrast."""
    found = {}
    for name in (module, "prefect.flow_engine"):
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, check=True)
            times.append(time.perf_counter() - began)
        found[name] = round(statistics.median(times), 2)
    return {**found, "load_1min": round(os.getloadavg()[0], 2)}


def page(result: dict) -> str:
    lines = [
        "# Prefect: a triggered run's start under `xbl serve`",
        "",
        f"{machine_line(result['machine'])}; Prefect {result['prefect']}",
        "",
        "A run of the `baseline` deployment created as the webhook and the UI create one; "
        "seconds from its creation to RUNNING, by the server's clocks (`python -m "
        "bench.prefect_start`). The 1-minute load average is the machine's at each creation "
        "(2 cores, shared).",
        "",
    ]
    rows = [
        [
            f"{poll:g} s" + (" (xbl serve)" if poll == RUNNER_POLL_S else " (Prefect default)"),
            f"{summary['median']:.2f}",
            f"{summary['min']:.2f}–{summary['max']:.2f}",
            ", ".join(f"{t['seconds']:.2f}" for t in summary["trials"]),
            ", ".join(f"{t['load_1min']:.2f}" for t in summary["trials"]),
        ]
        for poll, summary in ((float(k), v) for k, v in result["by_poll"].items())
    ]
    lines += table(["runner poll", "median s", "range s", "trials s", "load (1 min)"], rows)
    imports = result["imports"]
    lines += [
        "",
        "Before RUNNING, the run's new process imports the flow's module: "
        f"`import flows.baseline` takes {imports['flows.baseline']:.2f} s in a fresh "
        f"interpreter, `import prefect.flow_engine` alone {imports['prefect.flow_engine']:.2f} s "
        f"(medians of 3, load {imports['load_1min']:.2f}). The runner's poll adds 0 to one "
        "interval on top.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=5, help="runs per poll interval")
    parser.add_argument(
        "--polls",
        default=f"{RUNNER_POLL_S},10",
        help="the runner poll intervals to study, in seconds, comma-separated",
    )
    args = parser.parse_args()
    import prefect

    with tempfile.TemporaryDirectory(prefix="xbl-prefect-start-") as tmp:
        logs = Path(tmp)
        server, api = start_server(logs / "server-home", logs / "server.log")
        try:
            project = make_project(logs / "project")
            by_poll = {}
            for poll in (float(p) for p in args.polls.split(",")):
                trials = measure(api, project, poll, args.trials, logs)
                seconds = [t["seconds"] for t in trials]
                by_poll[f"{poll:g}"] = {
                    "median": statistics.median(seconds),
                    "min": min(seconds),
                    "max": max(seconds),
                    "trials": trials,
                }
        finally:
            stop(server)
    result = {
        "machine": machine(),
        "prefect": prefect.__version__,
        "by_poll": by_poll,
        "imports": import_seconds("flows.baseline"),
    }
    path = write_json(RESULTS / "prefect-start.json", result)
    path.with_suffix(".md").write_text(page(result))
    print(page(result))


if __name__ == "__main__":
    main()
