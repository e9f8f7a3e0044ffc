"""The rounds as plain files in the project's `metrics/` folder, which dvc.yaml declares, so
`dvc metrics show/diff` and `dvc plots show/diff` read them (git keeps them, like params.yaml):

  round.json  the latest round: its number, the decision (promoted, p-value, difference,
              level) and per role (baseline, champion, candidate) the compared figures
  rounds.csv  every round, one row each, the same figures as columns `<role>_<figure>`: DVC
              draws one line per column, and cannot split one column by a role column
  curves.csv  the latest round's candidate, one row per epoch (its learning curves)

Writing a round again replaces its row; an earlier round written again (`xbl report`) leaves
round.json and curves.csv to the latest one."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from xbl.errors import DataError
from xbl.files import write_whole

METRICS_ROOT = "metrics"  # in the project, beside dvc.yaml, which names these files
ROUND_FILE = "round.json"
ROUNDS_FILE = "rounds.csv"
CURVES_FILE = "curves.csv"
ROLES = ("baseline", "champion", "candidate")
FIGURES = ("audit_accuracy", "val_accuracy", "test_accuracy", "val_explanation_score")
DECISION = ("p_value", "difference", "level")  # the paired test's, when there was evidence
ROUND_COLUMNS = (
    "round",
    "promoted",
    *DECISION,
    *(f"{role}_{figure}" for role in ROLES for figure in FIGURES),
)


def round_record(round_number: int, table: list[dict], promotion: dict) -> dict:
    """round.json: the round's decision and each role's figures. A row whose role is shared
    ("baseline = champion") stands for each of its roles; a figure a model lacks is left out."""
    record: dict = {"round": round_number, "promoted": bool(promotion.get("promoted"))}
    record.update({k: _number(promotion[k]) for k in DECISION if _has(promotion, k)})
    for row in table:
        figures = {f: _number(row[f]) for f in FIGURES if _has(row, f)}
        for role in row["role"].split(" = "):
            if role in ROLES:
                record[role] = figures
    return record


def rounds_row(record: dict) -> dict:
    """A round's row of rounds.csv: the record flattened, promoted as 1 or 0 so it plots."""
    row = {k: record[k] for k in ("round", *DECISION) if k in record}
    row["promoted"] = int(record["promoted"])
    for role in ROLES:
        row.update({f"{role}_{f}": v for f, v in record.get(role, {}).items()})
    return row


def write_round_metrics(
    folder: Path, round_number: int, table: list[dict], promotion: dict, curves: list[dict]
) -> list[Path]:
    """Write the round into `folder` (the project's metrics/); returns the files written.
    `curves` is the candidate's history, one dict per epoch with an `epoch` key."""
    folder = Path(folder)
    record = round_record(round_number, table, promotion)
    kept = [r for r in read_rounds(folder / ROUNDS_FILE) if int(r["round"]) != round_number]
    rows = sorted([*kept, rounds_row(record)], key=lambda r: int(r["round"]))
    texts = {folder / ROUNDS_FILE: _csv_text(ROUND_COLUMNS, rows)}
    if round_number == int(rows[-1]["round"]):  # an earlier round leaves the latest's files
        texts[folder / ROUND_FILE] = json.dumps(record, indent=2) + "\n"
        texts[folder / CURVES_FILE] = curves_text(curves)
    folder.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        write_whole(path, text)  # DVC or a reader never sees half a file
    return list(texts)


def read_rounds(path: Path) -> list[dict]:
    """rounds.csv's rows; none when there is no file. A row whose round is not a whole number
    cannot be replaced or ordered, so it is an error naming every such row."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    bad = [f"row {i}: round {r.get('round')!r}" for i, r in enumerate(rows, 2) if not _whole(r)]
    if bad:
        raise DataError(
            f"{path}: {'; '.join(bad)} is not a round number; fix those rows or delete the "
            "file (every round's report writes its row again)"
        )
    return rows


def curves_text(curves: list[dict]) -> str:
    """curves.csv: `epoch`, then every curve any epoch has, in name order."""
    names = sorted({k for row in curves for k in row} - {"epoch"})
    rows = sorted(curves, key=lambda r: r["epoch"])
    return _csv_text(("epoch", *names), rows)


def _csv_text(columns, rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _has(values: dict, key: str) -> bool:
    """A figure present and finite: NaN is not valid JSON and DVC cannot compare it."""
    value = values.get(key)
    return isinstance(value, int | float) and math.isfinite(value)


def _number(value) -> float:
    # not rounded: a p-value such as 4.7e-16 must stay what it is
    return float(value)


def _whole(row: dict) -> bool:
    return str(row.get("round") or "").strip().isdigit()
