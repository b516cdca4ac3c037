"""Eval entry points: the eval bundle download (against a local server), clear errors for missing
inputs, and the stages' registration."""

import hashlib
import http.server
import io
import os
import subprocess
import sys
import threading
import zipfile

import pytest

from nanochat_jax.evals import bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bundle_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("eval_bundle/core.yaml", "icl_tasks:\n-\n  label: t\n  dataset_uri: d/t.jsonl\n  num_fewshot: [0]\n"
                   "  icl_task_type: multiple_choice\n")
        z.writestr("eval_bundle/eval_meta_data.csv", "Eval Task,Random baseline\nt,50\n")
        z.writestr("eval_bundle/eval_data/d/t.jsonl", '{"query": "q", "choices": ["a", "b"], "gold": 0}\n')
    return buf.getvalue()


class _Server:
    """Serves one archive; `cut_once` drops the first connection halfway (to test resuming)."""

    def __init__(self, body: bytes):
        self.body, self.cut_once, self.ranges = body, False, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                if not self.path.endswith("/eval_bundle.zip"):
                    self.send_error(404)
                    return
                rng = self.headers.get("Range")
                server.ranges.append(rng)
                start = int(rng.split("=")[1].split("-")[0]) if rng else 0
                self.send_response(206 if rng else 200)
                self.send_header("Content-Length", str(len(server.body) - start))
                self.end_headers()
                if server.cut_once:
                    server.cut_once = False
                    self.wfile.write(server.body[start:start + (len(server.body) - start) // 2])
                    self.close_connection = True
                    return
                self.wfile.write(server.body[start:])

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = _Server(_bundle_zip())
    yield s
    s.close()


def test_download_resumes_checks_sha256_and_unpacks(server, tmp_path):
    dest = tmp_path / "eval_bundle"
    server.cut_once = True
    got = bundle.download_bundle(str(dest), server.url, hashlib.sha256(server.body).hexdigest(), backoff_s=0)
    assert server.ranges[0] is None and server.ranges[1].startswith("bytes=")  # the second request resumed
    assert bundle.find_bundle(got) == str(dest)
    assert (dest / "eval_data" / "d" / "t.jsonl").exists()
    assert sorted(os.listdir(tmp_path)) == ["eval_bundle"]  # no archive or staging left behind
    with pytest.raises(bundle.BundleError, match="already exists"):
        bundle.download_bundle(str(dest), server.url, None)


def test_download_refuses_a_wrong_checksum_and_keeps_nothing(server, tmp_path):
    with pytest.raises(bundle.BundleError, match="sha256"):
        bundle.download_bundle(str(tmp_path / "b"), server.url, "0" * 64, backoff_s=0)
    assert os.listdir(tmp_path) == []
    with pytest.raises(bundle.BundleError, match="404"):
        bundle.download_bundle(str(tmp_path / "b"), server.url.replace("eval_bundle.zip", "nope.zip"), None)


def test_find_bundle_tells_how_to_get_one(tmp_path):
    with pytest.raises(bundle.BundleError, match="launch.stage eval_bundle.*--eval-bundle"):
        bundle.find_bundle(str(tmp_path / "absent"))
    (tmp_path / "core.yaml").write_text("icl_tasks: []\n")
    with pytest.raises(bundle.BundleError, match="lacks eval_meta_data.csv, eval_data"):
        bundle.find_bundle(str(tmp_path))


def test_eval_modules_import_without_jax():
    code = ("import sys, nanochat_jax.evals.core, nanochat_jax.evals.chat, nanochat_jax.evals.bundle, "
            "nanochat_jax.tasks.arc, nanochat_jax.tasks.mmlu, launch.base_eval, launch.chat_eval, launch.bench_core; "
            "print('jax' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def _stage(*args):
    return subprocess.run([sys.executable, "-m", "launch.stage", *args], cwd=ROOT, capture_output=True, text=True)


def test_eval_stages_fail_clearly_without_inputs(tmp_path):
    proc = _stage("base_eval", "--run-dir", str(tmp_path), "--eval-bundle", str(tmp_path / "none"))
    assert proc.returncode != 0 and "eval_bundle" in proc.stderr and "Traceback" not in proc.stderr
    proc = _stage("base_eval", "--run-dir", str(tmp_path), "--eval", "core,sample")
    assert proc.returncode != 0 and "sample is not part of base_eval" in proc.stderr and "Traceback" not in proc.stderr
    proc = _stage("chat_eval", "-i", "sft", "--run-dir", str(tmp_path))
    assert proc.returncode != 0 and "no 'sft' models" in proc.stderr and "Traceback" not in proc.stderr
    proc = _stage("chat_eval", "-i", "sft", "-a", "HumanEval", "--data-dir", str(tmp_path))
    assert proc.returncode != 0 and "humaneval/HumanEval.jsonl" in proc.stderr and "--data-dir" in proc.stderr \
        and "Traceback" not in proc.stderr
    out = _stage("--help").stdout
    assert all(name in out for name in ("eval_bundle", "base_eval", "chat_eval"))


@pytest.fixture
def run_dir(tmp_path, monkeypatch):
    """A run directory with the golden tokenizer and a tiny random model, restored through a stand-in
    for the checkpoint module (`restore_params(directory) -> (params, config)` is all the evals use)."""
    import json
    import types

    import jax

    from launch.parity import _golden_tokenizer
    from nanochat_jax import model
    from nanochat_jax.config import GPTConfig

    with open(os.path.join(ROOT, "tests", "golden", "tokenizer_a.json")) as f:
        _golden_tokenizer(json.load(f)).save(str(tmp_path / "tokenizer"))
    config = GPTConfig(sequence_len=64, vocab_size=1024, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
    params = jax.device_get(model.init_params(config, jax.random.key(0)))
    restored = []

    def restore_params(directory):
        restored.append(directory)
        return params, config

    monkeypatch.setitem(sys.modules, "nanochat_jax.checkpoint", types.SimpleNamespace(restore_params=restore_params))
    monkeypatch.setenv("NANOCHAT_DTYPE", "float32")
    for source in ("base", "sft"):
        (tmp_path / source / "d2").mkdir(parents=True)
    return tmp_path, restored


@pytest.mark.filterwarnings("ignore:.*-shot needs")  # one example per task: few-shot counts are clamped
def test_base_eval_and_chat_eval_end_to_end(run_dir, capsys):
    import json

    from launch import base_eval, chat_eval

    root, restored = run_dir
    base_eval.main(["--run-dir", str(root), "--eval", "core,bpb", "--eval-bundle", os.path.join(ROOT, "tests", "data", "core"),
                    "--max-per-task", "1", "--batch-tokens", "512", "--device-batch-size", "1", "--split-tokens", "1"])
    out = capsys.readouterr().out
    assert restored == [str(root / "base" / "d2" / "checkpoints")]
    assert "CORE metric: PARTIAL" in out and "train bpb" in out and "val bpb" in out
    record = json.loads((root / "base_eval" / "d2" / "results.json").read_text())
    assert (record["stage"], record["model"]) == ("base_eval", "base")
    # The test bundle holds 7 of core.yaml's 22 task files: the other 15 are reported missing, and
    # the CORE the report card shows says it is partial.
    core = record["details"]["core"]
    assert core["core_metric"] is None and len(core["results"]) == 7 and len(core["missing"]) == 15
    assert "squad" in core["missing"] and "over 7 of 22 tasks" in out
    assert isinstance(record["metrics"]["CORE"], str) and record["metrics"]["CORE"].endswith("(partial: 7/22 tasks)")
    assert record["metrics"]["train bpb"] > 0 and record["metrics"]["val bpb"] > 0
    assert "missing" in (root / "base_eval" / "d2" / "core.csv").read_text()
    chat_eval.main(["-i", "sft", "-a", "ARC-Easy|MMLU", "--run-dir", str(root), "-x", "4", "--batch-tokens", "1024"])
    out = capsys.readouterr().out
    assert "ARC-Easy accuracy" in out and "MMLU accuracy" in out and "ChatCORE metric: PARTIAL" in out
    record = json.loads((root / "chat_eval" / "sft" / "d2" / "results.json").read_text())
    assert (record["stage"], record["model"]) == ("chat_eval", "sft")
    assert 0 <= record["metrics"]["ARC-Easy"] <= 1 and 0 <= record["metrics"]["MMLU"] <= 1
    assert record["metrics"]["ChatCORE"].endswith("(partial: 2/5 tasks)")
    # The test model's context is 64 tokens, shorter than the real problems: two tiny ones of each.
    data = root / "data"
    for path, row in (("gsm8k/test.jsonl", {"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}),
                      ("humaneval/HumanEval.jsonl", {"task_id": "t", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
                                                     "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"})):
        (data / path).parent.mkdir(parents=True)
        (data / path).write_text(f"{json.dumps(row)}\n" * 2)
    chat_eval.main(["-i", "sft", "-a", "GSM8K|HumanEval", "--run-dir", str(root), "--data-dir", str(data), "-m", "8"])
    out = capsys.readouterr().out
    assert "GSM8K accuracy" in out and "HumanEval accuracy" in out and "ChatCORE metric: PARTIAL" in out
    record = json.loads((root / "chat_eval" / "sft" / "d2" / "results.json").read_text())
    assert record["settings"]["GSM8K problems"] == record["settings"]["HumanEval problems"] == 2
    assert record["settings"]["temperature"] == 0.0 and record["metrics"]["ChatCORE"].endswith("(partial: 2/5 tasks)")
    from nanochat_jax import report

    assert {r["stage"] for r in report.eval_results(str(root))} == {"base_eval", "chat_eval"}  # the report card reads them


def test_bench_core_smoke():
    """The benchmark as a user runs it on a CPU (one device), on the test bundle: a table and a JSON line."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-m", "launch.bench_core", "--depth", "1", "--max-per-task", "1",
                           "--eval-bundle", os.path.join(ROOT, "tests", "data", "core"), "--batch-tokens", "512"],
                          cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["bench"] == "core" and record["devices"] == 1 and record["tasks"] == 7 and len(record["missing"]) == 15
    assert all(r["examples"] == 1 and r["padded_tokens"] >= r["tokens"] > 0 for r in record["per_task"])
    assert "total" in proc.stdout
