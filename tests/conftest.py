import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def repo():
    return REPO


def pytest_report_header(config):
    """Name the floating-point environment: `make test` runs twice, the second time under another one."""
    import torch

    return (f"torch {torch.__version__}: CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{torch.get_num_threads()} threads, MKL_CBWR={os.environ.get('MKL_CBWR', 'unset')}")


@pytest.fixture
def time_limit():
    """Fail, instead of hanging, a test of an input that once made a loop run forever (where the OS has alarms)."""
    import signal

    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def too_long(signum, frame):
        raise TimeoutError("the test ran past its 120 s bound: a loop over the input does not terminate")

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(120)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
