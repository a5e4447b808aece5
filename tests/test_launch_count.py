"""The adapters' share of a training step, counted (bench/launch_count.py): the operations a T-LoRA adds to one
denoiser forward + backward stay within issue 25's bounds against a peft LoRA of the same rank on the same layers,
and nothing is zero-filled (no zero blocks)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["sdxl", "klein-4b"])
def test_a_t_lora_adds_at_most_its_bound_of_operations_against_peft(model):
    import launch_count

    rows = {v: launch_count.measure(model, 256, v, 16) for v in ("frozen", "peft", "lora", "ortho_lora")}
    added = {v: ops - rows["frozen"][0] for v, (ops, _, _) in rows.items()}
    assert added["lora"] <= 1.25 * added["peft"] and added["ortho_lora"] <= 2 * added["peft"], added
    assert all(zeros == 0 for _, _, zeros in rows.values())
