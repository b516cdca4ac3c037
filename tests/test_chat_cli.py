"""The chat_cli stage: one answer with -p, the interactive loop, clear errors for a missing model."""

import jax
import pytest

from launch import chat_cli
from nanochat_jax import engine, model
from nanochat_jax.config import GPTConfig


@pytest.fixture
def tiny_run(monkeypatch, tiny_tokenizer):
    config = GPTConfig(sequence_len=128, vocab_size=tiny_tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1,
                       n_embd=64)
    params = model.init_params(config, jax.random.key(0))
    monkeypatch.setattr(engine, "load_model", lambda run_dir, source, tag: (params, config, tiny_tokenizer))


def test_one_prompt_and_interactive(tiny_run, capsys, monkeypatch):
    chat_cli.main(["-p", "Hello", "-m", "6", "-t", "0"])
    one = capsys.readouterr().out
    assert one.endswith("\n") and "User:" not in one
    answers = iter(["Hello", "clear", "Hello", "quit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    chat_cli.main(["-m", "6", "-t", "0"])
    out = capsys.readouterr().out
    assert "(conversation cleared)" in out
    # greedy after a clear: the same answer as the one-shot run
    assert out.count("Assistant: " + one.rstrip("\n")) == 2


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="chat_cli: no 'sft' models in"):
        chat_cli.main(["--run-dir", str(tmp_path), "-p", "hi"])
    with pytest.raises(SystemExit, match="--temperature >= 0"):
        chat_cli.main(["--demo", "-t", "-1", "-p", "hi"])
