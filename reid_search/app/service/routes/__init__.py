"""The service's routes, one :class:`fastapi.APIRouter` per resource: ``query``, ``gallery``, ``admin``."""

from reid_search.app.service.routes import admin, gallery, query

ROUTERS = (query.router, gallery.router, admin.router)
"""Every router, in the order ``create_app`` includes them (the order of the OpenAPI paths)."""

__all__ = ["ROUTERS", "admin", "gallery", "query"]
