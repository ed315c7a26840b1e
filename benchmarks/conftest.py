"""Benchmark session set-up: warm every device up once before the first timed benchmark."""
import pytest

from benchmarks.harness import DEVICES, TINY, warm_up


@pytest.fixture(scope="session", autouse=True)
def warm_up_devices(request) -> None:
    if request.config.getoption("benchmark_disable") or TINY:
        return
    for device in DEVICES:
        warm_up(device, seconds=2.0)
