"""Data-parallel training: one process per GPU (or several on a CPU) under torchrun with DDP.

`xbl.train.fit` calls `launch` when `train.devices` > 1: it writes a job file and runs
`python -m torch.distributed.run --standalone --nproc_per_node=N -m xbl.train.distributed JOB`.
Every process runs the ordinary `xbl.train.loop.training_loop`: all draw the same seeded global
batches and the same annotated images, each trains on its own slice of both, and the
gradients are averaged by DistributedDataParallel. SmallCNN has no dropout and no batchnorm,
so this is the single-process training on the same global batch, up to float rounding.
Validation runs in full on every process: the weights are identical everywhere (same averaged
gradients, same Adam step), so every process reaches the same early-stopping decision
without talking; the training-loss guard sees values summed over processes, so a divergence
stops all of them at the same step. Process 0 writes the checkpoint and the TrainResult as JSON.
How each feedback term splits across processes is the method's own `share` (xbl/feedback/methods.py).

Plain torch on purpose: the workers import no Prefect, MLflow or DVC.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import record
from torch.nn.parallel import DistributedDataParallel

import xbl
from xbl.config import TrainConfig
from xbl.data.images import DiskArray
from xbl.data.prepared import PreparedData
from xbl.feedback.methods import METHODS, AnnotatedImages
from xbl.feedback.schedule import Feedback
from xbl.train.checkpoint import checkpoint_meta, initial_model, save_checkpoint, save_last_good
from xbl.train.loop import FeedbackDiverged, TrainResult, training_loop
from xbl.train.runtime import autocast, resolve_device


# ---------------------------------------------------------------- one process's share of a step
def _part(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """Contiguous slice `rank` of `world` (uneven sizes allowed; a slice may be empty)."""
    return torch.tensor_split(t, world)[rank]


class ShardedStep:
    """The `step` hook of `training_loop` for process `rank` of `world`.

    Each process takes its slice of the global batch and of the annotated images. Its losses
    are its shares of the global means, times `world`: DDP averages the gradients over the
    processes, which then gives the gradient of the global loss. The values it reports are
    summed over processes, so λ normalisation, the divergence guard and the history see the
    whole batch, identically on every process.
    """

    def __init__(self, ddp: DistributedDataParallel, rank: int, world: int):
        self.ddp, self.rank, self.world = ddp, rank, world

    def __call__(
        self,
        model: nn.Module,
        xb: torch.Tensor,
        yb: torch.Tensor,
        fb: Feedback | None,
        fbatch: AnnotatedImages | None,
        device: torch.device,
        use_amp: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, float, float]:
        n_global = len(yb) + (len(fbatch) if fbatch is not None else 0)
        x = _part(xb, self.rank, self.world).to(device, non_blocking=True)
        y = _part(yb, self.rank, self.world).to(device, non_blocking=True)
        expl = torch.zeros((), device=device)
        if fbatch is not None:
            x = torch.cat([x, _part(fbatch.x, self.rank, self.world)])
            y = torch.cat([y, _part(fbatch.y, self.rank, self.world)])
            # Through the bare module, not DDP: the term runs its own forward and an
            # autograd.grad, and DDP allows one forward per backward (a second raises
            # "Expected to have finished reduction in the prior iteration"). Its gradients
            # still meet the CE's at the same parameters, so DDP's hooks average their sum.
            expl = fb.method.share(model, fbatch, self.rank, self.world).float()
        with autocast(device, use_amp):
            logits = self.ddp(x)
        ce = F.cross_entropy(logits.float(), y, reduction="sum") / n_global
        shares = torch.stack([ce.detach(), expl.detach()])
        dist.all_reduce(shares)  # one sync per step, as in the single-process loop
        ce_value, expl_value = shares.tolist()
        return ce * self.world, expl * self.world, ce_value, expl_value


# ---------------------------------------------------------------- the feedback in the job file
def _feedback_job(feedback: Feedback) -> dict:
    """Plain values and tensors that rebuild `feedback` in a worker (torch.load with
    weights_only takes no objects)."""
    images = feedback.images
    return {
        "method": feedback.method.name,
        "state": feedback.method.state(),
        "images": {"x": images.x, "y": images.y, "W": images.W, "M": images.M},
        "lam": feedback.lam,
        "normalize_lambda": feedback.normalize_lambda,
        "per_batch": feedback.per_batch,
        "every": feedback.every,
    }


def _feedback_from_job(job: dict) -> Feedback:
    method = METHODS[job["method"]].from_state(job["state"])
    return Feedback(
        method,
        AnnotatedImages(**job["images"]),
        job["lam"],
        job["normalize_lambda"],
        job["per_batch"],
        job["every"],
    )


# ---------------------------------------------------------------- the worker (one per process)
def _worker_device(setting: str) -> torch.device:
    """CUDA device LOCAL_RANK when training on CUDA, else the CPU."""
    if resolve_device(setting).type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _write_json(path: str, payload: dict) -> None:
    tmp = Path(path).with_suffix(".tmp")
    tmp.write_text(json.dumps(payload))
    tmp.replace(path)  # the launcher never reads half a file


def _train_here(job: dict, rank: int, world: int, device: torch.device) -> None:
    """One process's training; process 0 saves the checkpoint and the result."""
    data = PreparedData.load(Path(job["dataset"]))
    cfg = TrainConfig(**job["train"])
    # as fit does
    model = initial_model(cfg.model, data, cfg.seed, job["init"], cfg.pretrained, cfg.freeze)
    model = model.to(device)
    ddp = DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    feedback = _feedback_from_job(job["feedback"]) if job["feedback"] else None
    meta = checkpoint_meta(cfg.model, data)
    out, lead = Path(job["out"]), rank == 0

    def on_epoch(row: dict) -> None:
        if lead:
            with open(job["epochs_log"], "a") as fh:
                fh.write(json.dumps(row) + "\n")

    try:
        result = training_loop(
            model,
            data.split_images("train"),
            data.split_images("val"),
            cfg,
            feedback,
            on_epoch=on_epoch,
            step=ShardedStep(ddp, rank, world),
        )
    except FeedbackDiverged as bad:
        # every process diverges at the same step (the guard sees summed values); keep the
        # last good weights as fit does and report, so the launcher raises the same error
        if lead:
            bad = bad.kept_at(save_last_good(model, out, meta))
            _write_json(
                job["result"],
                {
                    "diverged": {
                        "message": str(bad),
                        "method": bad.method,
                        "lam": bad.lam,
                        "epoch": bad.epoch,
                        "best_epoch": bad.best_epoch,
                    }
                },
            )
        return
    if lead:
        result.checkpoint = str(save_checkpoint(model, out, meta))
        result.device, result.world_size = str(device), world
        _write_json(job["result"], asdict(result))


@record  # puts a failing worker's traceback in torchrun's summary, for the launcher's error
def main(argv: list[str] | None = None) -> int:
    (job_file,) = argv if argv is not None else sys.argv[1:]
    job = torch.load(job_file, map_location="cpu", weights_only=True)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _worker_device(job["train"]["device"])
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        timeout=timedelta(seconds=float(job["collective_timeout_s"])),
    )
    try:
        _train_here(job, rank, world, device)
    finally:
        dist.destroy_process_group()
    return 0


# ---------------------------------------------------------------- the launcher
def _on_disk(data: PreparedData, spare: Path) -> Path:
    """The prepared folder the workers load: the one `data` streams from, else a copy of the
    in-memory data saved at `spare`."""
    if isinstance(data.images, DiskArray):
        return Path(data.images.path).parent
    data.save(spare)
    return spare


def _tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    return "\n".join(text.splitlines()[-lines:])


def _root_cause(log: Path) -> str:
    """The worker's exception line (e.g. 'FileNotFoundError: ...') from torchrun's "Root
    Cause" section, else the last exception line that is not torchrun's own wrapper."""
    text = log.read_text(errors="replace") if log.is_file() else ""
    lines = re.findall(
        r"^\s*((?:\w+\.)*\w+(?:Error|Exception|Diverged|Interrupt)\b.*)$",
        text.split("Root Cause")[-1],
        re.MULTILINE,
    )
    lines = [line for line in lines if "ChildFailedError" not in line]
    return lines[0].strip() if lines else "see the log below"


def _stop(proc: subprocess.Popen) -> None:
    """End torchrun and its workers: they run in the session the launcher started for them."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=grace)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _new_rows(path: Path, seen: int) -> list[dict]:
    """Complete epoch rows after the first `seen` (a line still being written is skipped)."""
    if not path.is_file():
        return []
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines[seen:]]


def _supervise(
    proc: subprocess.Popen,
    epochs: Path,
    timeout_s: float | None,
    on_epoch: Callable[[dict], None] | None,
) -> bool:
    """Wait for torchrun, passing epoch rows on as process 0 writes them; False on timeout.
    Whatever ends the wait (timeout, Ctrl-C), no worker is left running."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen = 0
    try:
        while True:
            done = proc.poll() is not None  # read the rows once more after the end
            for row in _new_rows(epochs, seen):
                seen += 1
                if on_epoch:
                    on_epoch(row)
            if done:
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
    finally:
        if proc.poll() is None:
            _stop(proc)


def _environment(devices: int, job: dict) -> dict:
    """The caller's environment, plus what the workers need; checks the device count."""
    env = dict(os.environ)
    # the workers import the same xbl as this launcher, wherever the caller's cwd is
    root = str(Path(xbl.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    if resolve_device(job["train"]["device"]).type == "cuda":
        if devices > torch.cuda.device_count():  # fail here, not in N half-started workers
            raise ValueError(
                f"train.devices is {devices} but {torch.cuda.device_count()} "
                "CUDA devices are visible"
            )
    else:  # N processes share the cores: N x all-cores threads would oversubscribe them
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // devices))
    return env


def launch(
    devices: int,
    data: PreparedData | str | Path,
    cfg: TrainConfig,
    out: Path,
    init: str | Path | dict | None = None,
    feedback: Feedback | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    workdir: Path | None = None,
    timeout_s: float | None = None,
    collective_timeout_s: float = 600.0,
) -> TrainResult:
    """Train on `devices` processes; process 0's TrainResult. Called by `xbl.train.fit`.

    An in-memory dataset is saved for the workers. Without `workdir` a temporary one is used,
    removed on success and on divergence, kept (and named in the error) on a failure. Raises
    FeedbackDiverged as the loop would, and RuntimeError (with the workers' error and log tail)
    when a process fails or `timeout_s` passes; a collective stuck for `collective_timeout_s`
    fails its process.
    """
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="xbl-ddp-")) if own else Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(data, PreparedData):
        data = _on_disk(data, workdir / "dataset")
    job = {
        "dataset": str(data),
        "train": asdict(cfg),
        "out": str(out),
        "init": str(init) if isinstance(init, (str, Path)) else init,
        "feedback": _feedback_job(feedback) if feedback is not None else None,
        "collective_timeout_s": collective_timeout_s,
    }
    try:
        result = _run(devices, job, workdir, timeout_s, on_epoch)
    except FeedbackDiverged:  # a training outcome, not a failure to debug: nothing to keep
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    if own:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _run(
    devices: int,
    job: dict,
    workdir: Path,
    timeout_s: float | None,
    on_epoch: Callable[[dict], None] | None,
) -> TrainResult:
    """Write the job, run torchrun on it, and read back process 0's result."""
    result, epochs = workdir / "result.json", workdir / "epochs.jsonl"
    log = workdir / "torchrun.log"
    for stale in (result, epochs):
        stale.unlink(missing_ok=True)
    job = {**job, "result": str(result), "epochs_log": str(epochs)}
    torch.save(job, workdir / "job.pt")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={devices}",
        "-m",
        "xbl.train.distributed",
        str(workdir / "job.pt"),
    ]
    with log.open("w") as fh:
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=_environment(devices, job),
            start_new_session=True,
        )
        finished = _supervise(proc, epochs, timeout_s, on_epoch)
    if not finished:
        raise RuntimeError(
            f"distributed training timed out after {timeout_s:g} s ({devices} "
            f"processes); log {log}:\n{_tail(log)}"
        )
    if proc.returncode != 0 or not result.is_file():
        raise RuntimeError(
            f"distributed training failed ({devices} processes, exit code "
            f"{proc.returncode}): {_root_cause(log)}\n--- last lines of {log} "
            f"---\n{_tail(log)}"
        )
    outcome = json.loads(result.read_text())
    if "diverged" in outcome:
        bad = outcome["diverged"]
        raise FeedbackDiverged(
            bad["message"], bad["method"], bad["lam"], bad["epoch"], bad["best_epoch"]
        )
    return TrainResult(**outcome)


if __name__ == "__main__":
    sys.exit(main())
