"""Query step: pick the training images the model is least sure of and draw its explanations."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from prefect import task

from xbl.config import QueryConfig
from xbl.data.prepared import PreparedData
from xbl.query.round import query_round
from xbl.train.checkpoint import load_model
from xbl.train.loop import predict_proba


@task
def select_round_queries(
    checkpoint: str,
    dataset: str,
    cfg: QueryConfig,
    round_number: int,
    already_annotated: list[str],
    out_dir: str,
) -> str:
    """The round's queries (training images, most informative first) with their saliency PNGs;
    returns the path of queries.json."""
    data = PreparedData.load(Path(dataset))
    model, _ = load_model(checkpoint)
    pool = data.indices("train")
    probs = predict_proba(
        model, data.split_images("train"), what=f"scoring {len(pool)} pool images"
    )
    exclude = np.isin(data.ids[pool], list(already_annotated))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = query_round(model, data, probs, exclude, cfg, round_number, out)
    path = out / "queries.json"
    path.write_text(json.dumps(records, indent=1))
    return str(path)
