"""The peer benchmark's machinery on LeNet-300-100 in a few steps (skipped without the extra ``bench``)."""

import json
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("bayesian_torch")
pytest.importorskip("tyxe")

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "analysis"))
import bench_peers


@pytest.mark.parametrize("method", bench_peers.METHODS)
def test_every_method_trains_on_its_fixed_batch(method):
    """Each step is a working training step: over 30 steps of Adam on the fixed batch, its own loss falls by more
    than ten times its spread over the last ten steps (a step that did not train would fall by about 0.6 of it,
    the standard deviation of a difference of two means of five)."""
    step = bench_peers.make_step(method, "lenet300", 1.0)
    losses = [float(step()) for _ in range(30)]
    fall = statistics.mean(losses[:5]) - statistics.mean(losses[-5:])
    assert fall > 10 * statistics.stdev(losses[-10:]), losses


def test_summary_quartiles_and_ratios_by_hand():
    seconds = {"pyro_bc": [0.004, 0.001, 0.003, 0.002, 0.005, 0.006],
               "dense": [0.0015, 0.0005, 0.003, 0.001, 0.002, 0.004]}
    out = bench_peers.summarise(seconds, per_round=2)
    # inclusive quartiles of 1..6 ms: 2.25, 3.5, 4.75; of 0.5, 1, 1.5, 2, 3, 4 ms: 1.125, 1.75, 2.75
    assert [out["pyro_bc"][k] for k in ("ms_q1", "ms_median", "ms_q3")] == pytest.approx([2.25, 3.5, 4.75])
    assert [out["dense"][k] for k in ("ms_q1", "ms_median", "ms_q3")] == pytest.approx([1.125, 1.75, 2.75])
    assert out["dense"]["ratio_to_pyro_bc"] == pytest.approx(1.75 / 3.5)
    # rounds of two: dense's medians 1, 2, 3 ms against pyro-bc's 2.5, 2.5, 5.5 ms
    ratios = [0.4, 0.8, 3 / 5.5]
    assert out["dense"]["round_ratios_to_pyro_bc"] == pytest.approx(ratios)
    assert out["dense"]["round_ratio_q1"] == pytest.approx(0.4 + (3 / 5.5 - 0.4) / 2)
    assert out["dense"]["round_ratio_q3"] == pytest.approx(3 / 5.5 + (0.8 - 3 / 5.5) / 2)
    assert out["pyro_bc"]["round_ratios_to_pyro_bc"] == pytest.approx([1.0, 1.0, 1.0])
    assert out["pyro_bc"]["steps"] == 6
    single = bench_peers.summarise({"pyro_bc": [0.002], "one": [0.006]}, per_round=1)
    assert [single["one"][k] for k in ("ms_q1", "ms_median", "ms_q3")] == pytest.approx([6.0, 6.0, 6.0])
    assert single["one"]["round_ratio_q1"] == single["one"]["round_ratio_q3"] == pytest.approx(3.0)


def test_tyxe_patch_gives_a_dotted_getattr():
    bench_peers.patch_tyxe()
    import pyro.util

    obj = SimpleNamespace(a=SimpleNamespace(b=SimpleNamespace(c=7)))
    assert pyro.util.deep_getattr(obj, "a.b.c") == 7
    assert bench_peers.patch_tyxe() is False  # already there: nothing to do


@pytest.mark.parametrize("kept", [False, True])
def test_memory_probe_counts_at_least_the_weights_and_adam_state(kept):
    """A dense LeNet-300-100 step holds weights, gradients and Adam's two moments: 4 x 266,610 float32 numbers
    (4.07 MiB) at least, whatever the allocator."""
    mib = bench_peers.peak_memory_mib("dense", "lenet300", 1.0, steps=1, kept=kept)
    assert mib > 4 * 266_610 * 4 / 2**20


def test_main_writes_json_and_table(tmp_path):
    out = tmp_path / "peers.json"
    code = bench_peers.main(["--networks", "lenet300", "--rounds", "2", "--steps", "2", "--warmup", "0",
                             "--no-memory", "--out", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    assert r["versions"]["tyxe"] and r["versions"]["bayesian-torch"] and r["versions"]["pyro-ppl"]
    assert len(r["loadavg_start"]) == 3
    (row,) = r["networks"]
    assert set(row["methods"]) == set(bench_peers.METHODS)
    assert all(m["steps"] == 4 and m["ms_q1"] <= m["ms_median"] <= m["ms_q3"] for m in row["methods"].values())


def test_bad_option_is_one_line_and_nonzero(tmp_path):
    out = tmp_path / "peers.json"
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "bench_peers.py"), "--rounds", "0",
                           "--out", str(out)], check=False, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].endswith("--rounds must be at least 1")
    assert not out.exists()
