"""launch.mesh_check: one optimizer step on 8 (fake) devices against the same step on one device."""

import json

import pytest

from launch import mesh_check


def test_eight_devices_match_one_and_a_tolerance_below_the_error_fails(capsys):
    # The step on 8 devices agrees with 1 device to float rounding; a tolerance below that
    # rounding must fail, which shows the two runs really are compared.
    with pytest.raises(SystemExit) as stop:
        mesh_check.main(["--depth", "3", "--max-seq-len", "64", "--device-batch-size", "1", "--tolerance", "1e-12"])
    assert stop.value.code == 1
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["devices"] == 8 and not result["pass"]
    assert 0 < result["worst_error"] < 1e-5
    assert result["loss_all"] == pytest.approx(result["loss_one"], rel=1e-6)
