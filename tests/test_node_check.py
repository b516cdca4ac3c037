"""launch.node_check --preset cpu: the multi-GPU node checks, end to end on 8 fake CPU devices."""

import json
import os
import time

from launch import node_check


def test_cpu_preset_passes_numerics_and_elastic_resume(tmp_path, capsys):
    node_check.main(["--preset", "cpu", "--out", str(tmp_path)])
    with open(tmp_path / "node_check.json") as f:
        verdicts = json.load(f)
    assert verdicts["numerics"]["pass"] and verdicts["numerics"]["devices"] == 8
    assert verdicts["scaling"]["pass"] is None and verdicts["scaling"]["tokens_per_s_all"] > 0
    resume = verdicts["elastic_resume"]
    assert resume["pass"] and resume["full_run_steps"] == 16 and resume["steps_on_one_device"] == 16 - resume["resumed_from"]
    for log in ("mesh_check", "scaling", "base", "resume_one_device"):
        assert os.path.getsize(tmp_path / f"{log}.log") > 0
    assert "elastic resume" in capsys.readouterr().out


def test_stop_after_ends_a_silent_process(tmp_path):
    # A training stage's progress bar writes no newline for minutes: the SIGTERM must not wait for output.
    start = time.monotonic()
    node_check.run(str(tmp_path / "log"), ["http.server", "0", "--bind", "127.0.0.1"], node_check.environment("cpu", 1),
                   stop_after=1.0, check=False)
    assert time.monotonic() - start < 30
