"""The Files and Batches routes of the local API (OpenAI's paths and shapes); logic in ``service.py``.

``POST /files`` (multipart: ``file``, ``purpose=batch``), ``GET /files``, ``GET /files/{id}``,
``GET /files/{id}/content``, ``DELETE /files/{id}``, ``POST /batches``, ``GET /batches``,
``GET /batches/{id}``, ``POST /batches/{id}/cancel``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile

from edge_agent.batch.service import BatchService
from shared.batch_api import Batch, BatchCreateRequest, BatchList, FileDeleted, FileList, FileObject
from shared.errors import InvalidRequest

Limit = Annotated[int, Query(ge=1, le=100)]
After = Annotated[str | None, Query(max_length=128)]


def batch_routes(service: Callable[[Request], BatchService], **router_kwargs: Any) -> APIRouter:
    router = APIRouter(**router_kwargs)

    @router.post("/files")
    async def create_file(
        request: Request, file: Annotated[UploadFile, File()], purpose: Annotated[str, Form(max_length=64)]
    ) -> FileObject:
        # FastAPI parsed the form already (request.form() is cached). Two parts named ``file``
        # would otherwise store the last one silently.
        form = await request.form()
        for field in ("file", "purpose"):
            if len(form.getlist(field)) > 1:
                raise InvalidRequest(f"the form holds more than one {field!r} part; send one", param=field)
        return await service(request).upload(file, purpose)

    @router.get("/files")
    async def list_files(
        request: Request,
        purpose: Annotated[str | None, Query(max_length=64)] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 10_000,
        after: After = None,
    ) -> FileList:
        return service(request).list_files(purpose, limit, after)

    @router.get("/files/{file_id}")
    async def retrieve_file(request: Request, file_id: str) -> FileObject:
        return service(request).file(file_id)

    @router.get("/files/{file_id}/content")
    async def file_content(request: Request, file_id: str) -> Response:
        return Response(service(request).content(file_id), media_type="application/jsonl")

    @router.delete("/files/{file_id}")
    async def delete_file(request: Request, file_id: str) -> FileDeleted:
        return service(request).delete_file(file_id)

    @router.post("/batches")
    async def create_batch(request: Request, body: BatchCreateRequest) -> Batch:
        return await service(request).create_batch(body)

    @router.get("/batches")
    async def list_batches(request: Request, limit: Limit = 20, after: After = None) -> BatchList:
        return service(request).list_batches(limit, after)

    @router.get("/batches/{batch_id}")
    async def retrieve_batch(request: Request, batch_id: str) -> Batch:
        return service(request).batch(batch_id)

    @router.post("/batches/{batch_id}/cancel")
    async def cancel_batch(request: Request, batch_id: str) -> Batch:
        return service(request).cancel(batch_id)

    return router
