"""``GET /healthz`` and ``GET /stats``."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Any

from fastapi import APIRouter, Depends, Request

from reid_search.app.service.deps import BatcherDep, CoreDep
from reid_search.app.service.params import only

router = APIRouter()


@router.get("/healthz", dependencies=[Depends(only())])
async def healthz(core: CoreDep) -> dict[str, Any]:
    """Liveness: answers while the event loop runs."""
    return {"status": "ok", "gallery_size": core.gallery.ntotal}


@router.get("/stats", dependencies=[Depends(only())])
async def stats(request: Request, core: CoreDep, batcher: BatcherDep) -> dict[str, Any]:
    """Gallery size, model fingerprint and description, index type, search device, generation, batching."""
    settings = request.app.state.settings
    out = core.stats()
    out["batching"] = {"max_batch": settings["max_batch"], "max_wait_ms": settings["max_wait_ms"],
                       **batcher.stats.to_dict()}
    out["settings"] = settings
    return out
