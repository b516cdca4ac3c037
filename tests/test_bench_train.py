"""launch.bench_train: the step benchmark runs end to end, and its profile summary reads a trace."""

import gzip
import json

import jax
import pytest

from launch import bench_train


def test_kernel_table_sums_gpu_kernels_by_category(tmp_path):
    events = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "name": "nvjet_sm90_tst_128x160", "dur": 3000},
        {"ph": "X", "pid": 1, "name": "gemm_fusion_dot.4", "dur": 600},
        {"ph": "X", "pid": 1, "name": "matmul_relu_squared_mosaic_gpu_kernel", "dur": 400},
        {"ph": "X", "pid": 1, "name": "cudnn_generated_sdpa_flash_bprop", "dur": 2000},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 500},
        {"ph": "X", "pid": 1, "name": "loop_add_fusion", "dur": 250},
        {"ph": "X", "pid": 2, "name": "host_work", "dur": 9000},  # not a GPU kernel
    ]
    folder = tmp_path / "plugins" / "profile" / "run"
    folder.mkdir(parents=True)
    with gzip.open(folder / "perfetto_trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    table = bench_train.kernel_table(str(tmp_path), top=2)
    assert table["categories_ms"] == {"matmul": 4.0, "attention": 2.0, "elementwise": 0.75}
    assert table["kernels_ms"] == {"nvjet_sm90_tst_128x160": 3.0, "cudnn_generated_sdpa_flash_bprop": 2.0}


def test_bench_runs_on_cpu_on_all_and_on_fewer_devices(capsys):
    bench_train.main(["--depth", "1", "--device-batch-size", "1", "--total-batch-size", str(2 * 64 * jax.device_count()), "--max-seq-len", "64",
                      "--steps", "1", "--attention", "xla", "--devices", "8,2"])
    eight, two = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (eight["devices"], eight["micro_steps"]) == (8, 2) and (two["devices"], two["micro_steps"]) == (2, 8)
    assert two["tokens_per_s_per_device"] == pytest.approx(two["tokens_per_s"] / 2) and eight["tokens_per_s"] > 0


def test_a_configuration_out_of_memory_is_reported_and_the_others_still_run(monkeypatch, capsys):
    real_bench = bench_train.bench

    def bench(depth, *args):
        if depth == 2:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 93.16GiB")
        return real_bench(depth, *args)

    monkeypatch.setattr(bench_train, "bench", bench)
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--depth", "2,1", "--device-batch-size", "1", "--total-batch-size", str(64 * jax.device_count()),
                          "--max-seq-len", "64", "--steps", "1", "--attention", "xla"])
    assert exit_info.value.code == 1
    out, err = capsys.readouterr()
    assert "d2 L, device batch 1: out of device memory (RESOURCE_EXHAUSTED" in err and "Traceback" not in err
    failed, ran = json.loads(out.strip().splitlines()[-1])
    assert failed["error"] == "out of device memory" and ran["tokens_per_s"] > 0
    assert "2 | L | " in out and "out of device memory" in out


def test_a_total_batch_the_micro_batches_do_not_divide_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_train.main(["--depth", "1", "--device-batch-size", "3", "--total-batch-size", "1000", "--max-seq-len", "64"])
    assert exit_info.value.code == 2 and "is not a multiple of --device-batch-size 3" in capsys.readouterr().err
