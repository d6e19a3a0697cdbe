"""PreemptionHandler, interruptible sections and signal shielding of forked children (one process)."""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from megavrl.rl.preemption import EXIT_INTERRUPTED, PreemptionHandler, StopRequested, exit_code_for, signals_blocked


def test_sigterm_sets_flag_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as h:
        assert not h.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.received == signal.SIGTERM and h.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)  # scancel and torchrun each deliver one: still alive
        assert h.seconds_since_signal >= 0
    assert signal.getsignal(signal.SIGTERM) == before


def test_a_signal_ends_an_interruptible_section_only():
    with PreemptionHandler() as h:
        with h.interruptible():
            pass  # no signal: nothing happens
        with pytest.raises(StopRequested):
            with h.interruptible():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(5)  # a call into a dead engine would block here
        assert h.received == signal.SIGUSR1
        with pytest.raises(StopRequested):  # once stopping, no section starts
            with h.interruptible():
                pass


def _sleep_then_write(path):
    time.sleep(1.5)
    with open(path, "w") as f:
        f.write("done")


def test_children_forked_with_signals_blocked_survive_a_group_sigterm(tmp_path):
    ctx = multiprocessing.get_context("fork")  # how Megatron's checkpoint writer starts its workers
    with PreemptionHandler() as h:
        with signals_blocked():
            child = ctx.Process(target=_sleep_then_write, args=(str(tmp_path / "out"),))
            child.start()
            os.kill(child.pid, signal.SIGTERM)
            # To this thread (a process-directed signal may go to any other thread of the test process,
            # e.g. tqdm's monitor, which does not block it): pending until the block ends.
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert h.received is None
        assert h.received == signal.SIGTERM
    child.join(10)
    assert child.exitcode == 0 and (tmp_path / "out").read_text() == "done"


def test_the_grace_period_is_enforced():
    code = textwrap.dedent("""
        import os, signal, time
        from megavrl.rl.preemption import PreemptionHandler
        with PreemptionHandler(grace_s=1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(60)  # a step that never ends
    """)
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and time.time() - t0 < 30
    assert "trainer.preemption_grace_s=1" in out.stderr


def test_exit_codes():
    assert exit_code_for(signal.SIGINT) == 130
    assert exit_code_for(signal.SIGTERM) == exit_code_for(signal.SIGUSR1) == EXIT_INTERRUPTED == 75
