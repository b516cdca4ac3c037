"""The pretraining stage end to end on a tiny model: learning, exact resume, clean interruption."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from launch import base_train, tok
from nanochat_jax.checkpoint import Checkpoints, abstract_params
from nanochat_jax.config import config_from_depth

TINY = ["--depth", "1", "--max-seq-len", "64", "--device-batch-size", "1", "--total-batch-size", "1024",
        "--eval-tokens", "1024", "--warmup-steps", "2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    tok.main_tok(["--run-dir", path, "--vocab-size", "512", "--max-chars", "300000"])
    return path


def final_params(directory):
    checkpoints = Checkpoints(directory)
    meta = checkpoints.meta()
    config = config_from_depth(1, vocab_size=512, sequence_len=64)
    params, _, _, _ = checkpoints.restore(meta["step"], abstract_params(config))
    checkpoints.close()
    return meta, jax.tree.map(np.asarray, params)


def test_resumed_run_equals_uninterrupted(run_dir):
    # 8 devices x 1 row x 64 tokens = 512 tokens per micro-step, so 2 micro-steps per step.
    base_train.main([*TINY, "--run-dir", run_dir, "--model-tag", "straight", "--num-iterations", "6",
                     "--eval-every", "3", "--save-every", "3"])
    base_train.main([*TINY, "--run-dir", run_dir, "--model-tag", "resumed", "--num-iterations", "6",
                     "--eval-every", "3", "--save-every", "3"])
    resumed_dir = os.path.join(run_dir, "base", "resumed", "checkpoints")
    # Forget the end of the second run and continue it from its middle checkpoint.
    Checkpoints(resumed_dir).manager.delete(6)
    base_train.main([*TINY, "--run-dir", run_dir, "--model-tag", "resumed", "--num-iterations", "6",
                     "--eval-every", "3", "--save-every", "3", "--resume"])
    meta_a, params_a = final_params(os.path.join(run_dir, "base", "straight", "checkpoints"))
    meta_b, params_b = final_params(resumed_dir)
    assert meta_a["step"] == meta_b["step"] == 6
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    assert meta_a["loop"]["smooth_loss"] == meta_b["loop"]["smooth_loss"]
    # It learned something: loss went down from the first steps.
    losses = [json.loads(line) for line in open(os.path.join(run_dir, "base", "straight", "metrics.jsonl"))]
    losses = [r["loss"] for r in losses if "loss" in r]
    assert losses[-1] < losses[0]


def test_sigint_saves_and_exits_cleanly(run_dir):
    cmd = [sys.executable, "-m", "launch.stage", "base", *TINY, "--run-dir", run_dir, "--model-tag", "stopped",
           "--num-iterations", "100000", "--eval-every", "-1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(run_dir, "base", "stopped", "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "interrupted: saved step" in out and "Traceback" not in out
    steps = Checkpoints(os.path.join(run_dir, "base", "stopped", "checkpoints")).all_steps()
    assert len(steps) == 1 and steps[0] >= 1


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="run `python -m launch.stage tok"):
        base_train.main(["--run-dir", str(tmp_path)])
