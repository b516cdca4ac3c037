"""MMLU (57 subjects), multiple choice A-D.

Files: `<data_dir>/mmlu/<split>/<subject>_<split>.csv[.gz]` with the header
`question,choice0,choice1,choice2,choice3,answer` (answer 0-3), an export of Hugging Face `cais/mmlu`.
The reference's `all` subset is the subjects in alphabetical order, concatenated.
"""

import csv
import os

from nanochat_jax.tasks.common import TaskDataError, hub_shuffle_order, mc_conversation, open_text

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "test")  # the local copy has no validation or auxiliary_train split


def load(data_dir: str, split: str = "test") -> list[dict]:
    """Conversations of all subjects in the reference's order (shuffled with seed 42)."""
    if split not in SPLITS:
        raise ValueError(f"MMLU split must be one of {SPLITS} here")
    folder = os.path.join(data_dir, "mmlu", split)
    suffixes = (f"_{split}.csv", f"_{split}.csv.gz")
    files = [f for f in os.listdir(folder) if f.endswith(suffixes)] if os.path.isdir(folder) else []
    if not files:
        raise TaskDataError(f"no MMLU files (<subject>_{split}.csv[.gz]) in {folder}; pass --data-dir pointing "
                            f"at a folder laid out like ../shared/data (see its README)")
    rows = []
    for subject, name in sorted((f.removesuffix(".gz").removesuffix(f"_{split}.csv"), f) for f in files):
        with open_text(os.path.join(folder, name)) as f:
            for record in csv.DictReader(f):
                rows.append((subject, record))
    out = []
    for i in hub_shuffle_order(len(rows)):
        subject, r = rows[i]
        choices = [r[f"choice{k}"] for k in range(4)]
        out.append(mc_conversation(r["question"], LETTERS, choices, LETTERS[int(r["answer"])], subject=subject))
    return out
