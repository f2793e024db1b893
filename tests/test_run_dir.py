"""Run directories (pyro_bc.train.run_dir): the training configuration's defaults, the lock, the writability check."""

import dataclasses
import os
import subprocess

import pytest

from pyro_bc import defaults
from pyro_bc.errors import ConfigError
from pyro_bc.train.run_dir import (
    CHECKPOINT,
    CONFIG,
    LOCK,
    METRICS,
    RunLock,
    TrainConfig,
    prepare_run_dir,
    removed_if_refused,
)


def test_train_config_defaults_come_from_pyro_bc_defaults():
    config = TrainConfig()
    assert (config.prior_options, config.val_size) == ({}, defaults.VAL_SIZE)  # the prior's own defaults
    assert (config.model, config.prior, config.epochs, config.batch_size, config.lr, config.seed) == \
        ("lenet300", "gnj", 10, 128, 1e-3, 0)
    assert (config.device, config.threads, config.warmup_epochs) == ("cpu", 1, 0)
    assert config.data is config.subset is config.init_from is None
    # a checkpoint stores asdict(config); TrainConfig.from_dict rebuilds it
    rhs = TrainConfig(prior="rhs", prior_options={"tau0": 3e-4, "slab_scale": 2.0})
    assert TrainConfig.from_dict(dataclasses.asdict(rhs)) == rhs


def test_a_config_written_with_tau0_and_slab_scale_fields_gets_the_options_its_prior_takes():
    old = {**dataclasses.asdict(TrainConfig()), "tau0": 3e-4, "slab_scale": 2.0}
    del old["prior_options"]
    assert TrainConfig.from_dict({**old, "prior": "gnj"}).prior_options == {}
    assert TrainConfig.from_dict({**old, "prior": "ghs"}).prior_options == {"tau0": 3e-4}
    assert TrainConfig.from_dict({**old, "prior": "rhs"}).prior_options == {"tau0": 3e-4, "slab_scale": 2.0}


@pytest.mark.parametrize(("prior", "options", "message"), [
    ("gnj", {"tau0": 1e-5}, r"^prior gnj has no option 'tau0' \(it takes none\)$"),
    ("ghs", {"slab_scale": 2.0}, r"^prior ghs has no option 'slab_scale' \(its options: tau0\)$"),
    ("rhs", {"tau0": -1.0}, r"^prior rhs: tau0 must be a positive number, got -1.0$"),
])
def test_the_prior_validates_its_options(prior, options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(prior=prior, prior_options=options).validate()


def test_file_names():
    assert (CHECKPOINT, METRICS, CONFIG, LOCK) == ("checkpoint.pt", "metrics.jsonl", "config.json", ".lock")


def test_lock_is_written_and_removed(tmp_path):
    with RunLock(tmp_path) as lock:
        assert lock.path == tmp_path / LOCK
        assert (tmp_path / LOCK).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK).exists()
    with pytest.raises(RuntimeError, match="inside"), RunLock(tmp_path):
        raise RuntimeError("inside")
    assert not (tmp_path / LOCK).exists()  # released on an error too


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("content", ["dead", "", "not a pid"])
def test_a_stale_lock_is_taken_over(tmp_path, content):
    (tmp_path / LOCK).write_text(str(_dead_pid()) if content == "dead" else content)
    with RunLock(tmp_path):
        assert (tmp_path / LOCK).read_text() == str(os.getpid())
    assert not (tmp_path / LOCK).exists()


def test_a_live_lock_refuses_and_is_left_alone(tmp_path):
    (tmp_path / LOCK).write_text(str(os.getpid()))  # this process is alive
    with pytest.raises(ConfigError, match=f"pid {os.getpid()}.*already running") as info, RunLock(tmp_path):
        pass
    assert "\n" not in str(info.value) and str(tmp_path) in str(info.value)
    assert (tmp_path / LOCK).read_text() == str(os.getpid())  # someone else's lock is left alone


def test_prepare_run_dir_creates_nested_folders_and_leaves_no_probe(tmp_path):
    run_dir = prepare_run_dir(str(tmp_path / "a" / "b"))
    assert run_dir == tmp_path / "a" / "b" and run_dir.is_dir()
    assert list(run_dir.iterdir()) == []
    assert prepare_run_dir(run_dir) == run_dir  # an existing folder is fine


def test_prepare_run_dir_on_an_unwritable_path(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="cannot be written") as info:
        prepare_run_dir(tmp_path / "file" / "run")
    assert str(tmp_path / "file" / "run") in str(info.value) and "\n" not in str(info.value)
    assert (tmp_path / "file").read_text() == "x"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(ConfigError, match="cannot be written"):
            prepare_run_dir(locked)


def test_a_refused_training_removes_only_the_empty_folders_it_made(tmp_path):
    run = tmp_path / "a" / "b" / "run"
    with pytest.raises(ConfigError), removed_if_refused(run):
        prepare_run_dir(run)
        raise ConfigError("refused")
    assert list(tmp_path.iterdir()) == []  # a, a/b and a/b/run were made here, and are gone

    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError), removed_if_refused(run):
        prepare_run_dir(run)
        (run / CONFIG).write_text("{}")  # written: the folder is the training's record and stays
        raise ConfigError("diverged")
    assert (run / CONFIG).read_text() == "{}"

    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(ConfigError), removed_if_refused(kept):
        raise ConfigError("refused")
    assert kept.is_dir()  # it was there before

    with removed_if_refused(tmp_path / "fine"):
        prepare_run_dir(tmp_path / "fine")
    assert (tmp_path / "fine").is_dir()  # no failure: nothing removed
