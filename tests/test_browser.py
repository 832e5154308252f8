"""One real-browser walk through the app: submit on Compress, watch it on Jobs, open the share link.

Starts the real web app (`streamlit run app.py`) and the real worker as subprocesses on a fresh
EXPLORER_HOME and drives headless Chromium with Playwright. Screenshots of the three pages go to
tmp_path and to /tmp/ui-shots/. Skipped when Playwright or Chromium is missing, unless
EXPLORER_REQUIRE_BROWSER=1, which turns that into a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urljoin, urlparse

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path("/tmp/ui-shots")
APP_ENV = {"EXPLORER_BENCH_REPEATS": "20", "EXPLORER_BENCH_BATCH_REPEATS": "5", "EXPLORER_BENCH_WARMUP": "5",
           "EXPLORER_POLL_SECONDS": "0.2"}

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _no_browser(reason: str):
    if os.environ.get("EXPLORER_REQUIRE_BROWSER") == "1":
        pytest.fail(f"EXPLORER_REQUIRE_BROWSER=1 but the browser test cannot run: {reason}")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """Terminate a process we started (and any children it left), then kill what remains."""
    try:
        import psutil

        children = psutil.Process(proc.pid).children(recursive=True)
    except Exception:  # psutil missing or the process already gone
        children = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for child in children:
        try:
            child.kill()
        except Exception:
            pass


@contextmanager
def _app_server(tmp_path: Path, extra_env: dict | None = None, worker: bool = True):
    """The web app (and a worker) on a fresh data folder under tmp_path; yields (base URL, home)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, **APP_ENV, "EXPLORER_HOME": str(home), **(extra_env or {})}
    env.pop("EXPLORER_EXECUTOR", None)
    port = _free_port()
    procs = []
    logs = {}

    def start(name, args):
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "wb") as log:
            procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=PROJECT_ROOT, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT))

    try:
        start("streamlit", ["streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
                            "--browser.gatherUsageStats", "false"])
        if worker:
            start("worker", ["services", "worker"])
        base = f"http://localhost:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.fail("the web app did not come up:\n" + logs["streamlit"].read_text(errors="replace"))
            time.sleep(0.2)
        yield base, home
    finally:
        for proc in procs:
            _stop(proc)
        for name, path in logs.items():  # kept beside the screenshots for whoever debugs a failure
            if path.exists():
                print(f"----- {name} log -----\n{path.read_text(errors='replace')[-3000:]}")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """The web app and a worker on a fresh data folder; yields the base URL."""
    with _app_server(tmp_path_factory.mktemp("ui-server")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def ui_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _no_browser("playwright is not installed")
    if not Path(CHROMIUM).exists():
        _no_browser(f"no Chromium at {CHROMIUM}")
    with sync_playwright() as playwright:
        try:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as error:  # noqa: BLE001 - any launch failure means no browser here
            _no_browser(f"Chromium would not start: {error}")
        try:
            yield browser
        finally:
            browser.close()


def _wait_for_app(page) -> None:
    page.wait_for_selector('[data-testid="stApp"]', timeout=30_000)
    # The status widget shows "Running..." while the script runs; wait until it is gone.
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')", timeout=30_000)


def _shot(page, tmp_path: Path, name: str) -> None:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it first."""
    path = tmp_path / name
    size = page.viewport_size
    height = page.evaluate(
        "() => { const main = document.querySelector('[data-testid=\"stMain\"]');"
        " return main ? main.scrollHeight : document.body.scrollHeight; }")
    page.set_viewport_size({"width": size["width"], "height": min(max(size["height"], height + 40), 6000)})
    page.wait_for_timeout(500)  # let charts lay out again at the new size
    page.screenshot(path=str(path), full_page=True)
    page.set_viewport_size(size)
    SHOTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, SHOTS / name)


def test_submit_watch_and_share_in_a_real_browser(ui_browser, ui_server, tmp_path):
    from playwright.sync_api import expect

    context = ui_browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)

    # Compress: add a magnitude-pruning step through the form and submit it.
    page.goto(f"{ui_server}/compress")
    _wait_for_app(page)
    expect(page.get_by_role("heading", name="Compress")).to_be_visible()
    page.get_by_role("combobox", name="Add a step").click()
    page.get_by_role("option", name=re.compile(r"prune\.magnitude")).click()
    page.get_by_role("button", name="Add step").click()
    expect(page.get_by_text("1. Magnitude pruning")).to_be_visible()
    expect(page.get_by_role("slider").first).to_be_visible()
    expect(page.locator('[data-testid="stCode"]').first).to_contain_text('"method": "prune.magnitude"')

    submit = page.get_by_role("button", name="Submit job")
    expect(submit).to_be_enabled()
    submit.click()
    expect(page.get_by_text(re.compile(r"Job .* queued"))).to_be_visible()
    share = page.get_by_role("link", name=re.compile("Result page \\(share link\\)"))
    expect(share).to_be_visible()
    href = share.get_attribute("href")
    share_url = urljoin(f"{ui_server}/compress", href)
    run_id = parse_qs(urlparse(share_url).query)["id"][0]
    assert urlparse(share_url).path.endswith("/result") and re.fullmatch(r"[0-9a-f]{32}", run_id), share_url
    _shot(page, tmp_path, "compress.png")

    # Jobs: the worker picks the job up; the list refreshes itself until it says succeeded.
    page.goto(f"{ui_server}/jobs")
    _wait_for_app(page)
    status_line = page.locator('[data-testid="stMarkdownContainer"] p').filter(has_text="Compress digits-cnn")
    expect(status_line).to_have_count(1)
    expect(status_line.locator("strong", has_text=re.compile(r"^succeeded$"))).to_be_visible(timeout=90_000)
    result_link = page.locator('[data-testid="stPageLink"] a').filter(has_text="Result")
    expect(result_link).to_be_visible()
    assert run_id in result_link.get_attribute("href")
    _shot(page, tmp_path, "jobs.png")

    # Result, opened from the share link in a second context: another person's browser.
    other = ui_browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        viewer = other.new_page()
        viewer.set_default_timeout(30_000)
        viewer.goto(share_url)
        _wait_for_app(viewer)
        expect(viewer.get_by_role("button", name=re.compile(r"Download ONNX"))).to_be_visible()
        summary = viewer.get_by_role("heading", name=re.compile(r"smaller|faster"))
        expect(summary).to_be_visible()
        expect(viewer.locator('[data-testid="stCode"]').filter(has_text='"method": "prune.magnitude"').first).to_be_visible()
        expect(viewer.get_by_text(run_id).first).to_be_attached()  # the share box repeats the link
        _shot(viewer, tmp_path, "result.png")

        # Two more views for whoever reviews the screenshots: the model cards and the comparison.
        viewer.goto(f"{ui_server}/compare")
        _wait_for_app(viewer)
        expect(viewer.locator('[data-testid="stDataFrame"]')).to_be_visible()
        expect(viewer.locator('[data-testid="stVegaLiteChart"]')).to_have_count(2)
        _shot(viewer, tmp_path, "compare.png")
        viewer.goto(ui_server)  # the default page (Models) lives at the root
        _wait_for_app(viewer)
        expect(viewer.get_by_text("Baseline accuracy")).to_be_visible()
        _shot(viewer, tmp_path, "models.png")
    finally:
        other.close()
        context.close()


def test_with_sign_in_on_pages_show_only_the_sign_in_and_a_share_link_only_its_run(ui_browser, tmp_path):
    """Served with EXPLORER_SIGN_IN=required: every page is the sign-in; a share link opens without it, shows
    its one run and no navigation; a withdrawn link says so."""
    from playwright.sync_api import expect

    from services import access, api

    secret = "correct horse battery"
    env = {"EXPLORER_SIGN_IN": "required", "EXPLORER_PASSWORD_HASH": access.hash_password(secret)}
    with _app_server(tmp_path, env, worker=False) as (base, home):
        db = api.connect(home)
        submitted = api.submit_compress(db, "digits-cnn", {"steps": [{"method": "prune.magnitude"}]})
        api.wait_for_job(db, submitted["job_id"], 240)  # inline: no worker runs here
        share = access.create_share(db, "run", {"run": submitted["run_id"]})
        context = ui_browser.new_context(viewport={"width": 1400, "height": 1000})
        page = context.new_page()
        page.set_default_timeout(30_000)
        for path in ("/", "/compare", "/jobs", f"/result?id={submitted['run_id']}", "/search"):
            page.goto(base + path)
            _wait_for_app(page)
            expect(page.get_by_label("Team password")).to_be_visible()
            assert submitted["run_id"] not in page.content()
            assert page.locator('[data-testid="stSidebarNav"]').count() == 0
        _shot(page, tmp_path, "sign-in.png")

        page.goto(f"{base}/share?id={share['id']}")
        _wait_for_app(page)
        expect(page.get_by_role("heading", name=re.compile("Digits CNN: prune.magnitude"))).to_be_visible()
        assert page.locator('[data-testid="stSidebarNav"]').count() == 0  # nowhere else to go
        assert page.get_by_role("button").count() == 0 or not page.get_by_role("button", name="Submit job").count()
        _shot(page, tmp_path, "share.png")

        access.revoke_share(db, share["id"])
        page.goto(f"{base}/share?id={share['id']}")
        _wait_for_app(page)
        expect(page.get_by_text("This link was withdrawn by the person who shared it.")).to_be_visible()
        page = context.new_page()  # and signing in opens the rest
        page.set_default_timeout(30_000)
        page.goto(f"{base}/compare")
        _wait_for_app(page)
        page.wait_for_timeout(1000)  # the form is inert while the first run settles
        page.get_by_label("Team password").fill(secret)
        page.get_by_role("button", name="Sign in").click()
        expect(page.locator('[data-testid="stSidebarNav"]')).to_be_visible()
        context.close()
