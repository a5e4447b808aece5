"""bench/gpu_check.py's smoke mode: every case of the GPU check on the tiny models, on the CPU, so that the check
cannot rot before a GPU runs it."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
def test_the_gpu_check_runs_every_case_in_smoke_mode(tmp_path, capsys):
    import gpu_check

    assert gpu_check.main(["--smoke", "--steps", "1", "--output", str(tmp_path / "check.json")]) == 0
    check = json.loads((tmp_path / "check.json").read_text())
    rows = check["rows"]
    training = [r for r in rows if "s_per_step" in r]
    assert [r["case"].split()[0] for r in training] == ["SDXL", "SDXL", "FLUX.1-dev"]
    assert all(r["s_per_step"] > 0 and r["estimated_peak_gb"] > 0 and r["tflops_per_step"] > 0 for r in training)
    assert check["estimator_gpu"] == "H100" and all(r["mode"] == "eager" for r in training)  # no compiling here
    assert all(0 < low < high for r in training for low, high in r["estimated_s"]["H100"].values())
    assert rows[-1]["equal"] is True and rows[-2]["s_per_image"] > 0
    assert "| SDXL fp32 (the authors' setting) |" in capsys.readouterr().out
