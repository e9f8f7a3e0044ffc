"""DVC stage `prepare`: build the dataset named in the settings file (`--params`, the file
dvc.yaml's `params_file` names: params.yaml unless `xbl --params FILE` runs) into `data.out`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from xbl.config import load_config
from xbl.data.build import build_dataset
from xbl.errors import XblError


def summary(data) -> dict:
    return {
        "n_images": int(len(data)),
        "classes": data.classes.tolist(),
        "image_shape": list(data.images.shape[1:]),
        "per_split": {s: int((data.split == s).sum()) for s in np.unique(data.split)},
        "has_confounder": bool(data.confounder.any()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="the settings file")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.params).data
        out = Path(cfg.out)
        data = build_dataset(cfg, Path("."), out)
    except (XblError, FileNotFoundError) as exc:  # a setting or an input the user must fix
        print(f"prepare: {exc}", file=sys.stderr)
        return 2
    (out / "summary.json").write_text(json.dumps(summary(data), indent=2) + "\n")
    print(json.dumps(summary(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
