"""GSM8K (grade-school math, `openai/gsm8k` "main") as conversations with calculator tool calls.

A solution's `<<expression=result>>` annotations become tool use: the expression is a "python"
part (supervised: the model learns to call the calculator) and the result a "python_output" part
(not supervised: at inference time the tool writes it).
"""

import re

from nanochat_jax.tasks import sources

_CALL = re.compile(r"(<<[^>]*>>)")


def conversation(row: dict) -> dict:
    parts = []
    for piece in _CALL.split(row["answer"]):
        if piece.startswith("<<") and piece.endswith(">>"):
            expression, _, result = piece[2:-2].rpartition("=")
            if not _:  # an annotation without "=": all of it is the call
                expression, result = result, ""
            parts += [{"type": "python", "text": expression}, {"type": "python_output", "text": result}]
        elif piece:
            parts.append({"type": "text", "text": piece})
    return {"messages": [{"role": "user", "content": row["question"]}, {"role": "assistant", "content": parts}]}


def load(split: str, data_dir: str | None = None, hf: bool = False) -> list[dict]:
    """All conversations of `split` ("train" or "test"), shuffled with the reference's seed."""
    if split not in ("train", "test"):
        raise ValueError(f"GSM8K has splits train and test, not {split!r}")
    rows = sources.hub_rows("openai/gsm8k", "main", split) if hf else \
        sources.read_jsonl(sources.find(data_dir, f"gsm8k/{split}.jsonl"))
    return [conversation(r) for r in sources.shuffled(rows)]
