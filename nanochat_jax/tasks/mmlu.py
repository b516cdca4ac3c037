"""MMLU (57 subjects), multiple choice A-D.

Files: `<data_dir>/mmlu/<split>/<subject>_<split>.csv[.gz]` with the header
`question,choice0,choice1,choice2,choice3,answer` (answer 0-3), an export of Hugging Face `cais/mmlu`.
The reference's `all` subset is the subjects in alphabetical order, concatenated.
"""

import os

from nanochat_jax.tasks import sources
from nanochat_jax.tasks.common import mc_conversation

LETTERS = ("A", "B", "C", "D")
SPLITS = ("dev", "test")  # the local copy has no validation or auxiliary_train split


def load(data_dir: str | None, split: str = "test") -> list[dict]:
    """Conversations of all subjects in the reference's order (shuffled with seed 42)."""
    if split not in SPLITS:
        raise ValueError(f"MMLU split must be one of {SPLITS} here")
    folder = sources.find(data_dir, f"mmlu/{split}")
    suffixes = (f"_{split}.csv", f"_{split}.csv.gz")
    files = sorted((f.removesuffix(".gz").removesuffix(f"_{split}.csv"), f) for f in os.listdir(folder) if f.endswith(suffixes))
    if not files:
        raise FileNotFoundError(f"no MMLU files (<subject>_{split}.csv[.gz]) in {folder}")
    rows = [(subject, r) for subject, name in files for r in sources.read_csv(os.path.join(folder, name))]
    return [mc_conversation(r["question"], LETTERS, [r[f"choice{k}"] for k in range(4)], LETTERS[int(r["answer"])],
                            subject=subject)
            for subject, r in sources.shuffled(rows)]
