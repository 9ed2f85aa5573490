"""The SLURM pieces that need no cluster (fast tier): the launcher config composes as Hydra's submitit launcher, and a
stop signal (SIGTERM, SIGUSR2) checkpoints, stops, and is handed on to the handler that was there before (submitit's,
in a SLURM job). tests/system/test_slurm.py runs them on a real cluster (slow tier)."""

import os
import signal

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from clipqa.errors import Preempted
from clipqa.training.run import train
from clipqa.training.signals import stop_on_signals
from tests.helpers.runs import CONF, SMALL_DEMO, compose_cfg

LAUNCHER = CONF / "hydra" / "launcher" / "slurm.yaml"


def test_the_slurm_launcher_config_is_submitits_with_the_files_values():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    # clipqa's subclass of submitit's (hydra_plugins/clipqa_slurm_launcher: it also notices jobs that vanish)
    assert launcher._target_ == "hydra_plugins.clipqa_slurm_launcher.launcher.SlurmLauncher"
    assert LAUNCHER.read_text().startswith("#") and "python train.py -m hydra/launcher=slurm" in LAUNCHER.read_text()
    own = OmegaConf.to_container(OmegaConf.load(LAUNCHER), resolve=False)
    own.pop("defaults")
    got = OmegaConf.to_container(launcher, resolve=False)
    assert {k: got[k] for k in own} == own  # none dropped or overridden by submitit's defaults
    for key in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min", "array_parallelism"):
        assert key in own
    assert own["max_num_timeout"] > 0  # a job that reaches its time limit is requeued (it resumes)
    assert got["submitit_folder"].startswith("${hydra.sweep.dir}/")  # SLURM logs land in the sweep folder


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR2])
def test_a_stop_signal_is_handed_on_to_the_previous_handler_after_the_stop(sig):
    got = []
    before = {s: signal.signal(s, lambda s, f: got.append(s)) for s in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        with pytest.raises(Preempted), stop_on_signals() as stop:
            os.kill(os.getpid(), sig)
            assert stop.requested and stop.reason == signal.Signals(sig).name and got == []  # not yet
            raise Preempted("stopped")
        assert got == [sig]  # after the stop: submitit's handler requeues the job here
        assert signal.getsignal(sig) is not None and signal.getsignal(sig) != signal.SIG_DFL

        with stop_on_signals() as stop:  # a stop that was never honoured (training had ended) is not handed on
            os.kill(os.getpid(), sig)
        assert stop.requested and got == [sig]
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_usr2_during_training_checkpoints_then_stops_and_reaches_the_previous_handler(tmp_path, cache_dir):
    got = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: got.append(s))

    def warn_of_the_time_limit(val_acc, step):  # as SLURM does signal_delay_s before the limit
        os.kill(os.getpid(), signal.SIGUSR2)

    try:
        with pytest.raises(Preempted, match="stopped by SIGUSR2 at step 10"):
            cfg = compose_cfg([*SMALL_DEMO, "trainer.eval_every=10", "trainer.checkpoint_every=100"], cache_dir)
            train(cfg, tmp_path, on_validation=warn_of_the_time_limit)
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert got == [signal.SIGUSR2]
    assert (tmp_path / "checkpoints" / "step_00000010.pt").is_file()  # saved at the stop, not on the schedule
    assert not (tmp_path / "metrics.json").exists()
