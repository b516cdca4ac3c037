"""launch.bench_data: pipeline throughput and the imitated training loop's wait per step."""

import json

from launch import bench_data, tok


def test_bench_data_reports_throughput_and_loop_waits(tmp_path):
    run_dir = str(tmp_path / "run")
    tok.main_tok(["--run-dir", run_dir, "--vocab-size", "512", "--max-chars", "300000"])
    out = tmp_path / "bench.json"
    bench_data.main(["--tokenizer-dir", f"{run_dir}/tokenizer", "--batch-size", "2", "--seq-len", "64", "--batches", "2",
                     "--micro-steps", "3", "--step-seconds", "0.01", "--json", str(out)])
    result = json.loads(out.read_text())
    assert [r["tokenizer_threads"] for r in result["results"]] == [1, 2, 4]
    assert all(r["tokens_per_s"] > 0 for r in result["results"])
    assert [w["prefetch"] for w in result["training_loop"]] == [2, 6]
    assert all(w["wait_per_step_s"] >= 0 for w in result["training_loop"])
