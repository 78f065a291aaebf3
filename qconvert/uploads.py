"""Upload as you go: finished safetensors shards pre-uploaded to the Hub and deleted locally.

A staging conversion (``qconvert release --stage``) hands each finished shard to a
:class:`ShardUploader`: ``preupload_lfs_files`` stores its bytes as an LFS object of the repo
(nothing is visible: no commit), the file is deleted, and its sha256 and size are recorded
(``output.UPLOADED_NAME``). The push at the end makes ONE commit that references them
(``publish.uploaded_addition``), so the disk a conversion needs is about one shard, a crash
publishes nothing, and a re-run uploads nothing the repo already stores: the LFS batch
answers "present" for the same bytes (a conversion is deterministic), and no PUT is made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import faults
from .errors import register_secret


class ShardUploader:
    """``sink(path) -> (sha256, size)`` for :class:`~qconvert.convert.writers.ShardedSafetensorsWriter`."""

    def __init__(self, repo_id: str, *, revision: str, token: str | None, endpoint: str | None, log: Any = None) -> None:
        self.repo_id, self.revision, self.token, self.endpoint = repo_id, revision, token, endpoint
        self.log = log or (lambda msg: None)
        self.uploaded: list[tuple[str, int]] = []
        register_secret(token)

    def __call__(self, path: Path) -> tuple[str, int]:
        from huggingface_hub import CommitOperationAdd, HfApi

        from .publish import hub_error

        faults.counted("upload")
        size = path.stat().st_size
        op = CommitOperationAdd(path_in_repo=f"{path.parent.name}/{path.name}", path_or_fileobj=str(path))
        sha = op.upload_info.sha256.hex()
        self.log(f"uploading {path.parent.name}/ shard {len(self.uploaded) + 1} ({size / 1e9:.2f} GB) to {self.repo_id}")
        try:
            HfApi(endpoint=self.endpoint, token=self.token).preupload_lfs_files(
                self.repo_id, [op], revision=self.revision, free_memory=True)  # fmt: skip
        except Exception as e:  # noqa: BLE001
            raise hub_error(e, f"uploading a shard to {self.repo_id}", repo_id=self.repo_id, endpoint=self.endpoint) from None
        path.unlink()  # stored on the Hub (not committed): the disk is for the next shard
        self.uploaded.append((sha, size))
        return sha, size
