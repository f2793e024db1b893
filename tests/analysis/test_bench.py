"""The benchmarks' helpers and tables: verdicts, causes and table cells on hand-built figures with known answers, the
interleaved timing on a fake clock."""

import sys
from pathlib import Path

import pytest

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


def test_interleaved_samples_rotates_rounds_and_times_each_call(monkeypatch):
    """A fake clock that each step advances by its own duration: the samples are those durations exactly, in
    the round-robin order worked out by hand."""
    clock, calls = [0.0], []

    def step(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds
        return run

    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
    steps = {"a": step("a", 0.001), "b": step("b", 0.002), "c": step("c", 0.004)}
    times = bench.interleaved_samples(steps, rounds=3, per_round=2, warmup=1)
    assert calls == ["a", "b", "c",  # warm-up
                     "a", "a", "b", "b", "c", "c", "b", "b", "c", "c", "a", "a", "c", "c", "a", "a", "b", "b"]
    assert {k: pytest.approx(v, abs=1e-12) for k, v in times.items()} == {"a": [0.001] * 6, "b": [0.002] * 6,
                                                                          "c": [0.004] * 6}


def _peer(median, q1, q3, ratio, mib=None):
    return {"ms_median": median, "ms_q1": q1, "ms_q3": q3, "ratio_to_pyro_bc": ratio,
            **({"peak_mib": mib} if mib is not None else {})}


def test_peers_section_cells_ratios_and_memory():
    r = {"command": "analysis/bench_peers.py --networks lenet300", "lr": 1e-3, "machine": "x86_64",
         "versions": {"torch": "2.13.0", "tyxe": "0.0.2"}, "tyxe_patched": True,
         "loadavg_start": [1.0, 0.5, 0.25], "loadavg_end": [2.0, 1.5, 1.25],
         "networks": [{"network": "lenet300", "label": "LeNet-300-100", "batch": 128, "rounds": 30, "per_round": 5,
                       "methods": {"dense": _peer(1.994, 1.9, 2.1, 0.2447, 150.4),
                                   "pyro_bc": _peer(8.15, 8.0, 8.3, 1.0, 170.0),
                                   "bt_reparam": _peer(7.65, 7.5, 7.8, 0.9387, 175.6),
                                   "tyxe_lrt": _peer(354.2, 300.0, 400.6, 43.46, 1234.5)}}]}
    text = "\n".join(bench.peers_section(r))
    assert "`.venv/bin/python analysis/bench_peers.py --networks lenet300`" in text
    assert "torch 2.13.0, tyxe 0.0.2" in text and "`pyro.util.deep_getattr` put back" in text
    assert "1.00, 0.50, 0.25 at the start, 2.00, 1.50, 1.25 at the end" in text
    # Flipout was not run: no column for it
    assert "Flipout" not in text.split("| network (batch) |")[1]
    assert ("| LeNet-300-100 (128) | 30 x 5 | 1.99 [1.90-2.10], 0.24x | 8.15 [8.00-8.30] | "
            "7.65 [7.50-7.80], 0.94x | 354 [300-401], 43.46x |") in text
    assert "| LeNet-300-100 (128) | 150 | 170 | 176 | 1234 |" in text
    # issue #30's targets: pyro-bc over each peer, 8.15 / 7.65 = 1.065 (missed), 8.15 / 354.2 = 0.023 (met)
    assert "| LeNet-300-100 | bayesian-torch, one weight sample per batch | <= 1 | 1.07 |  | missed by 0.07 |" in text
    assert "| LeNet-300-100 | TyXe, local reparameterisation | <= 1 | 0.02 |  | met |" in text
    # per-round ratios of the peer over pyro-bc 0.8, 1.25, 1.0, 0.5, 1.0: pyro-bc over the peer 1.25, 0.8, 1, 2, 1,
    # whose inclusive quartiles are 1 and 1.25; of 0.5, 0.8, 1, 1, 1.25 they are 0.8 and 1
    r["networks"][0]["methods"]["bt_reparam"].update(round_ratios_to_pyro_bc=[0.8, 1.25, 1.0, 0.5, 1.0],
                                                     round_ratio_q1=0.8, round_ratio_q3=1.0)
    text = "\n".join(bench.peers_section(r))
    assert "| 7.65 [7.50-7.80], 0.94x [0.80-1.00] |" in text
    assert "| 1.07 | 1.00-1.25 | missed by 0.07 (1 within the per-round range) |" in text
    assert "| LeNet-300-100 | bayesian-torch, Flipout |" not in text  # not run: no target row
    assert text.startswith("## Against bayesian-torch and TyXe\n") and "allocator: glibc's malloc as" in text
    r["allocator"] = "kept"  # the run with freed memory kept: its own title, figures file and allocator line
    text = "\n".join(bench.peers_section(r, "Kept", "bench_peers_kept.json"))
    assert text.startswith("## Kept\n") and "(figures in `bench_peers_kept.json`)" in text
    assert "allocator: freed memory kept in the process for every method" in text


def test_zoo_steps_section_ratios_rounds_conditions_and_misses():
    rows = [{"model": "alexnet", "input": 64, "ms_dense": 100.0, "ms_lrt": 300.0, "ms_lrt-bf16": 240.0,
             "step_ratio_lrt": 3.0, "step_ratio_lrt-bf16": 2.4, "step_ratio_lrt_rounds": [2.8, 3.3],
             "step_ratio_lrt-bf16_rounds": [2.2, 2.6], "loadavg": [1.5, 2.25], "steps_note": "quiet",
             "steps_command": "zoo.py --steps-only"},
            {"model": "resnet18", "input": 64, "ms_dense": 50.0, "ms_lrt": 100.0, "ms_lrt-bf16": 90.0,
             "step_ratio_lrt": 2.0, "step_ratio_lrt-bf16": 1.8}]  # an older row: no rounds, load or note
    text = "\n".join(bench.zoo_steps_section({"torch": "2.13", "torchvision": "0.28", "rows": rows}))
    assert "| alexnet (64) | 100 | 300 (3.00x) [2.80-3.30] | 240 (2.40x) [2.20-2.60] | 0.80 |" in text
    assert "| resnet18 (64) | 50 | 100 (2.00x) | 90 (1.80x) | 0.90 |" in text
    assert "Conditions: quiet. One-minute load average during the rows: 1.50-2.25 (2 cores)." in text
    assert "`lrt` meets it on 1 of 2 (missed: alexnet 3.00x); `lrt-bf16` on 2 of 2." in text
