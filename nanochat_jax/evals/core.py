"""CORE (the DCLM paper's in-context-learning suite, 22 tasks) scored exactly as the reference does.

A task is multiple choice (one prompt per choice, the continuation is the choice), schema (one
prompt per context option, the shared continuation is scored) or language modeling (the model must
produce the continuation greedily, token for token). Few-shot examples precede the question,
separated by a blank line. Multiple choice and schema pick the option whose continuation tokens
have the lowest mean loss; language modeling is right when every continuation token is the argmax.

Reproducing the reference's numbers requires its exact choices, all made here:
  - every task file is shuffled with random.Random(1337) before `max_per_task` cuts it;
  - example idx draws its few-shot examples with random.Random(1234 + idx) from the kept examples
    other than itself;
  - prompts are rendered text first and tokenized whole (BOS prepended), and the continuation span
    is found in token space: the common token prefix of the choices (multiple choice), the common
    token suffix of the options (schema), or the prompt without the continuation (language modeling,
    whose context is stripped so its last token cannot merge with the continuation);
  - prompts longer than the model's sequence_len are not cropped: the reference's crop only applies
    to models with a `max_seq_len` attribute, which its GPT does not have. The whole prompt goes
    through, the long sliding windows slide past sequence_len, rotary positions keep counting.
Centered accuracy maps the task's random baseline to 0 and perfect to 1; CORE is the mean over all
22 tasks. A task whose data file is missing is reported as missing, and the mean over the rest is
labelled partial: it is not comparable to a full CORE number.
"""

import csv
import dataclasses
import json
import os
import random
import time
import warnings

import numpy as np

SHUFFLE_SEED = 1337
FEWSHOT_SEED = 1234
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
DEFAULT_DELIMITER = " "  # the reference's default when core.yaml names none


@dataclasses.dataclass(frozen=True)
class CoreTask:
    label: str
    dataset_uri: str  # relative to <bundle>/eval_data
    task_type: str
    num_fewshot: int
    delimiter: str
    random_baseline: float  # percent, as eval_meta_data.csv states it


@dataclasses.dataclass
class Rendered:
    """One example's rows of token ids and, per row, the continuation span [start, end)."""
    tokens: list[list[int]]
    start: list[int]
    end: list[int]


# ---- the bundle: task list, baselines, data ---------------------------------------------------

def load_tasks(bundle_dir: str) -> list[CoreTask]:
    """The tasks of `<bundle>/core.yaml` with their random baselines from `eval_meta_data.csv`."""
    import yaml

    with open(os.path.join(bundle_dir, "core.yaml"), encoding="utf-8") as f:
        entries = yaml.safe_load(f)["icl_tasks"]
    with open(os.path.join(bundle_dir, "eval_meta_data.csv"), encoding="utf-8") as f:
        baselines = {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}
    tasks = []
    for e in entries:
        if e["icl_task_type"] not in TASK_TYPES:
            raise ValueError(f"core.yaml: task {e['label']} has unknown type {e['icl_task_type']!r}")
        if e["label"] not in baselines:
            raise ValueError(f"eval_meta_data.csv has no random baseline for task {e['label']}")
        shots = e["num_fewshot"]
        tasks.append(CoreTask(label=e["label"], dataset_uri=e["dataset_uri"], task_type=e["icl_task_type"],
                              num_fewshot=int(shots[0] if isinstance(shots, list) else shots),
                              delimiter=e.get("continuation_delimiter", DEFAULT_DELIMITER),
                              random_baseline=baselines[e["label"]]))
    return tasks


def task_data_path(bundle_dir: str, task: CoreTask) -> str:
    return os.path.join(bundle_dir, "eval_data", task.dataset_uri)


def load_examples(path: str, max_per_task: int = -1) -> list[dict]:
    """A task file's rows, shuffled as the reference shuffles them, cut to `max_per_task` (-1: all)."""
    with open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(SHUFFLE_SEED).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


# ---- rendering --------------------------------------------------------------------------------

def effective_fewshot(task: CoreTask, n_examples: int) -> int:
    """Few-shot count, clamped to the other examples available (the reference would crash)."""
    available = max(n_examples - 1, 0)
    if task.num_fewshot > available:
        warnings.warn(f"{task.label}: {task.num_fewshot}-shot needs {task.num_fewshot + 1} examples but "
                      f"{n_examples} are kept; using {available} few-shot examples (numbers not comparable)")
        return available
    return task.num_fewshot


def fewshot_examples(data: list[dict], idx: int, k: int) -> list[dict]:
    if k <= 0:
        return []
    # The reference samples from the list of indices without idx; sampling positions of range(n - 1)
    # and skipping idx draws the same examples without building that list (O(n) per example).
    picks = random.Random(FEWSHOT_SEED + idx).sample(range(len(data) - 1), k)
    return [data[j + (j >= idx)] for j in picks]


def _field(row: dict, key: str, label: str):
    try:
        return row[key]
    except (KeyError, TypeError):
        raise ValueError(f"{label}: a row has no {key!r} field (keys: {sorted(row) if isinstance(row, dict) else row})") from None


def render_prompts(task: CoreTask, item: dict, shots: list[dict]) -> list[str]:
    """Prompt texts: one per choice / context option; for language modeling [without, with]
    the continuation. Same text as the reference's templates produce."""
    d, lab = task.delimiter, task.label
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{_field(s, 'query', lab)}{d}{_field(s, 'choices', lab)[_field(s, 'gold', lab)]}\n\n" for s in shots)
        return [f"{prefix}{_field(item, 'query', lab)}{d}{choice}" for choice in _field(item, "choices", lab)]
    if task.task_type == "schema":
        prefix = "".join(f"{_field(s, 'context_options', lab)[_field(s, 'gold', lab)]}{d}{_field(s, 'continuation', lab)}\n\n"
                         for s in shots)
        cont = _field(item, "continuation", lab)
        return [f"{prefix}{option}{d}{cont}" for option in _field(item, "context_options", lab)]
    prefix = "".join(f"{str(_field(s, 'context', lab)).strip()}{d}{_field(s, 'continuation', lab)}\n\n" for s in shots)
    without = f"{prefix}{str(_field(item, 'context', lab)).strip()}{d}"
    # Stripped: a trailing space (the delimiter) would merge into the continuation's first token.
    return [without.strip(), f"{without}{_field(item, 'continuation', lab)}"]


def common_prefix_length(seqs: list[list[int]]) -> int:
    n = min(len(s) for s in seqs)
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def common_suffix_length(seqs: list[list[int]]) -> int:
    return common_prefix_length([s[::-1] for s in seqs])


def render_example(tokenizer, task: CoreTask, data: list[dict], idx: int, num_fewshot: int) -> Rendered:
    prompts = render_prompts(task, data[idx], fewshot_examples(data, idx, num_fewshot))
    tokens = tokenizer.encode(prompts, prepend=tokenizer.bos_token_id)
    ends = [len(t) for t in tokens]
    if task.task_type == "multiple_choice":
        start = common_prefix_length(tokens)
        return Rendered(tokens, [start] * len(tokens), ends)
    if task.task_type == "schema":
        suffix = common_suffix_length(tokens)
        return Rendered(tokens, [e - suffix for e in ends], ends)
    without, with_ = tokens
    if not (len(without) < len(with_) and with_[:len(without)] == without):
        raise ValueError(f"{task.label} example {idx}: the prompt without its continuation does not tokenize "
                         f"to a strict prefix of the prompt with it")
    return Rendered([with_], [len(without)], [len(with_)])


# ---- scoring ----------------------------------------------------------------------------------

def score_example(task: CoreTask, rendered: Rendered, scores, gold) -> dict:
    """The reference's decision for one example from its rows' (losses, predictions)."""
    if task.task_type == "language_modeling":
        (losses, preds), s, e = scores[0], rendered.start[0], rendered.end[0]
        predicted = preds[s - 1:e - 1]
        return {"predicted": [int(t) for t in predicted],
                "cont_losses": [float(x) for x in losses[s - 1:e - 1]],
                "correct": bool(np.array_equal(predicted, rendered.tokens[0][s:e]))}
    mean_losses = [float(np.mean(losses[s - 1:e - 1])) if e > s else float("nan")
                   for (losses, _), s, e in zip(scores, rendered.start, rendered.end)]
    pred = mean_losses.index(min(mean_losses))  # the first of equal lowest, as the reference picks
    return {"mean_losses": mean_losses, "pred": pred, "correct": pred == gold}


def evaluate_task(scorer, tokenizer, task: CoreTask, data: list[dict], details: bool = True,
                  chunk: int = 4096) -> dict:
    """Accuracy over `data`, row and token counts, and with `details` every example's rendering
    and scores. Examples are rendered and scored `chunk` at a time, so host memory stays bounded
    on the largest tasks (tens of thousands of prompts)."""
    from nanochat_jax.evals.scoring import bucket_length

    k = effective_fewshot(task, len(data))
    examples, correct, rows, tokens, padded = [], 0, 0, 0, 0
    n_chunks = -(-len(data) // chunk)
    for c, lo in enumerate(range(0, len(data), chunk)):
        rendered = [render_example(tokenizer, task, data, idx, k) for idx in range(lo, min(lo + chunk, len(data)))]
        flat = [t for r in rendered for t in r.tokens]
        rows, tokens, padded = rows + len(flat), tokens + sum(map(len, flat)), padded + sum(bucket_length(len(t)) for t in flat)
        scores = scorer.next_token_scores(flat, desc=task.label if n_chunks == 1 else f"{task.label} {c + 1}/{n_chunks}")
        offset = 0
        for idx, r in enumerate(rendered, start=lo):
            n = len(r.tokens)
            gold = None if task.task_type == "language_modeling" else data[idx].get("gold")
            result = score_example(task, r, scores[offset:offset + n], gold)
            offset += n
            correct += result["correct"]
            if details:
                examples.append({"idx": idx, "tokens": r.tokens, "start": r.start, "end": r.end, **result})
    out = {"accuracy": correct / len(data) if data else float("nan"), "num_fewshot": k, "num_examples": len(data),
           "rows": rows, "tokens": tokens, "padded_tokens": padded}
    return {**out, "examples": examples} if details else out


def centered_accuracy(accuracy: float, random_baseline_percent: float) -> float:
    """0 at the random baseline, 1 at perfect."""
    b = 0.01 * random_baseline_percent
    return (accuracy - b) / (1.0 - b)


def summarize(tasks: list[CoreTask], accuracies: dict[str, float]) -> dict:
    """Per-task and centered results, and CORE: the mean centered accuracy over all tasks, or, when
    some tasks have no result, None plus `core_partial` over those that have, with the missing named."""
    centered = {t.label: centered_accuracy(accuracies[t.label], t.random_baseline)
                for t in tasks if t.label in accuracies}
    missing = [t.label for t in tasks if t.label not in accuracies]
    mean = sum(centered.values()) / len(centered) if centered else float("nan")
    return {"results": {t.label: accuracies[t.label] for t in tasks if t.label in accuracies},
            "centered_results": centered, "missing": missing, "num_tasks": len(tasks),
            "core_metric": None if missing else mean, "core_partial": mean if missing else None}


def evaluate_core(scorer, tokenizer, bundle_dir: str, max_per_task: int = -1, log=print) -> dict:
    """Every task of the bundle; see `summarize` for the result."""
    tasks = load_tasks(bundle_dir)
    accuracies, timings = {}, {}
    for task in tasks:
        path = task_data_path(bundle_dir, task)
        if not os.path.exists(path):
            log(f"{task.label:<35} MISSING (no {path})")
            continue
        t0 = time.perf_counter()
        result = evaluate_task(scorer, tokenizer, task, load_examples(path, max_per_task), details=False)
        timings[task.label] = time.perf_counter() - t0
        accuracies[task.label] = result["accuracy"]
        log(f"{task.label:<35} {result['num_fewshot']:>2}-shot {task.task_type:<17} accuracy {result['accuracy']:.4f} | "
            f"centered {centered_accuracy(result['accuracy'], task.random_baseline):.4f} | "
            f"{result['num_examples']} examples in {timings[task.label]:.2f}s")
    return {**summarize(tasks, accuracies), "seconds": timings}


def core_line(summary: dict) -> str:
    """The CORE line to print: the full number, or the partial one clearly marked."""
    if summary["core_metric"] is not None:
        return f"CORE metric: {summary['core_metric']:.4f}"
    n_done = summary["num_tasks"] - len(summary["missing"])
    return (f"CORE metric: PARTIAL {summary['core_partial']:.4f} over {n_done} of {summary['num_tasks']} tasks "
            f"(missing: {', '.join(summary['missing'])}); not comparable to a full CORE")


def write_csv(summary: dict, path: str) -> None:
    """The reference's CSV layout (task, accuracy, centered; CORE last), missing tasks marked."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in summary["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {summary['centered_results'][label]:<10.6f}\n")
        for label in summary["missing"]:
            f.write(f"{label:<35}, {'missing':<10}, {'missing':<10}\n")
        if summary["core_metric"] is not None:
            f.write(f"{'CORE':<35}, {'':<10}, {summary['core_metric']:<10.6f}\n")
        else:
            f.write(f"{'CORE (partial)':<35}, {'':<10}, {summary['core_partial']:<10.6f}\n")
