"""`xbl`: the command line. Each command is a thin call into a flow or a service script."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from services import lock
from services import offline as _offline  # noqa: F401
from xbl.config import FEEDBACK_METHODS, QUERY_STRATEGIES, WaitConfig
from xbl.errors import ConfigError, XblError

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
DEMOS = REPO / "demos"  # <name>.yaml: a demo's settings; <name>/: its project, made on first use
# Commands import xbl (torch, Captum) only when they need it: `xbl labelstudio status` or the
# webhook receiver should not pay seconds for a model they never load.


def _table(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for row in rows for k in row))
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    lines = ["  ".join(c.ljust(widths[c]) for c in cols)]
    lines += ["  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def _mlflow_hint(project: Path) -> str:
    from services.tracking import tracking_uri

    uri = tracking_uri(project)
    # the venv's own mlflow (not on PATH unless the venv is activated)
    beside = Path(sys.executable).parent / "mlflow"
    mlflow = str(beside) if beside.is_file() else shutil.which("mlflow") or "mlflow"
    return (
        f"Open them with:  {mlflow} ui --backend-store-uri {uri}  (then http://127.0.0.1:5000)"
        "\n  or `xbl server start` for the MLflow and Prefect UIs together"
    )


def _checked_project(args) -> Path:
    """The project folder, its settings checked before any server or flow starts (the flow
    reads them again for its run: a bad key should cost a second, not a Prefect start-up)."""
    from xbl.config import load_config

    project = Path(args.project).resolve()
    load_config(project / args.params)
    return project


def cmd_baseline(args) -> int:
    from flows.baseline import baseline_flow

    project = _checked_project(args)
    result = baseline_flow(str(project), args.params)
    print("\n" + _table(result["table"]))
    m = result["baseline"]["metrics"]
    print(
        f"\nconfounded validation accuracy {m['val_accuracy']:.3f}  vs  "
        f"decoy-randomized test accuracy {m['test_accuracy']:.3f}: "
        f"the gap is the shortcut."
    )
    print(f"data version {result['data_version']}; MLflow run {result['baseline']['run_id']}")
    print(_mlflow_hint(project))
    return 0


def cmd_round(args) -> int:
    """One feedback round; `demo` first makes sure the local Label Studio is up."""
    from flows.loop import ROUND_SETTINGS, feedback_round_flow, round_config

    if getattr(args, "dataset", None):
        args.project = str(demo_project(args.dataset))
    # the options (`round`'s; `demo` has none) under the flow's parameter names, checked with
    # the file before any server or flow starts, as _checked_project does
    given = {name: getattr(args, name, None) for name in ROUND_SETTINGS}
    given = {name: value for name, value in given.items() if value is not None}
    project = Path(args.project).resolve()
    round_config(project / args.params, **given)
    # a round already running here: one line naming it, before Prefect starts (the flow's own
    # lock stays the guard; this only spares the user the failed flow's traceback)
    lock.check_free(project)
    local_server = args.command == "demo" and not os.environ.get("LABEL_STUDIO_URL")
    if local_server and subprocess.call(["bash", str(INFRA / "labelstudio.sh"), "start"]) != 0:
        return 1
    result = feedback_round_flow(str(project), args.params, **given)
    if result["status"] == "waiting":
        print(
            f"round {result['round']}: {result['annotated']}/{result['total']} "
            f"{result['what']} done; the next run carries on"
        )
        return 0
    print(
        f"\nround {result['round']}: queries chosen by {result['query_model']['name']}; "
        "baseline, champion and candidate, read back from MLflow\n"
    )
    print(_table(result["table"]))
    verdict = "candidate promoted" if result["promotion"]["promoted"] else "champion kept"
    print(f"\npromotion: {verdict} ({result['promotion']['reason']})")
    print(f"data version {result['data_version']}, feedback masks {result['feedback_version']}")
    print(f"Annotated tasks in Label Studio: {result['labelstudio_url']}")
    print(_mlflow_hint(project))
    return 0


def demo_project(name: str) -> Path:
    """demos/<name>/, a project of its own: the repository's params.yaml with the sections in
    demos/<name>.yaml replaced key by key, the data stage, and the code it depends on (linked,
    so the demo always runs this checkout's code)."""
    import yaml

    profile = DEMOS / f"{name}.yaml"
    if not profile.is_file():
        known = sorted(p.stem for p in DEMOS.glob("*.yaml"))
        raise ConfigError(f"no demo named {name!r}; available: {', '.join(known)}")
    root = DEMOS / name
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in yaml.safe_load(profile.read_text()).items():
        params.setdefault(section, {}).update(values)
    root.mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(
        f"# made from params.yaml and demos/{profile.name}: edit those, not this\n"
        + yaml.safe_dump(params, sort_keys=False)
    )
    for name_ in ("dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name_, root / name_)
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "data" / "raw" / "README.md").write_text("the built-in dataset needs no raw data\n")
    if not (root / "xbl").exists():
        (root / "xbl").symlink_to(os.path.relpath(REPO / "xbl", root), target_is_directory=True)
    if not (root / ".git").exists():
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    return root


def cmd_annotate(args) -> int:
    """The simulated annotator answers a round (the newest by default) through the API, as a
    person would; it needs the prepared dataset for the relevance masks."""
    from services import labelstudio as ls
    from xbl.config import load_config, project_title
    from xbl.data.prepared import PreparedData
    from xbl.labelstudio.oracle import Oracle, relevance_lookup

    project = Path(args.project).resolve()
    cfg = load_config(project / args.params)
    title = project_title(cfg)
    client = ls.connect()
    pushed = ls.pushed_rounds(client, title)
    if not pushed.rounds:
        print(
            f"xbl annotate: no round pushed to Label Studio project {title!r} yet", file=sys.stderr
        )
        return 2
    n = args.round or max(pushed.rounds)
    settings = cfg.labelstudio
    oracle = Oracle(
        relevance_lookup(PreparedData.load(project / cfg.data.out)),
        settings.oracle_overlap,
        settings.oracle_scope,
        settings.oracle_time_model(),
    )
    made = ls.answer_open_tasks(client, pushed.project_id, n, oracle.annotate)
    print(f"oracle annotated {made} task(s) of round {n}")
    reviewed = _oracle_reviews(client, title, n, oracle)
    if reviewed:
        print(f"oracle reviewed {reviewed} carried mask(s) of round {n}")
    return 0


def _oracle_reviews(client, title: str, n: int, oracle) -> int:
    """A cluster round's open review tasks, answered by the simulated reviewer."""
    from services import labelstudio as ls

    review = ls.pushed_rounds(client, ls.review_title(title)).project_id
    return 0 if review is None else ls.answer_open_tasks(client, review, n, oracle.review)


def cmd_data_checkout(args) -> int:
    from services.checkout import restore_run_data

    restored = restore_run_data(Path(args.project).resolve(), args.run_id)
    print(f"restored data version {restored.version} used by run {args.run_id} (dvc.lock updated)")
    if restored.masks is not None:
        print("\n".join(restored.masks.lines()))
    return 0


def cmd_report(args) -> int:
    from flows.report import report_flow

    project = _checked_project(args)
    page = report_flow(args.run_id, str(project), args.params)
    print(f"round report: {page} (also logged to run {args.run_id} under report/)")
    return 0


def cmd_status(args) -> int:
    """Where the project stands, in a fraction of a second: no torch, no Prefect, one short
    try per service (services/status.py)."""
    from services.status import project_status

    project = Path(args.project).resolve()
    if not (project / args.params).is_file():
        print(f"xbl status: {project} has no {args.params}: not an xbl project", file=sys.stderr)
        return 2
    print("\n".join(status_lines(project_status(project, args.params))))
    return 0


def status_lines(status) -> list[str]:
    """`xbl status`'s lines, one per question: which project, which round, who runs it, how
    far its answers are, the champion, the last decision."""
    tracked = status.tracked
    lines = [f"project   {status.project} (experiment {status.experiment!r})"]
    lines.append(f"round     {_round_line(status)}")
    lines.append(f"running   {status.running or 'no (the round lock is free)'}")
    if status.labelstudio is not None:
        lines.append(f"answers   {_answers_line(status.labelstudio)}")
    lines.append(f"champion  {_champion_line(tracked)}")
    decision = tracked.decision
    if decision is not None:
        verdict = "promoted" if decision.promoted else "champion kept"
        rnd = f"round {decision.round}, " if decision.round is not None else ""
        lines.append(f"decision  {verdict} ({rnd}run {decision.run_id}): {decision.reason}")
    lines.append(f"mlflow    {tracked.error or tracked.uri}")
    return lines


def _round_line(status) -> str:
    if status.tracked.error:
        return "unknown: the tracking store, which says which rounds are finished, is unreachable"
    if status.open_round is not None:
        return f"{status.open_round} open (queries in data/rounds/round-{status.open_round})"
    done = sorted(status.tracked.completed)
    if not done:
        return "none yet; the first run opens round 1"
    finished = ", ".join(map(str, done))
    return f"none open; round(s) {finished} finished, the next run opens {done[-1] + 1}"


def _answers_line(progress) -> str:
    if progress.error:
        return progress.error
    if progress.project_id is None:
        return f"the round is not in Label Studio yet ({progress.url})"
    where = f"{progress.url}/projects/{progress.project_id}/data"
    return f"{progress.annotated}/{progress.total} tasks answered ({where})"


def _champion_line(tracked) -> str:
    if tracked.error:
        return "unknown"
    model = tracked.champion or tracked.baseline
    if model is None:
        return "no baseline yet (`xbl baseline` or a first round trains one)"
    metrics = ", ".join(f"{k.replace('_', ' ')} {v:.3f}" for k, v in model.metrics.items())
    who = f"version {model.version}, run {model.run_id} ({model.run_name})"
    standing_in = "" if tracked.champion else "none promoted yet; the baseline stands in: "
    return f"{standing_in}{who}" + (f": {metrics}" if metrics else "")


def package_version() -> str:
    """The installed package's version; pyproject.toml's in a checkout that is not installed."""
    from importlib import metadata

    try:
        return metadata.version("xbl")
    except metadata.PackageNotFoundError:
        import tomllib

        return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]


# `xbl serve` on SIGTERM or Ctrl-C: the Prefect runner and its flow runs get this long to
# stop on their own (the runner cancels its run and pauses the schedules, over the API), then
# they are killed, so the command ends before a supervisor's kill (docker stop and Kubernetes
# wait 10 s) even when the Prefect server is gone and every API call would hang in retries
SERVE_STOP_S = 7.0
_SERVE_RUNNER = "XBL_SERVE_RUNNER"  # set in the runner's own process


def cmd_serve(args) -> int:
    """Serve prefect.yaml's deployments from this machine against a real Prefect server: the
    feedback round on the schedule in params.yaml, the baseline on demand. The runner runs in
    a process group of its own, which SIGTERM or Ctrl-C ends within SERVE_STOP_S; a round it
    interrupts is resumed by the next run."""
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "xbl serve: set PREFECT_API_URL to a running Prefect server "
            "(`xbl server start` starts one on 127.0.0.1:4200)",
            file=sys.stderr,
        )
        return 2
    project = Path(args.project).resolve()
    if os.environ.get(_SERVE_RUNNER):
        return _serve_deployments(project, args.params)
    return _supervise_runner(project, args.params)


def _serve_deployments(project: Path, params_file: str) -> int:
    from prefect import serve

    # one run at a time: two runs of the same round would race for its tasks, and a baseline
    # run beside a round would compete for the same CPU or GPU
    serve(*served_deployments(project, params_file), limit=1)
    return 0


def served_deployments(project: Path, params_file: str) -> list:
    """The round on params.yaml's schedule, and the baseline on demand. Their parameters are
    the flows' own: a custom run in the Prefect UI varies a setting for that run (the feedback
    method, λ, the query strategy, k, the wait mode; the baseline's model, lr and epochs)."""
    from flows.baseline import baseline_flow
    from flows.loop import feedback_round_flow
    from xbl.config import load_config

    schedule = load_config(project / params_file).schedule
    timing = {"interval": schedule.interval_s} if schedule.interval_s else {"cron": schedule.cron}
    where = {"project": str(project), "params_file": params_file}
    rounds = feedback_round_flow.to_deployment(
        name="scheduled", **timing, parameters={**where, "wait_mode": "resume"}
    )
    return [rounds, baseline_flow.to_deployment(name="baseline", parameters=where)]


def _supervise_runner(project: Path, params_file: str) -> int:
    """Run `_serve_deployments` in a child process group until it ends or a stop is asked."""
    import signal
    import threading

    from xbl.config import load_config

    load_config(project / params_file)  # a bad setting: one line here, not in the child
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    command = [sys.executable, "-m", "flows.cli", "--project", str(project)]
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    runner = subprocess.Popen(
        [*command, "--params", params_file, "serve"],
        env={**os.environ, **runner_env(), _SERVE_RUNNER: "1", "PYTHONPATH": path},
        start_new_session=True,  # its flow runs join its group, and leave with it
    )
    while runner.poll() is None and not stop.wait(0.5):
        pass
    if not stop.is_set():
        return runner.returncode
    print("xbl serve: stopping", file=sys.stderr)
    _end_process_group(runner, SERVE_STOP_S)
    return 0


# Seconds between the runner's polls for runs to start. Prefect's default, 10, made a run
# created in the UI, by the webhook or by `prefect deployment run` wait 0-10 s before starting
# (bench/prefect_start.py measures it); a poll is one light API call.
RUNNER_POLL_S = 1


def runner_env() -> dict[str, str]:
    """What `xbl serve` sets for its runner, unless the environment sets it already."""
    key = "PREFECT_RUNNER_POLL_FREQUENCY"
    return {key: os.environ.get(key, str(RUNNER_POLL_S))}


def _end_process_group(leader: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the group; then, once the leader has exited or `grace_s` has passed,
    SIGKILL to whatever is left of it: nothing the runner started outlives `xbl serve`."""
    import signal
    from contextlib import suppress

    with suppress(ProcessLookupError):  # the group may have ended by itself
        os.killpg(leader.pid, signal.SIGTERM)
    try:
        leader.wait(grace_s)
    except subprocess.TimeoutExpired:
        print(
            f"xbl serve: the runner did not stop within {grace_s:.0f} s (is the Prefect server "
            "gone?); killed it and its flow runs",
            file=sys.stderr,
        )
    with suppress(ProcessLookupError):  # no one left: the runner stopped its flow runs
        os.killpg(leader.pid, signal.SIGKILL)
    leader.wait()


def params_cron(project: str = ".", params_file: str = "params.yaml") -> dict[str, str]:
    """{"cron": schedule.cron of params.yaml}, the cron's one home. prefect.yaml's build step
    (`id: schedule`) calls this, so `prefect deploy` schedules the round on it as `xbl serve`
    does (schedule.interval_s, when set, is for `xbl serve` only)."""
    from xbl.config import load_config

    cron = load_config(Path(project) / params_file).schedule.cron
    if cron is None:
        raise ConfigError("schedule.cron is unset: prefect.yaml's deployment runs on it")
    return {"cron": cron}


def cmd_server(args) -> int:
    env = {**os.environ, "XBL_PROJECT": str(Path(args.project).resolve())}
    return subprocess.call(["bash", str(INFRA / "services.sh"), args.action], env=env)


def cmd_labelstudio(args) -> int:
    return subprocess.call(["bash", str(INFRA / "labelstudio.sh"), args.action])


def cmd_team(args) -> int:
    """The team topology of infra/compose.yaml, started natively (infra/team.py)."""
    from infra import team

    project = Path(args.project).resolve()
    home = Path(args.home or os.environ.get("XBL_TEAM_HOME") or project / ".xbl-team").resolve()
    if args.action == "down":
        print("team: stopped, data deleted" if team.down(home) else f"team: none in {home}")
        return 0
    if args.action == "status":
        running = team.Team.load(home)
        if running is None:
            print(f"team: not running (no state in {home})")
            return 3
        found = running.status()
        for name, (ok, where) in found.items():
            print(f"team: {name:<11} {'running' if ok else 'DOWN':<8} {where}")
        return 0 if all(ok for ok, _ in found.values()) else 3
    deploy = not args.no_deploy and (project / "prefect.yaml").is_file()
    try:
        started = team.up(home, project, deploy=deploy)
        if args.dvc_remote:
            started.use_dvc_remote(project)
            print(
                f"team: DVC remote 'team' (s3://dvc) is the default in {project}/.dvc/config.local"
            )
    except team.TeamError as err:
        print(f"xbl team up: {err}", file=sys.stderr)
        return 1
    print(f"team: `source {home / team.CLIENT_FILE}` points a shell at it (secrets inside, 0600)")
    print("team: `xbl team down` stops it and deletes its data")
    return 0


DEFAULT_DEPLOYMENT = "xbl-feedback-round/scheduled"


def deployment_starter(deployment: str):
    """(project, round, attempt) -> the id of a new run of the Prefect deployment; returns at
    once. Attempt 0 is the round's first run, 1, 2, ... the runs after one that failed."""

    def start(project_id: int, round_: int, attempt: int = 0) -> str:
        from prefect.deployments import run_deployment

        # the server refuses a second run for the same round (and attempt) as well
        key = f"xbl-webhook:{project_id}:{round_}" + (f":retry-{attempt}" if attempt else "")
        run = run_deployment(
            name=deployment,
            timeout=0,
            tags=["xbl-webhook", f"round-{round_}"],
            idempotency_key=key,
        )
        return str(run.id)

    return start


def flow_run_failed(flow_run_id: str) -> bool:
    """Whether a Prefect flow run ended FAILED or CRASHED (a cancelled run stays cancelled)."""
    from uuid import UUID

    from prefect import get_client
    from prefect.client.schemas.objects import StateType

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(UUID(flow_run_id)).state
    return state is not None and state.type in (StateType.FAILED, StateType.CRASHED)


def _webhook_secret() -> str:
    from webhook.auth import MIN_SECRET_LENGTH, SECRET_ENV

    secret = os.environ.get(SECRET_ENV, "")
    if len(secret) < MIN_SECRET_LENGTH:
        sys.exit(
            f"xbl webhook: set {SECRET_ENV} to a shared secret of at least "
            f"{MIN_SECRET_LENGTH} characters, e.g. "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return secret


def receiver_settings(project: Path, params_file: str):
    """params.yaml's `webhook` section (its defaults without a params.yaml)."""
    from xbl.config import WebhookConfig, load_config

    params = project / params_file
    return load_config(params).webhook if params.is_file() else WebhookConfig()


def receiver_target_fraction(project: Path, params_file: str) -> float:
    """XBL_WEBHOOK_TARGET_FRACTION, else the flow's own wait.target_fraction, so the receiver
    never starts a run the flow would find short."""
    from xbl.config import load_config

    if os.environ.get("XBL_WEBHOOK_TARGET_FRACTION"):
        return float(os.environ["XBL_WEBHOOK_TARGET_FRACTION"])
    params = project / params_file
    return load_config(params).wait.target_fraction if params.is_file() else 1.0


def _webhook_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbl webhook",
        description="Receive Label Studio's annotation webhooks and start "
        "the round's deployment once enough of the round is annotated.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    parser.add_argument("--port", type=int, default=8787, help="port to listen on (default: 8787)")
    parser.add_argument(
        "--state-dir",
        default=".xbl-webhook",
        help="where the deliveries already seen are kept (default: .xbl-webhook)",
    )
    parser.add_argument(
        "--deployment",
        default=os.environ.get("XBL_WEBHOOK_DEPLOYMENT", DEFAULT_DEPLOYMENT),
        help="the Prefect deployment a complete round starts (default: "
        f"XBL_WEBHOOK_DEPLOYMENT, else {DEFAULT_DEPLOYMENT})",
    )
    parser.add_argument(
        "--target-fraction",
        type=float,
        default=None,
        help="default: XBL_WEBHOOK_TARGET_FRACTION, else wait.target_fraction "
        "of params.yaml (the flow's own target)",
    )
    return parser


def _register_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xbl webhook register", description="Register the receiver as a Label Studio webhook."
    )
    parser.add_argument(
        "--url", required=True, help="where Label Studio reaches the receiver, …/hooks"
    )
    parser.add_argument("--project-id", type=int, default=None, help="default: every project")
    return parser


def cmd_webhook(args) -> int:
    """The Label Studio webhook receiver (`xbl webhook [--port N]`), or its registration
    (`xbl webhook register --url ...`)."""
    from services import labelstudio as ls
    from webhook import server
    from webhook.receiver import WebhookReceiver
    from webhook.store import DeliveryStore

    project = Path(args.project).resolve()
    if args.webhook_args[:1] == ["register"]:
        options = _register_parser().parse_args(args.webhook_args[1:])
        hook_id = ls.register_webhook(
            ls.connect(), options.project_id, options.url, _webhook_secret()
        )
        scope = (
            f"project {options.project_id}"
            if options.project_id is not None
            else "the organisation"
        )
        print(f"webhook {hook_id}: {scope} -> {options.url}")
        return 0
    options = _webhook_parser().parse_args(args.webhook_args)
    if options.target_fraction is None:  # read only now: `--help` works with any params.yaml
        options.target_fraction = receiver_target_fraction(project, args.params)
    settings = receiver_settings(project, args.params)
    receiver = WebhookReceiver(
        _webhook_secret(),
        DeliveryStore(options.state_dir),
        ls.progress_checker(),
        deployment_starter(options.deployment),
        options.target_fraction,
        auth=settings.auth,
        window_s=settings.signature_window_s,
        retention_s=settings.retention_days * 86400,
        run_failed=flow_run_failed,
    )
    return server.run_receiver(
        receiver,
        options.host,
        options.port,
        f"deployment {options.deployment}, {settings.auth} auth",
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command and option of `xbl`; building it runs nothing and imports no flow."""
    parser = argparse.ArgumentParser(prog="xbl", description=__doc__)
    parser.add_argument("--version", action="version", version=f"xbl {package_version()}")
    parser.add_argument(
        "--project",
        default=os.environ.get("XBL_PROJECT", "."),
        help="project folder (params.yaml, dvc.yaml); default: XBL_PROJECT, else the current "
        "folder",
    )
    parser.add_argument(
        "--params",
        default="params.yaml",
        help="the settings file, relative to the project (default: params.yaml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _round_commands(sub)
    status = sub.add_parser(
        "status",
        help="the open round, its answers, the champion and the last decision "
        "(no torch; under a second)",
    )
    status.set_defaults(func=cmd_status)
    _data_commands(sub)
    _service_commands(sub)
    return parser


def _round_commands(sub) -> None:
    """The loop's own steps: baseline, a round (or the demo's), the oracle, the report."""
    sub.add_parser("baseline", help="prepare data, train and log the baseline").set_defaults(
        func=cmd_baseline
    )
    demo = sub.add_parser(
        "demo", help="start Label Studio and run one unattended round with the oracle"
    )
    demo.add_argument(
        "--dataset",
        default=None,
        choices=sorted(p.stem for p in DEMOS.glob("*.yaml")),
        help="run the demo in demos/<DATASET>/ with the settings of demos/<DATASET>.yaml "
        "(decoy-lesions: RGB lesions with a ResNet-18; cluster: one cluster round on "
        "decoy-digits, with review tasks); "
        "default: this project",
    )
    round_ = sub.add_parser(
        "round", help="run one feedback round against the configured Label Studio"
    )
    round_.add_argument(
        "--wait-mode",
        choices=_setting_choices(WaitConfig, "mode"),
        default=None,
        help="block: wait for the annotators in this run; resume: push the queries and end, a "
        "later run carries on (default: wait.mode of params.yaml)",
    )
    _variant_options(round_)
    for command in (demo, round_):
        command.set_defaults(func=cmd_round)
    annotate = sub.add_parser("annotate", help="answer the open round with the simulated annotator")
    annotate.add_argument(
        "--oracle",
        action="store_true",
        required=True,
        help="the simulated annotator (the only automatic one)",
    )
    annotate.add_argument(
        "--round", type=int, default=None, help="the round to answer (default: the newest pushed)"
    )
    annotate.set_defaults(func=cmd_annotate)
    report = sub.add_parser("report", help="draw a finished round's report again")
    report.add_argument("run_id", help="the round's feedback run (an MLflow run id)")
    report.set_defaults(func=cmd_report)


def _variant_options(round_) -> None:
    """The settings a person varies between rounds, for this run only (params.yaml unchanged;
    MLflow records the values in use among the feedback run's params)."""
    round_.add_argument(
        "--method",
        dest="feedback_method",
        choices=FEEDBACK_METHODS,
        default=None,
        help="the feedback method (default: feedback.method of params.yaml)",
    )
    round_.add_argument(
        "--lambda",
        dest="feedback_lambda",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="the feedback term's weight for the method in use (default: its entry in "
        "feedback.lambda, else the method's own default)",
    )
    round_.add_argument(
        "--strategy",
        dest="query_strategy",
        choices=QUERY_STRATEGIES,
        default=None,
        help="how the round's queries are chosen (default: query.strategy of params.yaml)",
    )
    round_.add_argument(
        "--k",
        dest="query_k",
        type=int,
        default=None,
        metavar="K",
        help="images asked in the round (default: query.k of params.yaml)",
    )


def _setting_choices(section, key: str) -> tuple[str, ...]:
    """The values params.yaml allows for a key, from the typed config (their one home)."""
    return next(f for f in fields(section) if f.name == key).metadata["choices"]


def _data_commands(sub) -> None:
    data = sub.add_parser("data", help="data versions").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    checkout = data.add_parser("checkout", help="restore the exact data an MLflow run used")
    checkout.add_argument("run_id", help="the MLflow run whose data (and masks) to restore")
    checkout.set_defaults(func=cmd_data_checkout)


def _service_commands(sub) -> None:
    """The servers around the loop: Prefect deployments, the UIs, Label Studio, a team's
    stack, the webhook receiver."""
    sub.add_parser(
        "serve",
        help="serve the feedback round (on the schedule in params.yaml) and "
        "the baseline as Prefect deployments (needs PREFECT_API_URL)",
    ).set_defaults(func=cmd_serve)
    server = sub.add_parser("server", help="local Prefect and MLflow servers for their UIs")
    server.add_argument(
        "action", choices=["start", "stop", "status"], help="start, stop or check both servers"
    )
    server.set_defaults(func=cmd_server)
    ls = sub.add_parser("labelstudio", help="the local Label Studio server")
    ls.add_argument(
        "action",
        choices=["install", "start", "stop", "status"],
        help="install it (a venv of its own), start, stop or check it",
    )
    ls.set_defaults(func=cmd_labelstudio)
    team = sub.add_parser(
        "team",
        help="the team topology without Docker: PostgreSQL, S3 (moto), MLflow, Label Studio, "
        "Prefect server and worker on 127.0.0.1 (throwaway)",
    )
    team.add_argument(
        "action",
        choices=["up", "down", "status"],
        help="up: start it; down: stop it and delete its data; status: check each service",
    )
    team.add_argument("--home", default=None, help="state folder (default: <project>/.xbl-team)")
    team.add_argument(
        "--no-deploy", action="store_true", help="up: do not register prefect.yaml's deployments"
    )
    team.add_argument(
        "--dvc-remote",
        action="store_true",
        help="up: make the bucket s3://dvc the project's default DVC remote (.dvc/config.local)",
    )
    team.set_defaults(func=cmd_team)
    hook = sub.add_parser(
        "webhook",
        add_help=False,
        help="receive Label Studio's annotation webhooks and start the round's "
        "deployment (`xbl webhook --help`)",
    )
    hook.add_argument(
        "webhook_args",
        nargs=argparse.REMAINDER,
        help="the receiver's options (`xbl webhook --help`), or `register --url URL`",
    )
    hook.set_defaults(func=cmd_webhook)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad setting is one line naming the key, not a traceback."""
    try:
        return _dispatch(argv)
    except XblError as err:
        print(f"xbl: {err}", file=sys.stderr)
        return 2


def _dispatch(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "webhook" in argv:  # everything after it is the receiver's own options, --help included
        cut = argv.index("webhook") + 1
        args = build_parser().parse_args(argv[:cut])
        args.webhook_args = argv[cut:]
    else:
        args = build_parser().parse_args(argv)
    return args.func(args)


def console() -> int:
    """The `xbl` command. Prefect keeps its runs where `make`, `xbl server start` and
    infra/services.sh keep them, the checkout's .prefect, unless PREFECT_HOME says otherwise:
    a bare `xbl round` then shows in the UI that `xbl server start` serves."""
    os.environ.setdefault("PREFECT_HOME", str(REPO / ".prefect"))
    return main()


if __name__ == "__main__":
    sys.exit(console())
