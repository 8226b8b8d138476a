"""``POST /documents`` (index in the background, poll the job), ``DELETE /documents/{id}``.

Adding is a job on the engine's worker, queued behind requests already waiting: chunking,
embedding and KV precompute take seconds to minutes, far longer than a request should hang.
The job's documents are queryable (searchable, KV stored) once its status is ``done``.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from fastapi import APIRouter, BackgroundTasks, Depends, HTTPException, Request

from .errors import ERROR_RESPONSES, ErrorResponse
from .live_index import LiveIndex, NewDocument
from .rag import RAGService
from .schemas import AddDocumentsRequest, DeleteResponse, Job

log = logging.getLogger(__name__)
MAX_JOBS_KEPT = 1024


class Jobs:
    """Job records, newest last; the oldest finished ones are forgotten past ``MAX_JOBS_KEPT``."""

    def __init__(self) -> None:
        self._jobs: OrderedDict[str, Job] = OrderedDict()

    def create(self, document_ids: list[str], base_url: str) -> Job:
        job_id = uuid.uuid4().hex
        url = f"{base_url.rstrip('/')}/documents/jobs/{job_id}"
        job = Job(job_id=job_id, status="queued", queryable=False, status_url=url, document_ids=document_ids)
        self._jobs[job_id] = job
        finished = [k for k, j in self._jobs.items() if j.status in ("done", "failed")]
        for key in finished[: max(0, len(self._jobs) - MAX_JOBS_KEPT)]:
            del self._jobs[key]
        return job

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)


async def _run(job: Job, index: LiveIndex, service: RAGService, docs: list[NewDocument]) -> None:
    def add() -> dict[str, int]:
        job.status = "running"  # set on the worker: the job is running exactly from here
        return index.add(docs)

    try:
        counts = await service.worker.run(add)
    except Exception as err:  # reported on the job: no request is waiting for this error
        log.exception("indexing job %s failed", job.job_id)
        job.status, job.error = "failed", str(err)
        return
    job.status, job.queryable = "done", True
    job.added_chunks, job.kv_computed = counts["added"], counts["kv_computed"]


def documents_router(resolve: Callable[..., RAGService]) -> APIRouter:
    not_found = {"model": ErrorResponse, "description": "No such document or job in your namespace"}
    router = APIRouter(prefix="/documents", tags=["documents"], responses={**ERROR_RESPONSES, 404: not_found})
    jobs: defaultdict[RAGService, Jobs] = defaultdict(Jobs)  # per namespace: others' jobs are 404

    @router.post("", status_code=202, response_model=Job)
    async def add_documents(
        body: AddDocumentsRequest,
        request: Request,
        tasks: BackgroundTasks,
        service: RAGService = Depends(resolve),
    ) -> Job:
        """Queue documents for indexing (a document with an existing id replaces it).

        Returns at once; poll `status_url` until `queryable` is true."""
        ids = [d.id for d in body.documents]
        if len(set(ids)) != len(ids):
            raise HTTPException(422, "document ids must be unique within a request")
        job = jobs[service].create(ids, str(request.base_url))
        docs = [NewDocument(d.id, d.text, d.metadata) for d in body.documents]
        tasks.add_task(_run, job, service.index, service, docs)
        return job

    @router.get("/jobs/{job_id}", response_model=Job)
    async def job_status(job_id: str, service: RAGService = Depends(resolve)) -> Job:
        job = jobs[service].get(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return job

    @router.delete("/{doc_id:path}", response_model=DeleteResponse)
    async def delete(doc_id: str, service: RAGService = Depends(resolve)) -> DeleteResponse:
        """Remove a document, its vectors and its chunk KV (after queued jobs ahead of it)."""
        n = await service.worker.run(service.index.delete, doc_id)
        return DeleteResponse(document_id=doc_id, chunks_deleted=n)

    return router
