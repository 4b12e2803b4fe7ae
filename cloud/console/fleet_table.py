"""The fleet page's table: filter by label selector, status and id, sort, and page on the server
(a thousand devices render as one page of fifty)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from cloud.plane.fleet import DeviceSummary, Selector
from shared.errors import ContractError

SORT_KEYS: dict[str, Callable[[DeviceSummary], Any]] = {
    "device_id": lambda d: d.device_id,
    "status": lambda d: (d.status, d.device_id),
    "last_seen": lambda d: (d.last_seen.timestamp() if d.last_seen else 0.0, d.device_id),
    "model": lambda d: (d.active_model or "", d.device_id),
    "phase": lambda d: (d.phase or "", d.device_id),
}
STATUSES = ("online", "offline", "unknown", "failed", "updating")
PER_PAGE = (25, 50, 100, 200)
UPDATING_PHASES = frozenset({"fetching", "verifying", "staged", "smoke_testing", "switching"})


@dataclass(frozen=True)
class FleetQuery:
    selector: str = ""
    status: str = ""
    q: str = ""
    sort: str = "device_id"
    desc: bool = False
    page: int = 1
    per_page: int = 50

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> FleetQuery:
        """From the page's query string; ContractError names a bad parameter."""
        sort = params.get("sort", "device_id") or "device_id"
        if sort not in SORT_KEYS:
            raise ContractError(f"sort is one of {', '.join(SORT_KEYS)}", param="sort")
        status = params.get("status", "")
        if status and status not in STATUSES:
            raise ContractError(f"status is one of {', '.join(STATUSES)}", param="status")
        try:
            page = max(1, int(params.get("page", "1") or 1))
            per_page = int(params.get("per_page", "50") or 50)
        except ValueError as exc:
            raise ContractError("page and per_page are whole numbers", param="page") from exc
        if per_page not in PER_PAGE:
            raise ContractError(f"per_page is one of {', '.join(map(str, PER_PAGE))}", param="per_page")
        selector = params.get("selector", "").strip()
        Selector.parse(selector)  # refuse a malformed one here, naming it
        return cls(
            selector=selector,
            status=status,
            q=params.get("q", "").strip()[:64],
            sort=sort,
            desc=params.get("order", "asc") == "desc",
            page=page,
            per_page=per_page,
        )

    def link(self, **change: Any) -> str:
        """This query with ``change`` applied, as a query string (for sort headers and pages)."""
        values = {
            "selector": self.selector,
            "status": self.status,
            "q": self.q,
            "sort": self.sort,
            "order": "desc" if self.desc else "asc",
            "page": self.page,
            "per_page": self.per_page,
            **change,
        }
        return "?" + urlencode({k: v for k, v in values.items() if v not in ("", None)})


def _matches_status(d: DeviceSummary, status: str) -> bool:
    if status in ("online", "offline", "unknown"):
        return d.status == status
    if status == "failed":
        return d.phase == "failed"
    return d.phase in UPDATING_PHASES


@dataclass(frozen=True)
class FleetPage:
    rows: list[DeviceSummary]
    total: int  # devices of the tenant
    matched: int  # after the filters
    page: int
    pages: int
    counts: dict[str, int]  # whole fleet: online, offline, failed, updating
    first: int  # 1-based position of the first row shown (0: none)


def fleet_page(devices: list[DeviceSummary], query: FleetQuery) -> FleetPage:
    selector = Selector.parse(query.selector)
    found = [
        d
        for d in devices
        if (not query.selector or selector.matches(d.labels))
        and (not query.status or _matches_status(d, query.status))
        and (not query.q or query.q.lower() in d.device_id.lower())
    ]
    found.sort(key=SORT_KEYS[query.sort], reverse=query.desc)
    pages = max(1, -(-len(found) // query.per_page))
    page = min(query.page, pages)
    start = (page - 1) * query.per_page
    counts = {
        s: sum(1 for d in devices if _matches_status(d, s))
        for s in ("online", "offline", "failed", "updating")
    }
    return FleetPage(
        rows=found[start : start + query.per_page],
        total=len(devices),
        matched=len(found),
        page=page,
        pages=pages,
        counts=counts,
        first=start + 1 if found else 0,
    )
