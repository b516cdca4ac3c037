"""GSM8K (grade-school math, `openai/gsm8k` "main") as conversations with calculator tool calls.

A solution's `<<expression=result>>` annotations become tool use: the expression is a "python"
part (supervised: the model learns to call the calculator) and the result a "python_output" part
(not supervised: at inference time the tool writes it).
"""

import re

from nanochat_jax.tasks import sources

_CALL = re.compile(r"(<<[^>]*>>)")
# The final answer line of a solution, as GSM8K's own grader reads it (commas are dropped after).
_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after "#### " without thousands separators ("1,234" -> "1234"), or None. Compared
    as text, as the reference does: "10.0" is not "10"."""
    match = _ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def evaluate(conv: dict, completion: str) -> bool:
    """Whether the completion's final answer is the reference solution's (its last text part)."""
    reference = extract_answer(conv["messages"][-1]["content"][-1]["text"])
    return reference is not None and extract_answer(completion) == reference


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
