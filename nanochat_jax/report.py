"""The report card of a run: `<run-dir>/report/report.md` with its plots, built only from files the
stages wrote. A stage without its files is reported as "not run"; no number is ever made up.

What it reads (all paths inside the run directory):

    .done/<stage>                      speedrun_jax.sh's marker of a finished stage: {"seconds": wall time}
    tokenizer/tok_eval.json            the tok_eval stage's measurements (any JSON object)
    <stage>/<tag>/metrics.jsonl        training stages (base, mid, sft, rl): one object per line; training
                                       steps carry "step", "loss", "loss_ema", "dt_s", "tokens_per_s",
                                       "mfu_percent" (null off-GPU), "includes_compile"; evaluations carry
                                       "step", "val_bpb", "training_time_s"
    <stage>/<tag>/summary.json         written when a training stage finishes (see launch/loop.py):
                                       {"stage", "settings", "steps", "tokens", "training_time_s",
                                        "wall_time_s", "results": {"min_val_bpb", "samples"?}}
    **/results.json                    evaluation stages, one file per (stage, model):
                                       {"stage": "base_eval" | "chat_eval" | ...,
                                        "model": "base" | "mid" | "sft" | "rl"  (default: base for base_eval),
                                        "metrics": {"CORE": 0.21, "ARC-Easy": 0.31, "MMLU": 0.27, ...},
                                        "settings": {...} (optional), "time_s": seconds (optional)}
                                       accuracies are fractions in [0, 1]; CORE and ChatCORE as the stage reports them
"""

import datetime
import json
import os
import platform
import statistics
import subprocess

TRAINING_STAGES = ["base", "mid", "sft", "rl"]
STAGE_ORDER = ["tok", "tok_eval", "base", "base_eval", "mid", "sft", "chat_eval", "rl"]
SUMMARY_METRICS = ["CORE", "ARC-Easy", "ARC-Challenge", "GSM8K", "HumanEval", "MMLU", "ChatCORE"]
SUMMARY_MODELS = ["base", "mid", "sft", "rl"]
PACKAGES = ["jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tiktoken", "numpy"]
NOT_RUN = "not run"


# ---- reading ---------------------------------------------------------------------------------

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def read_metrics(path: str) -> tuple[list[dict], list[dict]]:
    """(training steps, evaluations) of a metrics.jsonl; a resumed stage logs again the steps after
    its last checkpoint, so the last record of each step wins. A torn last line is skipped."""
    steps, evals = {}, {}
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "loss" in row:
                steps[row["step"]] = row
            elif "val_bpb" in row:
                evals[row["step"]] = row
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def training_runs(run_dir: str, stage: str) -> list[dict]:
    """Every model of a training stage: its tag, directory, summary (None if unfinished), metrics."""
    stage_dir = os.path.join(run_dir, stage)
    runs = []
    if not os.path.isdir(stage_dir):
        return runs
    for tag in sorted(os.listdir(stage_dir)):
        directory = os.path.join(stage_dir, tag)
        metrics_path = os.path.join(directory, "metrics.jsonl")
        if not os.path.exists(metrics_path):
            continue
        steps, evals = read_metrics(metrics_path)
        runs.append(dict(tag=tag, directory=directory, summary=_read_json(os.path.join(directory, "summary.json")),
                         steps=steps, evals=evals))
    return runs


def eval_results(run_dir: str) -> list[dict]:
    """Every well-formed results.json in the run directory (checkpoints are not searched)."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        dirs[:] = sorted(d for d in dirs if d not in ("checkpoints", "report", ".done"))
        if "results.json" in files:
            result = _read_json(os.path.join(root, "results.json"))
            if isinstance(result, dict) and isinstance(result.get("metrics"), dict) and "stage" in result:
                result.setdefault("model", "base" if result["stage"] == "base_eval" else None)
                result["path"] = os.path.relpath(os.path.join(root, "results.json"), run_dir)
                found.append(result)
    return found


def stage_seconds(run_dir: str) -> dict[str, float]:
    out = {}
    done = os.path.join(run_dir, ".done")
    for name in sorted(os.listdir(done)) if os.path.isdir(done) else []:
        marker = _read_json(os.path.join(done, name))
        if isinstance(marker, dict) and isinstance(marker.get("seconds"), (int, float)):
            out[name] = float(marker["seconds"])
    return out


def system_info() -> list[tuple[str, str]]:
    from importlib import metadata

    rows = [("date", datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")),
            ("host", platform.node()), ("platform", platform.platform()),
            ("python", platform.python_version()), ("CPU cores", str(os.cpu_count()))]
    try:
        import jax

        devices = jax.devices()
        kinds = sorted({d.device_kind for d in devices})
        rows.append(("accelerators", f"{len(devices)} x {', '.join(kinds)} ({devices[0].platform})"))
    except RuntimeError as e:  # no backend at all: say so rather than fail the report
        rows.append(("accelerators", f"unavailable ({e})"))
    for package in PACKAGES:
        try:
            rows.append((package, metadata.version(package)))
        except metadata.PackageNotFoundError:
            rows.append((package, "not installed"))
    rows.append(("git commit", _git_commit()))
    return rows


def _git_commit() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return commit + (" (with uncommitted changes)" if dirty else "")


# ---- plots -----------------------------------------------------------------------------------

def plot_run(run: dict, path: str, title: str) -> bool:
    """Loss and val bpb against step and against training time; False when there is nothing to draw."""
    if not run["steps"] and not run["evals"]:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    steps, evals = run["steps"], run["evals"]
    elapsed, clock = [], 0.0
    for row in steps:  # training time as the stage counts it: compilation excluded
        clock += 0.0 if row.get("includes_compile") else row.get("dt_s", 0.0)
        elapsed.append(clock)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    panels = [
        (axes[0, 0], [r["step"] for r in steps], [r.get("loss_ema", r["loss"]) for r in steps], "step", "train loss (EMA)"),
        (axes[0, 1], elapsed, [r.get("loss_ema", r["loss"]) for r in steps], "training time (s)", "train loss (EMA)"),
        (axes[1, 0], [r["step"] for r in evals], [r["val_bpb"] for r in evals], "step", "val bpb"),
        (axes[1, 1], [r.get("training_time_s", 0.0) for r in evals], [r["val_bpb"] for r in evals],
         "training time (s)", "val bpb"),
    ]
    for ax, x, y, xlabel, ylabel in panels:
        ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return True


# ---- writing ---------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f}s" if seconds < 120 else f"{seconds / 60:.1f}min"


def _table(rows, header=("", "")) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in row) + " |" for row in rows]
    return out + [""]


def summary_table(results: list[dict]) -> list[str]:
    by_model = {m: {} for m in SUMMARY_MODELS}
    for r in results:
        if r.get("model") in by_model:
            by_model[r["model"]].update(r["metrics"])
    rows = [[metric] + [_fmt(by_model[m][metric]) if metric in by_model[m] else "-" for m in SUMMARY_MODELS]
            for metric in SUMMARY_METRICS]
    return _table(rows, header=["Metric"] + [m.upper() for m in SUMMARY_MODELS])


def training_section(stage: str, runs: list[dict], report_dir: str, seconds: float | None) -> list[str]:
    lines = [f"## {stage}", ""]
    if not runs:
        return lines + [NOT_RUN, ""]
    for run in runs:
        s = run["summary"]
        timed = [r for r in run["steps"] if not r.get("includes_compile")]
        tok_s = statistics.median(r["tokens_per_s"] for r in timed) if timed else None
        mfus = [r["mfu_percent"] for r in timed if r.get("mfu_percent") is not None]
        final_bpb = run["evals"][-1]["val_bpb"] if run["evals"] else None
        status = "finished" if s else f"unfinished ({len(run['steps'])} steps logged; rerun with --resume)"
        rows = [("model", run["tag"]), ("status", status)]
        if s:
            rows += [("steps", _fmt(s["steps"])), ("tokens trained on", _fmt(s["tokens"])),
                     ("training time (compilation excluded)", _duration(s["training_time_s"])),
                     ("stage wall time", _duration(s["wall_time_s"]))]
        if seconds is not None:
            rows.append(("wall time in the speedrun (all models, with start-up)", _duration(seconds)))
        rows += [("median tokens/s", _fmt(tok_s) if tok_s else "-"),
                 ("median MFU", f"{statistics.median(mfus):.1f}%" if mfus else "n/a (no known peak FLOPs, e.g. CPU)"),
                 ("final val bpb", _fmt(final_bpb) if final_bpb is not None else "-")]
        if s and "min_val_bpb" in s["results"]:
            rows.append(("min val bpb", _fmt(s["results"]["min_val_bpb"])))
        lines += _table(rows, header=("", run["tag"]))
        image = f"{stage}_{run['tag']}.png"
        if plot_run(run, os.path.join(report_dir, image), f"{stage} / {run['tag']}"):
            lines += [f"![{stage} {run['tag']}]({image})", ""]
        if s and s["results"].get("samples"):
            lines += ["Greedy answers at the end of the stage:", ""]
            lines += _table([(p, a) for p, a in s["results"]["samples"].items()], header=("prompt", "answer"))
        if s:
            lines += ["<details><summary>settings</summary>", ""]
            lines += _table(sorted((k, _fmt(v)) for k, v in s["settings"].items()), header=("setting", "value"))
            lines += ["</details>", ""]
    return lines


def eval_section(stage: str, results: list[dict], seconds: float | None) -> list[str]:
    lines = [f"## {stage}", ""]
    mine = [r for r in results if r["stage"] == stage]
    if not mine:
        return lines + [NOT_RUN, ""]
    if seconds is not None:
        lines += [f"Wall time in the speedrun: {_duration(seconds)}", ""]
    for r in sorted(mine, key=lambda r: SUMMARY_MODELS.index(r["model"]) if r["model"] in SUMMARY_MODELS else 99):
        rows = [(k, _fmt(v)) for k, v in r["metrics"].items()]
        if isinstance(r.get("time_s"), (int, float)):
            rows.append(("time", _duration(r["time_s"])))
        lines += [f"### model: {r['model']}  (`{r['path']}`)", ""] + _table(rows, header=("metric", "value"))
        if isinstance(r.get("settings"), dict):
            lines += _table(sorted((k, _fmt(v)) for k, v in r["settings"].items()), header=("setting", "value"))
    return lines


def tokenizer_section(run_dir: str, seconds: dict) -> list[str]:
    lines = ["## tok", ""]
    tok_json = os.path.join(run_dir, "tokenizer", "tokenizer.json")
    if not os.path.exists(tok_json):
        lines += [NOT_RUN, ""]
    else:
        from nanochat_jax.tokenizer import Tokenizer

        vocab = Tokenizer.from_directory(os.path.dirname(tok_json)).vocab_size
        rows = [("vocabulary size", _fmt(vocab))]
        if "tok" in seconds:
            rows.append(("wall time in the speedrun", _duration(seconds["tok"])))
        lines += _table(rows, header=("", "tokenizer"))
    lines += ["## tok_eval", ""]
    tok_eval = _read_json(os.path.join(run_dir, "tokenizer", "tok_eval.json"))
    if tok_eval is None:
        return lines + [NOT_RUN, ""]
    rows = list(_flatten(tok_eval))
    if "tok_eval" in seconds:
        rows.append(("wall time in the speedrun", _duration(seconds["tok_eval"])))
    return lines + _table(rows, header=("measurement", "value"))


def _flatten(obj, prefix=""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _flatten(v, f"{prefix}{k}.")
    elif isinstance(obj, list):
        yield prefix.rstrip("."), ", ".join(_fmt(v) for v in obj)
    else:
        yield prefix.rstrip("."), _fmt(obj)


def build(run_dir: str) -> str:
    """Writes `<run_dir>/report/report.md` (and its PNGs); returns its path."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run directory {run_dir}")
    report_dir = os.path.join(run_dir, "report")
    os.makedirs(report_dir, exist_ok=True)
    seconds = stage_seconds(run_dir)
    results = eval_results(run_dir)
    lines = ["# nanochat-jax report", "", f"Run directory: `{os.path.abspath(run_dir)}`", ""]
    lines += ["## System", ""] + _table(system_info(), header=("", ""))
    lines += ["## Summary", ""] + summary_table(results)
    if seconds:
        lines += [f"Total wall time of the finished speedrun stages: {_duration(sum(seconds.values()))}", ""]
    lines += tokenizer_section(run_dir, seconds)
    for stage in STAGE_ORDER[2:]:
        if stage in TRAINING_STAGES:
            lines += training_section(stage, training_runs(run_dir, stage), report_dir, seconds.get(stage))
        else:
            lines += eval_section(stage, results, seconds.get(stage))
    path = os.path.join(report_dir, "report.md")
    _write_atomic(path, "\n".join(lines))
    return path


def copy_to(report_path: str, directory: str) -> str:
    """The report in `directory` with its image links pointing back into the run directory."""
    images = os.path.relpath(os.path.dirname(os.path.abspath(report_path)), os.path.abspath(directory))
    with open(report_path) as f:
        text = f.read()
    for name in os.listdir(os.path.dirname(report_path)):
        if name.endswith(".png"):
            text = text.replace(f"]({name})", f"]({os.path.join(images, name)})")
    out = os.path.join(directory, "report.md")
    _write_atomic(out, text)
    return out


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)
