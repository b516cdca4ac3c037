"""Chat evaluations that need no sampling (categorical: ARC-Easy, ARC-Challenge, MMLU) and ChatCORE.

A categorical task is scored as the reference scores it: the conversation is rendered for
completion (up to <|assistant_start|>), and the prediction is the answer letter whose token has the
highest logit at the last position, among that question's letters only. ChatCORE is the mean
centered accuracy over the reference's five chat tasks; over fewer it is reported as partial.
"""

import numpy as np

# Random-guess accuracy of each chat task (multiple choice of 4, or open-ended).
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")


def load_task(name: str, data_dir: str | None) -> list[dict]:
    """The test split of a categorical chat task, from local files under `data_dir` (None: the
    samples shipped in nanochat_jax/tasks/data)."""
    from nanochat_jax.tasks import arc, mmlu

    if name in ("ARC-Easy", "ARC-Challenge"):
        return arc.load(data_dir, name, "test")
    if name == "MMLU":
        return mmlu.load(data_dir, "test")
    generative = sorted(set(BASELINES) - set(CATEGORICAL))
    raise ValueError(f"unknown chat task {name!r}: categorical tasks are {list(CATEGORICAL)}"
                     + (f" ({', '.join(generative)} need sampling, which chat_eval does not do yet)" if name in generative else ""))


def letter_token_ids(tokenizer, letters) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens in this tokenizer; it must be one")
        ids.append(encoded[0])
    return ids


def evaluate_categorical(scorer, tokenizer, conversations: list[dict], desc: str | None = None) -> dict:
    """Accuracy and every prediction (the first of equally high letters wins, as in the reference)."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    ids_of = {}  # letter sets repeat (A-D nearly always): tokenize each once
    for c in conversations:
        key = tuple(c["letters"])
        if key not in ids_of:
            ids_of[key] = letter_token_ids(tokenizer, key)
    candidates = [ids_of[tuple(c["letters"])] for c in conversations]
    logits = scorer.candidate_logits(prompts, [len(p) - 1 for p in prompts], candidates, desc=desc)
    predictions = [c["letters"][int(np.argmax(x))] for c, x in zip(conversations, logits)]
    passed = sum(p == c["messages"][-1]["content"] for p, c in zip(predictions, conversations))
    total = len(conversations)
    return {"accuracy": passed / total if total else float("nan"), "passed": passed, "total": total,
            "predictions": predictions}


def chatcore(accuracies: dict[str, float]) -> dict:
    """Mean centered accuracy: over all five chat tasks (`chatcore`), else over those given
    (`chatcore_partial`, with the missing ones named)."""
    centered = {name: (acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()}
    missing = [name for name in BASELINES if name not in accuracies]
    mean = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"centered": centered, "missing": missing,
            "chatcore": None if missing else mean, "chatcore_partial": mean if missing else None}
