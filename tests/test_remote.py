"""flows.remote: which DVC remote a workspace pushes to, and a store that is down failing fast."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.remote import RemoteError, check_reachable, default_remote
from infra.stack.processes import free_port


def dvc(root, *args):
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, check=True, capture_output=True)


@pytest.fixture
def repo(tmp_path):
    dvc(tmp_path, "init", "--no-scm", "-q")
    return tmp_path


def test_no_default_remote_is_none_and_a_local_remote_needs_no_check(repo):
    assert default_remote(repo) is None
    dvc(repo, "remote", "add", "-d", "here", str(repo / "store"))
    assert default_remote(repo) == "here"
    check_reachable(repo, "here")  # not S3: nothing to ask


def test_an_s3_remote_that_is_down_is_refused_before_dvc_starts_naming_it(repo, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    port = free_port()  # nothing listens there
    dvc(repo, "remote", "add", "-d", "stack", "s3://bucket/dvc")
    dvc(repo, "remote", "modify", "--local", "stack", "endpointurl", f"http://127.0.0.1:{port}")
    with pytest.raises(RemoteError, match=rf"DVC remote 'stack' \(s3://bucket/dvc at http://127.0.0.1:{port}\) is unreachable"):
        check_reachable(repo, "stack")
