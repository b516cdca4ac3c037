"""ARC-Easy and ARC-Challenge (AI2), multiple choice with 3-5 answers labelled A-E or 1-5.

Files: `<data_dir>/arc/ARC-{Easy,Challenge}/ARC-{Easy,Challenge}-{Train,Dev,Test}.jsonl[.gz]` in AI2's
release schema (`question.stem`, `question.choices[{text,label}]`, `answerKey`), rows in the order of
Hugging Face `allenai/ai2_arc`, whose `validation` split is `Dev` here.
"""

from nanochat_jax.tasks import sources
from nanochat_jax.tasks.common import mc_conversation

SUBSETS = ("ARC-Easy", "ARC-Challenge")
SPLITS = {"train": "Train", "validation": "Dev", "test": "Test"}


def load(data_dir: str | None, subset: str, split: str = "test") -> list[dict]:
    """Conversations in the reference's order (the hub's row order shuffled with seed 42)."""
    if subset not in SUBSETS or split not in SPLITS:
        raise ValueError(f"ARC subset must be one of {SUBSETS} and split one of {sorted(SPLITS)}")
    path = sources.find(data_dir, f"arc/{subset}/{subset}-{SPLITS[split]}.jsonl")
    out = []
    for row in sources.shuffled(sources.read_jsonl(path)):
        choices = row["question"]["choices"]
        letters = [c["label"] for c in choices]
        if row["answerKey"] not in letters:
            raise ValueError(f"{path}: question {row.get('id')!r} answer {row['answerKey']!r} is not one of {letters}")
        out.append(mc_conversation(row["question"]["stem"], letters, [c["text"] for c in choices], row["answerKey"]))
    return out
