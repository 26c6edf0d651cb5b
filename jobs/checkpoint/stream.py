"""A checkpoint file sent to S3 while it is still being written.

The local writer publishes how many bytes of each file are on disk (`FileProgress`); the uploader
reads the parts already there and sends them as a multipart upload (`stream_to_s3`), so a save's
upload runs alongside its local write instead of after it. The bytes come back from the file the
writer wrote and hashed, so the manifest's sizes and SHA-256 describe exactly what went up, and the
manifest itself is still uploaded last, after the local commit: nothing is committed remotely early.

Why: a spot notice gives 30 s (GCE). Writing a 1.2 GB checkpoint locally takes seconds before a
file-by-file upload can even start; streamed, the first part leaves 8 MiB into the write.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

from jobs.checkpoint.layout import FileEntry
from jobs.storage import S3_PART_BYTES, S3_PARTS_IN_FLIGHT

MAX_PART_BYTES = 5 << 30  # S3's limit per part
POLL_S = 0.1  # how often a waiting uploader looks at its stop event


class FileProgress:
    """The writer's side of one file: bytes written so far, then its entry (or that it failed)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.written = 0
        self.entry: Optional[FileEntry] = None
        self.failed = False

    def advance(self, n: int) -> None:
        with self._cond:
            self.written += n
            self._cond.notify_all()

    def finish(self, entry: FileEntry) -> None:
        with self._cond:
            self.entry = entry
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._cond.notify_all()

    def wait_for(self, nbytes: int, stop: threading.Event) -> tuple[int, bool]:
        """Until `nbytes` are written or the file ended (or `stop`): (bytes written, ended)."""
        with self._cond:
            while self.written < nbytes and self.entry is None and not self.failed and not stop.is_set():
                self._cond.wait(POLL_S)
            return self.written, self.entry is not None or self.failed

    def wait_end(self, stop: threading.Event) -> None:
        """Until the file ended (written or failed), or `stop`."""
        with self._cond:
            while self.entry is None and not self.failed and not stop.is_set():
                self._cond.wait(POLL_S)


def part_bytes(number: int) -> int:
    """Size of part `number` (from 1): 8 MiB for the first 8 GB, then 8 times larger every 1,000 parts,
    so a file of any size fits S3's 10,000 parts without knowing its size in advance."""
    return min(S3_PART_BYTES << (3 * ((number - 1) // 1000)), MAX_PART_BYTES)


def stream_to_s3(client: Any, bucket: str, key: str, local: Path, progress: FileProgress,
                 stop: threading.Event) -> Optional[FileEntry]:
    """Upload `local` to s3://bucket/key as the writer writes it; its entry once the object is complete,
    None if the writer failed or `stop` was set (the upload is then aborted). Store errors are raised
    (after aborting), for the caller to leave the file to its upload round."""
    written, ended = progress.wait_for(part_bytes(1) + 1, stop)  # a small file goes up in one request
    if stop.is_set() or progress.failed:
        return None
    if ended:
        assert progress.entry is not None
        client.put_object(Bucket=bucket, Key=key, Body=local.read_bytes())
        return progress.entry
    upload = client.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32")["UploadId"]
    try:
        parts = _send_parts(client, bucket, key, upload, local, progress, stop)
        if parts is None:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
            return None
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload, MultipartUpload={"Parts": parts})
        return progress.entry
    except BaseException:
        try:
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload)
        except Exception:
            pass  # the store is likely down; an unfinished upload holds no object, and S3 lifecycles expire it
        raise


def _send_parts(client: Any, bucket: str, key: str, upload: str, local: Path, progress: FileProgress,
                stop: threading.Event) -> Optional[list[dict[str, Any]]]:
    """Every part of the file, at most S3_PARTS_IN_FLIGHT at once (bounded memory); None if the writer
    failed or `stop` was set."""
    slots = threading.Semaphore(S3_PARTS_IN_FLIGHT)
    sent: list[Future] = []
    errors: list[BaseException] = []  # of the part threads: the first one ends the stream

    def send(number: int, data: bytes) -> dict[str, Any]:
        try:
            answer = client.upload_part(Bucket=bucket, Key=key, UploadId=upload, PartNumber=number, Body=data,
                                        ChecksumAlgorithm="CRC32")
        except BaseException as err:
            errors.append(err)
            raise
        finally:
            slots.release()
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if "ChecksumCRC32" in answer:
            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
        return part

    with ThreadPoolExecutor(S3_PARTS_IN_FLIGHT, thread_name_prefix="ckpt-part") as pool, open(local, "rb") as f:
        offset, number = 0, 1
        while True:
            size = part_bytes(number)
            written, ended = progress.wait_for(offset + size, stop)
            if stop.is_set() or progress.failed:
                return None
            if written - offset < size and not ended:
                continue
            length = min(size, written - offset)
            if length == 0:
                break  # the file ended exactly at a part boundary
            while not slots.acquire(timeout=POLL_S):  # S3_PARTS_IN_FLIGHT parts in the air: wait for one
                if stop.is_set():
                    return None
            if errors:
                raise errors[0]
            sent.append(pool.submit(send, number, os.pread(f.fileno(), length, offset)))
            offset, number = offset + length, number + 1
            if ended and offset >= written:
                break
        return [future.result() for future in sent]


class GrowingFile:
    """A file that another writer (DCP's) writes, followed on disk: its bytes are hashed as they appear and
    published as a FileProgress, so stream_to_s3 sends the parts already there while the write goes on.

    The writer must only append (DCP's file writer does: it records offsets from the stream's position) and
    the file must not exist at start(), so that no old bytes are taken for new ones."""

    def __init__(self, path: Path, rank: Optional[int]) -> None:
        self.path, self.rank = path, rank
        self.progress = FileProgress()
        self._digest, self._size = hashlib.sha256(), 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._follow, name="ckpt-follow", daemon=True)

    def start(self) -> None:
        self.path.unlink(missing_ok=True)
        self._thread.start()

    def finish(self, written: bool) -> Optional[FileEntry]:
        """The writer is done (`written`: and succeeded): the rest hashed and published; the file's entry."""
        self._done.set()
        self._thread.join()
        if not written:
            self.progress.fail()
            return None
        try:
            self._read_new()
        except OSError:
            self.progress.fail()
            return None
        entry = FileEntry(self._size, self._digest.hexdigest(), self.rank)
        self.progress.finish(entry)
        return entry

    def _follow(self) -> None:
        while not self._done.wait(POLL_S / 5):
            try:
                self._read_new()
            except FileNotFoundError:
                continue  # not created yet
            except OSError:
                return  # finish() reads what is left, or fails

    def _read_new(self) -> None:
        with open(self.path, "rb") as f:
            while chunk := os.pread(f.fileno(), 8 << 20, self._size):
                self._digest.update(chunk)
                self._size += len(chunk)
                self.progress.advance(len(chunk))
