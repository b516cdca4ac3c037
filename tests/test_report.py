"""The report card on a fake run directory: numbers come only from the stages' files, absent
stages say "not run", plots are written and linked, the copy's links still resolve."""

import json
import os
import re

from launch import report as report_stage
from nanochat_jax import report


def write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f)


def fake_training(run_dir, stage, tag, finished=True):
    directory = os.path.join(run_dir, stage, tag)
    os.makedirs(directory)
    with open(os.path.join(directory, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "val_bpb": 2.5, "training_time_s": 0.0}) + "\n")
        for step in range(6):
            f.write(json.dumps({"step": step, "loss": 5.0 - step / 10, "loss_ema": 5.0 - step / 10, "dt_s": 0.5,
                                "tokens_per_s": 1000.0 + step, "mfu_percent": 40.0 + step,
                                "includes_compile": step == 0}) + "\n")
        # a resume logs steps 4 and 5 again: the last record of a step wins
        f.write(json.dumps({"step": 5, "loss": 4.2, "loss_ema": 4.2, "dt_s": 0.5, "tokens_per_s": 1005.0,
                            "mfu_percent": 45.0, "includes_compile": True}) + "\n")
        f.write(json.dumps({"step": 6, "val_bpb": 2.125, "training_time_s": 2.5}) + "\n")
        f.write('{"step": 7, "lo')  # a torn last line from a killed process
    if finished:
        write_json(os.path.join(directory, "summary.json"), dict(
            stage=stage, settings={"depth": 3, "matrix_lr": 0.02}, steps=6, tokens=6 * 4096, training_time_s=2.5,
            wall_time_s=30.0, results={"min_val_bpb": 2.125, "samples": {"Who are you?": "I am nanochat | a model"}}))


def test_report_on_a_fake_run(tmp_path):
    run_dir = str(tmp_path / "run")
    fake_training(run_dir, "base", "d3")
    fake_training(run_dir, "sft", "d3")
    fake_training(run_dir, "mid", "d3", finished=False)
    write_json(os.path.join(run_dir, "tokenizer", "tok_eval.json"), {"train": {"ratio": 4.25}, "val": {"ratio": 4.5}})
    write_json(os.path.join(run_dir, "base_eval", "d3", "results.json"),
               {"stage": "base_eval", "metrics": {"CORE": 0.1234, "hellaswag": 0.3}, "time_s": 12.0})
    write_json(os.path.join(run_dir, "chat_eval", "sft", "results.json"),
               {"stage": "chat_eval", "model": "sft", "metrics": {"ARC-Easy": 0.375, "MMLU": 0.25}})
    write_json(os.path.join(run_dir, "chat_eval", "junk", "results.json"), {"no": "schema"})  # ignored
    write_json(os.path.join(run_dir, ".done", "base"), {"seconds": 90})
    write_json(os.path.join(run_dir, ".done", "tok_eval"), {"seconds": 3})

    path = report.build(run_dir)
    text = open(path).read()
    sections = dict(re.findall(r"^## (\S+)\n\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M))

    assert "| CORE | 0.1234 | - | - | - |" in text
    assert "| ARC-Easy | - | - | 0.3750 | - |" in text
    assert "| MMLU | - | - | 0.2500 | - |" in text
    assert "| GSM8K | - | - | - | - |" in text  # never made up
    assert sections["tok"].strip() == "not run" and sections["rl"].strip() == "not run"
    assert "ratio | 4.2500" in sections["tok_eval"]
    assert "git commit" in sections["System"] and "accelerators" in sections["System"]
    base = sections["base"]
    assert "| steps | 6 |" in base and "| tokens trained on | 24,576 |" in base
    assert "| final val bpb | 2.1250 |" in base and "| min val bpb | 2.1250 |" in base
    assert "| median MFU | 42.5% |" in base  # steps 1..4 (0 and the re-logged 5 include compilation)
    assert "with start-up) | 90s |" in base  # the speedrun marker's wall time
    assert "![base d3](base_d3.png)" in base and os.path.getsize(os.path.join(run_dir, "report", "base_d3.png")) > 1000
    assert "unfinished (6 steps logged" in sections["mid"]
    assert "I am nanochat \\| a model" in sections["sft"]
    assert "| CORE | 0.1234 |" in sections["base_eval"] and "not run" not in sections["base_eval"]
    assert "junk" not in text

    # The copy in another folder links back to the run's images.
    out_dir = tmp_path / "cwd"
    out_dir.mkdir()
    copy = report.copy_to(path, str(out_dir))
    for link in re.findall(r"!\[[^]]*\]\(([^)]+)\)", open(copy).read()):
        assert os.path.exists(os.path.join(out_dir, link)), link


def test_report_stage_errors_are_clear(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit, match="no run directory"):
        report_stage.main(["--run-dir", str(tmp_path / "none")])
    empty = tmp_path / "empty"
    empty.mkdir()
    report_stage.main(["--run-dir", str(empty), "--copy-to", str(tmp_path)])
    text = (tmp_path / "report.md").read_text()
    assert text.count("not run") == 8  # tok, tok_eval, base, base_eval, mid, sft, chat_eval, rl
