"""The web application: ``create_app(config, worklist) -> FastAPI`` (``ctscreen serve``).

Every route is a :class:`GuardedRoute`: before anything else it looks up the session and
lets the request through only where the endpoint names the user's role with :func:`allow`.
An endpoint that names none is refused to everyone (deny by default), and every POST must
carry the session's CSRF token (the login form: the token of its own cookie).  ROUTE_ROLES
below is the matrix; tests/test_web.py walks every route of the app against it.

Pages are rendered by Jinja2 with autoescaping on for every template and every string; no
template marks DICOM text safe.  Scripts are static files (no inline script), and every
response carries a Content-Security-Policy of 'self'.  The worklist database is read only
(the batch writes it); users, sessions, reviews and the audit log live in the web's own
database (db.py).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SITE_NAME, Config
from ..worklist import GROUPS, Worklist, WorklistFilter, WorklistRow
from . import audit, auth, db, reviews
from .auth import ROLES, Session, User

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION_COOKIE = "ctscreen_session"
LOGIN_CSRF_COOKIE = "ctscreen_login_csrf"
PUBLIC = "public"
ALL_ROLES = frozenset(ROLES)
STUDY_UID = re.compile(r"^[0-9A-Za-z.\-]{1,80}$")
SITE = re.compile(SITE_NAME)
STATUSES = ("analysed", "not-analysed", "failed")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
       "form-action 'self'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
}

# The role matrix: who may use each route (PUBLIC: anyone, logged in or not).  A route of
# the app missing here is refused to everyone; tests/test_web.py checks both ways.
ROUTE_ROLES: dict[tuple[str, str], frozenset[str]] = {
    ("GET", "/"): ALL_ROLES,
    ("GET", "/login"): frozenset({PUBLIC}),
    ("POST", "/login"): frozenset({PUBLIC}),
    ("POST", "/logout"): ALL_ROLES,
    ("GET", "/worklist"): ALL_ROLES,
    ("GET", "/worklist/stamp"): ALL_ROLES,
    ("GET", "/study/{study_uid}"): ALL_ROLES,
    ("GET", "/study/{study_uid}/slice/{k}.png"): ALL_ROLES,
    ("GET", "/study/{study_uid}/key/{i}.png"): ALL_ROLES,
    ("POST", "/study/{study_uid}/review"): frozenset({"radiologist"}),
    # a study of a site of a regional centre (docs/sites.md)
    ("GET", "/site/{site}/study/{study_uid}"): ALL_ROLES,
    ("GET", "/site/{site}/study/{study_uid}/slice/{k}.png"): ALL_ROLES,
    ("GET", "/site/{site}/study/{study_uid}/key/{i}.png"): ALL_ROLES,
    ("POST", "/site/{site}/study/{study_uid}/review"): frozenset({"radiologist"}),
    ("GET", "/reviews.csv"): ALL_ROLES,
    ("GET", "/metrics"): ALL_ROLES,
    ("GET", "/audit"): frozenset({"admin"}),
    ("GET", "/audit.csv"): frozenset({"admin"}),
}

F = TypeVar("F", bound=Callable[..., Any])


def allow(*roles: str, touch: bool = True) -> Callable[[F], F]:
    """Name the roles that may call an endpoint (PUBLIC: anyone).  ``touch=False``: a call
    does not count as activity for the session's idle expiry (the list page's polling)."""

    def mark(fn: F) -> F:
        fn._ctscreen_roles = frozenset(roles)  # type: ignore[attr-defined]
        fn._ctscreen_touch = touch  # type: ignore[attr-defined]
        return fn

    return mark


def _client(request: Request) -> str:
    return request.client.host if request.client else ""


class GuardedRoute(APIRoute):
    """A route that authenticates, authorises and checks CSRF before its endpoint runs."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()
        roles: frozenset[str] | None = getattr(self.endpoint, "_ctscreen_roles", None)
        touch: bool = getattr(self.endpoint, "_ctscreen_touch", True)

        async def guarded(request: Request) -> Response:
            if not roles:
                return _error(request, 403, "This page is not open to anyone.")
            session: Session | None = None
            if PUBLIC not in roles:
                auto = request.query_params.get("auto") == "1"  # a refresh, not the reader
                session = await run_in_threadpool(_session, request, touch and not auto)
                if session is None:
                    if request.method == "GET" and not request.url.path.endswith(
                            (".png", ".csv", "/stamp")):
                        target = request.url.path
                        if request.url.query:
                            target += "?" + request.url.query
                        return RedirectResponse("/login?" + urlencode({"next": target}), 303)
                    return _error(request, 401, "Please log in.")
                if session.user.role not in roles:
                    return _error(request, 403, "Your role may not use this page.")
            request.state.session = session
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                form = await request.form()
                sent = str(form.get("csrf", ""))
                expected = (session.csrf if session is not None
                            else request.cookies.get(LOGIN_CSRF_COOKIE, ""))
                if not auth.same_token(sent, expected):
                    return _error(request, 403, "The form is out of date or not ours "
                                                "(CSRF check failed): reload the page.")
            return await inner(request)

        return guarded


def _session(request: Request, touch: bool) -> Session | None:
    st = request.app.state
    cfg = st.config.web
    with db.connect(st.web_db) as conn:
        return auth.lookup_session(
            conn, request.cookies.get(SESSION_COOKIE, ""), st.clock(),
            cfg.session_idle_min * 60, cfg.session_max_hours * 3600, touch,
        )


def _error(request: Request, status: int, message: str) -> HTMLResponse:
    env: Environment = request.app.state.templates
    html = env.get_template("error.html").render(status=status, message=message, user=None,
                                                  csrf="")
    return HTMLResponse(html, status_code=status)


def _dicom_date(value: str) -> str:
    """YYYYMMDD as YYYY-MM-DD (anything else unchanged)."""
    return f"{value[:4]}-{value[4:6]}-{value[6:8]}" if re.fullmatch(r"\d{8}", value) else value


def _form_date(value: str) -> str:
    """An <input type=date> value (YYYY-MM-DD) as a DICOM date; '' where empty."""
    if not value:
        return ""
    try:
        return datetime.strptime(value, "%Y-%m-%d").strftime("%Y%m%d")
    except ValueError:
        raise StarletteHTTPException(400, "expected dates as YYYY-MM-DD") from None


def _visible(row: WorklistRow, user: User) -> WorklistRow:
    """The row as this user may see it: without name, ID and accession for a researcher."""
    if user.sees_identity:
        return row
    return dataclasses.replace(row, patient_name="", patient_id="", accession_number="")


def study_path(row: WorklistRow) -> str:
    """The study page's path: ``/study/UID``, or ``/site/SITE/study/UID`` for a site's."""
    uid = quote(row.study_uid, safe="")
    return f"/site/{quote(row.site, safe='')}/study/{uid}" if row.site else f"/study/{uid}"


def viewer_url(template: str, row: WorklistRow) -> str:
    """The site viewer's link for the study ('' where none is configured or it is not an
    http(s) URL)."""
    if not template.startswith(("http://", "https://")):
        return ""
    try:
        return template.format(study_uid=quote(row.study_uid, safe=""),
                               accession=quote(row.accession_number, safe=""))
    except (KeyError, IndexError, ValueError):
        return ""


def create_app(
    config: Config, worklist: str | Path | None = None, *,
    clock: Callable[[], float] = time.time,
) -> FastAPI:
    """The application over the worklist at ``worklist`` (default ``worklist.path``), which
    is created (or migrated) here; the web database beside it likewise."""
    wl = Path(worklist or config.worklist.path)
    if not str(wl) or str(wl) == ".":
        from ..errors import CtscreenError

        raise CtscreenError("no worklist: give its path (or set worklist.path)")
    Worklist(wl).close()  # create or migrate once; requests only read
    web_db = db.web_db_path(config, wl)
    db.create(web_db)
    try:
        from .viewer import view_root

        views = view_root(config, wl)
    except ImportError:  # without the view store's module: its default place
        views = Path(config.web.view_store or wl.with_name(wl.stem + ".views"))

    options: dict[str, Any] = {}
    if "telemetry" in inspect.signature(FastAPI.__init__).parameters:
        # FastAPI's native OpenTelemetry (0.16x) records requests: no patient data in anyone's
        # traces, whatever the environment configures
        options["telemetry"] = {"tracing": False, "metrics": False, "logs": False,
                                "operation_spans": False}
    app = FastAPI(title="ctscreen", docs_url=None, redoc_url=None, openapi_url=None, **options)
    app.router.route_class = GuardedRoute
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["dicom_date"] = _dicom_date
    env.globals["study_path"] = study_path
    app.state.config = config
    app.state.worklist = wl
    app.state.web_db = web_db
    app.state.views = views
    app.state.templates = env
    app.state.clock = clock
    cfg = config.web

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                      ) -> Response:
        response = await call_next(request)
        for k, v in SECURITY_HEADERS.items():
            response.headers.setdefault(k, v)
        if not request.url.path.startswith("/static/"):
            response.headers["Cache-Control"] = "no-store"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return _error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> Response:
        return _error(request, 400, "The request does not make sense (a wrong parameter).")

    def render(request: Request, name: str, status: int = 200, **ctx: Any) -> HTMLResponse:
        session: Session | None = request.state.session
        html = env.get_template(name).render(
            user=session.user if session else None, csrf=session.csrf if session else "",
            **ctx)
        return HTMLResponse(html, status_code=status)

    def who(request: Request) -> tuple[User, str]:
        session: Session = request.state.session
        return session.user, session.csrf

    def note(request: Request, action: str, study_uid: str = "", detail: str = "",
             site: str = "") -> None:
        user, _ = who(request)
        if site:
            detail = f"site {site}" + (f" {detail}" if detail else "")
        with db.connect(web_db) as conn:
            audit.record(conn, clock(), user.username, user.role, action, study_uid, detail,
                         _client(request))

    def study_row(study_uid: str, site: str, user: User) -> WorklistRow:
        """The study's row, where it exists and the user may see its site (else 404: a
        user of one hospital learns nothing of another's studies)."""
        if not STUDY_UID.match(study_uid) or (site and not SITE.match(site)):
            raise StarletteHTTPException(404, "No such study.")
        reader = Worklist.reader(wl)
        try:
            row = reader.get(study_uid, site)
        finally:
            reader.close()
        if row is None or not user.sees_site(row.site):
            raise StarletteHTTPException(404, "No such study.")
        return row

    def open_view(study_uid: str, site: str) -> Any:
        try:
            from .viewer import StudyView
        except ImportError:  # the view store's module is optional here
            return None
        return StudyView.open(views / site if site else views, study_uid)

    # ------------------------------------------------------------ login

    @app.get("/")
    @allow(*ROLES)
    def home() -> Response:
        return RedirectResponse("/worklist", 303)

    @app.get("/login")
    @allow(PUBLIC)
    def login_form(request: Request, next: str = "") -> Response:
        token = request.cookies.get(LOGIN_CSRF_COOKIE) or secrets.token_urlsafe(32)
        response = render(request, "login.html", login_csrf=token, next=_safe_next(next),
                          message="")
        _set_cookie(response, LOGIN_CSRF_COOKIE, token, cfg.cookie_secure)
        return response

    @app.post("/login")
    @allow(PUBLIC)
    async def login(request: Request) -> Response:
        form = await request.form()
        username = str(form.get("username", ""))[:64]
        password = str(form.get("password", ""))[:1024]
        target = _safe_next(str(form.get("next", "")))
        client = _client(request)
        token = request.cookies.get(LOGIN_CSRF_COOKIE, "")

        def attempt() -> tuple[User | None, str]:
            with db.connect(web_db) as conn:
                now = clock()
                try:
                    user = auth.authenticate(conn, username, password, client, now,
                                             cfg.login_max_failures, cfg.login_window_s)
                except auth.LoginRefused:
                    return None, "refused"
                if user is None:
                    known = conn.execute("SELECT 1 FROM users WHERE username = ?",
                                         (username,)).fetchone()
                    # a name that is no user's may be a password typed in the wrong box
                    audit.record(conn, now, username if known else "(unknown)", "",
                                 "login-failed", client=client)
                    return None, "failed"
                audit.record(conn, now, user.username, user.role, "login", client=client)
                return user, auth.create_session(conn, user, now)

        user, outcome = await run_in_threadpool(attempt)
        if user is None:
            refused = outcome == "refused"
            status = 429 if refused else 401
            message = ("Too many failed logins: try again later." if refused
                       else "Wrong user name or password.")
            return render(request, "login.html", status, login_csrf=token, next=target,
                          message=message)
        done = RedirectResponse(target or "/worklist", 303)
        _set_cookie(done, SESSION_COOKIE, outcome, cfg.cookie_secure)
        done.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
        return done

    @app.post("/logout")
    @allow(*ROLES)
    def logout(request: Request) -> Response:
        note(request, "logout")
        with db.connect(web_db) as conn:
            auth.end_session(conn, request.cookies.get(SESSION_COOKIE, ""))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ------------------------------------------------------------ the worklist

    @app.get("/worklist")
    @allow(*ROLES)
    def worklist_page(request: Request, date_from: str = "", date_to: str = "",
                      status: str = "", group: str = "", site: str = "",
                      page: int = 1) -> Response:
        user, _ = who(request)
        if status and status not in STATUSES:
            raise StarletteHTTPException(400, "expected a known status")
        if group and group not in GROUPS:
            raise StarletteHTTPException(400, "expected a known flag group")
        if site and not SITE.match(site):
            raise StarletteHTTPException(400, "expected a site name")
        filters = WorklistFilter(_form_date(date_from), _form_date(date_to), status, group,
                                 site, user.sites)
        size = max(1, cfg.page_size)
        page = max(1, page)
        reader = Worklist.reader(wl)
        try:
            rows, total = reader.page((page - 1) * size, size, filters)
            stamp = reader.stamp()
            sites = [s for s in reader.sites() if s and user.sees_site(s)]
        finally:
            reader.close()
        rows = [_visible(r, user) for r in rows]
        with db.connect(web_db) as conn:
            done = reviews.reviewed(conn, [(r.site, r.study_uid) for r in rows])
        note(request, "view-worklist", detail=" ".join(
            f"{r.site}/{r.study_uid}" if r.site else r.study_uid for r in rows))
        query = {"date_from": date_from, "date_to": date_to, "status": status, "group": group,
                 "site": site}
        pages = max(1, math.ceil(total / size))

        def page_url(n: int) -> str:
            return "/worklist?" + urlencode({**{k: v for k, v in query.items() if v},
                                             "page": n})

        return render(request, "worklist.html", rows=rows, total=total, page=page,
                      pages=pages, page_url=page_url, query=query, statuses=STATUSES,
                      groups=list(GROUPS), reviewed=done, stamp=stamp, sites=sites,
                      refresh_s=cfg.list_refresh_s, sees_identity=user.sees_identity)

    @app.get("/worklist/stamp")
    @allow(*ROLES, touch=False)
    def worklist_stamp() -> Response:
        reader = Worklist.reader(wl)
        try:
            return Response(reader.stamp(), media_type="text/plain")
        finally:
            reader.close()

    # ------------------------------------------------------------ a study

    @app.get("/site/{site}/study/{study_uid}")
    @app.get("/study/{study_uid}")
    @allow(*ROLES)
    def study_page(request: Request, study_uid: str, site: str = "") -> Response:
        user, _ = who(request)
        row = _visible(study_row(study_uid, site, user), user)
        view = open_view(study_uid, site)
        try:
            n_slices = view.n_slices if view is not None else 0
            n_key = view.n_key_images if view is not None else 0
            findings = list(view.findings) if view is not None else []
        finally:
            if view is not None:
                view.close()
        with db.connect(web_db) as conn:
            history = [dict(h) for h in reviews.for_study(conn, study_uid, site)]
        if not user.sees_identity:  # a reader may have typed a name into a comment
            history = [{**h, "comment": ""} for h in history]
        note(request, "view-study", study_uid, site=site)
        call = reviews.category(row.pattern) if row.status == "analysed" else ""
        start = max((f.get("slice", 0) for f in findings[:1]), default=n_slices // 2)
        return render(
            request, "study.html", row=row, n_slices=n_slices, n_key=n_key, findings=findings,
            start_slice=start, history=history, call=call, categories=reviews.CATEGORIES,
            viewer=viewer_url(cfg.viewer_url_template, row), sees_identity=user.sees_identity,
            may_review=user.role == "radiologist", base=study_path(row),
        )

    def image(request: Request, study_uid: str, site: str,
              draw: Callable[[Any], bytes]) -> Response:
        user, _ = who(request)
        study_row(study_uid, site, user)
        view = open_view(study_uid, site)
        if view is None:
            raise StarletteHTTPException(404, "No images are stored for this study.")
        try:
            data = draw(view)
        except (IndexError, ValueError, KeyError, TypeError):
            raise StarletteHTTPException(404, "No such image.") from None
        finally:
            view.close()
        with db.connect(web_db) as conn:
            audit.record_image_view(conn, clock(), user.username, user.role, study_uid,
                                    _client(request))
        return Response(data, media_type="image/png")

    @app.get("/site/{site}/study/{study_uid}/slice/{k}.png")
    @app.get("/study/{study_uid}/slice/{k}.png")
    @allow(*ROLES)
    def slice_png(request: Request, study_uid: str, k: int, overlays: str = "",
                  site: str = "") -> Response:
        chosen = frozenset(o for o in overlays.split(",") if o)
        if not chosen <= {"lungs", "lesions"}:
            raise StarletteHTTPException(400, "expected overlays of lungs, lesions")
        return image(request, study_uid, site, lambda v: bytes(v.slice_png(k, chosen)))

    @app.get("/site/{site}/study/{study_uid}/key/{i}.png")
    @app.get("/study/{study_uid}/key/{i}.png")
    @allow(*ROLES)
    def key_png(request: Request, study_uid: str, i: int, site: str = "") -> Response:
        return image(request, study_uid, site, lambda v: bytes(v.key_image_png(i)))

    @app.post("/site/{site}/study/{study_uid}/review")
    @app.post("/study/{study_uid}/review")
    @allow("radiologist")
    async def review(request: Request, study_uid: str, site: str = "") -> Response:
        user, _ = who(request)
        row = await run_in_threadpool(study_row, study_uid, site, user)
        form = await request.form()
        call = reviews.category(row.pattern) if row.status == "analysed" else ""
        target = str(form.get("target", ""))

        def store() -> None:
            with db.connect(web_db) as conn:
                reviews.add_review(
                    conn, study_uid=study_uid, target=target,
                    action=str(form.get("action", "")),
                    reader_category=str(form.get("reader_category", "")),
                    comment=str(form.get("comment", "")), call=call,
                    study_date=row.study_date, algorithm_version=row.algorithm_version,
                    n_findings=row.n_findings, username=user.username, at=audit.iso(clock()),
                    site=row.site,
                )
                where = f"site {row.site} " if row.site else ""
                audit.record(conn, clock(), user.username, user.role, "review", study_uid,
                             f"{where}{target} {form.get('action', '')}", _client(request))

        try:
            await run_in_threadpool(store)
        except reviews.ReviewError as e:
            raise StarletteHTTPException(400, str(e)) from None
        return RedirectResponse(f"{study_path(row)}#reviews", 303)

    # ------------------------------------------------------------ reviews and figures

    @app.get("/reviews.csv")
    @allow(*ROLES)
    def reviews_csv(request: Request) -> Response:
        user, _ = who(request)
        with db.connect(web_db) as conn:
            rows = reviews.all_reviews(conn, user.sites)
        identity: dict[tuple[str, str], WorklistRow | None] = {}
        if user.sees_identity:
            reader = Worklist.reader(wl)
            try:
                for r in rows:
                    key = (r["site"], r["study_uid"])
                    if key not in identity:
                        identity[key] = reader.get(r["study_uid"], r["site"])
            finally:
                reader.close()
        header = ["review_id", "at", "username", "site", "study_uid", "study_date", "target",
                  "action", "reader_category", "call", "algorithm_version"]
        if user.sees_identity:
            header += ["patient_name", "patient_id", "accession_number", "comment"]

        def line(r: Any) -> list[object]:
            out: list[object] = [r["id"], r["at"], r["username"], r["site"], r["study_uid"],
                                 r["study_date"], r["target"], r["action"],
                                 r["reader_category"], r["call"], r["algorithm_version"]]
            if user.sees_identity:
                w = identity.get((r["site"], r["study_uid"]))
                out += [w.patient_name if w else "", w.patient_id if w else "",
                        w.accession_number if w else "", r["comment"]]
            return out

        body = reviews.to_csv(header, (line(r) for r in rows))
        note(request, "export-reviews", detail=f"{len(rows)} reviews")
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": 'attachment; filename="ctscreen-reviews.csv"'})

    @app.get("/metrics")
    @allow(*ROLES)
    def metrics(request: Request, weeks: int = 26) -> Response:
        user, _ = who(request)
        weeks = min(max(1, weeks), 520)
        today = datetime.fromtimestamp(clock(), UTC).date()
        first = today - timedelta(days=7 * (weeks - 1))
        first = first - timedelta(days=first.weekday())  # its Monday
        y, w, _ = first.isocalendar()
        with db.connect(web_db) as conn:
            rows = reviews.all_reviews(conn, user.sites)
        reader = Worklist.reader(wl)
        try:
            calls = reader.calls_by_date(date_from=first.strftime("%Y%m%d"), sites=user.sites)
        finally:
            reader.close()
        table, total = reviews.weekly(rows, calls, cfg, since_week=f"{y}-W{w:02d}")
        return render(request, "metrics.html", weeks=table, total=total, n_weeks=weeks,
                      cfg=cfg, week_start=reviews.week_start)

    # ------------------------------------------------------------ the audit log

    @app.get("/audit")
    @allow("admin")
    def audit_page(request: Request, page: int = 1) -> Response:
        size = 100
        page = max(1, page)
        with db.connect(web_db) as conn:
            rows, total = audit.page(conn, (page - 1) * size, size)
        note(request, "view-audit", detail=f"page {page}")
        return render(request, "audit.html", rows=rows, page=page,
                      pages=max(1, math.ceil(total / size)), total=total)

    @app.get("/audit.csv")
    @allow("admin")
    def audit_csv(request: Request) -> Response:
        with db.connect(web_db) as conn:
            rows = audit.all_rows(conn)
        header = ["id", "at", "username", "role", "action", "study_uid", "detail", "client"]
        body = reviews.to_csv(header, ([r[h] for h in header] for r in rows))
        note(request, "export-audit", detail=f"{len(rows)} entries")
        return Response(body, media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": 'attachment; filename="ctscreen-audit.csv"'})

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    _check_matrix(app)
    return app


def _check_matrix(app: FastAPI) -> None:
    """Every guarded route is in ROUTE_ROLES with the roles its endpoint names."""
    seen = set()
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in route.methods or ():
                declared = getattr(route.endpoint, "_ctscreen_roles", None)
                listed = ROUTE_ROLES.get((method, route.path))
                seen.add((method, route.path))
                if declared != listed:
                    raise AssertionError(
                        f"{method} {route.path}: the endpoint allows {declared}, ROUTE_ROLES "
                        f"lists {listed}")
    if set(ROUTE_ROLES) - seen:
        raise AssertionError(f"ROUTE_ROLES lists routes the app lacks: {set(ROUTE_ROLES) - seen}")


def _safe_next(target: str) -> str:
    """A local path to go to after the login ('' for anything else: no open redirect)."""
    if target.startswith("/") and not target.startswith(("//", "/\\")) and "\n" not in target:
        return target
    return ""


def _set_cookie(response: Response, name: str, value: str, secure: bool) -> None:
    response.set_cookie(name, value, httponly=True, samesite="strict", secure=secure, path="/")
