"""`monitor console`: the web app an alert links to. Server-rendered pages and a JSON API over the store.

Nothing but `/healthz` and the login form answers without authentication (401 otherwise). Pages are
Jinja2 templates with inline SVG; the little JavaScript there is only adds hover links between the
token strip and the heatmap, and every page reads the same with it off.
"""

from __future__ import annotations

import io
import json
import logging
import math
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlencode

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field, ValidationError
from sqlalchemy.exc import DBAPIError

from monitor.config.models import MonitorConfig
from monitor.console.auth import (CSRF_COOKIE, SESSION_COOKIE, AuthError, Identity, LoginLimiter, Sessions,
                                  TokenStore, csrf_ok, new_csrf, proxy_identity, session_secret)
from monitor.console import runbooks
from monitor.console.views import gist, incident_view, shade, without_text
from monitor.console.whatif import what_if
from monitor.sinks.sealing import SealingError
from monitor.store.db import Store, StoreError
from monitor.store.export import EXPORTABLE, labelled_record, write_export
from monitor.store.queries import (STATUSES, VERDICTS, IncidentFilter, detector_fires, detector_threshold, events_of,
                                   facets, list_incidents,
                                   parse_time, verdict_counts)

log = logging.getLogger("monitor.console")
HERE = Path(__file__).parent
PAGE_SIZE = 50
LANDING_SIZE = 20  # an alert's landing page: the newest incidents behind it, each read in full
LANDING_WINDOW = timedelta(hours=24)  # without `since`: what "behind this alert" means


class Unavailable(Exception):
    """The database cannot answer; shown as a 503 page."""


class NeedLogin(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


class Forbidden(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


# ---- the JSON API's shapes (also its OpenAPI description) -----------------------------------


class IncidentSummary(BaseModel):
    alert_ids: list[str]
    event_id: str
    request_id: str
    detectors: list[str] = Field(description="Detectors that fired.")
    severity: Literal["critical", "warning", "info"]
    model: str
    deployment: str
    time: datetime
    status: Literal["open", "acknowledged", "resolved"]
    verdict: Literal["true_positive", "false_positive", "unsure"] | None
    mode: Literal["live", "shadow"] = Field(description="`shadow`: only detectors in shadow mode fired (never paged).")
    tier: Literal["page", "record"] = Field(description="`record`: recorded at a detector's lower tier, never paged.")
    url: str = Field(description="The incident page.")


class IncidentList(BaseModel):
    items: list[IncidentSummary]
    total: int = Field(description="Incidents matching the filter.")
    counts: dict[str, int] = Field(description="Per detector, under every filter but `detector`.")
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last.")


class TriageEntry(BaseModel):
    action: str
    verdict: str | None
    note: str | None
    actor: str
    at: datetime


class IncidentDetail(BaseModel):
    incident: dict = Field(description="The incident event (CloudEvent, schema incident.v1.json); `trace.text` and "
                           "`trace.token_ids` are null without the text permission.")
    alerts: list[dict] = Field(description="The alert events of this alert id, by revision.")
    status: str
    verdict: str | None
    verdict_note: str | None
    triage: list[TriageEntry]


class TriageRequest(BaseModel):
    action: Literal["acknowledge", "resolve", "reopen", "verdict"]
    verdict: Literal["true_positive", "false_positive", "unsure"] | None = None
    note: str | None = Field(None, max_length=4000)


@dataclass
class Console:
    cfg: MonitorConfig
    store: Store
    tokens: TokenStore
    sessions: Sessions
    limiter: LoginLimiter

    @property
    def secure_cookies(self) -> bool:
        return bool(self.cfg.console.base_url and self.cfg.console.base_url.startswith("https://"))


def _filter(request: Request) -> IncidentFilter:
    params = {k: v for k, v in request.query_params.items() if k in IncidentFilter.model_fields}
    if "from" in request.query_params:  # Grafana's data links say from/to
        params.setdefault("since", request.query_params["from"])
    if "to" in request.query_params:
        params.setdefault("until", request.query_params["to"])
    try:
        return IncidentFilter.model_validate(params)
    except ValidationError as e:
        reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'filter'}: {err['msg']}" for err in e.errors())
        raise HTTPException(400, f"bad filter: {reasons}") from None


def create_app(cfg: MonitorConfig, store: Store, tokens: TokenStore, opener=None) -> FastAPI:
    """`opener`: the key that opens sealed redacted values (monitor.sinks.sealing.Opener), or None."""
    c = Console(cfg=cfg, store=store, tokens=tokens, sessions=Sessions(session_secret(cfg.console), cfg.console.session_hours),
                limiter=LoginLimiter(cfg.console.login_attempts_per_minute))
    app = FastAPI(title="misalignment-monitor console", version="1", docs_url=None, redoc_url=None, openapi_url=None,
                  description="The incident store: list, read and triage incidents. Authenticate with "
                              "`Authorization: Bearer <token>` (tokens from `monitor console token`).")
    app.state.console = c
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(shade=shade, STATUSES=STATUSES, VERDICTS=VERDICTS)
    templates.env.filters["tojson_pretty"] = lambda v: json.dumps(v, indent=2, ensure_ascii=False)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    served_runbooks = runbooks.runbooks_dir(cfg.console.runbooks_dir)
    templates.env.globals.update(nav_alerts=bool(cfg.console.alertmanager_url), nav_runbooks=served_runbooks is not None)

    def runbook_link(alert: str) -> str:
        """The deployment's own runbook page when the console serves them, else the configured base."""
        page = f"{alert.lower()}.md"
        return f"/runbooks/{page}" if served_runbooks is not None else f"{cfg.console.runbook_url}/{page}"

    def client(request: Request) -> str:
        return request.client.host if request.client else "unknown"

    def identify(request: Request) -> Identity:
        auth = request.headers.get("authorization", "")
        try:
            if auth.lower().startswith("bearer "):
                e = c.tokens.verify(auth[7:].strip())
                return Identity(e.name, e.role, e.text, "token", e.id)
            who = proxy_identity(cfg.console.proxy, client(request), request.headers)
            if who is not None:
                return who
        except AuthError as e:
            log.warning("refused", extra={"client": client(request), "reason": str(e), "path": request.url.path})
            raise NeedLogin(str(e)) from None
        cookie = request.cookies.get(SESSION_COOKIE)
        s = c.sessions.read(cookie) if cookie else None
        if s is None:
            raise NeedLogin("log in with a console token")
        # Sessions come from a token's login: they end when the token is removed or expires, and take
        # its current role and permission.
        e = c.tokens.entry(s.get("tid") or "")
        if e is None:
            raise NeedLogin("your token was removed or has expired")
        return Identity(e.name, e.role, e.text, "session", e.id)

    def viewer(request: Request) -> Identity:
        who = identify(request)
        request.state.who = who
        return who

    def triager(request: Request, who: Identity = Depends(viewer)) -> Identity:
        if not who.at_least("triager"):
            raise Forbidden(f"{who.name} is a {who.role}: triage needs the triager or admin role")
        return who

    def admin(request: Request, who: Identity = Depends(viewer)) -> Identity:
        if not who.at_least("admin"):
            raise Forbidden(f"{who.name} is a {who.role}: this page needs the admin role")
        return who

    def check_csrf(request: Request, who: Identity, submitted: str | None) -> None:
        if who.via == "token":
            return
        if not csrf_ok(request.cookies.get(CSRF_COOKIE), submitted):
            raise Forbidden("the form's CSRF token is missing or does not match: reload the page and try again")

    def db(fn, *args, **kw):
        try:
            with c.store.session() as s:
                return fn(s, *args, **kw)
        except (DBAPIError, StoreError) as e:
            log.error("database unavailable", extra={"database": c.store.name, "error": str(e).splitlines()[0][:300]})
            raise Unavailable(str(getattr(e, "orig", e) or e).splitlines()[0][:300]) from None

    def render(request: Request, name: str, status: int = 200, **ctx) -> HTMLResponse:
        token = request.cookies.get(CSRF_COOKIE) or new_csrf()
        ctx.setdefault("who", getattr(request.state, "who", None))
        resp = templates.TemplateResponse(request, name, {"csrf": token, **ctx}, status_code=status)
        if request.cookies.get(CSRF_COOKIE) != token:
            resp.set_cookie(CSRF_COOKIE, token, httponly=True, samesite="strict", secure=c.secure_cookies, path="/")
        return resp

    def wants_json(request: Request) -> bool:
        return request.url.path.startswith("/api/") or request.url.path.endswith(".json")

    @app.exception_handler(NeedLogin)
    async def _need_login(request: Request, exc: NeedLogin):
        if wants_json(request) or request.headers.get("authorization"):
            return JSONResponse({"detail": exc.reason}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return render(request, "login.html", status=401, reason=exc.reason, next=request.url.path +
                      (f"?{request.url.query}" if request.url.query else ""))

    @app.exception_handler(Forbidden)
    async def _forbidden(request: Request, exc: Forbidden):
        if wants_json(request):
            return JSONResponse({"detail": exc.reason}, status_code=403)
        return render(request, "error.html", status=403, title="Not allowed", message=exc.reason)

    @app.exception_handler(Unavailable)
    async def _unavailable(request: Request, exc: Unavailable):
        msg = (f"The incident database ({c.store.name}) is not answering: {exc}. Pages come back by themselves when "
               "it does; if it persists, check the database and the console's log.")
        if wants_json(request):
            return JSONResponse({"detail": msg}, status_code=503, headers={"Retry-After": "10"})
        return render(request, "error.html", status=503, title="The incident database is unavailable", message=msg)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        if wants_json(request):
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
        title = {400: "That request is not right", 404: "Not found"}.get(exc.status_code, "Error")
        return render(request, "error.html", status=exc.status_code, title=title, message=str(exc.detail))

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        resp = await call_next(request)
        resp.headers.setdefault("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; "
                                "style-src 'self' 'unsafe-inline'; script-src 'self'; frame-ancestors 'none'; "
                                "form-action 'self'; base-uri 'none'")
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("Referrer-Policy", "same-origin")  # incident URLs stay inside
        if not request.url.path.startswith("/static/"):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    # ---- unauthenticated --------------------------------------------------------------------

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon():  # browsers ask for it on every page, whatever the page's <link rel="icon"> says
        return FileResponse(HERE / "static" / "favicon.svg", media_type="image/svg+xml",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
    def login_form(request: Request, next: str = "/incidents"):
        return render(request, "login.html", next=next, reason=None)

    @app.post("/login", include_in_schema=False)
    def login(request: Request, token: str = Form(""), csrf: str = Form(""), next: str = Form("/incidents")):
        where = client(request)
        if not csrf_ok(request.cookies.get(CSRF_COOKIE), csrf):
            return render(request, "login.html", status=403, next=next,
                          reason="the form expired (CSRF check failed): try again")
        wait = c.limiter.retry_after(where)
        if wait:
            resp = render(request, "login.html", status=429, next=next,
                          reason=f"too many failed logins from {where}: wait {wait} s")
            resp.headers["Retry-After"] = str(wait)
            return resp
        try:
            e = c.tokens.verify(token.strip())
        except AuthError as err:
            c.limiter.failed(where)
            log.warning("login failed", extra={"client": where, "reason": str(err)})
            _audit("unknown", "login_failed", None, where)
            return render(request, "login.html", status=401, next=next, reason=str(err))
        _audit(e.name, "login", None, where)
        safe_next = next if next.startswith("/") and not next.startswith("//") else "/incidents"
        resp = RedirectResponse(safe_next, status_code=303)
        resp.set_cookie(SESSION_COOKIE, c.sessions.issue(Identity(e.name, e.role, e.text, "session", e.id)),
                        max_age=c.sessions.max_age, httponly=True, samesite="lax", secure=c.secure_cookies, path="/")
        return resp

    def _audit(actor: str, action: str, target: str | None, where: str | None) -> None:
        try:
            c.store.audit(actor, action, target, where)
        except DBAPIError as e:  # the audit log is the database: when it is down, the page says so
            raise Unavailable(str(e.orig).splitlines()[0][:300]) from None

    # ---- pages ------------------------------------------------------------------------------

    @app.post("/logout", include_in_schema=False)
    def logout(request: Request, who: Identity = Depends(viewer), csrf: str = Form("")):
        check_csrf(request, who, csrf)
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/", include_in_schema=False)
    def root(who: Identity = Depends(viewer)):
        return RedirectResponse("/incidents", status_code=303)

    @app.get("/incidents", response_class=HTMLResponse, include_in_schema=False)
    def incidents_page(request: Request, who: Identity = Depends(viewer), cursor: str | None = None):
        f = _filter(request)
        try:
            page = page_of(f, PAGE_SIZE, cursor)
        except ValueError as e:  # a cursor from elsewhere
            raise HTTPException(400, str(e)) from None
        options = filter_options()
        query = f.query()
        export = "/incidents/export.jsonl?" + urlencode(query)
        return render(request, "list.html", page=page, f=f, options=options, query=query,
                      next_url=("/incidents?" + urlencode({**query, "cursor": page.next_cursor})) if page.next_cursor else None,
                      first_url=("/incidents?" + urlencode(query)) if cursor else None, export_url=export,
                      count_url=lambda d: "/incidents?" + urlencode({**query, "detector": d}))

    options_cache: list = [0.0, None]
    counts_cache: dict[str, tuple[float, tuple[int, dict[str, int]]]] = {}
    COUNTS_TTL = 2.0

    def page_of(f: IncidentFilter, limit: int, cursor: str | None):
        """A page of the list. Its rows are always read fresh; the total and per-detector counts (a scan
        of the filter's rows: the costly part at 100k incidents) are reused for 2 s per filter, so a
        team watching the same list during an incident, or paging through it, does not recount it on
        every request. Triage here drops them at once."""
        import time

        key = f.model_dump_json()
        hit = counts_cache.get(key)
        counted = hit[1] if hit and time.monotonic() - hit[0] < COUNTS_TTL else None
        page = db(list_incidents, f, limit, cursor, counted)
        if counted is None:
            if len(counts_cache) > 256:
                counts_cache.clear()
            counts_cache[key] = (time.monotonic(), (page.total, page.counts))
        return page

    def filter_options() -> dict[str, list[str]]:
        """The drop-downs' values: distinct scans of the whole store, so kept for 30 s (a new detector
        or model shows up in them that much later; the list itself is always current)."""
        import time

        if options_cache[1] is None or time.monotonic() - options_cache[0] > 30:
            options_cache[:] = [time.monotonic(), db(facets)]
        return options_cache[1]

    def load(s, alert_id: str):
        from sqlalchemy import select

        from monitor.store.schema import Alert

        inc = Store.incident_by_alert(s, alert_id)
        alerts = list(s.scalars(select(Alert).where(Alert.alert_id == alert_id).order_by(Alert.revision)))
        return inc, [a.event for a in alerts]

    def incident_or_404(alert_id: str):
        if len(alert_id) > 64:
            raise HTTPException(404, f"no incident with alert id {alert_id[:64]}…")
        inc, alerts = db(load, alert_id)
        if inc is None:
            extra = " (its alert events are stored; the incident event has not arrived yet)" if alerts else ""
            raise HTTPException(404, f"no incident with alert id {alert_id}{extra}")
        return inc, alerts

    def audit_text(who: Identity, inc, request: Request) -> None:
        if who.text and inc.event["data"]["trace"].get("text") is not None:
            _audit(who.name, "view_text", ",".join(inc.alert_ids), client(request))

    def may_export(who: Identity) -> None:
        if not who.text:
            raise Forbidden(f"{who.name} may not see conversation text, which is what an export contains")

    @app.get("/incidents/export.jsonl", include_in_schema=False)
    def export_all(request: Request, who: Identity = Depends(triager),
                   verdicts: str = Query("true_positive,false_positive", alias="verdict_in")):
        may_export(who)
        f = _filter(request)
        buf = io.StringIO()
        try:
            stats = db(lambda s: write_export(c.store, buf, tuple(v for v in verdicts.split(",") if v), f))
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        _audit(who.name, "export", json.dumps(f.query())[:500], client(request))
        return PlainTextResponse(buf.getvalue(), media_type="application/x-ndjson", headers={
            "Content-Disposition": 'attachment; filename="incidents-labelled.jsonl"',
            "X-Exported": str(stats.written), "X-Skipped": json.dumps(stats.skipped)})

    def _links(inc, view) -> dict:
        t = inc.event_time
        lo, hi = int((t - timedelta(minutes=30)).timestamp() * 1000), int((t + timedelta(minutes=30)).timestamp() * 1000)
        links = {"runbook": runbook_link("MisalignmentDetectorFired"),
                 "alert": "/alert?" + urlencode({"detector": view.primary.name, "model": inc.model})}
        if cfg.console.grafana_url:
            links["grafana"] = (f"{cfg.console.grafana_url}/d/misalignment-monitor-detector?"
                                + urlencode({"var-detector": view.primary.name, "from": lo, "to": hi}))
        return links

    @app.get("/incidents/{alert_id:path}/events.json", include_in_schema=False)
    def raw_events(request: Request, alert_id: str, who: Identity = Depends(viewer)):
        inc, alerts = incident_or_404(alert_id)
        audit_text(who, inc, request)
        event = inc.event if who.text else without_text(inc.event)
        return JSONResponse({"incident": event, "alerts": alerts})

    @app.get("/incidents/{alert_id:path}/export.jsonl", include_in_schema=False)
    def export_one(request: Request, alert_id: str, who: Identity = Depends(triager)):
        may_export(who)
        inc, _ = incident_or_404(alert_id)
        if inc.verdict not in EXPORTABLE:
            raise HTTPException(400, "give this incident a verdict (true or false positive) before exporting it")
        rec, why = labelled_record(inc.event, inc.verdict, inc.verdict_note)
        if rec is None:
            raise HTTPException(400, f"this incident cannot be exported: {why}")
        _audit(who.name, "export", alert_id, client(request))
        return PlainTextResponse(json.dumps(rec, ensure_ascii=False) + "\n", media_type="application/x-ndjson",
                                 headers={"Content-Disposition": f'attachment; filename="incident-{quote(alert_id)}.jsonl"'})

    @app.post("/incidents/{alert_id:path}/triage", include_in_schema=False)
    def triage_form(request: Request, alert_id: str, who: Identity = Depends(triager), action: str = Form(...),
                    verdict: str = Form(""), note: str = Form(""), csrf: str = Form("")):
        check_csrf(request, who, csrf)
        try:
            req = TriageRequest(action=action, verdict=verdict or None, note=note.strip() or None)
        except ValidationError as e:
            raise HTTPException(400, "; ".join(err["msg"] for err in e.errors())) from None
        _triage(request, who, alert_id, req)
        return RedirectResponse(f"/incidents/{quote(alert_id)}", status_code=303)

    # Ids are whatever the ingested events carry, "/" included: `:path` takes them whole, and this route comes
    # after the `/incidents/<id>/...` ones it would otherwise swallow.
    def revealed(who: Identity, inc, request: Request) -> dict:
        """The incident event with its sealed values opened in place of their replacements (audited)."""
        if not who.text:
            raise Forbidden(f"{who.name} may not see conversation text, which is what revealing shows")
        if opener is None:
            raise HTTPException(404, "this console holds no reveal key (console.reveal_key_file): redacted values "
                                     "stay redacted")
        data = inc.event["data"]
        if not data.get("sealed") or data["trace"].get("text") is None:
            raise HTTPException(404, "this incident has no sealed values: its sidecar had no "
                                     "evidence.reveal_public_key_file, or nothing was redacted")
        texts = list(data["trace"]["text"])
        index = {p: j for j, p in enumerate(data["trace"]["positions"])}
        for v in data["sealed"]:
            if v["position"] in index:
                try:
                    texts[index[v["position"]]] = opener.open(v["box"])
                except SealingError as e:
                    raise HTTPException(409, str(e)) from None
        _audit(who.name, "reveal", ",".join(inc.alert_ids)[:500], client(request))
        return {**inc.event, "data": {**data, "trace": {**data["trace"], "text": texts}}}

    @app.get("/incidents/{alert_id:path}", response_class=HTMLResponse, include_in_schema=False)
    def incident_page(request: Request, alert_id: str, who: Identity = Depends(viewer), reveal: bool = False):
        inc, alerts = incident_or_404(alert_id)
        event = revealed(who, inc, request) if reveal else inc.event
        view = incident_view(event, show_text=who.text)
        audit_text(who, inc, request)
        history = db(lambda s: c.store.triage_history(inc.event_id))
        links = _links(inc, view)
        similar, judged = db(similar_incidents, view.primary.name, inc.event_id)
        can_reveal = (opener is not None and who.text and not reveal and bool(inc.event["data"].get("sealed"))
                      and inc.event["data"]["trace"].get("text") is not None)
        return render(request, "incident.html", inc=inc, d=inc.event["data"], v=view, alert_id=alert_id,
                      history=history, links=links, alerts=alerts, similar=similar, judged=judged,
                      can_reveal=can_reveal, revealed=reveal,
                      first_steps=first_steps("MisalignmentDetectorFired"))

    def whatif_of(detector: str, threshold: str | None):
        try:
            candidate = None if threshold in (None, "") else float(threshold)
        except ValueError:
            raise HTTPException(400, f"threshold {threshold[:40]!r} is not a number") from None
        if candidate is not None and not math.isfinite(candidate):
            raise HTTPException(400, f"threshold {threshold!r} is not a finite number: no score ever reaches it")
        fires, current = db(lambda s: (detector_fires(s, detector), detector_threshold(s, detector)))
        if not fires:
            raise HTTPException(404, f"no fire of detector {detector!r} is stored")
        return what_if(detector, fires, current, current if candidate is None else candidate)

    @app.get("/detectors/{name}", response_class=HTMLResponse, include_in_schema=False)
    def detector_page(request: Request, name: str, who: Identity = Depends(viewer), threshold: str | None = None):
        """A detector's recorded fires, and what a candidate threshold would have done to them."""
        return render(request, "detector.html", w=whatif_of(name, threshold))

    @app.get("/api/detectors/{name}/what-if", tags=["detectors"],
             summary="Which recorded fires a candidate threshold keeps, with precision and recall over the judged ones")
    def api_what_if(name: str, who: Identity = Depends(viewer), threshold: str | None = None) -> dict:
        w = whatif_of(name, threshold)
        return {"detector": w.detector, "current_threshold": w.current, "threshold": w.candidate,
                "below_current": w.below_current, "fires": len(w.rows), "still_firing": w.kept,
                "true_positives": w.true_positives, "false_positives": w.false_positives,
                "true_positives_kept": w.kept_true, "false_positives_kept": w.kept_false,
                "precision": w.precision, "precision_now": w.precision_now, "recall": w.recall,
                "alerts": [{"alert_id": f.alert_id, "score": f.score, "fires": k, "verdict": f.verdict, "mode": f.mode}
                           for f, k in w.rows]}

    def similar_incidents(s, detector: str, event_id: str, n: int = 5):
        """The detector's other recent incidents (with their verdicts) and how its incidents were judged."""
        page = list_incidents(s, IncidentFilter(detector=detector, mode="all"), limit=n + 1)
        return [r for r in page.rows if r.event_id != event_id][:n], verdict_counts(s, detector)

    def first_steps(alert: str) -> str | None:
        """The runbook's Mitigation section, as HTML, for the page's first screen."""
        if served_runbooks is None:
            return None
        text = runbooks.page(served_runbooks, f"{alert.lower()}.md")
        part = runbooks.section(text, "Mitigation") if text else None
        return runbooks.render(part) if part else None

    @app.get("/alert", response_class=HTMLResponse, include_in_schema=False)
    def alert_page(request: Request, who: Identity = Depends(viewer)):
        """Where an alert lands (its `console_url`): the incidents behind it, newest first, the top one open."""
        params = dict(request.query_params)
        if not params.get("detector"):
            raise HTTPException(400, "an alert's page needs its detector: /alert?detector=<name>&model=<model>")
        params.setdefault("since", (datetime.now(timezone.utc) - LANDING_WINDOW).isoformat())
        # The alert that links here (MisalignmentDetectorFired) pages on the page tier only: record-tier incidents
        # are not behind it.
        params.setdefault("tier", "page")
        try:
            f = IncidentFilter.model_validate({k: v for k, v in params.items() if k in IncidentFilter.model_fields})
        except ValidationError as e:
            reasons = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'filter'}: {err['msg']}" for err in e.errors())
            raise HTTPException(400, f"bad alert link: {reasons}") from None

        def read(s):
            page = list_incidents(s, f, LANDING_SIZE)
            return page, events_of(s, [r.event_id for r in page.rows])

        page, events = db(read)
        shown = [(r, gist(events[r.event_id], who.text)) for r in page.rows if r.event_id in events]
        if who.text and shown:
            _audit(who.name, "view_text", ",".join(r.alert_ids[0] for r, _ in shown)[:500], client(request))
        return render(request, "alert.html", f=f, page=page, shown=shown, query=f.query(),
                      list_url="/incidents?" + urlencode(f.query()),
                      runbook=runbook_link("MisalignmentDetectorFired"))

    @app.get("/alerts", response_class=HTMLResponse, include_in_schema=False)
    def alerts_page(request: Request, who: Identity = Depends(viewer)):
        """Alertmanager's active alerts (Debian's build serves no web UI), each linked to its landing page."""
        if not cfg.console.alertmanager_url:
            raise HTTPException(404, "this console knows no Alertmanager (console.alertmanager_url is unset)")
        url = f"{cfg.console.alertmanager_url}/api/v2/alerts?active=true"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                raw = json.loads(r.read())
        except (OSError, ValueError) as e:
            return render(request, "error.html", status=502, title="Alertmanager is not answering",
                          message=f"{url}: {e}. Its alerts cannot be listed; incidents are still in the list.")
        rows = []
        for a in sorted(raw, key=lambda a: a.get("startsAt", ""), reverse=True):
            lab, ann = a.get("labels", {}), a.get("annotations", {})
            started = parse_time(a["startsAt"]) if a.get("startsAt") else None
            landing = None
            if lab.get("detector"):
                q = {"detector": lab["detector"], **({"model": lab["model_name"]} if lab.get("model_name") else {})}
                if started:
                    q["since"] = (started - timedelta(minutes=15)).isoformat()
                landing = "/alert?" + urlencode(q)
            rows.append({"labels": lab, "summary": ann.get("summary", ""), "started": started,
                         "state": a.get("status", {}).get("state", ""), "landing": landing,
                         "runbook": runbook_link(lab.get("alertname", "")) if lab.get("alertname") else None})
        return render(request, "alerts.html", rows=rows, source=cfg.console.alertmanager_url)

    @app.get("/runbooks/", response_class=HTMLResponse, include_in_schema=False)
    @app.get("/runbooks/{name}", response_class=HTMLResponse, include_in_schema=False)
    def runbook_page(request: Request, name: str = "", who: Identity = Depends(viewer)):
        if served_runbooks is None:
            raise HTTPException(404, "this console serves no runbooks (console.runbooks_dir is unset); they are at "
                                f"{cfg.console.runbook_url}")
        text = runbooks.page(served_runbooks, name)
        if text is None:
            raise HTTPException(404, f"no runbook {name!r}: the index at /runbooks/ lists them")
        title = text.splitlines()[0].lstrip("# ").strip() if text else name
        return render(request, "runbook.html", title=title, body=runbooks.render(text))

    def _triage(request: Request, who: Identity, alert_id: str, req: TriageRequest):
        if req.action == "verdict" and req.verdict is None:
            raise HTTPException(400, "choose a verdict: true positive, false positive or unsure")
        try:
            inc = c.store.triage(alert_id, who.name, req.action, req.verdict, req.note)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        except DBAPIError as e:
            raise Unavailable(str(e.orig).splitlines()[0][:300]) from None
        if inc is None:
            raise HTTPException(404, f"no incident with alert id {alert_id}")
        counts_cache.clear()
        _audit(who.name, "triage", f"{alert_id} {req.action} {req.verdict or ''}".strip(), client(request))
        return inc

    @app.get("/audit", response_class=HTMLResponse, include_in_schema=False)
    def audit_page(request: Request, who: Identity = Depends(admin)):
        return render(request, "audit.html", entries=db(lambda s: c.store.audit_log(500)))

    # ---- JSON API -----------------------------------------------------------------------------

    def summary(r) -> IncidentSummary:
        return IncidentSummary(alert_ids=r.alert_ids, event_id=r.event_id, request_id=r.request_id, detectors=r.detectors,
                               severity=r.severity, model=r.model, deployment=r.deployment, time=r.event_time,
                               status=r.status, verdict=r.verdict, mode=r.mode, tier=r.tier, url=_url(f"/incidents/{quote(r.alert_ids[0])}"))

    def _url(path: str) -> str:
        return (cfg.console.base_url or "") + path

    @app.get("/api/incidents", response_model=IncidentList, tags=["incidents"],
             summary="Incidents, newest first, filtered", responses={400: {"description": "A malformed filter"},
                                                                    401: {"description": "No or bad token"}})
    def api_list(request: Request, who: Identity = Depends(viewer), cursor: str | None = None,
                 limit: int = Query(PAGE_SIZE, ge=1, le=500),
                 detector: str | None = None, concept: str | None = None, severity: str | None = None,
                 model: str | None = None, deployment: str | None = None, status: str | None = None,
                 verdict: str | None = None, since: str | None = None, until: str | None = None,
                 mode: str = "live", tier: str | None = None) -> IncidentList:
        f = _filter(request)
        try:
            page = page_of(f, limit, cursor)
        except ValueError as e:
            raise HTTPException(400, str(e)) from None
        return IncidentList(items=[summary(r) for r in page.rows], total=page.total, counts=page.counts,
                            next_cursor=page.next_cursor)

    @app.get("/api/incidents/{alert_id:path}", response_model=IncidentDetail, tags=["incidents"],
             summary="One incident, by any of its alert ids", responses={404: {"description": "Unknown alert id"}})
    def api_incident(request: Request, alert_id: str, who: Identity = Depends(viewer)) -> IncidentDetail:
        inc, alerts = incident_or_404(alert_id)
        audit_text(who, inc, request)
        history = db(lambda s: c.store.triage_history(inc.event_id))
        return IncidentDetail(incident=inc.event if who.text else without_text(inc.event), alerts=alerts,
                              status=inc.status, verdict=inc.verdict, verdict_note=inc.verdict_note,
                              triage=[TriageEntry(action=h.action, verdict=h.verdict, note=h.note, actor=h.actor,
                                                  at=h.at) for h in history])

    @app.post("/api/incidents/{alert_id:path}/triage", tags=["incidents"], summary="Acknowledge, resolve, reopen, or give a verdict",
              responses={403: {"description": "Not a triager, or a cookie session without the CSRF header"}})
    def api_triage(request: Request, alert_id: str, body: TriageRequest, who: Identity = Depends(triager)) -> dict:
        check_csrf(request, who, request.headers.get("x-csrf-token"))
        inc = _triage(request, who, alert_id, body)
        return {"status": inc.status, "verdict": inc.verdict, "verdict_note": inc.verdict_note,
                "triaged_by": inc.triaged_by, "triaged_at": inc.triaged_at}

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi(who: Identity = Depends(viewer)) -> dict:
        return app.openapi()

    return app
