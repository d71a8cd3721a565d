"""From a source `path` in params.yaml to concrete inputs, and from an input to its bytes.

A path is a local file, a glob (`data/sources/*.jsonl`, `**` recursive), a folder written by
`datasets.save_to_disk`, or `s3://bucket/key` with an optional glob in the key. Globs expand in
sorted order so a run reads its inputs in the same order every time.

S3 uses boto3's default credential chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE,
instance roles) and endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3, or S3_ENDPOINT_URL here):
credentials never belong in params.yaml, and no message here ever shows one.
"""

from __future__ import annotations

import fnmatch
import functools
import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from tasks.data.errors import SourceError

if TYPE_CHECKING:
    from botocore.client import BaseClient

FORMATS = ("jsonl", "json", "csv", "parquet", "text", "hf_disk")
EXTENSION_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    "": "text",
}
# Compressed inputs: the suffix is dropped to tell the format ("x.jsonl.gz" is jsonl), and the
# bytes are decompressed by their magic number, whatever the name.
COMPRESSED_SUFFIXES = (".gz", ".zst")
GZIP_MAGIC, ZSTD_MAGIC = b"\x1f\x8b", b"\x28\xb5\x2f\xfd"
GLOB_CHARS = "*?["
# What `datasets.save_to_disk` writes: a Dataset folder, or a DatasetDict folder with one per split.
HF_DATASET_MARKERS = ("dataset_info.json", "state.json")
HF_DATASET_DICT_MARKER = "dataset_dict.json"


@dataclass(frozen=True)
class Input:
    """One concrete thing to read: a file, an S3 object, or a `save_to_disk` folder."""

    uri: str  # local path as written (relative stays relative) or "s3://bucket/key"
    format: str  # concrete: jsonl|json|csv|parquet|text|hf_disk


# --- resolving ------------------------------------------------------------------------------


def resolve_inputs(path: str, fmt: str = "auto") -> list[Input]:
    """The inputs a source path names, in a deterministic order; `SourceError` if there are none."""
    if fmt != "auto" and fmt not in FORMATS:
        raise SourceError(f"{path}: unknown format {fmt!r}; use one of auto, {', '.join(FORMATS)}")
    if path.startswith("s3://"):
        return [Input(uri, _format_of(uri, fmt)) for uri in _resolve_s3(path)]
    if _has_glob(path):
        return [Input(p, _local_format(p, fmt)) for p in _expand_local_glob(path)]
    if not os.path.exists(path):
        raise SourceError(
            f"{path} does not exist (relative paths are resolved against {os.getcwd()})"
        )
    return [Input(path, _local_format(path, fmt))]


def _has_glob(text: str) -> bool:
    return any(char in text for char in GLOB_CHARS)


def is_hf_disk_folder(path: str) -> bool:
    """True for a folder written by `Dataset.save_to_disk` or `DatasetDict.save_to_disk`."""
    folder = Path(path)
    if (folder / HF_DATASET_DICT_MARKER).is_file():
        return True
    return all((folder / name).is_file() for name in HF_DATASET_MARKERS)


def _local_format(path: str, fmt: str) -> str:
    if os.path.isdir(path):
        if fmt in ("auto", "hf_disk") and is_hf_disk_folder(path):
            return "hf_disk"
        raise SourceError(
            f"{path} is a folder but not one written by `datasets.save_to_disk` (no"
            f" {HF_DATASET_DICT_MARKER}, or {' and '.join(HF_DATASET_MARKERS)}): to read the files"
            f" in it, use a glob such as {os.path.join(path, '*.jsonl')}"
        )
    return _format_of(path, fmt)


def _format_of(uri: str, fmt: str) -> str:
    """The explicit format, or the one the extension implies."""
    if fmt != "auto":
        return fmt
    name = uri.rsplit("/", 1)[-1]
    if name.lower().endswith(COMPRESSED_SUFFIXES):
        name = os.path.splitext(name)[0]
    extension = os.path.splitext(name)[1].lower()
    if extension not in EXTENSION_FORMATS:
        known = ", ".join(sorted(e for e in EXTENSION_FORMATS if e))
        raise SourceError(
            f"{uri}: cannot tell the format from the extension {extension!r} (known: {known});"
            f" set `format:` on this source ({', '.join(FORMATS)})"
        )
    return EXTENSION_FORMATS[extension]


def _expand_local_glob(pattern: str) -> list[str]:
    matches = sorted(
        p
        for p in glob.glob(pattern, recursive=True)
        if os.path.isfile(p) or is_hf_disk_folder(p)
    )
    if not matches:
        searched = os.path.abspath(_literal_prefix_dir(pattern) or ".")
        missing = "" if os.path.isdir(searched) else " (that folder does not exist)"
        raise SourceError(f"no file matches the glob {pattern!r} (searched in {searched}{missing})")
    return matches


def _literal_prefix_dir(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: where the search starts."""
    parts = pattern.split("/")
    literal: list[str] = []
    for part in parts[:-1]:
        if _has_glob(part):
            break
        literal.append(part)
    return "/".join(literal) if literal != [""] else "/"


def split_s3_uri(uri: str) -> tuple[str, str]:
    """("bucket", "key/of/object") from "s3://bucket/key/of/object"."""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket:
        raise SourceError(f"{uri}: no bucket name; expected s3://bucket/key")
    return bucket, key


def _resolve_s3(uri: str) -> list[str]:
    bucket, key = split_s3_uri(uri)
    if not key or key.endswith("/"):
        raise SourceError(
            f"{uri} names a bucket or prefix, not an object: add a glob, e.g."
            f" s3://{bucket}/{key}*.jsonl"
        )
    if not _has_glob(key):
        return [uri]  # existence is checked when it is read, with the exact S3 error
    prefix = key[: min(key.find(c) for c in GLOB_CHARS if c in key)]
    client = _s3_client()
    keys = sorted(k for k in _list_s3_keys(client, bucket, prefix, uri) if s3_key_matches(key, k))
    if not keys:
        raise SourceError(
            f"no S3 object matches {uri} (listed prefix {prefix!r} in bucket {bucket!r} at"
            f" {_endpoint_for_humans(client)})"
        )
    return [f"s3://{bucket}/{k}" for k in keys]


def s3_key_matches(pattern: str, key: str) -> bool:
    """Glob match on S3 keys as on local paths: `*` stays within one "/" segment, and a `**`
    segment matches zero or more whole segments (so `data/**/*.jsonl` also finds `data/a.jsonl`)."""
    return _segments_match(pattern.split("/"), key.split("/"))


def _segments_match(pattern: list[str], key: list[str]) -> bool:
    if not pattern:
        return not key
    if pattern[0] == "**":
        return any(_segments_match(pattern[1:], key[skip:]) for skip in range(len(key) + 1))
    return bool(key) and fnmatch.fnmatchcase(key[0], pattern[0]) and _segments_match(pattern[1:], key[1:])


def _list_s3_keys(client: BaseClient, bucket: str, prefix: str, uri: str) -> list[str]:
    keys: list[str] = []
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys.extend(obj["Key"] for obj in page.get("Contents", []))
    except Exception as err:  # translated below, or re-raised if not an S3 error
        raise _s3_error(err, uri, client) from err
    return keys


# --- reading --------------------------------------------------------------------------------


def read_bytes(inp: Input) -> bytes:
    """The whole content of a local file or S3 object, decompressed if it is gzip or zstd;
    `SourceError` with what to do if not."""
    return decompressed(_raw_bytes(inp), inp.uri)


def decompressed(data: bytes, uri: str) -> bytes:
    """`data` itself, or what it holds when it starts with gzip's or zstd's magic number."""
    if data.startswith(GZIP_MAGIC):
        import gzip
        import zlib

        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise SourceError(f"{uri} is a damaged gzip file ({err}): download or compress it again") from None
    if data.startswith(ZSTD_MAGIC):
        import zstandard

        try:
            with zstandard.ZstdDecompressor().stream_reader(data) as reader:
                return reader.read()
        except zstandard.ZstdError as err:
            raise SourceError(f"{uri} is a damaged zstd file ({err}): download or compress it again") from None
    return data


def _raw_bytes(inp: Input) -> bytes:
    if inp.uri.startswith("s3://"):
        return _read_s3(inp.uri)
    try:
        return Path(inp.uri).read_bytes()
    except FileNotFoundError:
        raise SourceError(f"{inp.uri} does not exist") from None
    except IsADirectoryError:
        raise SourceError(f"{inp.uri} is a folder, not a {inp.format} file") from None
    except PermissionError:
        raise SourceError(f"{inp.uri}: permission denied; check the file's permissions") from None


def _read_s3(uri: str) -> bytes:
    bucket, key = split_s3_uri(uri)
    client = _s3_client()
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as err:  # translated below, or re-raised if not an S3 error
        raise _s3_error(err, uri, client) from err


def s3_etag(inp: Input) -> str | None:
    """The object's ETag (content fingerprint for lineage), or None for a local input."""
    if not inp.uri.startswith("s3://"):
        return None
    bucket, key = split_s3_uri(inp.uri)
    client = _s3_client()
    try:
        return client.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')
    except Exception as err:  # translated below, or re-raised if not an S3 error
        raise _s3_error(err, inp.uri, client) from err


# The environment that decides which S3 client we get; a change (as between tests, or after a
# credentials refresh) gets a new client instead of one holding stale credentials.
S3_ENV = (
    "S3_ENDPOINT_URL",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)


def _s3_client() -> BaseClient:
    """An S3 client for the current environment, reused while the environment stays the same."""
    # Hashed, so no secret sits in the cache key.
    fingerprint = hashlib.sha256(
        "\0".join(os.environ.get(name, "") for name in S3_ENV).encode()
    ).hexdigest()
    return _s3_client_for(fingerprint)


@functools.lru_cache(maxsize=4)
def _s3_client_for(env_fingerprint: str) -> BaseClient:
    """A client that fails in seconds, not minutes, when the endpoint is down."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30)
    # boto3 reads AWS_ENDPOINT_URL(_S3) itself; S3_ENDPOINT_URL is the name many tools use.
    endpoint = os.environ.get("S3_ENDPOINT_URL") or None
    # A session of our own: boto3's default session caches the credentials it first found.
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def _endpoint_for_humans(client: Any) -> str:
    """The endpoint URL without any user:password part."""
    parts = urlsplit(client.meta.endpoint_url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


ACCESS_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


def _s3_error(err: Exception, uri: str, client: Any) -> Exception:
    """A `SourceError` saying what went wrong with S3 and what to check; other errors unchanged."""
    from botocore import exceptions as bx

    endpoint = _endpoint_for_humans(client)
    if isinstance(err, (bx.ConnectionError, bx.HTTPClientError)):
        return SourceError(
            f"cannot reach S3 endpoint {endpoint} for {uri}: check AWS_ENDPOINT_URL / network"
            f" ({type(err).__name__})"
        )
    if isinstance(err, (bx.NoCredentialsError, bx.PartialCredentialsError)):
        return SourceError(
            f"no usable S3 credentials for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            f" (or AWS_PROFILE) in the environment, never in params.yaml"
        )
    if not isinstance(err, bx.ClientError):
        return err
    code = str(err.response.get("Error", {}).get("Code", ""))
    status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    bucket, key = split_s3_uri(uri)
    if code in ACCESS_DENIED_CODES or status == 403:
        return SourceError(
            f"access denied to {uri} ({code or status} from {endpoint}): check the credentials in"
            f" the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, never in"
            f" params.yaml) and that they may read bucket {bucket!r}"
        )
    if code == "NoSuchBucket":
        return SourceError(f"bucket {bucket!r} does not exist at {endpoint} (reading {uri})")
    if code in MISSING_CODES or status == 404:
        return SourceError(f"{uri} does not exist: no object {key!r} in bucket {bucket!r} at {endpoint}")
    message = err.response.get("Error", {}).get("Message", "")
    return SourceError(f"S3 error {code or status} for {uri} at {endpoint}: {message}")
