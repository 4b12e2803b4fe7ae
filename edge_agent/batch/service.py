"""The logic behind the Files and Batches endpoints (the routes in ``routes.py`` stay thin)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.datastructures import UploadFile

from edge_agent.batch.input_file import PARAM, parse_input_file
from edge_agent.batch.journal import BatchJournal
from edge_agent.settings import BatchSettings
from shared.batch_api import (
    COMPLETION_WINDOWS,
    Batch,
    BatchCreateRequest,
    BatchList,
    FileDeleted,
    FileList,
    FileObject,
)
from shared.errors import InvalidRequest, NotFound, RequestTooLarge

_READ_CHUNK = 1024 * 1024
MAX_FILENAME = 255


class BatchService:
    def __init__(
        self, journal: BatchJournal, settings: BatchSettings, on_new_batch: Callable[[], None]
    ) -> None:
        self.journal = journal
        self.settings = settings
        self.on_new_batch = on_new_batch

    # -- files -----------------------------------------------------------------------------------
    async def upload(self, file: UploadFile, purpose: str) -> FileObject:
        if purpose != "batch":
            raise InvalidRequest(
                f"purpose {purpose[:40]!r} is not supported by this server; only 'batch'", param="purpose"
            )
        limit = self.settings.max_file_bytes
        parts: list[bytes] = []
        size = 0
        while chunk := await file.read(_READ_CHUNK):
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(
                    f"the file is larger than {limit} bytes (batch.max_file_bytes)", param="file"
                )
            parts.append(chunk)
        if size == 0:
            raise InvalidRequest("the file is empty", param="file")
        filename = (file.filename or "input.jsonl")[:MAX_FILENAME]
        return self.journal.add_file(filename, "batch", b"".join(parts)).wire()

    def list_files(self, purpose: str | None, limit: int, after: str | None) -> FileList:
        found, more = self.journal.files(purpose=purpose, limit=limit, after=after)
        data = [f.wire() for f in found]
        return FileList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    def file(self, file_id: str) -> FileObject:
        return self.journal.file(file_id).wire()

    def content(self, file_id: str) -> bytes:
        return self.journal.content(file_id)

    def delete_file(self, file_id: str) -> FileDeleted:
        self.journal.delete_file(file_id)
        return FileDeleted(id=file_id, deleted=True)

    # -- batches ---------------------------------------------------------------------------------
    async def create_batch(self, req: BatchCreateRequest) -> Batch:
        try:
            stored = self.journal.file(req.input_file_id)
        except NotFound as exc:
            raise NotFound(exc.message, param=PARAM) from exc
        if stored.purpose != "batch":
            raise InvalidRequest(
                f"file {stored.id!r} has purpose {stored.purpose!r}; a batch reads a file uploaded "
                "with purpose 'batch'",
                param=PARAM,
            )
        content = self.journal.content(stored.id)
        # Up to 50,000 requests to validate: off the event loop, which serves interactive requests.
        lines = await asyncio.to_thread(parse_input_file, content, req.endpoint, self.settings.max_lines)
        # Tens of thousands of rows: written off the event loop too (the journal's own connection).
        record = await asyncio.to_thread(
            self.journal.create_batch,
            endpoint=req.endpoint,
            input_file_id=stored.id,
            completion_window=req.completion_window,
            window_s=COMPLETION_WINDOWS[req.completion_window],
            metadata=req.metadata,
            lines=lines,
        )
        self.on_new_batch()
        return record.wire()

    def batch(self, batch_id: str) -> Batch:
        return self.journal.batch(batch_id).wire()

    def list_batches(self, limit: int, after: str | None) -> BatchList:
        found, more = self.journal.batches(limit=limit, after=after)
        data = [b.wire() for b in found]
        return BatchList(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=more,
        )

    def cancel(self, batch_id: str) -> Batch:
        return self.journal.cancel(batch_id).wire()
