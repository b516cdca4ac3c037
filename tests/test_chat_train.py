"""mid/sft settings: the reference's inheritance from the source run and its schedules (the stages
themselves run end to end in test_speedrun.py)."""

import pytest

from launch import chat_train


def test_unset_flags_are_inherited_from_the_source_run():
    args = chat_train.build_parser("sft").parse_args(["--matrix-lr", "0.05"])
    meta = {"flags": {"max_seq_len": 256, "device_batch_size": 16, "embedding_lr": 0.3, "matrix_lr": 0.02},
            "total_batch_size": 4096}
    lines = chat_train.inherit(args, meta)
    assert (args.max_seq_len, args.device_batch_size, args.total_batch_size) == (256, 16, 4096)
    assert args.embedding_lr == 0.3 and args.matrix_lr == 0.05
    assert args.unembedding_lr == 0.004  # the source did not record it: the reference's fallback
    assert "matrix_lr = 0.05 (the source used 0.02)" in lines


def test_stage_defaults_are_the_references():
    sft = chat_train.build_parser("sft").parse_args([])
    mid = chat_train.build_parser("mid").parse_args([])
    assert (sft.init_lr_frac, sft.warmdown_ratio, sft.final_lr_frac, sft.load_optimizer) == (0.8, 0.5, 0.0, 1)
    assert (mid.init_lr_frac, mid.warmdown_ratio, mid.load_optimizer) == (1.0, 0.2, 0)
    assert (sft.mmlu_epochs, sft.gsm8k_epochs) == (3, 4)


@pytest.mark.parametrize("progress, expected", [(0.0, 1.0), (0.5, 1.0), (0.75, 0.5), (1.0, 0.0)])
def test_lr_is_flat_then_warms_down(progress, expected):
    assert chat_train.lr_multiplier(progress, 0.0, 0.5, 0.0) == pytest.approx(expected)


def test_muon_momentum_warms_up_over_300_steps():
    assert chat_train.muon_momentum(0) == pytest.approx(0.85)
    assert chat_train.muon_momentum(150) == pytest.approx(0.90)
    assert chat_train.muon_momentum(1000) == pytest.approx(0.95)
