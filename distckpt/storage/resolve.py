"""The one place a store path becomes a FileSystem: ``s3://`` URLs go to the object-store
backend, everything else to local files.

The S3 backend and its client are imported only for ``s3://`` paths, so the read-only CLI
and local jobs never load them. Its configuration comes from the standard AWS variables,
overridden key by key by an explicit ``storage_options``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from typing import Any

from distckpt.storage.filesystem import FileSystem, LocalFileSystem

S3_SCHEME = "s3://"

# Environment variable -> storage option (the first variable set wins for an option).
AWS_VARIABLES = (
    ("AWS_ENDPOINT_URL_S3", "endpoint"),
    ("AWS_ENDPOINT_URL", "endpoint"),
    ("AWS_ACCESS_KEY_ID", "access_key_id"),
    ("AWS_SECRET_ACCESS_KEY", "secret_access_key"),
    ("AWS_SESSION_TOKEN", "session_token"),
    ("AWS_REGION", "region"),
    ("AWS_DEFAULT_REGION", "region"),
    ("AWS_ALLOW_HTTP", "allow_http"),
)

_LOCAL = LocalFileSystem()
_CACHE: dict[tuple[str, tuple[tuple[str, str], ...]], FileSystem] = {}
_CACHE_LOCK = threading.Lock()


def is_object_store_path(path: str | os.PathLike[str]) -> bool:
    return isinstance(path, str) and path.startswith(S3_SCHEME)


def s3_options(storage_options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The S3 options in force: the AWS environment variables, then ``storage_options``."""
    options: dict[str, str] = {}
    for variable, option in AWS_VARIABLES:
        value = os.environ.get(variable)
        if value and option not in options:
            options[option] = value
    options.update({k: str(v) for k, v in (storage_options or {}).items()})
    return options


def filesystem_for(
    path: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> FileSystem:
    """The backend for ``path``: an ``S3FileSystem`` for ``s3://bucket/...`` (one per
    bucket and configuration per process, so connections are reused), else local files."""
    if not is_object_store_path(path):
        if storage_options:
            raise ValueError(f"storage_options apply to s3:// stores only, not {path}")
        return _LOCAL
    from distckpt.storage.s3 import S3FileSystem, split_url

    bucket, _ = split_url(str(path))
    options = s3_options(storage_options)
    key = (bucket, tuple(sorted(options.items())))
    with _CACHE_LOCK:
        fs = _CACHE.get(key)
        if fs is None:
            fs = _CACHE[key] = S3FileSystem(bucket, options)
        return fs


def store_path(path: str | os.PathLike[str]) -> str:
    """``path`` as a store keeps it: object-store URLs without a trailing slash, other
    paths as given."""
    if is_object_store_path(path):
        return str(path).rstrip("/")
    return os.fspath(path)
