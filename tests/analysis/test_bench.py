"""The benchmark's targets table: verdicts and causes on hand-built figures with known answers."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[2] / "analysis"))
import bench


def _step(model, prior, a, b, c, memory=1.0):
    return {"model": model, "prior": prior, "ms_deterministic": a, "ms_plain": b, "ms_pyro_bc": c,
            "ratio_pyro_bc_to_deterministic": c / a, "ratio_pyro_bc_to_plain": c / b, "memory_ratio": memory}


def _inference(allocator, speedup):
    return {"model": "lenet5", "batch": 1000, "allocator": allocator, "speedup": speedup}


def test_targets_verdicts_and_causes():
    results = {
        "steps": [_step("lenet300", "gnj", 4.0, 14.0, 17.5),   # (c)/(b) 1.25, (c)/(a) 4.375, floor 3.5
                  _step("lenet5", "gnj", 60.0, 140.0, 126.0, memory=2.5)],  # 0.9, 2.1; memory missed
        "overhead": [{"prior": "gnj", "ms_plain": 2.0, "ms_pyro_bc": 3.25}],
        "inference": [_inference("default", 4.5), _inference("kept", 5.5)],
    }
    text = "\n".join(bench.targets_section(results))
    assert "| lenet300 gnj (c)/(b) | <= 1.15 | 1.25 | missed by 0.10 |" in text
    assert "| lenet300 gnj (c)/(a) | <= 3.0 | 4.38 | missed by 1.38 |" in text
    assert "| lenet5 gnj (c)/(a) | <= 2.5 | 2.10 | met |" in text
    assert "| lenet5 gnj peak memory (c)/(b) | <= 2.0 | 2.50 | missed by 0.50 |" in text
    assert "default allocator: speed-up | >= 5x | 4.5x | missed by 0.50 |" in text
    assert "kept allocator: speed-up | >= 5x | 5.5x | met |" in text
    assert "(c) - (b) is 3.50 ms at full size, and 1.25 ms of it" in text
    assert "(b)/(a) is already 3.50" in text
    assert "lenet5 gnj (c)/(b):" not in text  # met targets get no cause


def test_no_causes_when_every_target_is_met():
    results = {"steps": [_step("lenet5", "lu", 60.0, 120.0, 110.0)], "overhead": [],
               "inference": [_inference("default", 6.0)]}
    assert "Causes" not in "\n".join(bench.targets_section(results))


def test_cnn_section_rows_verdicts_and_skips():
    rows = [{"model": "vgg", "prior": "gnj", "width": 0.25, "weights": 937392, "ms_deterministic": 100.0,
             "ms_pyro_bc": 200.0, "ratio_pyro_bc_to_deterministic": 2.0},
            {"model": "resnet20", "prior": "ghs", "width": 0.5, "weights": 67992, "ms_deterministic": 40.0,
             "ms_pyro_bc": 120.0, "ratio_pyro_bc_to_deterministic": 3.0},
            {"model": "vgg", "prior": "gnj", "width": 1.0, "weights": 14977728, "skipped": "one (c) step 2.60 s > 1 s"}]
    text = "\n".join(bench.cnn_section({"command": "analysis/bench_cnn.py --widths 0.25 0.5", "rows": rows}))
    assert "## SVI step of VGG and ResNet-20 (CIFAR-shaped, batch 64)" in text
    assert "`.venv/bin/python analysis/bench_cnn.py --widths 0.25 0.5`" in text
    assert "| vgg | gnj | 0.25 | 937,392 | 100.0 | 200.0 | 2.00 | met |" in text
    assert "| resnet20 | ghs | 0.5 | 67,992 | 40.0 | 120.0 | 3.00 | missed by 0.50 |" in text
    assert "| vgg | gnj | 1 | 14,977,728 | skipped: one (c) step 2.60 s > 1 s | | | |" in text
