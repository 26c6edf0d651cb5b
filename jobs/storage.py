"""fsspec file systems for paths and URIs (local, file://, s3://, gs://, memory://), configured
from the cluster's `storage:` section.

Credentials are left to the store's own client (s3fs reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY,
profiles and instance roles); nothing here reads, prints or stores them.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Optional

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from jobs.checkpoint.layout import MANIFEST, OWNER_FILE, STEP_DIR, manifest_run_id, parse_owner_record
from jobs.schema import StorageConfig
from jobs.schema.secrets import redact_text

# s3fs retries connection errors itself (5 tries, and botocore retries inside each): against a
# store that is down that is minutes per call. The checkpointer does its own backoff, so the
# client gives up quickly.
S3_CLIENT_CONFIG: dict[str, Any] = {"connect_timeout": 2, "read_timeout": 10, "retries": {"max_attempts": 2}}
S3_CALL_RETRIES = 2
# Checkpoint files go to S3 through boto3: streamed part by part as they are written (jobs/checkpoint/
# stream.py), or whole through its transfer manager. Either way 8 MiB parts, 10 in flight on threads,
# each part sent as soon as one finishes. s3fs's put_file sends 50 MiB parts in batches that wait for
# their slowest part; the same 1.2 GB checkpoint took 17 s through it and 11 s through boto3 (moto,
# this machine), and seconds count when a spot notice gives 30 of them.
S3_PART_BYTES = 8 << 20
S3_PARTS_IN_FLIGHT = 10
# filesystem() leaves its settings on the (private) s3fs instance for s3_client(), under these names: a
# mapping keyed by the instance would not do, as fsspec instances with the same options compare equal
SETTINGS_ATTR, CLIENT_ATTR = "_launcher_storage", "_launcher_s3_client"


def filesystem(uri: str, storage: StorageConfig) -> tuple[AbstractFileSystem, str]:
    """(file system, path inside it) for a local path or an fsspec URI.

    The s3 instance is private (`skip_instance_cache`), so its short retry settings do not leak to
    other users of s3fs in the process, and its directory listings are our own to invalidate.
    """
    if is_s3(uri):
        fs, path = fsspec.core.url_to_fs(uri, **s3_options(storage))
        fs.retries = S3_CALL_RETRIES
        setattr(fs, SETTINGS_ATTR, storage)  # for s3_client(): the same endpoint, profile and region
        return fs, path
    try:
        return fsspec.core.url_to_fs(uri)
    except ImportError as err:  # e.g. gs:// without gcsfs
        raise RuntimeError(f"cannot open {uri!r}: {err}. Install the fsspec package for this protocol "
                           f"(gcsfs for gs://, s3fs for s3://) in the environment the ranks run in") from None


def s3_options(storage: StorageConfig) -> dict[str, Any]:
    """s3fs keyword arguments from the `storage:` section, falling back to the standard AWS variables."""
    options: dict[str, Any] = {"skip_instance_cache": True, "config_kwargs": dict(S3_CLIENT_CONFIG)}
    endpoint = storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if storage.profile:
        options["profile"] = storage.profile
    region = storage.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def put_file(fs: AbstractFileSystem, local: str, target: str) -> None:
    """Copy a local file to `target` on `fs`; to S3 (an `fs` from filesystem()) with boto3's transfer manager."""
    client = s3_client(fs)
    if client is None:
        fs.put_file(local, target)
        return
    from boto3.s3.transfer import TransferConfig

    bucket, key = target.split("/", 1)
    config = TransferConfig(multipart_threshold=S3_PART_BYTES, multipart_chunksize=S3_PART_BYTES,
                            max_concurrency=S3_PARTS_IN_FLIGHT)  # past 80 GB s3transfer makes parts larger
    client.upload_file(local, bucket, key, Config=config)


_client_lock = threading.Lock()


def s3_client(fs: AbstractFileSystem) -> Any:
    """A boto3 client with the settings of `fs` (an S3 file system from filesystem()), one per file system
    (clients are thread-safe; making one takes ~50 ms); None for any other file system."""
    storage = getattr(fs, SETTINGS_ATTR, None)
    if storage is None:
        return None
    with _client_lock:
        if getattr(fs, CLIENT_ATTR, None) is None:
            import boto3
            from botocore.config import Config

            options = s3_options(storage)
            session = boto3.session.Session(profile_name=options.get("profile"))
            setattr(fs, CLIENT_ATTR, session.client(
                "s3", endpoint_url=options.get("endpoint_url"),
                region_name=options.get("client_kwargs", {}).get("region_name"),
                config=Config(**options["config_kwargs"], max_pool_connections=S3_PARTS_IN_FLIGHT)))
        return getattr(fs, CLIENT_ATTR)


def is_s3(uri: str) -> bool:
    return uri.startswith(("s3://", "s3a://"))


def is_local(fs: AbstractFileSystem) -> bool:
    """Local disks can rename atomically; object stores cannot, but their single PUTs are atomic."""
    return isinstance(fs, LocalFileSystem)


def join(uri: str, *names: str) -> str:
    """Child of a path or URI, keeping the caller's spelling (so `s3://b/run` gives `s3://b/run/x`)."""
    return "/".join([uri.rstrip("/"), *names])


def fresh_listing(fs: AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Entries of a folder as the store has them now ([] if it does not exist).

    s3fs caches listings per instance: without the invalidation a restarted server or files written
    by another process would not be seen.
    """
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def folder_owner(fs: AbstractFileSystem, root: str) -> Optional[str]:
    """The run id a remote checkpoint folder belongs to, or None for a folder no run has claimed.

    The owner record decides; a folder without one (written before owner records existed, or the
    record was deleted) belongs to the run its manifests name. Raises ValueError for an owner
    record that cannot be read, OSError when the store cannot be reached.
    """
    record = f"{root.rstrip('/')}/{OWNER_FILE}"
    try:
        text = fs.cat_file(record)
    except FileNotFoundError:
        return _manifest_owner(fs, root)
    return parse_owner_record(text, record)


def _manifest_owner(fs: AbstractFileSystem, root: str) -> Optional[str]:
    for entry in fresh_listing(fs, root):
        name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        if entry["type"] != "directory" or not STEP_DIR.match(name):
            continue
        try:
            run_id = manifest_run_id(fs.cat_file(f"{root.rstrip('/')}/{name}/{MANIFEST}"))
        except (FileNotFoundError, ValueError, AttributeError):
            continue  # uncommitted or unreadable: says nothing about the owner
        if run_id is not None:
            return run_id
    return None


def foreign_folder_message(folder: str, owner: str, this: str) -> tuple[str, str]:
    """Why a run may not use a checkpoint folder another run owns, and (second) what to do instead."""
    return (f"checkpoint folder {redact_text(folder)} belongs to run id {owner}, not to {this}: two runs in one "
            f"folder would delete each other's checkpoints",
            f"choose another --run-name or checkpoint.uri; or, if this is run {owner} on a new machine "
            f"(its runs directory lost), continue it with --run-id {owner}")
