"""Shared fixtures: one Ray instance per test session, on loopback, with a small object store."""

import os

import pytest

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every Ray address on 127.0.0.1 (FACTS.md)


@pytest.fixture(scope="session")
def ray_session():
    """Start one local Ray for the whole session; stop only the instance this fixture started."""
    import ray

    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        object_store_memory=200 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture
def one_thread():
    """One torch intra-op thread for a test: tiny CPU workloads on a shared 2-core machine run faster and
    steadier that way. Modules opt in with pytest.mark.usefixtures("one_thread")."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
