"""S3 inputs against real HTTP servers: moto's S3, a closed port, and a server that answers 403.

Credentials and endpoint come from the environment only, as in production; every test isolates
itself from any AWS configuration on the machine.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tasks.data.errors import SourceError
from tasks.data.items import Item
from tasks.data.readers import read_items
from tasks.data.sources import Input, read_bytes, resolve_inputs, s3_etag

SECRET = "tHiS-iS-tHe-SeCrEt-VaLuE-0123456789"
BUCKET = "corpus"


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch, tmp_path) -> pytest.MonkeyPatch:
    """Test credentials in the environment and nothing else: no ~/.aws, no instance metadata."""
    import os

    for name in list(os.environ):
        if name.startswith("AWS_") or name == "S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


@pytest.fixture
def s3(moto_url, aws_env):
    """An empty `corpus` bucket on a freshly reset moto server, and a client to fill it."""
    import urllib.request

    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{moto_url}/moto-api/reset", method="POST"))
    aws_env.setenv("AWS_ENDPOINT_URL", moto_url)
    client = boto3.session.Session().client("s3")
    client.create_bucket(Bucket=BUCKET)
    return client


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


ACCESS_DENIED_XML = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>1</RequestId></Error>"
)


class DenyAll(BaseHTTPRequestHandler):
    """An S3 endpoint that refuses everything, as one does for credentials without permission."""

    def _deny(self) -> None:
        self.send_response(403)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(ACCESS_DENIED_XML)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(ACCESS_DENIED_XML)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _deny

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def deny_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), DenyAll)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join()


# --- reading from S3 ------------------------------------------------------------------------


class TestMoto:
    def test_read_a_jsonl_object(self, s3):
        body = b'{"text": "one"}\n\n{"text": "two"}\n'
        s3.put_object(Bucket=BUCKET, Key="data/train.jsonl", Body=body)
        uri = f"s3://{BUCKET}/data/train.jsonl"
        [inp] = resolve_inputs(uri)
        assert inp == Input(uri, "jsonl")
        assert read_bytes(inp) == body
        items = list(read_items(inp))
        assert [(i.source, i.where, i.value) for i in items] == [
            (uri, "line 1", {"text": "one"}),
            (uri, "line 3", {"text": "two"}),
        ]

    def test_key_glob_is_expanded_sorted_and_per_segment(self, s3):
        for key in ["data/b.jsonl", "data/a.jsonl", "data/c.csv", "data/sub/d.jsonl", "other/e.jsonl"]:
            s3.put_object(Bucket=BUCKET, Key=key, Body=b"{}\n")
        found = resolve_inputs(f"s3://{BUCKET}/data/*.jsonl")
        assert found == [
            Input(f"s3://{BUCKET}/data/a.jsonl", "jsonl"),
            Input(f"s3://{BUCKET}/data/b.jsonl", "jsonl"),
        ]
        recursive = [i.uri for i in resolve_inputs(f"s3://{BUCKET}/data/**/*.jsonl")]
        assert recursive == [f"s3://{BUCKET}/data/{k}" for k in ["a.jsonl", "b.jsonl", "sub/d.jsonl"]]
        assert [i.format for i in resolve_inputs(f"s3://{BUCKET}/data/*")] == ["jsonl", "jsonl", "csv"]

    def test_parquet_object(self, s3):
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(pa.table({"text": ["a", "b"]}), buffer)
        s3.put_object(Bucket=BUCKET, Key="t.parquet", Body=buffer.getvalue())
        [inp] = resolve_inputs(f"s3://{BUCKET}/t.parquet")
        assert [(i.where, i.value) for i in read_items(inp)] == [
            ("row 1", {"text": "a"}),
            ("row 2", {"text": "b"}),
        ]

    def test_etag_is_the_content_fingerprint(self, s3):
        s3.put_object(Bucket=BUCKET, Key="a.jsonl", Body=b"{}\n")
        assert s3_etag(Input(f"s3://{BUCKET}/a.jsonl", "jsonl")) == hashlib.md5(b"{}\n").hexdigest()
        assert s3_etag(Input("local.jsonl", "jsonl")) is None

    def test_missing_key(self, s3):
        uri = f"s3://{BUCKET}/data/nope.jsonl"
        with pytest.raises(SourceError) as caught:
            list(read_items(Input(uri, "jsonl")))
        assert str(caught.value).startswith(
            f"{uri} does not exist: no object 'data/nope.jsonl' in bucket '{BUCKET}' at http://127.0.0.1:"
        )

    def test_missing_key_for_the_etag(self, s3):
        with pytest.raises(SourceError, match="does not exist"):
            s3_etag(Input(f"s3://{BUCKET}/nope.jsonl", "jsonl"))

    def test_missing_bucket(self, s3):
        with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
            read_bytes(Input("s3://no-such-bucket/a.jsonl", "jsonl"))
        with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
            resolve_inputs("s3://no-such-bucket/*.jsonl")

    def test_glob_matching_nothing(self, s3, moto_url):
        s3.put_object(Bucket=BUCKET, Key="data/a.csv", Body=b"x\n1\n")
        with pytest.raises(SourceError) as caught:
            resolve_inputs(f"s3://{BUCKET}/data/*.jsonl")
        assert str(caught.value) == (
            f"no S3 object matches s3://{BUCKET}/data/*.jsonl (listed prefix 'data/' in bucket"
            f" '{BUCKET}' at {moto_url})"
        )

    def test_a_prefix_is_not_an_object(self, s3):
        with pytest.raises(SourceError, match=r"names a bucket or prefix.*s3://corpus/data/\*\.jsonl"):
            resolve_inputs(f"s3://{BUCKET}/data/")

    def test_empty_object_is_a_source_error(self, s3):
        s3.put_object(Bucket=BUCKET, Key="empty.jsonl", Body=b"")
        with pytest.raises(SourceError, match=f"^s3://{BUCKET}/empty.jsonl is empty \\(0 bytes\\): nothing to read"):
            list(read_items(Input(f"s3://{BUCKET}/empty.jsonl", "jsonl")))

    def test_s3_endpoint_url_is_honoured(self, s3, moto_url, aws_env):
        s3.put_object(Bucket=BUCKET, Key="a.jsonl", Body=b'{"x": 1}\n')
        aws_env.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port()}")
        aws_env.setenv("S3_ENDPOINT_URL", moto_url)
        assert read_bytes(Input(f"s3://{BUCKET}/a.jsonl", "jsonl")) == b'{"x": 1}\n'

    def test_hf_disk_is_local_only(self, s3):
        with pytest.raises(SourceError, match="hf_disk reads local folders only"):
            list(read_items(Input(f"s3://{BUCKET}/ds", "hf_disk")))


# --- failures that must be quick and clear --------------------------------------------------


class TestFailures:
    def test_unreachable_endpoint_fails_fast(self, aws_env):
        endpoint = f"http://127.0.0.1:{closed_port()}"
        aws_env.setenv("AWS_ENDPOINT_URL", endpoint)
        uri = f"s3://{BUCKET}/a.jsonl"
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_bytes(Input(uri, "jsonl"))
        assert time.monotonic() - started < 5
        assert str(caught.value).startswith(
            f"cannot reach S3 endpoint {endpoint} for {uri}: check AWS_ENDPOINT_URL / network"
        )
        with pytest.raises(SourceError, match="cannot reach S3 endpoint"):
            resolve_inputs(f"s3://{BUCKET}/*.jsonl")

    def test_endpoint_userinfo_is_not_shown(self, aws_env):
        port = closed_port()
        aws_env.setenv("AWS_ENDPOINT_URL", f"http://user:{SECRET}@127.0.0.1:{port}")
        with pytest.raises(SourceError) as caught:
            read_bytes(Input(f"s3://{BUCKET}/a.jsonl", "jsonl"))
        assert SECRET not in str(caught.value)
        assert f"http://127.0.0.1:{port}" in str(caught.value)

    def test_access_denied_names_the_uri_and_hides_the_secret(self, aws_env, deny_url):
        aws_env.setenv("AWS_ENDPOINT_URL", deny_url)
        uri = f"s3://{BUCKET}/private/a.jsonl"
        with pytest.raises(SourceError) as caught:
            read_bytes(Input(uri, "jsonl"))
        message = str(caught.value)
        assert message.startswith(f"access denied to {uri} (AccessDenied from {deny_url})")
        assert "AWS_ACCESS_KEY_ID" in message and "never in params.yaml" in message
        assert SECRET not in message
        assert SECRET not in str(caught.value.__cause__)
        with pytest.raises(SourceError, match=r"access denied to s3://corpus/private/\*\.jsonl"):
            resolve_inputs(f"s3://{BUCKET}/private/*.jsonl")
        with pytest.raises(SourceError, match="access denied"):  # HEAD: a bare 403, no XML body
            s3_etag(Input(uri, "jsonl"))

    def test_no_credentials(self, aws_env, deny_url):
        aws_env.setenv("AWS_ENDPOINT_URL", deny_url)
        aws_env.delenv("AWS_ACCESS_KEY_ID")
        aws_env.delenv("AWS_SECRET_ACCESS_KEY")
        started = time.monotonic()
        with pytest.raises(SourceError) as caught:
            read_bytes(Input(f"s3://{BUCKET}/a.jsonl", "jsonl"))
        assert time.monotonic() - started < 5
        assert str(caught.value) == (
            f"no usable S3 credentials for s3://{BUCKET}/a.jsonl: set AWS_ACCESS_KEY_ID and"
            " AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the environment, never in params.yaml"
        )

    def test_rejects_serialise(self, s3):
        s3.put_object(Bucket=BUCKET, Key="bad.jsonl", Body=b'{"ok": 1}\n{"bad": \n')
        outputs = list(read_items(Input(f"s3://{BUCKET}/bad.jsonl", "jsonl")))
        assert isinstance(outputs[0], Item)
        assert json.loads(json.dumps(outputs[1].to_json()))["where"] == "line 2"
