"""Chat evaluations: categorical (ARC-Easy, ARC-Challenge, MMLU), generative (GSM8K, HumanEval), ChatCORE.

A categorical task is scored as the reference scores it: the conversation is rendered for
completion (up to <|assistant_start|>), and the prediction is the answer letter whose token has the
highest logit at the last position, among that question's letters only. A generative task samples
completions of the same prompt (greedy by default, calculator tool use included) and a problem
passes when any of its samples does: GSM8K compares the number after "####", HumanEval runs the
code against the problem's tests in the sandbox. ChatCORE is the mean centered accuracy over the
reference's five chat tasks; over fewer it is reported as partial.
"""

import numpy as np

# Random-guess accuracy of each chat task (multiple choice of 4, or open-ended).
BASELINES = {"ARC-Easy": 0.25, "ARC-Challenge": 0.25, "MMLU": 0.25, "GSM8K": 0.0, "HumanEval": 0.0}
CATEGORICAL = ("ARC-Easy", "ARC-Challenge", "MMLU")
GENERATIVE = ("GSM8K", "HumanEval")


def load_task(name: str, data_dir: str | None) -> list[dict]:
    """The test split of a chat task, from local files under `data_dir` (None: the samples shipped
    in nanochat_jax/tasks/data)."""
    from nanochat_jax.tasks import arc, gsm8k, humaneval, mmlu

    if name in ("ARC-Easy", "ARC-Challenge"):
        return arc.load(data_dir, name, "test")
    if name == "MMLU":
        return mmlu.load(data_dir, "test")
    if name == "GSM8K":
        return gsm8k.load("test", data_dir)
    if name == "HumanEval":
        return humaneval.load(data_dir)
    raise ValueError(f"unknown chat task {name!r}: the tasks are {list(BASELINES)}")


def judge(name: str):
    """`(conversation, completion text) -> passed` of a generative task."""
    from nanochat_jax.tasks import gsm8k, humaneval

    return {"GSM8K": gsm8k.evaluate, "HumanEval": humaneval.evaluate}[name]


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


def evaluate_generative(engine, tokenizer, conversations: list[dict], passes, *, num_samples: int = 1,
                        max_tokens: int = 512, temperature: float = 0.0, top_k: int | None = 50, seed: int = 42,
                        progress: bool = False) -> dict:
    """Accuracy (a problem passes if any of its samples does, `passes(conversation, text)`) and every
    completion's text. All prompts go through the engine as one batch with one seed, so a run is a
    pure function of the model, the data and these settings."""
    prompts = [tokenizer.render_for_completion(c) for c in conversations]
    samples = engine.generate_batch(prompts, max_tokens=max_tokens, num_samples=num_samples,
                                    temperature=temperature, top_k=top_k, seed=seed, progress=progress)
    completions = [[tokenizer.decode(s.tokens) for s in row] for row in samples]
    # any() stops at the first pass: no more sandbox runs than needed
    passed = sum(any(passes(c, text) for text in texts) for c, texts in zip(conversations, completions))
    total = len(conversations)
    return {"accuracy": passed / total if total else float("nan"), "passed": passed, "total": total,
            "completions": completions}


def chatcore(accuracies: dict[str, float]) -> dict:
    """Mean centered accuracy: over all five chat tasks (`chatcore`), else over those given
    (`chatcore_partial`, with the missing ones named)."""
    centered = {name: (acc - BASELINES[name]) / (1.0 - BASELINES[name]) for name, acc in accuracies.items()}
    missing = [name for name in BASELINES if name not in accuracies]
    mean = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"centered": centered, "missing": missing,
            "chatcore": None if missing else mean, "chatcore_partial": mean if missing else None}
