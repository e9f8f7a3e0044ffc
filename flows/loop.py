"""A feedback round: prepare → query model → select → push → wait → masks → retrain → judge.
A cluster round (`query.strategy: cluster`) adds, after the wait: carry each answer to its
cluster's members → push the doubtful masks to review → wait for the reviews.

The baseline is trained once per data version; each round's queries are chosen, and their
saliency drawn, by the current model (the champion by default), so annotators see what the
model still gets wrong. Each retraining learns from every round's answers so far, and the
candidate is judged against the champion.

A round may span several runs (`wait.mode: resume`): a run that pushed queries ends, and a
later run (scheduled or triggered) finds the open round in Label Studio, collects what is
annotated and retrains once the target is met. Which step is done is read from the services;
within a run, each step's result is handed to the next.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.context import ConcurrencyContext
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run
from prefect.settings import get_current_settings
from prefect.variables import Variable

from flows.baseline import baseline_fingerprint, run_dir
from flows.report import column_checkpoints, report_flow
from services import faults, lock, tracking
from tasks.annotation import (
    collect_feedback_masks,
    oracle_answers,
    push_queries,
    recollect_finished_rounds,
    round_progress,
    wait_for_annotations,
)
from tasks.data import DataRef, prepare_data, version_feedback
from tasks.links import link_labelstudio, link_mlflow_runs
from tasks.propagation import (
    collect_cluster_feedback,
    is_cluster_round,
    oracle_reviews,
    propagate_answers,
    push_review_tasks,
)
from tasks.queries import select_round_queries
from tasks.report import round_report
from tasks.rounds import (
    RoundState,
    discard_unpushed,
    model_of_run,
    queries_from_labelstudio,
    query_model,
    read_round_state,
    restore_checkpoint,
    resume_round,
)
from tasks.runs import (
    close_run,
    compare_models,
    current_model,
    log_model_run,
    log_probe_saliency,
    log_round_annotation,
    log_round_clusters,
    open_parent_run,
    promote,
    set_model_alias,
    start_model_run,
    tag_run,
)
from tasks.training import evaluate_checkpoint, train_baseline, train_with_feedback
from xbl.config import Config, as_params, load_config, project_title, with_overrides
from xbl.errors import ProjectBusy
from xbl.feedback.schedule import method_lambda
from xbl.labelstudio.results import annotation_target
from xbl.paths import FEEDBACK_ROOT, feedback_dir, feedback_manifest, round_dir, round_name


def crash_point(step: str) -> None:
    """Fault drill: XBL_CRASH_AFTER=baseline|push|wait|retrain kills this process right after
    that step, as a power cut would, so tests can check that the next run loses nothing (the
    mid-step points live in the steps themselves: services/faults.py)."""
    faults.crash_point(step)


def earlier_feedback(project: Path, completed: tuple[int, ...]) -> dict[int, str]:
    """The masks of the completed rounds that were collected, oldest first, by round."""
    manifests = {k: feedback_manifest(project, k) for k in sorted(completed)}
    return {k: str(m) for k, m in manifests.items() if m.is_file()}


@dataclass
class _Round:
    """What every step of round `n` needs to know."""

    root: Path
    cfg: Config
    n: int
    title: str
    data: DataRef
    holder: lock.Holder  # this run, as its round lock records it

    @property
    def rounds_dir(self) -> str:
        return str(round_dir(self.root, self.n))


@dataclass
class _Opened:
    """An open round: its queries, the model that chose them, where annotators work."""

    queries: str  # queries.json
    checkpoint: str  # the query model's weights
    query_model: dict  # its MLflow record
    baseline: dict  # this data version's baseline, for the comparison
    parent: str  # the round's parent run
    project_id: int
    project_url: str
    propagation: str | None = None  # a cluster round: propagation.json, once answers are in
    review_project_id: int | None = None


@flow(name="xbl-feedback-round", log_prints=True)
def feedback_round_flow(
    project: str = ".",
    params_file: str = "params.yaml",
    wait_mode: str | None = None,
    feedback_method: str | None = None,
    feedback_lambda: float | None = None,
    query_strategy: str | None = None,
    query_k: int | None = None,
) -> dict:
    """One feedback round. A setting left empty is params.yaml's; one given replaces it for
    this run only, checked as the file's value is.

    Args:
        project: the project folder (params.yaml, dvc.yaml, data/)
        params_file: the settings file, relative to the project
        wait_mode: block (wait for the annotators in this run) or resume (push the queries
            and end; a later run carries on); empty: wait.mode
        feedback_method: rrr, rrr_output, rrr_g, hint, exbl or counterexamples; empty:
            feedback.method
        feedback_lambda: the feedback term's weight λ for the method in use; empty: its
            feedback.lambda entry, else the method's default
        query_strategy: entropy, least_confidence, margin, random, confident_mistakes or
            cluster; empty: query.strategy
        query_k: images asked per round; empty: query.k
    """
    root = Path(project).resolve()
    cfg, given = round_config(
        root / params_file,
        wait_mode=wait_mode,
        feedback_method=feedback_method,
        feedback_lambda=feedback_lambda,
        query_strategy=query_strategy,
        query_k=query_k,
    )
    if given:
        get_run_logger().info("this run replaces settings of %s: %s", params_file, given)
    with round_lock(root, cfg.mlflow.experiment) as holder:
        return _feedback_round(root, cfg, holder, params_file, given)


# a flow parameter (and `xbl round` option) → the setting it replaces for one run
ROUND_SETTINGS = {
    "wait_mode": "wait.mode",
    "feedback_method": "feedback.method",
    "feedback_lambda": "feedback.lambda",
    "query_strategy": "query.strategy",
    "query_k": "query.k",
}


def round_config(settings: Path, **given: object) -> tuple[Config, dict[str, object]]:
    """The settings file's configuration with a round's parameters applied (`given`: flow
    parameter names, None for not given), each checked as the file's value is; and the
    dotted settings they replaced."""
    loaded = load_config(settings)
    dotted = round_overrides(loaded.feedback.method, **given)
    return with_overrides(loaded, dotted), dotted


def round_overrides(file_method: str, **given: object) -> dict[str, object]:
    """The dotted settings a round's parameters replace (those given, not None). λ is the
    entry of the method in use: the one given, else the file's."""
    method = given.get("feedback_method") or file_method
    dotted = {**ROUND_SETTINGS, "feedback_lambda": f"feedback.lambda.{method}"}
    return {dotted[name]: value for name, value in given.items() if value is not None}


def _feedback_round(
    root: Path, cfg: Config, holder: lock.Holder, params_file: str, given: dict
) -> dict:
    title = project_title(cfg)
    data = prepare_data(str(root), cfg.data.out, params_file)
    state = read_round_state(str(root), cfg.mlflow.experiment, title)
    late = sorted(key for key in given if key.startswith("query."))
    if state.open and late:
        get_run_logger().warning(
            "round %d is open: the run that opened it chose its queries; %s apply from the "
            "next round",
            state.number,
            ", ".join(late),
        )
    for run_id in state.finished_from_record:  # the end a crash cut short, from MLflow
        report_flow(run_id, str(root), params_file)
    rnd = _Round(root, cfg, state.number, title, data, holder)
    opened = _resume_round(rnd, state) if state.open else _open_round(rnd, state)
    link_labelstudio(opened.project_url, rnd.n, cfg.mlflow.experiment)
    link_mlflow_runs(str(root), cfg.mlflow.experiment, {"round": opened.parent})
    oracle = cfg.labelstudio
    if oracle.annotator == "oracle":
        oracle_answers(
            opened.project_id,
            rnd.n,
            data.path,
            opened.queries,
            oracle.oracle_overlap,
            oracle.oracle_scope,
            oracle.oracle_time_model(),
        )
    waiting = _await_annotations(rnd, opened.project_id)
    if waiting is None and is_cluster_round(opened.queries):
        waiting = _propagate_and_review(rnd, opened)
    if waiting is not None:
        close_run(str(root), opened.parent)
        return waiting
    crash_point("wait")
    return _retrain_and_promote(rnd, state, opened)


def _resume_round(rnd: _Round, state: RoundState) -> _Opened:
    """The open round's query model from MLflow and its queries from Label Studio."""
    get_run_logger().info("round %d is open in Label Studio: resuming it", rnd.n)
    root, cfg = str(rnd.root), rnd.cfg
    parent = resume_round(
        root, cfg.mlflow.experiment, cfg.mlflow.model_name, rnd.n, state.query_run_id
    )
    chooser = model_of_run(root, state.query_run_id)
    checkpoint = restore_checkpoint(
        root, state.query_run_id, str(run_dir(rnd.root) / "query-model")
    )
    baseline = current_model(root, cfg.mlflow.model_name, "baseline", rnd.data.version) or chooser
    queries = queries_from_labelstudio(state.project_id, rnd.n, rnd.data.path, rnd.rounds_dir)
    return _Opened(
        queries, checkpoint, chooser, baseline, parent, state.project_id, state.project_url
    )


def _open_round(rnd: _Round, state: RoundState) -> _Opened:
    """Select queries with the current model and push them to Label Studio."""
    root, data, cfg = str(rnd.root), rnd.data, rnd.cfg
    discard_unpushed(root, cfg.mlflow.experiment, cfg.mlflow.model_name, rnd.n)
    parent = open_parent_run(root, cfg.mlflow.experiment, round_name(rnd.n), data.version)
    # at once: a later discard_unpushed tells this attempt, alive or dead, by its holder
    tag_run(root, parent, {tracking.HOLDER_TAG: rnd.holder.to_json()})
    baseline, checkpoint = _baseline(rnd, parent)
    chooser = query_model(
        root, cfg.mlflow.experiment, cfg.mlflow.model_name, data.version, cfg.query.model
    )
    if chooser is None or chooser["run_id"] == baseline["run_id"]:
        chooser = baseline
    if chooser is not baseline or checkpoint is None:
        checkpoint = restore_checkpoint(
            root, chooser["run_id"], str(run_dir(rnd.root) / "query-model")
        )
    tag_run(root, parent, {tracking.QUERY_MODEL_TAG: chooser["run_id"]})
    get_run_logger().info(
        "round %d: queries chosen by %s (run %s)", rnd.n, chooser["name"], chooser["run_id"]
    )
    queries = select_round_queries(
        checkpoint, data.path, cfg.query, rnd.n, list(state.queried), rnd.rounds_dir
    )
    pushed = push_queries(queries, rnd.title, chooser["run_id"])
    if cfg.query.strategy == "cluster":
        log_round_clusters(root, parent, str(Path(queries).parent / "clusters.json"))
    crash_point("push")
    return _Opened(
        queries, checkpoint, chooser, baseline, parent, pushed["project_id"], pushed["url"]
    )


def _baseline(rnd: _Round, parent: str) -> tuple[dict, str | None]:
    """This data version's baseline: the one logged before (no checkpoint path: it stays in
    MLflow until needed), or a new one trained and logged under this round's parent."""
    root, cfg = str(rnd.root), rnd.cfg
    settings = {tracking.TRAIN_SETTINGS_TAG: baseline_fingerprint(cfg.train)}
    known = current_model(root, cfg.mlflow.model_name, "baseline", rnd.data.version, settings)
    if known is not None:
        return known, None
    run = start_model_run(
        root, parent, "baseline", rnd.data.version, cfg.mlflow.model_name, settings
    )
    base = train_baseline(rnd.data.path, cfg.train, str(run_dir(rnd.root) / "baseline.pt"), run)
    baseline = log_model_run(
        root,
        parent,
        "baseline",
        as_params(cfg.train),
        base,
        evaluate_checkpoint(base.checkpoint, rnd.data.path),
        rnd.data.version,
        cfg.mlflow.model_name,
        extra_tags=settings,
        run=run,
    )
    log_probe_saliency(root, baseline["run_id"], rnd.data.path, base.checkpoint, 0)
    set_model_alias(root, cfg.mlflow.model_name, "baseline", baseline["model_version"])
    crash_point("baseline")
    return baseline, base.checkpoint


def _await_annotations(rnd: _Round, project_id: int, what: str = "annotations") -> dict | None:
    """`block`: poll until the target is met (or fail clearly). `resume`: None when the target
    is met, else the progress, and this run ends: a later one carries on. `what`: the round's
    answers, or its reviews (in the review project)."""
    if rnd.cfg.wait.mode == "block":
        wait_for_annotations(project_id, rnd.n, rnd.cfg.wait, what)
        return None
    annotated, total = round_progress(project_id, rnd.n)
    if annotated >= annotation_target(total, rnd.cfg.wait.target_fraction):
        return None
    get_run_logger().info(
        "round %d: %d/%d %s done; a later run will carry on", rnd.n, annotated, total, what
    )
    return {
        "round": rnd.n,
        "status": "waiting",
        "annotated": annotated,
        "total": total,
        "what": what,
    }


def _propagate_and_review(rnd: _Round, opened: _Opened) -> dict | None:
    """Carry each cluster answer to its members; the masks in doubt go to review tasks, which
    the round waits for as for its answers. Sets the round's propagation and review project."""
    cfg = rnd.cfg
    opened.propagation = propagate_answers(
        opened.project_id,
        rnd.n,
        rnd.data.path,
        opened.queries,
        opened.checkpoint,
        cfg.query,
        rnd.rounds_dir,
    )
    pushed = push_review_tasks(opened.propagation, rnd.title)
    opened.review_project_id = pushed["project_id"]
    if pushed["created"] + pushed["skipped"] == 0:
        return None  # nothing in doubt: no review to wait for
    if cfg.labelstudio.annotator == "oracle":
        oracle_reviews(
            pushed["project_id"],
            rnd.n,
            rnd.data.path,
            opened.propagation,
            cfg.labelstudio.oracle_overlap,
            cfg.labelstudio.oracle_time_model(),
        )
    return _await_annotations(rnd, pushed["project_id"], "reviews")


def _retrain_and_promote(rnd: _Round, state: RoundState, opened: _Opened) -> dict:
    """Masks → DVC → retrain on every round's feedback → MLflow → promotion → comparison."""
    root, n, cfg = str(rnd.root), rnd.n, rnd.cfg
    out = str(feedback_dir(rnd.root, n))
    if opened.propagation is not None:
        manifest = collect_cluster_feedback(
            opened.project_id, opened.review_project_id, n, opened.queries, opened.propagation, out
        )
    else:
        manifest = collect_feedback_masks(opened.project_id, n, opened.queries, out)
    orphans = {k: _orphan_feedback(rnd, opened.project_id, k) for k in state.orphaned}
    # edits, deletions and late answers of finished rounds reach the masks DVC versions next
    answers = recollect_finished_rounds(
        root, opened.project_id, list(state.completed), rnd.data.path
    )
    feedback_version = version_feedback(root, FEEDBACK_ROOT)
    by_round = {**earlier_feedback(rnd.root, state.completed), **orphans, n: manifest}
    manifests = list(by_round.values())
    tags = {
        tracking.FEEDBACK_VERSION_TAG: feedback_version,
        tracking.ROUND_TAG: str(n),
        tracking.FEEDBACK_ROUNDS_TAG: ",".join(str(k) for k in by_round),
    }
    name = f"feedback-round-{n}"
    run = start_model_run(root, opened.parent, name, rnd.data.version, cfg.mlflow.model_name, tags)
    tuned = train_with_feedback(
        rnd.data.path,
        opened.checkpoint,
        manifests,
        cfg.train,
        cfg.feedback,
        str(run_dir(rnd.root) / "feedback.pt"),
        rnd.data.version,
        run=run,
    )
    feedback = log_model_run(
        root,
        opened.parent,
        name,
        _feedback_params(cfg),
        tuned,
        evaluate_checkpoint(tuned.checkpoint, rnd.data.path),
        rnd.data.version,
        cfg.mlflow.model_name,
        extra_tags=tags,
        extra_files=(str(rnd.root / f"{FEEDBACK_ROOT}.dvc"),),
        run=run,
    )
    log_probe_saliency(root, feedback["run_id"], rnd.data.path, tuned.checkpoint, n)
    clusters = Path(opened.queries).parent / "clusters.json" if opened.propagation else None
    log_round_annotation(root, feedback["run_id"], manifests, clusters and str(clusters))
    crash_point("retrain")
    promotion = promote(
        root,
        cfg.mlflow.model_name,
        rnd.data.version,
        opened.baseline,
        feedback,
        cfg.promotion,
        rnd.data.path,
        manifests,
        cfg.query,
    )
    close_run(root, opened.parent)
    roles = {
        "baseline": opened.baseline["run_id"],
        "champion": promotion["champion"]["run_id"],
        "candidate": feedback["run_id"],
    }
    table = compare_models(root, roles)
    link_mlflow_runs(root, cfg.mlflow.experiment, roles)
    get_run_logger().info("round %d done; promotion: %s", n, promotion["reason"])
    report = _report(rnd, opened, manifests, table, promotion, feedback, tuned.checkpoint)
    return {
        "round": n,
        "status": "done",
        "parent_run_id": opened.parent,
        "baseline": opened.baseline,
        "query_model": opened.query_model,
        "feedback": feedback,
        "promotion": promotion,
        "table": table,
        "report": report,
        "labelstudio_url": opened.project_url,
        "data_version": rnd.data.version,
        "feedback_version": feedback_version,
        "answers": answers,
    }


def _report(
    rnd: _Round,
    opened: _Opened,
    manifests: list[str],
    table: list[dict],
    promotion: dict,
    feedback: dict,
    candidate_checkpoint: str,
) -> str | None:
    """The round's report page. The round is done and recorded before it is drawn, so a
    failure here is logged, not raised: `xbl report RUN_ID` draws it again."""
    roles = {
        "baseline": opened.baseline["run_id"],
        "champion": promotion["champion"]["run_id"],
        "candidate": feedback["run_id"],
    }
    try:
        return round_report(
            str(rnd.root),
            rnd.data.path,
            rnd.n,
            column_checkpoints(rnd.root, roles, {feedback["run_id"]: candidate_checkpoint}),
            roles,
            opened.queries,
            manifests,
            table,
            promotion,
            feedback["run_id"],
            rnd.rounds_dir,
        )
    except Exception as err:  # noqa: BLE001 - the round itself is complete
        get_run_logger().warning(
            "round %d: the report could not be drawn (%s); rebuild it with `xbl report %s`",
            rnd.n,
            err,
            feedback["run_id"],
        )
        return None


def _orphan_feedback(rnd: _Round, project_id: int, k: int) -> str:
    """The masks of orphaned round `k`, collected from Label Studio: what annotators said there
    still holds, though the model that showed them the images is gone."""
    queries = queries_from_labelstudio(project_id, k, rnd.data.path, str(round_dir(rnd.root, k)))
    return collect_feedback_masks(project_id, k, queries, str(feedback_dir(rnd.root, k)))


def _feedback_params(cfg: Config) -> dict:
    """What a feedback run logs: the train settings, the feedback's with the λ in use, and the
    query's (strategy and k chose what was annotated), so variants compare as MLflow params."""
    feedback = {**as_params(cfg.feedback), "lambda": method_lambda(cfg.feedback)}
    return {**as_params(cfg.train), "feedback": feedback, "query": as_params(cfg.query)}


# --- one round per project at a time ------------------------------------------------------------

TEAM_WAIT_S = 3.0  # how long a second run waits for the team-wide slot before it is refused
TEAM_LEASE_S = 120.0  # a holder that died unseen frees its slot this long after its last renewal


@contextmanager
def round_lock(root: Path, experiment: str) -> Iterator[lock.Holder]:
    """One round per project at a time, held for the whole run: the project's lock file and,
    in team mode, a Prefect global concurrency limit named after the experiment, which workers
    on other hosts (other checkouts, other lock files) share. A second run stops at once with
    ProjectBusy naming the holder.

    Team mode is a Prefect server this run talks to (PREFECT_API_URL, from the environment or
    a profile), what `xbl serve` and a team's workers need: without one, each run starts its
    own temporary server, where a limit would guard nothing."""
    team = experiment if get_current_settings().api.url else None
    with ExitStack() as stack:
        holder = stack.enter_context(
            lock.project_lock(root, flow_run.get_id(), flow_run.get_name(), team)
        )
        if team:
            stack.enter_context(_team_slot(team, holder))
        yield holder


def team_limit_name(experiment: str) -> str:
    """The experiment's limit (and holder variable) name, in the characters Prefect allows;
    the hash keeps apart experiments that spell the same ("Exp A", "exp-a")."""
    slug = re.sub(r"[^a-z0-9_-]+", "-", experiment.lower())[:80]
    return f"xbl-round-{slug}-{hashlib.sha256(experiment.encode()).hexdigest()[:8]}"


@contextmanager
def _team_slot(experiment: str, holder: lock.Holder) -> Iterator[None]:
    """The experiment's one team-wide slot. Its holder is recorded in a Prefect variable of the
    same name, so a refused run can name it, and a run that finds the holder dead (its flow
    run ended, or its process is gone from this host) releases the slot at once instead of
    waiting out the lease."""
    name = team_limit_name(experiment)
    _ensure_limit(name)
    with ExitStack() as stack:
        if not _take_slot(stack, name, holder):
            recorded, lease = _recorded_holder(name)
            if not _release_if_ended(recorded, lease) or not _take_slot(stack, name, holder):
                raise ProjectBusy(_team_busy(experiment, name, _recorded_holder(name)[0]))
        Variable.set(name, {"holder": holder.to_json(), "lease": _own_lease()}, overwrite=True)
        stack.enter_context(lock.holding_team_slot(experiment))
        try:
            yield
        finally:
            _forget_holder(name, holder)


def _forget_holder(name: str, holder: lock.Holder) -> None:
    """Clear the record as the slot is released. Best effort: a record left behind names a
    run that has ended, which the next run finds out and overwrites."""
    try:
        if _recorded_holder(name)[0] == holder:
            Variable.unset(name)
    except Exception as err:  # noqa: BLE001 - the round itself is over
        get_run_logger().warning("the team-wide round slot's record stays behind: %s", err)


def _ensure_limit(name: str) -> None:
    # another run may create it between the upsert's read and its create
    with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
        client.upsert_global_concurrency_limit_by_name(name, limit=1)


def _take_slot(stack: ExitStack, name: str, holder: lock.Holder) -> bool:
    """Enter the limit's slot on `stack`; False when another holds it for longer than
    TEAM_WAIT_S. A lease renewal that fails (the server restarting) leaves the round running:
    the project's lock file still guards this checkout."""
    slot = concurrency(
        name,
        occupy=1,
        timeout_seconds=TEAM_WAIT_S,
        lease_duration=TEAM_LEASE_S,
        strict=True,
        holder=ConcurrencyLeaseHolder(type="flow_run", id=UUID(holder.flow_run)),
        raise_on_lease_renewal_failure=False,
    )
    try:
        stack.enter_context(slot)
    except TimeoutError:
        return False
    return True


def _own_lease() -> str | None:
    """The lease just taken. `concurrency` hands out no handle on it; the flow run's context
    lists the leases it holds (to release them should the run be cancelled), newest last."""
    context = ConcurrencyContext.get()
    return str(context.cleanup_lease_ids[-1]) if context and context.cleanup_lease_ids else None


def _recorded_holder(name: str) -> tuple[lock.Holder | None, str | None]:
    record = Variable.get(name) or {}
    return lock.Holder.from_json(record.get("holder")), record.get("lease")


def _release_if_ended(holder: lock.Holder | None, lease: str | None) -> bool:
    """Release a dead holder's lease; True when it was released."""
    why = _ended(holder) if holder and lease else None
    if why is None:
        return False
    with get_client(sync_client=True) as client:
        client.release_concurrency_slots_with_lease(UUID(lease))
    get_run_logger().warning("released the team-wide round slot of %s: %s", holder.describe(), why)
    return True


def _ended(holder: lock.Holder) -> str | None:
    """Why `holder` has certainly ended, or None when it may be running."""
    if lock.process_ended(holder):
        return f"its process is gone from {holder.host}"
    with get_client(sync_client=True) as client:
        try:
            state = client.read_flow_run(UUID(holder.flow_run)).state
        except ObjectNotFound:
            return "Prefect has no such flow run"
    return f"its flow run ended {state.name}" if state is not None and state.is_final() else None


def _team_busy(experiment: str, name: str, holder: lock.Holder | None) -> str:
    who = holder.describe() if holder else "a run that has not yet recorded its name"
    return (
        f"experiment {experiment!r} is busy: its team-wide round slot (Prefect concurrency "
        f"limit {name!r}) is held by {who}. One round per experiment at a time, on any host: "
        f"wait for it to end. A run that died frees the slot once Prefect marks it crashed, "
        f"or {TEAM_LEASE_S:.0f} s after its last sign of life."
    )
