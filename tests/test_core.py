"""CORE: the reference's rendering, spans, few-shot draws and decisions; centered accuracy and the
CORE mean (missing tasks reported, never averaged as if complete); parity with the golden trace."""

import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from nanochat_jax.evals import core

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, "tests", "golden")


def _task(task_type, shots=0, delimiter=" ", label="t", baseline=25.0):
    return core.CoreTask(label, f"x/{label}.jsonl", task_type, shots, delimiter, baseline)


@pytest.fixture(scope="module")
def tok():
    from launch.parity import _golden_tokenizer

    with open(os.path.join(GOLDEN, "tokenizer_a.json")) as f:
        return _golden_tokenizer(json.load(f))


# ---- numbers ----------------------------------------------------------------------------------

def test_centered_accuracy_and_core_on_hand_made_numbers():
    assert core.centered_accuracy(0.25, 25) == 0.0
    assert core.centered_accuracy(1.0, 25) == 1.0
    assert core.centered_accuracy(0.62, 62) == pytest.approx(0.0)
    assert core.centered_accuracy(0.5, 0) == 0.5
    assert core.centered_accuracy(0.1, 50) == pytest.approx(-0.8)
    tasks = [_task("multiple_choice", label="a", baseline=25), _task("schema", label="b", baseline=50),
             _task("language_modeling", label="c", baseline=0)]
    s = core.summarize(tasks, {"a": 0.625, "b": 0.75, "c": 0.2})
    assert s["centered_results"] == pytest.approx({"a": 0.5, "b": 0.5, "c": 0.2})
    assert s["core_metric"] == pytest.approx(0.4) and s["core_partial"] is None and s["missing"] == []
    assert core.core_line(s) == "CORE metric: 0.4000"


def test_missing_task_is_reported_not_averaged():
    tasks = [_task("multiple_choice", label="a", baseline=25), _task("schema", label="b", baseline=50),
             _task("language_modeling", label="squad", baseline=0)]
    s = core.summarize(tasks, {"a": 0.625, "b": 0.75})
    assert s["core_metric"] is None
    assert s["core_partial"] == pytest.approx(0.5) and s["missing"] == ["squad"]
    line = core.core_line(s)
    assert "PARTIAL" in line and "2 of 3" in line and "squad" in line and "not comparable" in line


# ---- rendering --------------------------------------------------------------------------------

def test_render_prompts_match_the_reference_templates():
    mc = _task("multiple_choice", delimiter="\nAnswer: ")
    shot = {"query": "Q0?", "choices": ["x", "y"], "gold": 1}
    item = {"query": "Q1?", "choices": ["a", "b"], "gold": 0}
    assert core.render_prompts(mc, item, [shot]) == ["Q0?\nAnswer: y\n\nQ1?\nAnswer: a", "Q0?\nAnswer: y\n\nQ1?\nAnswer: b"]
    schema = _task("schema")
    shot = {"context_options": ["c0", "c1"], "continuation": "goes.", "gold": 0}
    item = {"context_options": ["d0", "d1"], "continuation": "ends.", "gold": 1}
    assert core.render_prompts(schema, item, [shot]) == ["c0 goes.\n\nd0 ends.", "c0 goes.\n\nd1 ends."]
    lm = _task("language_modeling")
    shot = {"context": "  2+2= ", "continuation": "4"}
    item = {"context": "3+3= \n", "continuation": "6"}
    # Contexts are trimmed; the prompt without the continuation is stripped (its delimiter goes).
    assert core.render_prompts(lm, item, [shot]) == ["2+2= 4\n\n3+3=", "2+2= 4\n\n3+3= 6"]


def test_spans_common_prefix_suffix_and_lm_prefix(tok):
    mc = core.render_example(tok, _task("multiple_choice"), [{"query": "The sky is", "choices": ["blue.", "green today."], "gold": 0}], 0, 0)
    assert mc.start[0] == mc.start[1] and mc.end == [len(t) for t in mc.tokens]
    assert all(t[0] == tok.bos_token_id for t in mc.tokens)
    assert mc.tokens[0][:mc.start[0]] == mc.tokens[1][:mc.start[1]] != []
    assert mc.tokens[0][mc.start[0]] != mc.tokens[1][mc.start[1]]
    sc = core.render_example(tok, _task("schema"), [{"context_options": ["Tom said he", "Anna said she"],
                                                     "continuation": "was late.", "gold": 0}], 0, 0)
    assert [e - s for s, e in zip(sc.start, sc.end)] == [sc.end[0] - sc.start[0]] * 2
    assert sc.tokens[0][sc.start[0]:] == sc.tokens[1][sc.start[1]:]
    lm = core.render_example(tok, _task("language_modeling"), [{"context": "Paris is in", "continuation": "France"}], 0, 0)
    assert len(lm.tokens) == 1 and lm.tokens[0][:lm.start[0]] == tok.encode("Paris is in", prepend=tok.bos_token_id)
    assert tok.decode(lm.tokens[0][lm.start[0]:lm.end[0]]) == " France"


def test_fewshot_draws_are_the_references_and_clamped_with_a_warning():
    data = list(range(30))
    for idx in (0, 7, 29):
        expected = random.Random(1234 + idx).sample([i for i in range(30) if i != idx], 10)
        assert core.fewshot_examples(data, idx, 10) == expected
    with pytest.warns(UserWarning, match="10-shot needs 11 examples but 4 are kept; using 3"):
        assert core.effective_fewshot(_task("multiple_choice", shots=10), 4) == 3


def test_shuffle_then_cut(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"i": i}) + "\n" for i in range(50)))
    order = list(range(50))
    random.Random(1337).shuffle(order)
    assert [r["i"] for r in core.load_examples(str(path), 7)] == order[:7]
    assert [r["i"] for r in core.load_examples(str(path))] == order


# ---- decisions --------------------------------------------------------------------------------

def test_decisions_on_hand_made_losses():
    mc = _task("multiple_choice")
    r = core.Rendered(tokens=[[1, 5, 6, 7], [1, 5, 8, 9, 9]], start=[2, 2], end=[4, 5])
    # losses[t] scores token t+1: the continuations are losses[1:3] and losses[1:4].
    scores = [(np.array([9.0, 1.0, 3.0, 0.0]), None), (np.array([0.0, 1.0, 2.0, 2.4, 9.0]), None)]
    out = core.score_example(mc, r, scores, gold=1)
    assert out["mean_losses"] == pytest.approx([2.0, 1.8]) and out["pred"] == 1 and out["correct"]
    tie = [(np.array([0.0, 1.0, 1.0, 0.0]), None), (np.array([0.0, 1.0, 1.0, 1.0, 0.0]), None)]
    assert core.score_example(mc, r, tie, gold=1)["pred"] == 0  # the first of equal losses
    lm = _task("language_modeling")
    r = core.Rendered(tokens=[[1, 4, 5, 6]], start=[2], end=[4])
    ok = core.score_example(lm, r, [(np.array([0.0, 0.5, 0.25]), np.array([9, 5, 6]))], None)
    assert ok == {"predicted": [5, 6], "cont_losses": [0.5, 0.25], "correct": True}
    assert not core.score_example(lm, r, [(np.zeros(3), np.array([4, 5, 7]))], None)["correct"]


# ---- end to end on a small bundle -------------------------------------------------------------

def _write_bundle(root):
    tasks = [("mc", "multiple_choice", 0, None, 50), ("sch", "schema", 0, None, 50),
             ("lm", "language_modeling", 1, "\\nAnswer: ", 0), ("gone", "language_modeling", 0, None, 0)]
    yaml_lines = ["icl_tasks:"]
    for label, kind, shots, delim, _ in tasks:
        yaml_lines += ["-", f"  label: {label}", f"  dataset_uri: d/{label}.jsonl", f"  num_fewshot: [{shots}]",
                       f"  icl_task_type: {kind}"] + ([f'  continuation_delimiter: "{delim}"'] if delim else [])
    (root / "eval_data" / "d").mkdir(parents=True)
    (root / "core.yaml").write_text("\n".join(yaml_lines) + "\n")
    (root / "eval_meta_data.csv").write_text("Eval Task,Random baseline\n" + "".join(f"{t[0]},{t[4]}\n" for t in tasks))
    rows = {
        "mc": [{"query": f"Item {i} is", "choices": ["red.", "a blue one."], "gold": i % 2} for i in range(6)],
        "sch": [{"context_options": [f"Ann {i} met Bo so Ann", f"Ann {i} met Bo so Bo"], "continuation": "smiled.",
                 "gold": i % 2} for i in range(5)],
        "lm": [{"context": f"{i} plus one is", "continuation": str(i + 1)} for i in range(4)],
    }
    for label, items in rows.items():
        (root / "eval_data" / "d" / f"{label}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))


@pytest.fixture(scope="module")
def golden_scorer(tok):
    from nanochat_jax import convert, sharding
    from nanochat_jax.evals.scoring import Scorer

    with np.load(os.path.join(GOLDEN, "core_a_model.npz")) as f:
        config = convert.config_from_json(str(f["config"]))
        params = convert.from_reference({k[6:]: f[k] for k in f.files if k.startswith("param/")}, config)
    return Scorer(params, config, sharding.make_mesh(), pad_id=tok.bos_token_id, batch_tokens=512,
                  dtype="float32", progress=False)


def test_evaluate_core_end_to_end_reports_missing_and_repeats_exactly(tmp_path, tok, golden_scorer):
    _write_bundle(tmp_path)
    logged = []
    first = core.evaluate_core(golden_scorer, tok, str(tmp_path), log=logged.append)
    second = core.evaluate_core(golden_scorer, tok, str(tmp_path), log=lambda _: None)
    assert first["missing"] == ["gone"] and first["core_metric"] is None
    assert set(first["results"]) == {"mc", "sch", "lm"}
    assert first["core_partial"] == pytest.approx(np.mean(list(first["centered_results"].values())))
    assert any("gone" in line and "MISSING" in line for line in logged)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    csv_path = tmp_path / "out.csv"
    core.write_csv(first, str(csv_path))
    text = csv_path.read_text()
    assert "gone" in text and "missing" in text and "CORE (partial)" in text


def test_evaluate_task_rows_match_an_unbatched_forward(tok, golden_scorer):
    """Bucketing, padding, chunking and 8-way batch sharding leave every loss as an unpadded forward gives it."""
    import jax
    import jax.numpy as jnp

    from nanochat_jax import model

    task = _task("multiple_choice")
    data = [{"query": f"Question {i}: which?", "choices": ["this one", "that other one"], "gold": 0} for i in range(3)]
    result = core.evaluate_task(golden_scorer, tok, task, data)
    assert core.evaluate_task(golden_scorer, tok, task, data, chunk=2) == result  # scored in pieces: the same
    assert core.evaluate_task(golden_scorer, tok, task, data, details=False) == \
        {k: v for k, v in result.items() if k != "examples"}
    assert result["rows"] == 6 and result["tokens"] == sum(len(t) for e in result["examples"] for t in e["tokens"])
    ex = result["examples"][2]
    row, s, e = ex["tokens"][1], ex["start"][1], ex["end"][1]
    forward = jax.jit(model.forward, static_argnums=2, static_argnames="dtype")
    logits = forward(jax.device_get(golden_scorer.params), jnp.array([row]), golden_scorer.config, dtype="float32")[0]
    losses = jax.nn.logsumexp(logits[:-1], -1) - jnp.take_along_axis(logits[:-1], jnp.array(row[1:])[:, None], -1)[:, 0]
    assert ex["mean_losses"][1] == pytest.approx(float(jnp.mean(losses[s - 1:e - 1])), abs=1e-5)


# ---- parity with the reference ----------------------------------------------------------------

@pytest.mark.slow
def test_parity_core_reproduces_the_golden_trace(tmp_path):
    """`launch.parity core` on core_a.json: token ids and spans identical, losses within 1e-4,
    predictions equal wherever the two lowest mean losses differ by more than 1e-3. Its prompts
    reach 3,471 tokens against sequence_len 1024 (windows slide, nothing is cropped)."""
    out = tmp_path / "core_out.json"
    proc = subprocess.run([sys.executable, "-m", "launch.parity", "core", os.path.join(GOLDEN, "core_a.json"),
                           os.path.join(GOLDEN, "core_a_model.npz"), str(out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(os.path.join(GOLDEN, "core_a.json")) as f:
        want = json.load(f)
    got = json.loads(out.read_text())
    assert list(got["tasks"]) == list(want["tasks"])
    for label, w in want["tasks"].items():
        g = got["tasks"][label]
        assert len(g["examples"]) == len(w["examples"]) == want["n_examples"]
        for we, ge in zip(w["examples"], g["examples"]):
            where = f"{label} example {we['idx']}"
            assert ge["tokens"] == we["tokens"], where
            assert (ge["start"], ge["end"]) == (we["start"], we["end"]), where
            if "mean_losses" in we:
                np.testing.assert_allclose(ge["mean_losses"], we["mean_losses"], atol=1e-4, rtol=0, err_msg=where)
                lowest = sorted(we["mean_losses"])
                if len(lowest) < 2 or lowest[1] - lowest[0] > 1e-3:
                    assert (ge["pred"], ge["correct"]) == (we["pred"], we["correct"]), where
            else:
                np.testing.assert_allclose(ge["cont_losses"], we["cont_losses"], atol=1e-4, rtol=0, err_msg=where)
                assert (ge["predicted"], ge["correct"]) == (we["predicted"], we["correct"]), where
        assert g["accuracy"] == pytest.approx(w["accuracy"])
