import os
import threading
import time

from bench.common import process_cpu_seconds


def _spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_cpu_seconds_counts_every_thread_of_the_process():
    before = process_cpu_seconds(os.getpid())
    worker = threading.Thread(target=_spin, args=(0.15,))
    worker.start()
    _spin(0.15)
    worker.join()
    spent = process_cpu_seconds(os.getpid()) - before
    assert 0.28 <= spent < 2.0  # both threads' 0.15 s, whatever else ran meanwhile


def test_cpu_seconds_of_a_process_that_is_gone_is_zero():
    assert process_cpu_seconds(2**22 + 12345) == 0.0
