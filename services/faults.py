"""Fault drills: a process killed at a named point, as a power cut or an OOM kill would.

`XBL_CRASH_AFTER=<step>` kills the process the first time it reaches `crash_point(<step>)`;
`<step>:<n>` the n-th time (e.g. `mlflow-logging:2`: the round's second model run, its
retraining, not its baseline). Between steps: baseline, push, wait, retrain (flows/loop.py).
Mid-step: push-partial (some of a round's files uploaded, no task created yet),
masks-partial (a round's masks written, its folder not complete), dvc-add (masks added to
DVC, not pushed), mlflow-logging (a model run started, its model not logged), promotion (the
decision recorded, the alias and the round's promotion tag not set).
"""

from __future__ import annotations

import os
import signal
import sys
from collections import Counter

ENV = "XBL_CRASH_AFTER"
_reached: Counter[str] = Counter()


def crash_point(step: str) -> None:
    """Kill this process at once (SIGKILL: no cleanup, no finally) when `ENV` names `step`."""
    name, _, nth = os.environ.get(ENV, "").partition(":")
    if name != step:
        return
    _reached[step] += 1
    if _reached[step] < int(nth or 1):
        return
    # the drill's log says where it died; stderr is unbuffered, so the line is out before the kill
    print(f"fault drill: killed at {step} ({_reached[step]})", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
