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
