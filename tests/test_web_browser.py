"""The worklist in a real browser: headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium) against the real app served by uvicorn on a free loopback port, over a
worklist of really screened phantom studies with their stored views.

A radiologist logs in, sees the ranked list, opens a study, moves through the slices,
toggles the overlays, confirms the call, sees the review stored, and logs out; a patient name
holding script never runs anywhere (``window.__xss`` stays undefined, no alert).  Screenshots
of the list and the study page are written to ``test-artifacts/web/`` (CTSCREEN_TEST_ARTIFACTS
to choose another folder) for a person to look at.

Skips where chromium, chromedriver or selenium are missing, except in CI (CI=true), where
that fails: scripts/setup.sh --test installs them.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO

from pipeline.run import StudyAnalysis

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
XSS_NAME = '<script>window.__xss=1</script><img src=x onerror="window.__xss=2">'
USER, PASSWORD = "reader.one", "a-long-password-1"
ARTIFACTS = Path(os.environ.get("CTSCREEN_TEST_ARTIFACTS", str(REPO / "test-artifacts" / "web")))

pytestmark = pytest.mark.slow  # screening two phantoms: about a minute on 2 cores


def _require_browser() -> None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    try:
        import uvicorn  # noqa: F401

        from pipeline.web.app import create_app  # noqa: F401
    except ImportError as e:
        missing.append(f"the web app ({e})")
    if missing:
        why = f"headless browser test needs {', '.join(missing)} (scripts/setup.sh --test)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Site:
    url: str
    typical_uid: str
    xss_uid: str
    refused_uid: str


def _write_study(folder: Path, *, seed: int, lesions: bool, accession: str, name: str,
                 n_slices: int | None = None) -> str:
    """A phantom chest written as one CT series (the demo's, with a chosen patient name;
    ``n_slices``: only that many central slices, which selection refuses)."""
    import numpy as np

    from pipeline.artefacts import Volume
    from pipeline.demo import DEMO_SHAPE, DEMO_SPACING
    from pipeline.phantom.dicom import derive_uid, write_ct_series
    from pipeline.phantom.model import PhantomSpec, make_grid, render

    spec = PhantomSpec(seed=seed) if lesions else PhantomSpec(seed=seed, lesions=())
    shape = DEMO_SHAPE if n_slices is None else (n_slices, 64, 64)
    affine = make_grid(shape, DEMO_SPACING)
    if n_slices is None:
        ct, _ = render(spec, affine, shape, slice_thickness_mm=DEMO_SPACING[0])
    else:
        ct = Volume(np.full(shape, -1000, np.int16), affine)
    study_uid = derive_uid(seed, "web-study")
    write_ct_series(ct, folder, study_uid=study_uid, series_uid=derive_uid(seed, "web-series"),
                    accession_number=accession, patient_id=f"WEB-{seed:03d}",
                    patient_name=name, slice_thickness=DEMO_SPACING[0], seed=seed)
    return study_uid


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Three studies screened as the batch does (worklist row + stored view), the app on a
    free loopback port, one radiologist."""
    _require_browser()
    import uvicorn

    from pipeline import screen
    from pipeline.config import Config
    from pipeline.web import auth, db
    from pipeline.web.app import create_app
    from pipeline.web.viewer import save_view, view_root
    from pipeline.worklist import Worklist

    root = tmp_path_factory.mktemp("web")
    uids = {
        "typical": _write_study(root / "a", seed=1, lesions=True, accession="WEB1",
                                name="Reader^Typical"),
        "xss": _write_study(root / "b", seed=2, lesions=False, accession="WEB2", name=XSS_NAME),
        "refused": _write_study(root / "c", seed=3, lesions=False, accession="WEB3",
                                name="Reader^Refused", n_slices=8),
    }
    wl_path = root / "site.ctscreen.sqlite"
    cfg = Config()
    cfg = replace(cfg, worklist=replace(cfg.worklist, path=str(wl_path)))
    views = view_root(cfg, wl_path)
    with Worklist(wl_path) as wl:
        for folder in ("a", "b", "c"):
            s = screen(root / folder, cfg)
            wl.record(s.result, fingerprint=f"test-{folder}")
            if s.analysed:
                done = StudyAnalysis(s.result, list(s.datasets), s.volume, list(s.sources),
                                     s.lungs, s.analysis)
                save_view(views, done, None, cfg.web.view_max_px,
                          window=(cfg.report.window_center, cfg.report.window_width))
    app = create_app(cfg, wl_path)
    with db.connect(db.web_db_path(cfg, wl_path)) as conn:
        auth.add_user(conn, USER, "radiologist", PASSWORD, time.time())
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.05)
    try:
        yield Site(f"http://127.0.0.1:{port}", uids["typical"], uids["xss"], uids["refused"])
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1700", "--no-first-run", "--disable-extensions",
                "--disable-background-networking", "--disable-sync",
                "--disable-component-update", "--disable-default-apps"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _no_xss(driver: Any) -> None:
    """No script of the patient name ran on this page, and no alert is open."""
    from selenium.common.exceptions import NoAlertPresentException

    try:
        text = driver.switch_to.alert.text
    except NoAlertPresentException:
        pass
    else:
        pytest.fail(f"an alert is open on {driver.current_url}: {text!r}")
    assert driver.execute_script("return typeof window.__xss") == "undefined", driver.current_url
    assert driver.execute_script("return document.querySelectorAll('img[src=\"x\"]').length") \
        == 0
    scripts = driver.execute_script(
        "return Array.from(document.scripts).map(function (s) { return s.src; })")
    assert all(src.startswith(driver.current_url.split("/", 3)[0] + "//") and "/static/" in src
               for src in scripts), scripts


def _wait_image(driver: Any, img: Any, src_part: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 15).until(lambda d: d.execute_script(
        "var i = arguments[0]; return i.src.indexOf(arguments[1]) >= 0 && i.complete "
        "&& i.naturalWidth > 0", img, src_part))


def _shot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / name
    driver.save_screenshot(str(path))
    return path


def test_reader_session_in_the_browser(site: Site, browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    # not logged in: the list is not reachable
    d.get(site.url + "/worklist")
    assert "/login" in d.current_url
    _no_xss(d)
    # a wrong password is refused
    d.find_element(By.NAME, "username").send_keys(USER)
    d.find_element(By.NAME, "password").send_keys("not-the-password")
    d.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    assert "/login" in d.current_url
    assert d.find_elements(By.CSS_SELECTOR, "table.worklist") == []
    # log in
    d.find_element(By.NAME, "username").clear()
    d.find_element(By.NAME, "username").send_keys(USER)
    d.find_element(By.NAME, "password").send_keys(PASSWORD)
    d.find_element(By.CSS_SELECTOR, "form.login button[type=submit]").click()
    WebDriverWait(d, 15).until(lambda drv: "/worklist" in drv.current_url)
    _no_xss(d)

    # the ranked list: typical first, then the study a reader must look at (not analysed),
    # then the negative one; the script-bearing name is shown as text
    rows = d.find_elements(By.CSS_SELECTOR, "table.worklist tbody tr")
    cells = [[td.text for td in r.find_elements(By.TAG_NAME, "td")] for r in rows]
    order = [next(c for c in row if re.fullmatch(r"WEB\d", c)) for row in cells]
    assert order == ["WEB1", "WEB3", "WEB2"], cells
    assert cells[0][1] == "TYPICAL" and cells[1][1] == "NOT ANALYSED", cells
    assert XSS_NAME in cells[2], cells[2]
    _shot(d, "worklist.png")

    # the negative study with the script-bearing name: shown as text, nothing runs
    d.get(f"{site.url}/study/{site.xss_uid}")
    assert XSS_NAME in d.find_element(By.CSS_SELECTOR, "table.facts").text
    _no_xss(d)

    # open the typical study from the list
    d.get(site.url + "/worklist")
    d.find_element(By.LINK_TEXT, "TYPICAL").click()
    WebDriverWait(d, 15).until(lambda drv: "/study/" in drv.current_url)
    _no_xss(d)
    img = d.find_element(By.ID, "slice")
    viewer = d.find_element(By.ID, "viewer")
    n = int(viewer.get_attribute("data-n"))
    start = int(viewer.get_attribute("data-start"))
    assert n == 200 and 0 <= start < n
    _wait_image(d, img, f"/slice/{start}.png")
    first = img.screenshot_as_png
    assert d.find_element(By.ID, "slice-label").text == f"{start + 1} / {n}"
    keys = d.find_elements(By.CSS_SELECTOR, "div.keys img")
    assert keys and all(d.execute_script("return arguments[0].naturalWidth", k) > 0
                        for k in keys)
    _shot(d, "study.png")
    d.execute_script("arguments[0].scrollIntoView()", viewer)
    _shot(d, "study-slices.png")

    # move through the slices: the button, then the arrow keys; the image changes
    d.find_element(By.ID, "next").click()
    _wait_image(d, img, f"/slice/{start + 1}.png")
    assert d.find_element(By.ID, "slice-label").text == f"{start + 2} / {n}"
    d.find_element(By.TAG_NAME, "body").click()
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(5):
        ActionChains(d).send_keys(Keys.ARROW_DOWN).perform()
    _wait_image(d, img, f"/slice/{start + 6}.png")
    moved = img.screenshot_as_png
    assert moved != first
    # toggle the overlays off and on: the same slice without, then with them again
    d.find_element(By.ID, "ov-lungs").click()
    d.find_element(By.ID, "ov-lesions").click()
    _wait_image(d, img, f"/slice/{start + 6}.png?overlays=")
    assert img.get_attribute("src").endswith("overlays=")
    plain = img.screenshot_as_png
    assert plain != moved
    d.find_element(By.ID, "ov-lesions").click()
    _wait_image(d, img, "overlays=lesions")
    assert img.screenshot_as_png not in (plain, moved)
    d.find_element(By.ID, "ov-lungs").click()
    _wait_image(d, img, "overlays=lungs,lesions")
    assert img.screenshot_as_png == moved
    _no_xss(d)

    # confirm the call; the review is stored and shown, and the list marks it reviewed
    form = d.find_element(By.CSS_SELECTOR, "form.review")
    form.find_element(By.CSS_SELECTOR, "input[name=action][value=confirm]").click()
    form.find_element(By.NAME, "comment").send_keys("agree <b>typical</b>")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    WebDriverWait(d, 15).until(lambda drv: drv.find_elements(By.CSS_SELECTOR, "table.history"))
    history = d.find_element(By.CSS_SELECTOR, "table.history").text
    assert USER in history and "confirm" in history and "typical" in history, history
    assert "agree <b>typical</b>" in history  # the comment as text, not markup
    _no_xss(d)
    _shot(d, "study-reviewed.png")
    d.get(site.url + "/worklist")
    first_row = d.find_element(By.CSS_SELECTOR, "table.worklist tbody tr")
    assert "yes" in [td.text for td in first_row.find_elements(By.TAG_NAME, "td")]

    # log out: the list and the images are no longer reachable
    d.find_element(By.CSS_SELECTOR, "form.logout button[type=submit]").click()
    WebDriverWait(d, 15).until(lambda drv: "/login" in drv.current_url)
    d.get(site.url + "/worklist")
    assert "/login" in d.current_url
    assert d.find_elements(By.CSS_SELECTOR, "table.worklist") == []
    d.get(f"{site.url}/study/{site.typical_uid}/slice/{start}.png")
    assert "image" not in (d.execute_script("return document.contentType") or "")
    _no_xss(d)


def test_artifacts_folder_is_ignored() -> None:
    """The screenshots never end up in a commit."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    import subprocess

    out = subprocess.run(["git", "check-ignore", "-q", str(ARTIFACTS / "worklist.png")],
                         cwd=REPO, capture_output=True)
    if ARTIFACTS.is_relative_to(REPO):
        assert out.returncode == 0, "add /test-artifacts/ to .gitignore"
