"""A real S3 server on 127.0.0.1 for the object-storage tests: moto's ThreadedMotoServer.

The same server s3fs and zarr-python test against. The fixture sets the usual AWS
environment (endpoint, keys, region), so the code under test finds it exactly as it would
find a real service: through the environment, with no config entry. Subprocesses and Dask
workers inherit it. Import the fixtures into a test module to use them.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator

import pytest

AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",  # no 1-s timeouts looking for an EC2 role
}
# Variables that could point botocore at a real account or another endpoint.
_FOREIGN = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL_S3",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The server's URL; the AWS environment of this process points at it while it runs."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with pytest.MonkeyPatch.context() as mp:
        for name in _FOREIGN:
            mp.delenv(name, raising=False)
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            mp.setenv(name, value)
        try:
            yield endpoint
        finally:
            server.stop()


def s3fs_client():
    """A fresh s3fs file system (no instance cache), configured by the environment."""
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def make_bucket(name: str) -> str:
    fs = s3fs_client()
    if not fs.exists(name):
        fs.mkdir(name)
    return name


def env_without_credentials() -> dict[str, str]:
    """The environment of a user who has no AWS credentials anywhere."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    }
    env["AWS_SHARED_CREDENTIALS_FILE"] = os.devnull
    env["AWS_CONFIG_FILE"] = os.devnull
    return env
