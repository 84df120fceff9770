"""Shared test fixtures: deterministic seeding and the Triton interpreter switch."""
import os
import random
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # busy 2-core CI: spinning OpenMP threads cost 10x
os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels run on the CPU interpreter in tests
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# the record of verified bundle files (turbo_infer.verified): per test run, not the user's ~/.cache
os.environ["TURBO_CACHE_DIR"] = tempfile.mkdtemp(prefix="turbo-test-cache-")

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    with 2 OpenMP threads on 2 shared, busy cores each tiny op can wait ~10 ms for a spinning peer
    (measured: one tiny-model calibration 18 s at 2 threads vs 0.3 s at 1)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
