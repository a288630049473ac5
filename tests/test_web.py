"""The worklist in the browser (pipeline/web): access control on every route, CSRF, sessions,
what a researcher never sees, escaping of DICOM text, reviews, figures, audit, CSV export.

Real SQLite databases, real worklist rows written by ``Worklist.record`` from real
``ScreeningResult`` objects, FastAPI's TestClient.  The study view is a small stand-in with
StudyView's interface (the real view store is tested in tests/test_web_viewer.py)."""

from __future__ import annotations

import csv
import io
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("argon2")

from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount

from pipeline.artefacts import OutputRef, Pattern, ScreeningResult, Status
from pipeline.config import Config, WebConfig
from pipeline.web import auth, db, reviews
from pipeline.web.app import create_app
from pipeline.worklist import Worklist

PASSWORD = "correct horse battery"
EVIL = "<script>alert(1)</script>"
NAME, PID, ACC = "Doe^Jane", "PID-4711", "ACC-0815"
TYPICAL_UID = "1.2.826.0.1.3680043.1.1"
EVIL_UID = "1.2.826.0.1.3680043.1.2"
NEGATIVE_UID = "1.2.826.0.1.3680043.1.3"
NOT_ANALYSED_UID = "1.2.826.0.1.3680043.1.4"
ROLES = ("radiologist", "admin", "researcher")

# Who may use each route, written out here independently of the app's own table: every
# route of the app must be listed (a new route cannot escape the walk).  PUBLIC: anyone.
PUBLIC = "public"
EVERYONE = set(ROLES)
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("GET", "/"): EVERYONE,
    ("GET", "/login"): {PUBLIC},
    ("POST", "/login"): {PUBLIC},
    ("POST", "/logout"): EVERYONE,
    ("GET", "/worklist"): EVERYONE,
    ("GET", "/worklist/stamp"): EVERYONE,
    ("GET", "/study/{study_uid}"): EVERYONE,
    ("GET", "/study/{study_uid}/slice/{k}.png"): EVERYONE,
    ("GET", "/study/{study_uid}/key/{i}.png"): EVERYONE,
    ("POST", "/study/{study_uid}/review"): {"radiologist"},
    ("GET", "/site/{site}/study/{study_uid}"): EVERYONE,
    ("GET", "/site/{site}/study/{study_uid}/slice/{k}.png"): EVERYONE,
    ("GET", "/site/{site}/study/{study_uid}/key/{i}.png"): EVERYONE,
    ("POST", "/site/{site}/study/{study_uid}/review"): {"radiologist"},
    ("GET", "/reviews.csv"): EVERYONE,
    ("GET", "/metrics"): EVERYONE,
    ("GET", "/audit"): {"admin"},
    ("GET", "/audit.csv"): {"admin"},
    ("GET", "/static"): {PUBLIC},  # the mount: style sheet and scripts, no patient data
}

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


@pytest.fixture(autouse=True)
def quick_hashes(monkeypatch: pytest.MonkeyPatch) -> None:
    """argon2id with small costs: the defaults take a second a hash on a busy test machine
    (test_the_default_hash_is_argon2id checks those)."""
    from argon2 import PasswordHasher

    monkeypatch.setattr(auth, "_hasher",
                        lambda: PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))


def test_the_default_hash_is_argon2id() -> None:
    from argon2 import PasswordHasher

    assert PasswordHasher().type.name == "ID"
    assert auth.hash_password.__module__ == "pipeline.web.auth"


@dataclass
class FakeView:
    """StudyView's interface (pipeline/web/viewer.py), over nothing."""

    n_slices: int = 40
    n_key_images: int = 2

    def __post_init__(self) -> None:
        self.findings: list[dict[str, Any]] = [
            {"index": 1, "kind": "ggo", "side": "right", "zone": "lower", "volume_ml": 12.5,
             "mean_hu": -620.0, "slice": 22},
            {"index": 2, "kind": "consolidation", "side": "left", "zone": "upper",
             "volume_ml": 3.1, "mean_hu": -150.0, "slice": 9},
        ]

    def slice_png(self, k: int, overlays: frozenset[str]) -> bytes:
        if not 0 <= k < self.n_slices:
            raise IndexError(k)
        return PNG + ",".join(sorted(overlays)).encode()

    def key_image_png(self, i: int) -> bytes:
        if not 0 <= i < self.n_key_images:
            raise IndexError(i)
        return PNG

    def close(self) -> None:
        pass

    @classmethod
    def open(cls, root: Path, study_uid: str) -> FakeView | None:
        return cls() if study_uid in (TYPICAL_UID, EVIL_UID) else None


def _result(uid: str, pattern: Pattern | None, suspicion: float | None, **kw: Any
            ) -> ScreeningResult:
    if pattern is None:
        return ScreeningResult(uid, "ACC-NA", "20200302", Status.NOT_ANALYSED,
                               reasons=("slice-too-thick:5.0mm",), patient_name="Roe^Richard",
                               patient_id="PID-NA", **kw)
    return ScreeningResult(
        uid, kw.pop("accession_number", "ACC-X"), kw.pop("study_date", "20200302"),
        Status.ANALYSED, suspicion=suspicion, pattern=pattern, lung_volume_ml=(2500.0, 2300.0),
        involved_pct=12.5, severity_score=9, severity_max=25, n_findings=2,
        series_description="Lung 1.0", algorithm_version="ctscreen 0.1.0",
        outputs=(OutputRef("sr", "1.2.840.10008.5.1.4.1.1.88.34", uid + ".9", uid + ".8"),),
        **kw)


class Clock:
    def __init__(self) -> None:
        self.now = 1_600_000_000.0  # 2020-09-13

    def __call__(self) -> float:
        return self.now


@dataclass
class Site:
    app: Any
    clock: Clock
    worklist: Path
    web_db: Path

    def client(self) -> TestClient:
        return TestClient(self.app, follow_redirects=False)

    def login(self, role: str) -> tuple[TestClient, str]:
        """A client logged in as the role's user, and its session's CSRF token."""
        c = self.client()
        r = c.get("/login")
        token = _csrf(r.text)
        r = c.post("/login", data={"username": role, "password": PASSWORD, "csrf": token})
        assert r.status_code == 303, r.text
        return c, _csrf(c.get("/worklist").text)


def _csrf(html: str) -> str:
    m = re.search(r'name="csrf" value="([^"]+)"', html)
    assert m, "no CSRF token in the page"
    return m.group(1)


def make_site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, web: WebConfig | None = None,
              fake_view: bool = True) -> Site:
    import pipeline.web.viewer as viewer

    if fake_view:
        monkeypatch.setattr(viewer, "StudyView", FakeView)
    wl = tmp_path / "site.sqlite"
    with Worklist(wl) as w:
        w.record(_result(TYPICAL_UID, Pattern.TYPICAL, 0.91, accession_number=ACC,
                         patient_name=NAME, patient_id=PID), "f")
        w.record(_result(EVIL_UID, Pattern.INDETERMINATE, 0.4, patient_name=EVIL,
                         patient_id="=HYPERLINK(\"http://x\")", accession_number=EVIL), "f")
        w.record(_result(NEGATIVE_UID, Pattern.NEGATIVE, 0.01, patient_name="Poe^Edgar",
                         patient_id="PID-NEG"), "f")
        w.record(_result(NOT_ANALYSED_UID, None, None), "f")
    clock = Clock()
    config = Config(web=web or WebConfig())
    app = create_app(config, wl, clock=clock)
    web_db = db.web_db_path(config, wl)
    with db.connect(web_db) as conn:
        for role in ROLES:
            auth.add_user(conn, role, role, PASSWORD, clock())
    return Site(app, clock, wl, web_db)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Site:
    return make_site(tmp_path, monkeypatch)


def _routes(app: Any) -> Iterator[tuple[str, str]]:
    for route in app.routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods or ()):
                yield method, route.path
        elif isinstance(route, Mount):
            yield "GET", route.path
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")


def _call(c: TestClient, method: str, path: str, csrf: str) -> Any:
    url = (path.replace("{study_uid}", TYPICAL_UID).replace("{k}", "3").replace("{i}", "0")
           .replace("{site}", "north"))
    if path == "/static":
        url = "/static/style.css"
    if method == "GET":
        return c.get(url)
    data = {"csrf": csrf}
    if path.endswith("/review"):
        data.update(target="pattern", action="confirm")
    if path == "/login":
        data.update(username="nobody", password="wrong password")
    return c.post(url, data=data)


def _denied(r: Any) -> bool:
    """401 / 403, or (a page without a session) a redirect to the login form."""
    if r.status_code in (401, 403):
        return True
    return (r.request.method == "GET" and r.status_code == 303
            and r.headers["location"].startswith("/login"))


def test_every_route_is_allowed_or_denied_as_the_matrix_says(site: Site) -> None:
    routes = sorted(set(_routes(site.app)), key=lambda mr: mr == ("POST", "/logout"))
    assert set(routes) == set(EXPECTED), "a route of the app is missing from EXPECTED (or gone)"
    sessions = {role: site.login(role) for role in ROLES}
    anonymous = site.client()
    anonymous.get("/login")  # the login form's CSRF cookie, as a browser would have it
    login_csrf = anonymous.cookies.get("ctscreen_login_csrf") or ""
    for method, path in routes:
        allowed = EXPECTED[(method, path)]
        for role in ROLES:
            c, csrf = sessions[role]
            r = _call(c, method, path, csrf)
            if PUBLIC in allowed or role in allowed:
                assert not _denied(r) or path == "/login", (role, method, path, r.status_code)
                assert r.status_code < 500, (role, method, path)
            else:
                assert r.status_code == 403, (role, method, path, r.status_code)
        r = _call(anonymous, method, path, login_csrf)
        if PUBLIC in allowed:
            assert r.status_code < 500 and r.status_code != 403, (method, path)
        else:
            assert _denied(r), ("no session", method, path, r.status_code)
        assert "Content-Security-Policy" in r.headers
    # the logout (walked last) ended the sessions it was called with
    for role in ROLES:
        assert _denied(sessions[role][0].get("/worklist"))


def test_an_endpoint_without_roles_is_refused_to_everyone(site: Site) -> None:
    @site.app.get("/forgotten")
    def forgotten() -> str:
        return "patient data"

    c, _ = site.login("admin")
    assert c.get("/forgotten").status_code == 403
    assert site.client().get("/forgotten").status_code == 403


def test_a_forged_or_missing_csrf_token_is_refused(site: Site) -> None:
    c, csrf = site.login("radiologist")
    for token in ("forged" + csrf[6:], "", csrf + "x"):
        r = c.post(f"/study/{TYPICAL_UID}/review",
                   data={"csrf": token, "target": "pattern", "action": "confirm"})
        assert r.status_code == 403 and "CSRF" in r.text
    _other, other_csrf = site.login("admin")  # another session's token is no good either
    r = c.post(f"/study/{TYPICAL_UID}/review",
               data={"csrf": other_csrf, "target": "pattern", "action": "confirm"})
    assert r.status_code == 403
    with db.connect(site.web_db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM reviews").fetchone()[0] == 0
    r = c.post(f"/study/{TYPICAL_UID}/review",
               data={"csrf": csrf, "target": "pattern", "action": "confirm"})
    assert r.status_code == 303
    # the login form too: a post without the token of its cookie is refused
    fresh = site.client()
    fresh.get("/login")
    r = fresh.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": "forged"})
    assert r.status_code == 403 and "ctscreen_session" not in r.cookies


def test_an_expired_session_is_refused(site: Site) -> None:
    cfg = site.app.state.config.web
    c, _ = site.login("radiologist")
    site.clock.now += cfg.session_idle_min * 60 - 5
    assert c.get("/worklist").status_code == 200  # in time: and it counts as activity
    site.clock.now += cfg.session_idle_min * 60 + 1
    assert _denied(c.get("/worklist"))
    assert _denied(c.get(f"/study/{TYPICAL_UID}/slice/1.png"))
    # the absolute limit: active all along, still over after session_max_hours
    c, _ = site.login("radiologist")
    step = cfg.session_idle_min * 60 / 2
    for _ in range(int(cfg.session_max_hours * 3600 / step)):
        site.clock.now += step
        assert c.get("/worklist").status_code == 200
    site.clock.now += step
    assert _denied(c.get("/worklist"))
    with db.connect(site.web_db) as conn:  # an expired session is gone from the database
        assert conn.execute("SELECT COUNT(*) FROM sessions").fetchone()[0] == 0


def test_polling_does_not_keep_a_session_alive(site: Site) -> None:
    cfg = site.app.state.config.web
    c, _ = site.login("radiologist")
    for _ in range(4):
        site.clock.now += cfg.session_idle_min * 60 / 3
        r = c.get("/worklist/stamp")
    assert r.status_code == 401  # the idle time ran out under the polling


def test_the_session_lives_in_the_database_hashed_and_the_cookie_is_strict(site: Site) -> None:
    c = site.client()
    token = _csrf(c.get("/login").text)
    r = c.post("/login", data={"username": "radiologist", "password": PASSWORD, "csrf": token})
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
    assert "Secure" not in cookie
    value = c.cookies["ctscreen_session"]
    with db.connect(site.web_db) as conn:
        stored = [row[0] for row in conn.execute("SELECT token_hash FROM sessions")]
        hashes = [row[0] for row in conn.execute("SELECT password_hash FROM users")]
    assert value not in stored and len(stored) == 1
    assert all(h.startswith("$argon2id$") for h in hashes) and PASSWORD not in str(hashes)


def test_cookie_secure_is_set_when_configured(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_site(tmp_path, monkeypatch, WebConfig(cookie_secure=True))
    c = TestClient(s.app, base_url="https://testserver", follow_redirects=False)
    token = _csrf(c.get("/login").text)
    r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": token})
    assert r.status_code == 303 and "Secure" in r.headers["set-cookie"]


def test_logins_are_rate_limited(site: Site) -> None:
    cfg = site.app.state.config.web
    c = site.client()
    token = _csrf(c.get("/login").text)
    for _ in range(cfg.login_max_failures):
        r = c.post("/login", data={"username": "admin", "password": "wrong one!", "csrf": token})
        assert r.status_code == 401
    r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": token})
    assert r.status_code == 429  # even the right password, until the window has passed
    site.clock.now += cfg.login_window_s + 1
    r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": token})
    assert r.status_code == 303


def test_a_disabled_user_is_logged_out(site: Site) -> None:
    c, _ = site.login("radiologist")
    with db.connect(site.web_db) as conn:
        auth.set_disabled(conn, "radiologist", True)
    assert _denied(c.get("/worklist"))
    fresh = site.client()
    token = _csrf(fresh.get("/login").text)
    r = fresh.post("/login", data={"username": "radiologist", "password": PASSWORD,
                                   "csrf": token})
    assert r.status_code == 401


def test_the_list_is_ranked_and_shows_names_to_radiologists(site: Site) -> None:
    c, _ = site.login("radiologist")
    r = c.get("/worklist")
    assert r.status_code == 200
    text = r.text
    assert NAME in text and PID in text and ACC in text
    # the ranking of pipeline/worklist.py: typical, indeterminate, not analysed, negative
    order = [text.index(u) for u in (TYPICAL_UID, EVIL_UID, NOT_ANALYSED_UID, NEGATIVE_UID)]
    assert order == sorted(order)
    assert "not analysed: slice-too-thick:5.0mm" in text
    assert "2020-03-02" in text and "0.91" in text and "12.5%" in text and "9/25" in text
    r = c.get("/worklist", params={"group": "negative"})
    assert NEGATIVE_UID in r.text and TYPICAL_UID not in r.text
    r = c.get("/worklist", params={"status": "not-analysed"})
    assert NOT_ANALYSED_UID in r.text and TYPICAL_UID not in r.text
    r = c.get("/worklist", params={"date_from": "2020-03-03"})
    assert TYPICAL_UID not in r.text
    assert c.get("/worklist", params={"group": "bogus"}).status_code == 400
    assert c.get("/worklist", params={"date_from": "03/03/2020"}).status_code == 400


def test_the_list_is_paged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_site(tmp_path, monkeypatch, WebConfig(page_size=2))
    c, _ = s.login("radiologist")
    first, second = c.get("/worklist").text, c.get("/worklist?page=2").text
    assert TYPICAL_UID in first and EVIL_UID in first and NEGATIVE_UID not in first
    assert NOT_ANALYSED_UID in second and NEGATIVE_UID in second and TYPICAL_UID not in second
    assert "page 1 of 2" in first and "page=2" in first


def test_the_stamp_changes_when_a_study_is_recorded(site: Site) -> None:
    c, _ = site.login("researcher")
    before = c.get("/worklist/stamp").text
    with Worklist(site.worklist) as w:
        w.record(_result("1.2.3.4.5", Pattern.NEGATIVE, 0.0), "f")
    assert c.get("/worklist/stamp").text != before
    page = c.get("/worklist").text
    assert 'data-refresh-s="60"' in page and "/static/worklist.js" in page


def _no_identity(text: str) -> None:
    for secret in (NAME, PID, ACC, "Roe^Richard", "PID-NA", "ACC-NA", "Poe^Edgar", "PID-NEG",
                   "HYPERLINK", "alert(1)"):
        assert secret not in text, secret


def test_a_researcher_never_gets_a_name_or_id(site: Site) -> None:
    rad, rad_csrf = site.login("radiologist")
    r = rad.post(f"/study/{TYPICAL_UID}/review", data={
        "csrf": rad_csrf, "target": "pattern", "action": "confirm",
        "comment": f"spoke to {NAME}"})
    assert r.status_code == 303
    c, _ = site.login("researcher")
    for url in ("/worklist", "/worklist?page=1&group=typical", f"/study/{TYPICAL_UID}",
                f"/study/{EVIL_UID}", f"/study/{NOT_ANALYSED_UID}", "/reviews.csv", "/metrics"):
        r = c.get(url)
        assert r.status_code == 200, url
        _no_identity(r.text)
    header = next(csv.reader(io.StringIO(c.get("/reviews.csv").text)))
    assert "patient_name" not in header and "comment" not in header
    # the same pages do show them to a radiologist
    assert NAME in rad.get(f"/study/{TYPICAL_UID}").text
    exported = rad.get("/reviews.csv").text
    assert NAME in exported and PID in exported and ACC in exported


def test_dicom_text_is_served_escaped(site: Site) -> None:
    c, _ = site.login("radiologist")
    for url in ("/worklist", f"/study/{EVIL_UID}"):
        text = c.get(url).text
        assert EVIL not in text and "<script>alert" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        # no inline script anywhere: every <script> names a file of ours
        for tag in re.findall(r"<script[^>]*>", text):
            assert re.fullmatch(r'<script src="/static/[a-z]+\.js">', tag), tag
    r = c.get(f"/study/{EVIL_UID}")
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    assert "unsafe-inline" not in csp and r.headers["X-Content-Type-Options"] == "nosniff"


def test_the_study_page_images_and_viewer_link(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_site(tmp_path, monkeypatch, WebConfig(
        viewer_url_template="http://localhost:8042/ohif/viewer?StudyInstanceUIDs={study_uid}"))
    c, _ = s.login("radiologist")
    text = c.get(f"/study/{TYPICAL_UID}").text
    assert f'href="http://localhost:8042/ohif/viewer?StudyInstanceUIDs={TYPICAL_UID}"' in text
    assert f"/study/{TYPICAL_UID}/key/0.png" in text and f"/study/{TYPICAL_UID}/key/1.png" in text
    assert 'data-n="40"' in text and 'data-start="22"' in text  # the largest finding's slice
    assert "ggo" in text and "consolidation" in text and "12.5" in text
    r = c.get(f"/study/{TYPICAL_UID}/slice/5.png", params={"overlays": "lungs,lesions"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.endswith(b"lesions,lungs") and r.headers["cache-control"] == "no-store"
    assert c.get(f"/study/{TYPICAL_UID}/slice/5.png").content.endswith(PNG[-4:])
    assert c.get(f"/study/{TYPICAL_UID}/slice/40.png").status_code == 404
    assert c.get(f"/study/{TYPICAL_UID}/slice/-1.png").status_code == 404
    assert c.get(f"/study/{TYPICAL_UID}/slice/x.png").status_code == 400
    assert c.get(f"/study/{TYPICAL_UID}/slice/1.png?overlays=bones").status_code == 400
    assert c.get(f"/study/{TYPICAL_UID}/key/2.png").status_code == 404
    assert c.get(f"/study/{NEGATIVE_UID}/slice/1.png").status_code == 404  # no view stored
    assert c.get("/study/9.9.9/slice/1.png").status_code == 404  # no such study
    assert c.get("/study/9.9.9").status_code == 404
    page = c.get(f"/study/{NOT_ANALYSED_UID}").text
    assert "No slices are stored" in page and "not analysed" in page
    # without a template, no link
    assert "Open in the viewer" not in make_site(
        tmp_path / "b", monkeypatch).login("radiologist")[0].get(f"/study/{TYPICAL_UID}").text


def test_reviews_are_stored_with_user_and_time_and_checked(site: Site) -> None:
    c, csrf = site.login("radiologist")
    url = f"/study/{TYPICAL_UID}/review"
    ok = [
        {"target": "pattern", "action": "confirm"},
        {"target": "pattern", "action": "reject", "reader_category": "negative"},
        {"target": "finding:1", "action": "confirm"},
        {"target": "finding:2", "action": "reject", "comment": "a vessel"},
        {"target": "finding:2", "action": "comment", "comment": "=1+1"},
    ]
    for form in ok:
        r = c.post(url, data={"csrf": csrf, **form})
        assert r.status_code == 303, (form, r.text)
    bad = [
        {"target": "pattern", "action": "reject"},  # the reader's category is missing
        {"target": "pattern", "action": "reject", "reader_category": "typical"},  # = the call
        {"target": "finding:3", "action": "confirm"},  # no such finding
        {"target": "finding:0", "action": "confirm"},
        {"target": "lungs", "action": "confirm"},
        {"target": "pattern", "action": "delete"},
        {"target": "pattern", "action": "comment", "comment": "   "},
        {"target": "pattern", "action": "comment", "comment": "x" * 2001},
    ]
    for form in bad:
        assert c.post(url, data={"csrf": csrf, **form}).status_code == 400, form
    r = c.post(f"/study/{NOT_ANALYSED_UID}/review",
               data={"csrf": csrf, "target": "pattern", "action": "confirm"})
    assert r.status_code == 400  # no call to confirm; a comment is fine
    r = c.post(f"/study/{NOT_ANALYSED_UID}/review",
               data={"csrf": csrf, "target": "pattern", "action": "comment", "comment": "x"})
    assert r.status_code == 303
    with db.connect(site.web_db) as conn:
        rows = conn.execute("SELECT * FROM reviews ORDER BY id").fetchall()
    assert len(rows) == len(ok) + 1
    assert {r["username"] for r in rows} == {"radiologist"}
    assert rows[0]["call"] == "typical" and rows[0]["reader_category"] == "typical"
    assert rows[1]["reader_category"] == "negative" and rows[0]["at"].startswith("2020-09-13")
    page = c.get(f"/study/{TYPICAL_UID}").text
    assert "a vessel" in page and "finding:2" in page
    listing = c.get("/worklist").text
    assert re.search(TYPICAL_UID + r".*?<td>yes</td>", listing, re.S)
    # the export: every review, formulas defused
    r = c.get("/reviews.csv")
    assert r.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(r.text)))
    assert len(table) == len(rows)
    assert table[4]["comment"] == "'=1+1"


def test_csv_cells_never_start_a_formula() -> None:
    for bad in ("=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\rx"):
        assert reviews.safe_cell(bad) == "'" + bad
    assert reviews.safe_cell("Doe^Jane") == "Doe^Jane" and reviews.safe_cell(None) == ""
    text = reviews.to_csv(["a"], [['=HYPERLINK("http://x")']])
    assert next(iter(csv.reader(io.StringIO(text.splitlines()[1]))))[0].startswith("'=")


def test_the_export_defuses_formulas_in_dicom_text(site: Site) -> None:
    c, csrf = site.login("radiologist")
    c.post(f"/study/{EVIL_UID}/review", data={"csrf": csrf, "target": "pattern",
                                               "action": "confirm"})
    (row,) = list(csv.DictReader(io.StringIO(c.get("/reviews.csv").text)))
    assert row["patient_id"] == "'=HYPERLINK(\"http://x\")" and row["patient_name"] == EVIL


def test_wilson_intervals() -> None:
    p, lo, hi = reviews.wilson(8, 10)  # type: ignore[misc]
    assert p == 0.8 and lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433,
                                                                                       abs=1e-4)
    p, lo, hi = reviews.wilson(0, 5)  # type: ignore[misc]
    assert (p, lo) == (0.0, 0.0) and hi == pytest.approx(0.4345, abs=1e-4)
    assert reviews.wilson(0, 0) is None


def test_figures_per_week_and_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Week 2020-W10: 9 true positives, 1 false positive, 5 true negatives; week 2020-W11:
    the model misses: 2 TP, 8 FN (sensitivity 20%, interval under 80%: drift)."""
    s = make_site(tmp_path, monkeypatch)
    s.clock.now = 1_584_000_000.0  # 2020-03-12
    uids = []
    with Worklist(s.worklist) as w:
        n = 0
        for date_, pattern, reader, count in (
            ("20200303", Pattern.TYPICAL, "typical", 9),
            ("20200303", Pattern.INDETERMINATE, "negative", 1),
            ("20200304", Pattern.NEGATIVE, "negative", 4),
            ("20200304", Pattern.ATYPICAL, "atypical", 1),  # atypical: a negative call
            ("20200310", Pattern.TYPICAL, "typical", 2),
            ("20200311", Pattern.NEGATIVE, "typical", 8),
        ):
            for _ in range(count):
                n += 1
                uid = f"1.2.3.{n}"
                w.record(_result(uid, pattern, 0.5, study_date=date_), "f")
                uids.append((uid, pattern.value, reader))
        w.record(_result("1.2.3.999", Pattern.TYPICAL, 0.5, study_date="20200310"), "f")
    c, csrf = s.login("radiologist")
    for uid, call, reader in uids:
        form = ({"action": "confirm"} if reader == call
                else {"action": "reject", "reader_category": reader})
        assert c.post(f"/study/{uid}/review",
                      data={"csrf": csrf, "target": "pattern", **form}).status_code == 303
    with db.connect(s.web_db) as conn:
        rows = reviews.all_reviews(conn)
    with Worklist.reader(s.worklist) as w:
        calls = w.calls_by_date()
    weeks, total = reviews.weekly(rows, calls, WebConfig())
    by = {wk.week: wk for wk in weeks}
    w10, w11 = by["2020-W10"], by["2020-W11"]
    assert (w10.tp, w10.fp, w10.tn, w10.fn) == (9, 1, 5, 0)
    assert (w11.tp, w11.fp, w11.tn, w11.fn) == (2, 0, 0, 8)
    assert (total.tp, total.fp, total.tn, total.fn) == (11, 1, 5, 8)
    sens11 = w11.figures[0]
    assert sens11.name == "sensitivity" and sens11.mark == "drift" and w11.marked
    assert w10.figures[0].mark == "" and w10.figures[2].mark == ""
    assert w11.analysed == 11 and w11.flagged == 3  # the unreviewed typical study counts too
    # and the site's four studies of 2020-03-02: typical, indeterminate, negative, not analysed
    assert (w10.flagged, w10.analysed, w10.not_analysed) == (12, 18, 1)
    page = c.get("/metrics", params={"weeks": 4})
    assert page.status_code == 200
    assert "2020-W10" in page.text and "2020-W11" in page.text and "drift" in page.text
    assert 'class="marked"' in page.text and "2020-W09" not in page.text.split("<tbody>")[1]
    # the latest review of a study counts: a changed mind moves the figures
    c.post(f"/study/{uids[-1][0]}/review",
           data={"csrf": csrf, "target": "pattern", "action": "confirm"})
    with db.connect(s.web_db) as conn:
        _, total = reviews.weekly(reviews.all_reviews(conn), calls, WebConfig())
    assert (total.tn, total.fn) == (6, 7)


def test_every_view_of_patient_data_and_every_export_is_audited(site: Site) -> None:
    c, _ = site.login("radiologist")
    c.get("/worklist")
    c.get(f"/study/{TYPICAL_UID}")
    for k in range(5):  # scrolling: one entry per study and user in IMAGE_AUDIT_S
        c.get(f"/study/{TYPICAL_UID}/slice/{k}.png")
    c.get(f"/study/{TYPICAL_UID}/key/0.png")
    c.get("/reviews.csv")
    researcher, _ = site.login("researcher")
    researcher.get(f"/study/{EVIL_UID}")
    admin, _ = site.login("admin")
    admin.get("/audit.csv")
    failed = site.client()
    token = _csrf(failed.get("/login").text)
    failed.post("/login", data={"username": "admin", "password": "not it at all",
                                "csrf": token})
    failed.post("/login", data={"username": "my password typed", "password": "x" * 10,
                                "csrf": token})
    with db.connect(site.web_db) as conn:
        log = [(r["username"], r["action"], r["study_uid"]) for r in
               conn.execute("SELECT * FROM audit ORDER BY id")]
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            with conn:
                conn.execute("DELETE FROM audit")
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            with conn:
                conn.execute("UPDATE audit SET username = 'x'")
    assert ("radiologist", "view-worklist", "") in log
    assert ("radiologist", "view-study", TYPICAL_UID) in log
    assert log.count(("radiologist", "view-images", TYPICAL_UID)) == 1
    assert ("radiologist", "export-reviews", "") in log
    assert ("researcher", "view-study", EVIL_UID) in log
    assert ("admin", "export-audit", "") in log
    assert ("admin", "login-failed", "") in log and ("(unknown)", "login-failed", "") in log
    assert not any("my password" in u for u, _, _ in log)
    page = admin.get("/audit").text
    assert "view-study" in page and TYPICAL_UID in page
    # the list view names the studies it showed
    with db.connect(site.web_db) as conn:
        detail = conn.execute("SELECT detail FROM audit WHERE action = 'view-worklist'"
                              ).fetchone()[0]
    assert TYPICAL_UID in detail and NEGATIVE_UID in detail


def test_no_patient_name_reaches_the_log(site: Site, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("DEBUG")
    c, csrf = site.login("radiologist")
    c.get("/worklist")
    c.get(f"/study/{TYPICAL_UID}")
    c.post(f"/study/{TYPICAL_UID}/review", data={"csrf": csrf, "target": "pattern",
                                                  "action": "confirm"})
    c.get("/reviews.csv")
    assert NAME not in caplog.text and PID not in caplog.text


def test_login_redirects_back_but_never_off_site(site: Site) -> None:
    c = site.client()
    r = c.get(f"/study/{TYPICAL_UID}")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?next=")
    page = c.get(r.headers["location"]).text
    assert f'value="/study/{TYPICAL_UID}"' in page
    token = _csrf(page)
    r = c.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": token,
                               "next": f"/study/{TYPICAL_UID}"})
    assert r.headers["location"] == f"/study/{TYPICAL_UID}"
    c2 = site.client()
    token = _csrf(c2.get("/login").text)
    for evil in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        r = c2.post("/login", data={"username": "admin", "password": PASSWORD, "csrf": token,
                                    "next": evil})
        assert r.headers["location"] == "/worklist", evil
        c2 = site.client()
        token = _csrf(c2.get("/login").text)


def test_users_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.cli import main

    wl = str(tmp_path / "wl.sqlite")
    monkeypatch.setattr("sys.stdin", io.StringIO(PASSWORD + "\n"))
    assert main(["user", "--worklist", wl, "add", "dr.who", "--role", "radiologist",
                 "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["user", "--worklist", wl, "add", "dr.no", "--role", "admin",
                 "--password-stdin"]) == 2
    assert main(["user", "--worklist", wl, "disable", "dr.who"]) == 0
    assert main(["user", "--worklist", wl, "disable", "nobody"]) == 2
    capsys.readouterr()
    assert main(["user", "--worklist", wl, "list"]) == 0
    out = capsys.readouterr().out
    assert "dr.who" in out and "radiologist" in out and "(disabled)" in out
    assert "dr.no" not in out
    monkeypatch.setattr("sys.stdin", io.StringIO("another long password\n"))
    assert main(["user", "--worklist", wl, "passwd", "dr.who", "--password-stdin"]) == 0
    assert main(["user", "--worklist", wl, "enable", "dr.who"]) == 0
    with db.connect(tmp_path / "wl.web.sqlite") as conn:
        user = auth.authenticate(conn, "dr.who", "another long password", "c", 1e9, 5, 60)
    assert user is not None and user.role == "radiologist"


def test_serve_builds_the_app_on_the_configured_address(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from pipeline.cli import main

    seen: dict[str, Any] = {}

    def fake_run(app: Any, **kw: Any) -> None:
        seen.update(kw, app=app)

    monkeypatch.setattr(uvicorn, "run", fake_run)
    assert main(["serve", "--worklist", str(tmp_path / "wl.sqlite")]) == 0
    assert (seen["host"], seen["port"]) == ("127.0.0.1", 8080)
    assert main(["serve", "--worklist", str(tmp_path / "wl.sqlite"), "--port", "9001",
                 "--host", "0.0.0.0"]) == 0
    assert (seen["host"], seen["port"]) == ("0.0.0.0", 9001)
    assert (tmp_path / "wl.web.sqlite").exists()


def test_a_forgotten_role_in_the_app_table_fails_at_start(site: Site) -> None:
    """create_app refuses to build an app whose endpoints and ROUTE_ROLES disagree."""
    from pipeline.web import app as web_app

    broken = dict(web_app.ROUTE_ROLES)
    broken[("GET", "/audit")] = frozenset({"admin", "researcher"})
    with pytest.MonkeyPatch.context() as m:
        m.setattr(web_app, "ROUTE_ROLES", broken)
        with pytest.raises(AssertionError, match="/audit"):
            create_app(Config(), site.worklist)


def test_worklist_rows_come_from_real_results(site: Site) -> None:
    with Worklist.reader(site.worklist) as w:
        row = w.get(TYPICAL_UID)
    assert row is not None and row.patient_name == NAME and row.flag == "TYPICAL"
    assert replace(row, patient_name="").patient_name == ""


def test_the_real_view_store_serves_the_study_page(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """W2's view store (pipeline/web/viewer.py) behind the routes: a small synthetic study
    saved with save_view, served as the study page and its slices with and without overlays."""
    from view_kit import analysis, image

    from pipeline.phantom.model import make_grid
    from pipeline.web.viewer import StudyView, save_view

    s = make_site(tmp_path, monkeypatch, fake_view=False)
    uid = "1.2.826.0.1.3680043.1.77"
    ct, lungs, lesions = image(make_grid((30, 80, 96), (2.5, 1.6, 1.4), "axial"), (30, 80, 96))
    result = replace(_result(uid, Pattern.TYPICAL, 0.8, patient_name=NAME), n_findings=1)
    save_view(s.app.state.views, replace(analysis(ct, lungs, lesions, uid=uid), result=result),
              [], max_px=64)
    with Worklist(s.worklist) as w:
        w.record(result, "f")
    with StudyView.open(s.app.state.views, uid) as view:  # type: ignore[union-attr]
        n, k, view_kind = view.n_slices, view.findings[0]["slice"], view.findings[0]["kind"]
    c, _ = s.login("radiologist")
    page = c.get(f"/study/{uid}").text
    assert f'data-n="{n}"' in page and f'data-start="{k}"' in page and view_kind in page
    plain = c.get(f"/study/{uid}/slice/{k}.png").content
    both = c.get(f"/study/{uid}/slice/{k}.png", params={"overlays": "lungs,lesions"}).content
    assert plain.startswith(b"\x89PNG") and both.startswith(b"\x89PNG") and plain != both
    assert c.get(f"/study/{uid}/slice/{n}.png").status_code == 404
    assert c.get(f"/study/{uid}/key/0.png").status_code == 404  # none were stored


# ---------------------------------------------------------------- a regional centre's sites

def test_a_user_of_one_hospital_sees_that_hospitals_studies_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One study UID held by two sites (a copy): two rows, each with its site; a user
    scoped to one site sees its rows only, and the other site's study page is a 404 (not
    a 403: nothing is learnt of another hospital's studies); reviews are per site."""
    site = make_site(tmp_path, monkeypatch)
    with Worklist(site.worklist) as w:
        for name, patient in (("north", "North^Nora"), ("south", "South^Sam")):
            w.for_site(name).record(_result(TYPICAL_UID, Pattern.TYPICAL, 0.8,
                                            patient_name=patient, patient_id=f"P-{name}"), "f")
    with db.connect(site.web_db) as conn:
        auth.add_user(conn, "nora", "radiologist", PASSWORD, site.clock(), sites=["north"])
    c = site.client()
    token = _csrf(c.get("/login").text)
    assert c.post("/login", data={"username": "nora", "password": PASSWORD,
                                  "csrf": token}).status_code == 303
    page = c.get("/worklist").text
    assert "North^Nora" in page and "South^Sam" not in page and NAME not in page
    assert f'href="/site/north/study/{TYPICAL_UID}"' in page
    assert c.get(f"/site/north/study/{TYPICAL_UID}").status_code == 200
    for other in (f"/site/south/study/{TYPICAL_UID}", f"/study/{TYPICAL_UID}",
                  f"/site/south/study/{TYPICAL_UID}/slice/3.png"):
        assert c.get(other).status_code == 404, other
    csrf = _csrf(c.get(f"/site/north/study/{TYPICAL_UID}").text)
    r = c.post(f"/site/north/study/{TYPICAL_UID}/review",
               data={"csrf": csrf, "target": "pattern", "action": "confirm"})
    assert r.status_code == 303 and r.headers["location"].startswith("/site/north/study/")
    assert c.post(f"/site/south/study/{TYPICAL_UID}/review",
                  data={"csrf": csrf, "target": "pattern", "action": "confirm"}
                  ).status_code == 404
    with db.connect(site.web_db) as conn:
        assert [(r["site"], r["study_uid"]) for r in reviews.all_reviews(conn)] == [
            ("north", TYPICAL_UID)]
    csv_text = c.get("/reviews.csv").text
    assert "north" in csv_text.splitlines()[1]

    # a centre user (no sites given) sees every site, with a site column and filter
    admin, _ = site.login("admin")
    page = admin.get("/worklist").text
    assert "North^Nora" in page and "South^Sam" in page and NAME in page
    assert '<select name="site">' in page
    south_only = admin.get("/worklist?site=south").text
    assert "South^Sam" in south_only and "North^Nora" not in south_only
    assert admin.get("/worklist?site=../etc").status_code == 400
    assert "Not reviewed yet" in admin.get(f"/site/south/study/{TYPICAL_UID}").text
