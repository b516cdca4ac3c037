"""Where post-training data comes from: a local folder laid out like `shared/data/` (the samples
shipped in `tasks/data/` by default, a full copy with `--data-dir`), or the Hugging Face hub.

Every loader returns plain rows (dicts) in a fixed, shuffled order: the order is a pure function
of the data and a seed, so a mixture (and a resumed run) sees the same conversation at the same index.
"""

import csv
import gzip
import io
import json
import os

import numpy as np

SAMPLE_DATA_DIR = os.path.join(os.path.dirname(__file__), "data")


def find(data_dir: str | None, relative: str) -> str:
    """`relative` inside `data_dir` (default: the shipped samples); `.gz` is tried too."""
    root = data_dir or SAMPLE_DATA_DIR
    for candidate in (os.path.join(root, relative), os.path.join(root, relative) + ".gz"):
        if os.path.exists(candidate):
            return candidate
    raise FileNotFoundError(f"{os.path.join(root, relative)}[.gz] not found; --data-dir must point to a folder "
                            f"laid out like {SAMPLE_DATA_DIR} (e.g. ../shared/data)")


def open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.endswith(".gz") else \
        open(path, encoding="utf-8", newline="")


def read_jsonl(path: str) -> list:
    """One JSON value per non-empty line; a malformed line is an error naming file and line."""
    rows = []
    with open_text(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from None
    return rows


def read_json(path: str):
    with open_text(path) as f:
        return json.load(f)


def read_csv(path: str) -> list[dict]:
    with open_text(path) as f:
        return list(csv.DictReader(io.StringIO(f.read())))


def shuffled(rows: list, seed: int = 42) -> list:
    """A fixed permutation of `rows` (the reference shuffles every dataset with seed 42)."""
    order = np.random.default_rng(seed).permutation(len(rows))
    return [rows[i] for i in order]


def hub_rows(name: str, config: str | None, split: str) -> list[dict]:
    """Rows of a Hugging Face dataset (needs the `datasets` package and network or its cache)."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise ValueError("--hf needs the `datasets` package: `uv pip install datasets`") from None
    return list(load_dataset(name, config, split=split))
