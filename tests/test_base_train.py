"""The pretraining stage end to end on a tiny model: it learns, resumes exactly (also after
SIGTERM), resumes elastically on fewer devices, and refuses bad input with a clear message."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from launch import base_train, tok
from nanochat_jax.checkpoint import Checkpoints, abstract_params
from nanochat_jax.config import config_from_depth

STEPS = 16
# 8 fake devices x 1 row x 64 tokens = 512 tokens per micro-step: 2 micro-steps per optimizer step.
FLAGS = ["--depth", "1", "--max-seq-len", "64", "--total-batch-size", "1024", "--eval-tokens", "1024",
         "--warmup-steps", "2", "--num-iterations", str(STEPS), "--eval-every", "8", "--save-every", "8",
         "--sample-every", str(STEPS), "--matrix-lr", "0.4", "--embedding-lr", "6", "--unembedding-lr", "0.2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    tok.main_tok(["--run-dir", path, "--vocab-size", "512", "--max-chars", "300000"])
    return path


def ckpt_dir(run_dir, tag):
    return os.path.join(run_dir, "base", tag, "checkpoints")


def metrics(run_dir, tag):
    with open(os.path.join(run_dir, "base", tag, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def saved(run_dir, tag, step=STEPS):
    """Params, optimizer state, data-iterator state and meta of a checkpoint, as host arrays."""
    manager = Checkpoints(ckpt_dir(run_dir, tag)).manager
    config = config_from_depth(1, vocab_size=512, sequence_len=64)
    out = manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params(config)), opt_state=ocp.args.StandardRestore(),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    manager.close()
    return {k: jax.tree.map(np.asarray, out[k]) for k in ("params", "opt_state")} | {"data": out["data"], "meta": out["meta"]}


def stage(run_dir, tag, *extra, devices=8, wait_for_steps=None):
    """The stage in a fresh process (own device count); optionally SIGTERM it after some steps."""
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", NANOCHAT_JAX_CACHE="")
    cmd = [sys.executable, "-m", "launch.stage", "base", *FLAGS, "--run-dir", run_dir, "--model-tag", tag,
           "--device-batch-size", str(8 // devices), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    if wait_for_steps:
        log = os.path.join(run_dir, "base", tag, "metrics.jsonl")
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(log) and sum(1 for line in open(log) if '"loss"' in line) >= wait_for_steps:
                break
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


@pytest.fixture(scope="module")
def straight(run_dir):
    base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "straight", "--device-batch-size", "1"])
    return saved(run_dir, "straight")


def assert_identical(a, b):
    jax.tree.map(np.testing.assert_array_equal, a["params"], b["params"])
    jax.tree.map(np.testing.assert_array_equal, a["opt_state"], b["opt_state"])
    assert a["data"] == b["data"]  # the same iterator state: the next batch is the same batch
    assert a["meta"]["loop"]["smooth_loss"] == b["meta"]["loop"]["smooth_loss"]


def test_tiny_run_learns_and_reports(run_dir, straight):
    records = metrics(run_dir, "straight")
    steps = [r for r in records if "loss" in r]
    losses = [r["loss"] for r in steps]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.5, losses
    bpb = [r["val_bpb"] for r in records if "val_bpb" in r]
    assert len(bpb) == 3 and bpb[-1] < bpb[0]
    assert steps[0]["includes_compile"] and not any(r["includes_compile"] for r in steps[1:])
    # Steps are accounted for one step late, yet every record lands in order: an eval after the
    # steps before it, its training time theirs.
    kinds = [("loss" if "loss" in r else "val", r["step"]) for r in records]
    assert kinds == [("val", 0), *[("loss", s) for s in range(8)], ("val", 8),
                     *[("loss", s) for s in range(8, 16)], ("val", 16)]
    assert records[9]["training_time_s"] == pytest.approx(sum(r["dt_s"] for r in steps[1:8]))
    assert all(type(r["lr_multiplier"]) is float for r in steps)


def test_resume_is_bitwise_exact(run_dir, straight):
    os.makedirs(ckpt_dir(run_dir, "resumed"))
    shutil.copytree(os.path.join(ckpt_dir(run_dir, "straight"), "8"), os.path.join(ckpt_dir(run_dir, "resumed"), "8"))
    base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "resumed", "--device-batch-size", "1", "--resume"])
    assert_identical(saved(run_dir, "resumed"), straight)


def test_sigterm_saves_and_resume_is_exact(run_dir, straight):
    out = stage(run_dir, "stopped", wait_for_steps=2)
    assert "interrupted: saved step" in out and "Traceback" not in out
    stopped_at = Checkpoints(ckpt_dir(run_dir, "stopped")).latest_step()
    assert 2 <= stopped_at < STEPS
    stage(run_dir, "stopped", "--resume")
    assert_identical(saved(run_dir, "stopped"), straight)


@pytest.mark.parametrize("devices", [4, 1])
def test_elastic_resume_on_fewer_devices(run_dir, straight, devices):
    tag = f"elastic{devices}"
    os.makedirs(ckpt_dir(run_dir, tag))
    shutil.copytree(os.path.join(ckpt_dir(run_dir, "straight"), "8"), os.path.join(ckpt_dir(run_dir, tag), "8"))
    stage(run_dir, tag, "--resume", devices=devices)
    ours = [r["loss"] for r in metrics(run_dir, tag) if "loss" in r]
    reference = [r["loss"] for r in metrics(run_dir, "straight") if "loss" in r][8:]
    np.testing.assert_allclose(ours, reference, rtol=1e-4)


def test_bad_input_is_a_clear_error(run_dir, tmp_path, straight):
    with pytest.raises(SystemExit, match="run `python -m launch.stage tok"):
        base_train.main(["--run-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="not a multiple of one micro-step"):
        base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "odd", "--total-batch-size", "1000"])
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "straight", "--device-batch-size", "1"])
    with pytest.raises(SystemExit, match="holds another model"):
        base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "straight", "--depth", "2", "--device-batch-size", "1",
                         "--resume"])
    with pytest.raises(SystemExit, match="is not a folder"):
        base_train.main([*FLAGS, "--run-dir", run_dir, "--model-tag", "nodata", "--device-batch-size", "1",
                         "--data-dir", str(tmp_path / "none")])
    assert Checkpoints(ckpt_dir(run_dir, "straight")).all_steps() == [8, 16]  # nothing overwritten
