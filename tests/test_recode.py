"""``pyro-bc recode``: a file of any version rewritten in the newest with the same codes, atomically, with
one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from pyro_bc.bcz import codec
from pyro_bc.bcz import v1 as bcz_v1
from pyro_bc.bcz.codec import CompressedModel, Op, QuantizedLayer
from pyro_bc.cli import main


def model() -> CompressedModel:
    rng = np.random.default_rng(0)
    codes = np.where(rng.random((20, 30)) < 0.5, rng.integers(-9, 10, (20, 30)), 0)
    bias = np.array([0.1, -2.5, 1 / 3] * 6 + [0.0, -0.0], dtype=np.float32)
    return CompressedModel([Op("flatten"), QuantizedLayer("linear", "fc", codes, 3, bias), Op("relu")], (30,),
                           {"model": "lenet300", "prior": "gnj", "run_dir": "runs/x"})


def test_recode_v1_to_v2_keeps_the_codes_and_biases(tmp_path, capsys) -> None:
    old, new = tmp_path / "old.bcz", tmp_path / "new.bcz"
    old.write_bytes(bcz_v1.encode(model()))
    assert main(["recode", str(old), "--out", str(new)]) == 0
    assert f"wrote {new} (.bcz version 2" in capsys.readouterr().out
    assert new.read_bytes()[4:6] == b"\x02\x00" and new.stat().st_size < old.stat().st_size
    a, b = codec.read_bcz(old), codec.read_bcz(new)
    assert np.array_equal(a.items[1].weight_codes, b.items[1].weight_codes)
    assert a.items[1].bias.tobytes() == b.items[1].bias.tobytes()  # float32 kept bit for bit, -0.0 included
    assert b.metadata == {"model": "lenet300", "prior": "gnj"}
    assert main(["recode", str(new), "--out", str(new)]) == 0  # in place, and idempotent
    assert codec.encode(codec.read_bcz(new)) == new.read_bytes()


# model()'s biases 0.1, -2.5, 1/3 rounded by hand: to multiples of 2^-3 (0.8 -> 1, -20, 2.67 -> 3 eighths), or to
# float16 (0.1 in [2^-4, 2^-3) and 1/3 in [2^-2, 2^-1) on steps of 2^-14 and 2^-12: 1638.4 -> 1638, 1365.3 -> 1365)
ROUNDED = {"fixed": [0.125, -2.5, 0.375], "float16": [0.0999755859375, -2.5, 1365 / 4096]}


@pytest.mark.parametrize("rounding", ["float16", "fixed"])
def test_recode_rounds_biases_when_asked(tmp_path, rounding) -> None:
    old, new = tmp_path / "old.bcz", tmp_path / "new.bcz"
    codec.write_bcz(old, model())
    assert main(["recode", str(old), "--out", str(new), "--bias", rounding]) == 0
    bias = codec.read_bcz(new).items[1].bias
    expected = np.array(ROUNDED[rounding] * 6 + [0.0, -0.0], dtype=np.float32)
    assert bias.tobytes() == expected.tobytes()  # bit for bit, the sign of -0.0 included
    assert np.array_equal(codec.read_bcz(new).items[1].weight_codes, model().items[1].weight_codes)
    assert new.stat().st_size < old.stat().st_size


def test_recode_errors_are_one_line_and_leave_the_target(tmp_path, capsys) -> None:
    out = tmp_path / "out.bcz"
    out.write_bytes(b"keep me")
    bad = tmp_path / "bad.bcz"
    bad.write_bytes(b"BCZ1\x02\x00" + b"\0" * 20)
    for source in (tmp_path / "missing.bcz", bad):
        assert main(["recode", str(source), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert str(source) in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert main(["recode", str(bad), "--out", str(tmp_path / "no" / "x.bcz")]) == 1
    good = tmp_path / "good.bcz"
    codec.write_bcz(good, model())
    assert main(["recode", str(good), "--out", str(tmp_path / "no" / "x.bcz")]) == 1
    assert "cannot write" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "bad.bcz", "good.bcz", "out.bcz"]
    with pytest.raises(SystemExit) as info:
        main(["recode", str(good), "--out", str(out), "--bias", "int8"])
    assert info.value.code == 2


def test_recode_keeps_the_variances_of_a_version_3_file(tmp_path, capsys) -> None:
    from test_sampled import _model

    old, new = tmp_path / "v3.bcz", tmp_path / "new.bcz"
    size = codec.write_bcz(old, _model())
    assert main(["recode", str(old), "--out", str(new)]) == 0
    assert f"(.bcz version 3, {size} bytes)" in capsys.readouterr().out
    assert new.read_bytes() == old.read_bytes()
