import os
import signal

from megavrl.rl.preemption import PreemptionHandler


def test_sigterm_sets_flag_and_handlers_restored():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler() as h:
        assert not h.should_stop()
        os.kill(os.getpid(), signal.SIGTERM)
        assert h.received == signal.SIGTERM and h.should_stop()
    assert signal.getsignal(signal.SIGTERM) == before
