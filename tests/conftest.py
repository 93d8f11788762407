"""Shared fixtures: sample data, an isolated model cache, an embedded Ray, and a local S3 server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from tests.data_paths import samples_dir


@pytest.fixture(scope="session")
def samples() -> Path:
    return samples_dir()


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Tiny models are built once per session into a private cache (also seen by Ray workers)."""
    cache = os.environ.get("STYLEGEN_TEST_CACHE") or str(tmp_path_factory.mktemp("stylegen-cache"))
    os.environ["STYLEGEN_CACHE"] = cache
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    yield cache


@pytest.fixture(scope="session")
def ray_local(_isolated_cache):
    """One embedded Ray for the session's in-process pipeline tests."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint on loopback (moto's ThreadedMotoServer), stopped at the end of the session."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    yield env
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point this process at the local S3 server and give the test a fresh bucket."""
    import uuid

    import s3fs

    for k, v in s3_server.items():
        monkeypatch.setenv(k, v)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server["AWS_ENDPOINT_URL"]})
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    fs.mkdir(bucket)
    yield {"fs": fs, "bucket": bucket, "env": dict(s3_server)}
    s3fs.S3FileSystem.clear_instance_cache()
