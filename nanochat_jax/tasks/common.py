"""What the task modules share: opening local data files, the reference's shuffle, multiple-choice prompts."""

import gzip
import os

import numpy as np


class TaskDataError(FileNotFoundError):
    """A task's data is not where the user pointed (message says where it looked and what to pass)."""


def find_file(data_dir: str, relative: str) -> str:
    """`<data_dir>/<relative>`, or the same with `.gz` (the shared copies are gzip-compressed)."""
    for candidate in (relative + ".gz", relative):
        path = os.path.join(data_dir, candidate)
        if os.path.exists(path):
            return path
    raise TaskDataError(f"no {relative}[.gz] under {data_dir}; pass --data-dir pointing at a folder laid out "
                        f"like ../shared/data (see its README)")


def open_text(path: str):
    return gzip.open(path, "rt", encoding="utf-8", newline="") if path.endswith(".gz") else \
        open(path, encoding="utf-8", newline="")


def hub_shuffle_order(n: int, seed: int = 42) -> np.ndarray:
    """Row order of Hugging Face `Dataset.shuffle(seed)`, which the reference applies to its eval
    sets: position i holds row permutation[i]."""
    return np.random.default_rng(seed).permutation(n)


def render_mc(question: str, letters, choices) -> str:
    """The reference's multiple-choice prompt. Each letter follows its choice with no space before
    it, so it is the same token ("A", not " A") the assistant answers with; small models need that."""
    lines = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{lines}\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters, choices, answer: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), **extra}
