import json

import pytest

from launch import bench_infer


@pytest.mark.slow
def test_bench_infer_cpu_smoke(capsys):
    bench_infer.main(["--depth", "1", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "4", "--chunk", "2"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["batch_size"] for r in result["results"]] == [1, 2]
    assert all(r["decode_tok_per_s"] > 0 and r["bytes_per_step"] > result["weight_bytes"] for r in result["results"])


def test_bench_infer_rejects_bad_flags():
    with pytest.raises(SystemExit, match="bench_infer: prompt \\+ new tokens"):
        bench_infer.main(["--depth", "1", "--prompt-len", "2048", "--new-tokens", "16"])
