"""What every training stage (base, mid, sft, rl) shares around its step function: checkpoints that
refuse to overwrite and resume only the same model, clean stops on Ctrl-C/SIGTERM, steps dispatched
without waiting for them (their metrics fetched one step late), the metrics log (and optional
Weights & Biases), the progress bar, MFU, and the stage summary the report reads.

A stage directory `<run-dir>/<stage>/<model-tag>/` holds `checkpoints/`, `metrics.jsonl` (one JSON
object per line: training steps carry `loss`, evaluations `val_bpb`) and, once the stage has
finished, `summary.json` (see `write_summary`).
"""

import concurrent.futures
import contextlib
import json
import math
import os
import signal
import sys
import time

import grain
import jax
import numpy as np
from tqdm import tqdm

from nanochat_jax import sharding
from nanochat_jax.checkpoint import Checkpoints

EMA = 0.9  # smoothing of the logged training loss


def peak_flops(device) -> float | None:
    """bf16 dense peak of one chip (None where MFU means nothing, e.g. CPU)."""
    kind = device.device_kind.lower()
    table = [("h200", 989e12), ("h100", 989e12), ("h800", 756e12), ("a100", 312e12), ("a800", 312e12),
             ("l40s", 362e12), ("b200", 2.25e15), ("gb200", 2.5e15)]
    if device.platform == "cpu":
        return None
    return next((flops for name, flops in table if name in kind), None)


def open_checkpoints(directory: str, config, *, keep: int, resume: bool, resume_from_step: int = -1):
    """(Checkpoints, the step to resume from or None). A directory that already holds checkpoints is
    never silently overwritten, and a resume must be of the same model."""
    checkpoints = Checkpoints(directory, keep=keep)
    step = resume_from_step if resume_from_step >= 0 else (checkpoints.latest_step() if resume else None)
    if step is None and checkpoints.latest_step() is not None:
        checkpoints.close()
        raise ValueError(f"{checkpoints.directory} already holds checkpoints {checkpoints.all_steps()}; pass --resume "
                         f"to continue that run, or another --model-tag / --run-dir for a new one")
    if step is not None:
        saved = checkpoints.meta(step)["model_config"]
        if saved != config.to_json_dict():
            checkpoints.close()
            raise ValueError(f"{checkpoints.directory} step {step} holds another model ({saved}); "
                             f"use the flags of that run, or another --model-tag / --run-dir")
    return checkpoints, step


@contextlib.contextmanager
def stop_requests():
    """A list that SIGINT/SIGTERM append to: the loop finishes its step, saves and exits."""
    stop = []
    handler = lambda signum, frame: stop.append(signum)  # noqa: E731
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class MetricsLog:
    """Appends to `<stage dir>/metrics.jsonl` (a resumed stage continues the same file) and, with a
    project name, to Weights & Biases from the first process."""

    def __init__(self, out_dir: str, *, wandb_project: str | None = None, name: str = "", config: dict | None = None):
        self.file = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        self.wandb = None
        if wandb_project and jax.process_index() == 0:
            try:
                import wandb
            except ImportError:
                self.file.close()
                raise ValueError("--wandb-project needs the wandb package: `uv pip install wandb`") from None
            self.wandb = wandb.init(project=wandb_project, name=name, config=config)

    def record(self, **fields):
        self.file.write(json.dumps(fields) + "\n")
        if self.wandb is not None:
            self.wandb.log(fields, step=fields["step"])

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def progress_bar(total: int, initial: int, desc: str) -> tqdm:
    # In a log file (not a terminal) the bar is refreshed rarely instead of on every step.
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30)


def micro_steps(total_batch_size: int, device_batch_size: int, seq_len: int, n_devices: int) -> int:
    """Gradient-accumulation count: how many micro-steps of `device_batch_size` rows of `seq_len`
    tokens on every device make one optimizer step of `total_batch_size` tokens."""
    tokens_per_micro = device_batch_size * seq_len * n_devices
    if total_batch_size % tokens_per_micro:
        raise ValueError(f"--total-batch-size {total_batch_size:,} is not a multiple of one micro-step's "
                         f"{tokens_per_micro:,} tokens ({device_batch_size} rows x {seq_len} x {n_devices} devices)")
    return total_batch_size // tokens_per_micro


def step_batches(rows: grain.IterDataset, micro_steps: int, micro_sharding) -> grain.DatasetIterator:
    """Each optimizer step's batch: `micro_steps` host batches of this process's `rows` stacked and
    assembled into global (micro_steps, rows, T) arrays on the mesh, by a background thread one step
    ahead. The loop's host work between two dispatches is then a queue pop: the device has little
    left in its launch queue when a step's dispatch returns (its last launches are the optimizer's
    small kernels), and host work there leaves it idle (docs/perf_notes.md section 17). The
    iterator's `get_state()` is the position after the last batch taken."""

    def to_global(stacked):
        return tuple(sharding.global_batch(a, micro_sharding) for a in stacked)

    return iter(grain.experimental.ThreadPrefetchIterDataset(rows.batch(micro_steps).map(to_global),
                                                             prefetch_buffer_size=1))


def set_hyperparameters(opt_state, **values) -> None:
    """Host-computed values (schedules that depend on more than the step count) for the next
    update, written into the optimizer's injected hyperparameters."""
    for name, value in values.items():
        opt_state.hyperparams[name] = np.float32(value)


class OneStepLate:
    """Runs optimizer steps without waiting for them. `step_fn` dispatches a step to the device and
    returns at once; its loss is fetched only after the next step has been dispatched, so the device
    has the next step queued instead of idling while the host reads a scalar and prepares the next
    call (docs/perf_notes.md section 17).

    `on_done(loss, dt, **metrics)` is called once per step, in order, with the loss as a float, the
    step's wall time and the metrics given at dispatch. The first step is waited for at once. Call
    `settle()` before anything that reads what `on_done` accounts for (a checkpoint's metadata, an
    eval record, the end of the run): it waits for the step in flight and accounts for it.

    A step's time runs from its start on the device (its dispatch, or the end of the step queued
    before it) to its end. The ends are noted by a thread that waits for each step in turn: the
    host reads a loss only once the next dispatch has returned, which blocks until the device's
    launch queue has room, so by then the step may have ended long before.
    """

    def __init__(self, step_fn, on_done):
        self.step_fn, self.on_done = step_fn, on_done
        self.in_flight = None  # (loss, future end, dispatch time, metrics) of the step not accounted for
        self.last_end = -math.inf  # when the last step accounted for ended
        self.watcher = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="step-ends")

    def __call__(self, params, opt_state, *batch, **metrics):
        dispatched = time.perf_counter()
        params, opt_state, loss = self.step_fn(params, opt_state, *batch)
        end = self.watcher.submit(_end_time, loss)
        self.settle()
        self.in_flight = (loss, end, dispatched, metrics)
        if self.last_end == -math.inf:
            # The first step compiles: waited for at once, so that its time holds nothing of the next.
            self.settle()
        return params, opt_state

    def settle(self):
        if self.in_flight is None:
            return
        loss, end, dispatched, metrics = self.in_flight
        self.in_flight = None
        end = end.result()  # waits for the step
        self.on_done(float(loss), end - max(dispatched, self.last_end), **metrics)
        self.last_end = end


def _end_time(loss):
    """When the step that computes `loss` ended, seen from a thread that does nothing but wait for it."""
    loss.block_until_ready()
    return time.perf_counter()


def step_accounting(*, start_step: int, loop: dict, flops_per_token: int, log: MetricsLog, bar: tqdm):
    """The `on_done` of a training stage's `OneStepLate`, taking `step` and `tokens` (and any
    other fields for the record) as metrics: wall time (the first step of a process includes
    compilation and is kept out of the training time), the loss EMA, tokens/s, MFU over all the
    job's devices, a metrics record and the progress bar."""
    peak, n_devices = peak_flops(jax.devices()[0]), jax.device_count()

    def on_done(loss: float, dt: float, *, step: int, tokens: int, **extra):
        compiled_now = step == start_step
        if not compiled_now:
            loop["training_time_s"] += dt
        debiased = smoothed(loop, loss, step)
        tok_s = tokens / dt
        mfu = None if peak is None else 100 * flops_per_token * tok_s / (peak * n_devices)
        log.record(step=step, loss=loss, loss_ema=debiased, dt_s=dt, tokens_per_s=tok_s, mfu_percent=mfu,
                   includes_compile=compiled_now, **extra)
        bar.update(1)
        bar.set_postfix(loss=f"{debiased:.3f}", tok_s=f"{tok_s:,.0f}", mfu="n/a" if mfu is None else f"{mfu:.1f}%")
        if compiled_now:
            tqdm.write(f"step {step:05d} | compile + first step {dt:.1f}s")

    return on_done


def smoothed(loop: dict, loss: float, step: int) -> float:
    """Updates the loss EMA in `loop` and returns it debiased (early steps are not pulled to 0)."""
    loop["smooth_loss"] = EMA * loop["smooth_loss"] + (1 - EMA) * loss
    return loop["smooth_loss"] / (1 - EMA ** (step + 1))


def write_json(path: str, obj) -> None:
    """Atomic: a reader sees the old file or the new one, never half of one."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def write_summary(out_dir: str, *, stage: str, settings: dict, steps: int, tokens: int, training_time_s: float,
                  wall_time_s: float, results: dict) -> None:
    """`<stage dir>/summary.json`, written when a training stage finishes:
    {"stage", "settings" (resolved flags and derived values), "steps", "tokens" (trained on),
    "training_time_s" (steps only, compilation excluded), "wall_time_s" (this process), "results"}."""
    write_json(os.path.join(out_dir, "summary.json"), dict(
        stage=stage, settings=settings, steps=steps, tokens=tokens, training_time_s=training_time_s,
        wall_time_s=wall_time_s, results=results))
