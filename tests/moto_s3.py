"""A moto S3 server on 127.0.0.1 with one bucket, for the store and grid tests (nothing leaves loopback)."""

from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CREDENTIALS = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing", "region_name": "us-east-1"}


@contextmanager
def moto_bucket(bucket: str) -> Iterator[tuple[str, object]]:
    """Start a threaded moto server on loopback, create `bucket`; yield (endpoint URL, boto3 client); stop it."""
    boto3 = pytest.importorskip("boto3")
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        assert host == "127.0.0.1"
        endpoint = f"http://{host}:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, **CREDENTIALS)
        client.create_bucket(Bucket=bucket)
        yield endpoint, client
    finally:
        server.stop()
