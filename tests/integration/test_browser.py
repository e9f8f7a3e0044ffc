"""A person's path through a round, in a real browser (Playwright on Debian's Chromium).

The loop pushes a round for a human annotator and ends, waiting. A person then logs into the
real Label Studio, opens a few of the round's tasks, relabels pre-drawn cells as "ignore",
paints one brush stroke over the decoy patch, rates the explanation and submits. The next run
of the round flow must turn exactly those answers into masks and retrain on them; the task
view and the feedback run's MLflow page must render.
"""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from flows.loop import feedback_round_flow
from services import labelstudio as ls
from services import tracking
from tests.integration.ls_server import free_port, read_env_file
from tests.integration.project import TINY_TRAIN, make_project
from xbl.data.prepared import PreparedData
from xbl.feedback.masks import mask_file_name

pytestmark = [pytest.mark.integration, pytest.mark.labelstudio]

CHROMIUM = Path("/usr/bin/chromium")
# No sandbox (CI runs as root), and none of Chromium's own calls home: the machine is offline.
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# The expected brush pixels below rely on this size: the image (560 px for 28) is shown at
# ~357 px, so the default brush (~24 image px wide) is narrower than one model pixel (20).
VIEWPORT = {"width": 1400, "height": 1000}
K = 5  # the round's queries
ANSWERED = 3  # tasks the person answers; the others stay open
IGNORED_PER_TASK = 2  # pre-drawn cells relabelled "ignore" in each answered task
EXPERIMENT = "browser"
TITLE = f"xbl-{EXPERIMENT}"
ERRORS = '[data-testid^="error"], .lsf-errors'


MISSING = f"{CHROMIUM} is missing: run `make browser-install` (apt-get install chromium)"
# Without Chromium the module skips before any server starts; under CI, where `make test`
# installs it, the round's fixture fails instead.
if not CHROMIUM.exists() and not os.environ.get("CI"):
    pytest.skip(MISSING, allow_module_level=True)


@contextmanager
def chromium(profile: Path):
    """A fresh headless Chromium context; any request off this machine is aborted and kept
    in the list it yields, so a test can say nothing tried to reach the internet."""
    from playwright.sync_api import sync_playwright

    outside: list[str] = []

    def local_only(route) -> None:
        url = route.request.url
        if url.startswith(("data:", "blob:")) or urlparse(url).hostname in (
            "127.0.0.1",
            "localhost",
        ):
            route.continue_()
        else:
            outside.append(url)
            route.abort()

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            args=CHROMIUM_ARGS,
            headless=True,
            viewport=VIEWPORT,
        )
        context.route("**/*", local_only)
        try:
            yield context, outside
        finally:
            context.close()


def screenshot_pixels(png: Path, box: dict | None = None) -> np.ndarray:
    """The screenshot as RGB integers, or the part of it inside `box`."""
    with Image.open(png) as image:
        rgb = np.asarray(image.convert("RGB"), dtype=int)
    if box is None:
        return rgb
    top, left = int(box["y"]), int(box["x"])
    return rgb[top : top + int(box["height"]), left : left + int(box["width"])]


def assert_not_blank(png: Path, box: dict | None = None) -> None:
    """A rendered screenshot (or the part of it inside `box`) has real contrast and detail."""
    grey = screenshot_pixels(png, box).mean(axis=2)
    assert grey.size and grey.std() > 10 and len(np.unique(grey)) > 16, png


# --- the round, pushed for a person -------------------------------------------------------------


@pytest.fixture(scope="module")
def env(labelstudio):
    """The pipeline talks to the test server as a team's would: URL and token from the env."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LABEL_STUDIO_URL", labelstudio.url)
    mp.setenv("LABEL_STUDIO_API_KEY", labelstudio.token)
    yield labelstudio
    mp.undo()


@pytest.fixture(scope="module")
def pushed(tmp_path_factory, env):
    """Round 1 pushed with the human annotator: the run ends and the tasks wait for a person."""
    if not CHROMIUM.exists():
        pytest.fail(MISSING)
    project = make_project(
        tmp_path_factory.mktemp("browser") / "project",
        mlflow={"experiment": EXPERIMENT},
        train={**TINY_TRAIN, "epochs": 2},  # what the models learn is not tested here
        query={"k": K},
        feedback={"epochs": 1},
        labelstudio={"annotator": "human"},
        wait={"mode": "resume", "target_fraction": ANSWERED / K},
    )
    first = feedback_round_flow(str(project))
    assert first == {
        "round": 1,
        "status": "waiting",
        "annotated": 0,
        "total": K,
        "what": "annotations",
    }
    client = ls.connect()
    project_id = ls.pushed_rounds(client, TITLE).project_id
    tasks = {t["image_id"]: t["task_id"] for t in ls.round_task_data(client, project_id, 1)}
    queries = json.loads((project / "data" / "rounds" / "round-1" / "queries.json").read_text())
    return project, project_id, tasks, queries


# --- what the person does -----------------------------------------------------------------------


def decoy_stroke(confounder: np.ndarray) -> tuple[int, int, int]:
    """(row, first col, last col): along the middle row of the decoy patch."""
    rows, cols = np.nonzero(confounder)
    return (int(rows.min() + rows.max()) // 2, int(cols.min()), int(cols.max()))


def stroke_mask(stroke: tuple[int, int, int], shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    row, first, last = stroke
    mask[row, first : last + 1] = True
    return mask


def cells_mask(cells, cell: int, shape: tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    for row, col in cells:
        mask[row * cell : (row + 1) * cell, col * cell : (col + 1) * cell] = True
    return mask


def plan(query: dict, confounder: np.ndarray) -> dict:
    """What the person will do on this task: a stroke over the decoy, and "ignore" on the first
    shown cells the stroke does not touch, so the stroke's pixels show in the mask."""
    shape = (query["height"], query["width"])
    stroke = decoy_stroke(confounder)
    apart = [
        tuple(c)
        for c in query["cells"]
        if not (cells_mask([c], query["cell"], shape) & stroke_mask(stroke, shape)).any()
    ]
    ignored = apart[:IGNORED_PER_TASK]
    assert len(ignored) == IGNORED_PER_TASK, query["image_id"]
    return {"stroke": stroke, "ignored": ignored, "shown": [tuple(c) for c in query["cells"]]}


def log_in(page, server) -> None:
    credentials = read_env_file(server.home / "env")
    page.goto(f"{server.url}/user/login/")
    page.fill('#login-form input[name="email"]', credentials["XBL_LABEL_STUDIO_USERNAME"])
    page.fill('#login-form input[name="password"]', credentials["XBL_LABEL_STUDIO_PASSWORD"])
    page.click('#login-form button[type="submit"]')
    page.wait_for_load_state("networkidle")
    assert "/user/login" not in page.url, "log-in failed"


def open_task(page, server, project_id: int, query: dict, task_id: int):
    """Open the task from the project's task list, as a person does, and wait until its image
    is loaded and the model's cells are drawn. (Label Studio 1.23 leaves the cells out when a
    task is opened by direct link before the project's list was ever shown.)"""
    from playwright.sync_api import expect

    page.goto(f"{server.url}/projects/{project_id}/data")
    page.get_by_text(f"image {query['image_id']} · round {query['round']} ·").first.click()
    expect(page).to_have_url(re.compile(rf"[?&]task={task_id}(&|$)"))
    images = page.locator(".lsf-main-view .lsf-image img")
    expect(images).to_have_count(2)  # the image and the explanation overlay
    for img in images.all():
        page.wait_for_function(
            "(i) => i.complete && i.naturalWidth > 0", arg=img.element_handle(), timeout=30_000
        )
    outliner = page.locator(".lsf-outliner-item")
    expect(outliner).to_have_count(len(query["cells"]), timeout=30_000)
    page.wait_for_timeout(600)  # let the canvas paint the regions
    return images.first


def check_task_view(page, image, shot: Path) -> None:
    """The task view renders: both images loaded, no error banner, a non-blank screenshot."""
    natural = page.locator(".lsf-main-view .lsf-image img").evaluate_all(
        "(imgs) => imgs.map((i) => i.complete ? i.naturalWidth : 0)"
    )
    assert len(natural) == 2 and min(natural) > 0, natural
    assert page.locator(ERRORS).count() == 0, page.locator(ERRORS).all_inner_texts()
    page.screenshot(path=str(shot))
    assert_not_blank(shot)
    box = image.bounding_box()
    assert_not_blank(shot, box)  # the canvas drew the digit, not a blank
    # and painted the pre-drawn cells on it, in the "model attention" amber (#ffbf00)
    r, g, b = np.moveaxis(screenshot_pixels(shot, box), 2, 0)
    assert ((r > 200) & (g > 150) & (g < 225) & (b < 90)).sum() > 200, shot


def annotate(page, image, query: dict, todo: dict, shot: Path) -> dict:
    """Relabel, paint, rate and submit as a person would; returns the saved annotation."""
    box = image.bounding_box()

    def at(row: float, col: float) -> tuple[float, float]:  # model pixel centre -> screen
        return (
            box["x"] + (col + 0.5) * box["width"] / query["width"],
            box["y"] + (row + 0.5) * box["height"] / query["height"],
        )

    rect_labels, brush_labels = (page.locator(".lsf-labels").nth(i) for i in (0, 1))
    page.click('button[aria-label="move-tool"]')
    half = (query["cell"] - 1) / 2
    for row, col in todo["ignored"]:  # click the cell on the image, then the label
        page.mouse.click(*at(row * query["cell"] + half, col * query["cell"] + half))
        rect_labels.locator(".lsf-label", has_text="ignore").click()
        page.keyboard.press("Escape")  # deselect, so the brush label starts a new region
    brush_labels.locator(".lsf-label", has_text="ignore").click()  # selects the brush tool
    row, first, last = todo["stroke"]
    page.mouse.move(*at(row, first))
    page.mouse.down()
    page.mouse.move(*at(row, last), steps=8)
    page.mouse.up()
    page.locator('.lsf-choice__checkbox:has(input[name="bad"])').click()
    page.screenshot(path=str(shot))  # what was submitted, for a person to look at
    with page.expect_response(
        lambda r: urlparse(r.url).path.endswith("/annotations") and r.request.method == "POST"
    ) as response:
        page.click('[data-testid="bottombar-submit-button"]')
    assert response.value.status == 201, response.value.text()
    return response.value.json()


@pytest.fixture(scope="module")
def answered(pushed, env, tmp_path_factory):
    """The person answers the first ANSWERED queries in the browser."""
    project, project_id, tasks, queries = pushed
    data = PreparedData.load(project / "data" / "prepared")
    shots = tmp_path_factory.mktemp("screenshots")
    plans, saved = {}, {}
    with chromium(shots / "profile") as (context, outside):
        page = context.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda err: page_errors.append(str(err)))
        try:
            log_in(page, env)
            for n, query in enumerate(queries[:ANSWERED]):
                todo = plan(query, data.confounder[query["index"]])
                image = open_task(page, env, project_id, query, tasks[query["image_id"]])
                if n == 0:
                    check_task_view(page, image, shots / "task-view.png")
                shot = shots / f"answered-{n + 1}.png"
                saved[query["image_id"]] = annotate(page, image, query, todo, shot)
                plans[query["image_id"]] = todo
        except Exception:
            page.screenshot(path=str(shots / "failure.png"))  # what the page showed
            print(f"the browser step failed; see {shots / 'failure.png'}")
            raise
    print(f"screenshots in {shots}")
    return {"plans": plans, "saved": saved, "outside": outside, "page_errors": page_errors}


@pytest.fixture(scope="module")
def retrained(pushed, answered, env, mlflow_ui):
    """The next run of the round flow: it finds the answers and retrains. (MLflow's server,
    for the last test, starts before it.)"""
    project = pushed[0]
    result = feedback_round_flow(str(project))
    assert (result["round"], result["status"]) == (1, "done")
    return result


# --- the tests ----------------------------------------------------------------------------------


def test_label_studio_saved_what_the_person_did(answered):
    for image_id, todo in answered["plans"].items():
        result = answered["saved"][image_id]["result"]
        labels = {
            r["id"]: r["value"]["rectanglelabels"][0]
            for r in result
            if r["type"] == "rectanglelabels"
        }
        # every pre-drawn cell is in the answer, and exactly the clicked ones say "ignore"
        assert set(labels) == {f"cell-{r}-{c}" for r, c in todo["shown"]}, image_id
        ignored = {k for k, label in labels.items() if label == "ignore"}
        assert ignored == {f"cell-{r}-{c}" for r, c in todo["ignored"]}, image_id
        brushes = [r for r in result if r["type"] == "brushlabels"]
        assert [b["value"]["brushlabels"] for b in brushes] == [["ignore"]], image_id
        ratings = [r["value"]["choices"] for r in result if r["type"] == "choices"]
        assert ratings == [["bad"]], image_id
    assert answered["outside"] == []  # nothing tried to leave the machine
    assert answered["page_errors"] == []


def test_masks_are_exactly_the_relabelled_cells_and_the_stroke(pushed, answered, retrained):
    project, _, _, queries = pushed
    feedback = project / "data" / "feedback" / "round-1"
    names = {p.name for p in (feedback / "masks").iterdir()}
    plans = answered["plans"]
    assert names == {mask_file_name(i) for i in plans}  # nothing for the unanswered tasks
    for query in (q for q in queries if q["image_id"] in plans):
        todo, shape = plans[query["image_id"]], (query["height"], query["width"])
        stroke = stroke_mask(todo["stroke"], shape)
        ignored = cells_mask(todo["ignored"], query["cell"], shape)
        name = mask_file_name(query["image_id"])
        with Image.open(feedback / "masks" / name) as png:
            saved = np.asarray(png) > 0
        assert (stroke & ~ignored).any()  # the stroke adds pixels of its own
        assert np.array_equal(saved, ignored | stroke), query["image_id"]
        # the cells left as "model attention" are the evidence the person kept
        kept = set(todo["shown"]) - set(todo["ignored"])
        with Image.open(feedback / "keep" / name) as png:
            keep = np.asarray(png) > 0
        assert np.array_equal(keep, cells_mask(kept, query["cell"], shape) & ~saved)
    rows = (feedback / "manifest.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + ANSWERED
    assert (feedback / "problems.txt").read_text() == ""


def test_the_manifest_keeps_the_ratings_and_the_persons_time(answered, pushed, retrained):
    manifest = pushed[0] / "data" / "feedback" / "round-1" / "manifest.csv"
    with manifest.open() as fh:
        rows = {row["image_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == set(answered["plans"])
    for row in rows.values():
        assert row["rating"] == "bad"
        assert float(row["annotator_seconds"]) > 0  # Label Studio timed a person


def test_a_feedback_run_in_mlflow_learnt_from_those_answers(pushed, retrained, tmp_path):
    project = pushed[0]
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    run = client.get_run(retrained["feedback"]["run_id"])
    assert run.info.run_name == "feedback-round-1" and run.info.status == "FINISHED"
    assert run.data.tags[tracking.FEEDBACK_ROUNDS_TAG] == "1"
    version = run.data.tags[tracking.FEEDBACK_VERSION_TAG]
    assert version == retrained["feedback_version"]
    # the versioned masks are these answers: masks + keep masks per answer, manifest, problems,
    # the round's annotation cost (cost.json) and the annotators' agreement (agreement.json)
    dvc_file = project / "data" / "feedback.dvc"
    (out,) = yaml.safe_load(dvc_file.read_text())["outs"]
    assert (out["md5"], out["nfiles"]) == (version, 2 * ANSWERED + 4)
    assert (project / "data" / "feedback" / "round-1" / "cost.json").is_file()
    logged = Path(client.download_artifacts(run.info.run_id, "feedback.dvc", str(tmp_path)))
    assert logged.read_text() == dvc_file.read_text()
    assert "audit_accuracy" in run.data.metrics


# --- MLflow's page for that run -----------------------------------------------------------------


def wait_for_health(url: str, server: subprocess.Popen, log: Path) -> str:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as answer:
                if answer.status == 200:
                    return url
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start:\n{log.read_text()}") from None
            time.sleep(0.5)


@pytest.fixture(scope="module")
def mlflow_ui(pushed):
    """`mlflow server` on a free loopback port, serving the project's own store; returns a
    function that waits until it answers. The retraining asks for it first, so the server's
    start-up (10-20 s on a busy machine) overlaps the retraining."""
    project, port = pushed[0], free_port()
    log = project / "mlflow-server.log"
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", tracking.tracking_uri(project)]
    # a viewer only: without the job runner (and its seven queue consumers) it starts in half
    # the time
    viewer = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        server = subprocess.Popen(
            command,
            cwd=project,
            env=viewer,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield lambda: wait_for_health(f"http://127.0.0.1:{port}", server, log)
    finally:
        with suppress(ProcessLookupError):  # its own session: the server and its workers
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_the_feedback_run_page_renders_in_mlflow(pushed, retrained, mlflow_ui, tmp_path):
    from playwright.sync_api import expect

    project = pushed[0]
    run_id = retrained["feedback"]["run_id"]
    client = MlflowClient(tracking.tracking_uri(project), tracking.tracking_uri(project))
    run = client.get_run(run_id)
    url = mlflow_ui()
    with chromium(tmp_path / "profile") as (context, outside):
        page = context.new_page()
        page_errors: list[str] = []
        page.on("pageerror", lambda err: page_errors.append(str(err)))
        page.goto(f"{url}/#/experiments/{run.info.experiment_id}/runs/{run_id}")
        expect(page.get_by_role("heading", name="feedback-round-1")).to_be_visible(timeout=60_000)
        expect(page.get_by_text(run_id, exact=True).first).to_be_visible()
        # the UI reads the same store: the audit accuracy it shows is the run's
        page.get_by_placeholder("Search metrics").fill("audit_accuracy")
        value = repr(run.data.metrics["audit_accuracy"])
        expect(page.get_by_text(value, exact=True).first).to_be_visible(timeout=30_000)
        assert page.get_by_role("alert").count() == 0, page.get_by_role("alert").all_inner_texts()
        page.wait_for_timeout(500)
        shot = tmp_path / "mlflow-run.png"
        page.screenshot(path=str(shot))
    assert_not_blank(shot)
    assert outside == [] and page_errors == []
