"""HumanEval (OpenAI, 164 Python function-completion problems) as conversations, and its scoring.

File: `<data_dir>/humaneval/HumanEval.jsonl[.gz]` in OpenAI's release schema (`task_id`, `prompt`,
`canonical_solution`, `test`, `entry_point`), rows in the order of Hugging Face
`openai/openai_humaneval`. The user message is the prompt (imports, signature, docstring); the model
is expected to write the whole function, as the reference's chat models are trained to.
"""

import re

from nanochat_jax.execution import execute_code
from nanochat_jax.tasks import sources

# The first fenced block (```python or bare ```), if the model used one.
_FENCED = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def conversation(row: dict) -> dict:
    return {"messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
            "task_id": row["task_id"], "entry_point": row["entry_point"], "test": row["test"]}


def load(data_dir: str | None) -> list[dict]:
    """All problems in the reference's order (the hub's row order shuffled with seed 42)."""
    return [conversation(r) for r in sources.shuffled(sources.read_jsonl(sources.find(data_dir, "humaneval/HumanEval.jsonl")))]


def leading_imports(prompt: str) -> str:
    """The import lines the prompt starts with (comments and blank lines skipped): a completion that
    rewrites the function often leaves them out, and the tests need them."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    """The code of a completion: its first fenced block, else all of it."""
    match = _FENCED.search(completion)
    return (match.group(1) if match else completion).strip()


def program(conv: dict, completion: str) -> str:
    """What runs in the sandbox: the prompt's imports, the completion's code, the tests, the check."""
    return (f"{leading_imports(conv['messages'][0]['content'])}\n\n{extract_program(completion)}\n\n"
            f"{conv['test']}\ncheck({conv['entry_point']})")


def evaluate(conv: dict, completion: str, timeout: float = 5.0) -> bool:
    """Whether the completion passes the problem's tests, run in the sandbox (model-written code)."""
    return execute_code(program(conv, completion), timeout=timeout).success
