"""speedrun_jax.sh end to end (the smoke preset: the cpu chain shortened to seconds per stage):
killed in the middle of a stage, the rerun skips the finished stages and resumes that one; it ends
with a report whose every stage section is filled and a model that chat_cli answers from."""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def speedrun(run_dir, cwd, **kwargs):
    env = dict(os.environ, XLA_FLAGS="", NANOCHAT_JAX_CACHE="")  # one CPU device, like a user's shell
    return subprocess.Popen(["bash", os.path.join(REPO, "speedrun_jax.sh"), "--preset", "smoke", "--run-dir", run_dir],
                            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.slow
def test_killed_speedrun_resumes_and_finishes_with_a_report(tmp_path):
    run_dir = str(tmp_path / "run")
    first = speedrun(run_dir, tmp_path)
    metrics = os.path.join(run_dir, "base", "d1", "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:  # stop it in the middle of pretraining
        if os.path.exists(metrics) and sum('"loss"' in line for line in open(metrics)) >= 3:
            break
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGTERM)  # like Ctrl-C: the whole process group
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert "interrupted during 'base'" in out
    assert os.path.exists(os.path.join(run_dir, ".done", "tok")) and not os.path.exists(os.path.join(run_dir, ".done", "base"))
    assert glob.glob(os.path.join(run_dir, "base", "d1", "checkpoints", "*"))

    second = speedrun(run_dir, tmp_path)
    out, _ = second.communicate(timeout=400)
    assert second.returncode == 0, out
    assert "== tok: already done, skipped" in out and "== tok_eval: already done, skipped" in out
    assert "resumed from step" in out
    for stage in ("base", "mid", "sft"):
        assert os.path.exists(os.path.join(run_dir, stage, "d1", "summary.json")), stage

    text = (tmp_path / "report.md").read_text()
    for section in ("tok", "tok_eval", "base", "base_eval", "mid", "sft", "chat_eval"):
        body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        assert "not run" not in body and "unfinished" not in body, section
    assert os.path.exists(os.path.join(tmp_path, text.split("![base d1](", 1)[1].split(")", 1)[0]))

    answer = subprocess.run([sys.executable, "-m", "launch.stage", "chat_cli", "--run-dir", run_dir, "-p", "Hello!",
                             "-m", "8"], cwd=REPO, capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, XLA_FLAGS="", NANOCHAT_JAX_CACHE=""))
    assert answer.returncode == 0 and answer.stdout.strip(), answer.stderr
