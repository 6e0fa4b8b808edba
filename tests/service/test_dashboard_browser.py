"""The dashboard in a real browser: headless Debian chromium driven by Selenium (chromium-driver),
against the real stack (uvicorn, a Celery worker, Postgres, Redis, local storage).

A moderator signs in with an API key, uploads the tiny reference model and a forget set of real
MNIST zeros from the pages, starts two jobs from the form (vdu, and gradient ascent for comparison)
with a webhook to a receiver on loopback, watches the first progress to the end, sees both sample
grids and the metrics, downloads the checkpoint (its sha256 checked against the page and the tar
opened), compares the two jobs side by side, and signs out. Screenshots of every step are kept
under ``test-artifacts/dashboard/`` (the path is printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import httpx
import pytest

from jobs.settings import Settings
from jobs.webhooks import verify_webhook
from tests.service.conftest import REDIS_URL, REPO, migrated_database
from tests.service.helpers import tiny_model_archive
from tests.service.stack import stack_env, start_stack, wait_until
from tests.service.test_webhooks import Receiver
from worker.demo import forget_zip

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
ARTIFACTS = REPO / "test-artifacts" / "dashboard"
FAST_PARAMS = {"plasticity_target": "negative_guidance", "batch_size": 4, "anchor_weight": 0,
               "self_forget_fraction": 0, "guidance_weighting": "uniform"}
EVALUATION = {"num_samples": 8, "grid_samples": 8, "sample_steps": 4, "forget_class": 0}

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(
        not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
        reason="Debian's chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)",
    ),
]


@pytest.fixture(scope="module")
def stack(pg_databases, redis_prefix, tmp_path_factory):
    root = tmp_path_factory.mktemp("dashboard")
    pg_url = migrated_database(pg_databases, "dashboard_")  # no other stack's reconciler sees its jobs
    env = stack_env(
        root,
        database_url=pg_url,
        broker_url=REDIS_URL,
        broker_key_prefix=redis_prefix,
        storage_url=str(root / "storage"),
        allow_private_urls="true",  # the webhook receiver is on loopback
        webhook_poll_interval_s="0.5",
        worker_preload="true",
    )
    stack = start_stack(env, root)
    yield stack.base, Settings(database_url=pg_url, log_json=False)
    stack.stop()
    print("---- worker log (tail) ----\n" + stack.worker.log()[-3000:])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    downloads = tmp_path_factory.mktemp("downloads")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
    ):
        options.add_argument(flag)
    options.add_experimental_option(
        "prefs", {"download.default_directory": str(downloads), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    driver.set_page_load_timeout(60)
    driver.downloads = downloads
    yield driver
    driver.quit()


class Shots:
    def __init__(self, driver):
        self.driver = driver
        self.n = 0
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        for old in ARTIFACTS.glob("*.png"):
            old.unlink()

    def __call__(self, name: str) -> None:
        self.n += 1
        self.driver.save_screenshot(str(ARTIFACTS / f"{self.n:02d}-{name}.png"))


def team_key(settings: Settings) -> tuple[str, str]:
    from api.keys import create_key
    from jobs.db import session_scope
    from tests.service.helpers import make_team

    with session_scope(settings) as s:
        team = make_team(s, "moderation <b>&</b> safety")  # the page must escape it
        return team.id, create_key(s, team, "dashboard").key


def test_a_moderator_runs_and_compares_jobs_in_the_dashboard(stack, browser, tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base, settings = stack
    _, key = team_key(settings)
    shot = Shots(browser)
    print(f"\nscreenshots: {ARTIFACTS}")
    find = browser.find_element

    def wait_for(predicate, timeout=60, what="the page"):
        return wait_until(lambda: predicate(), timeout, interval=0.25, what=what)

    def text_of(element_id: str) -> str:
        """An element's text; "" while the page is reloading (the script reloads it when the job ends)."""
        try:
            return find(By.ID, element_id).text
        except (NoSuchElementException, StaleElementReferenceException):
            return ""

    # sign in (the dashboard sends us to the sign-in page first)
    browser.get(f"{base}/dashboard")
    assert browser.current_url.startswith(f"{base}/dashboard/login")
    find(By.ID, "api-key").send_keys("vdu_wrong_key")
    find(By.ID, "sign-in").click()
    # the form posts and the page reloads: wait for the new page rather than read the old one mid-navigation
    wait_for(lambda: "invalid or revoked API key" in text_of("form-error"), what="the sign-in error")
    find(By.ID, "api-key").send_keys(key)
    find(By.ID, "sign-in").click()
    wait_for(lambda: browser.current_url == f"{base}/dashboard", what="the jobs page")
    assert "moderation <b>&</b> safety" in find(By.CLASS_NAME, "team").text  # shown as text, not markup
    cookie = browser.get_cookie("vdu_dashboard")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and key not in cookie["value"]
    assert browser.execute_script("return document.cookie") == ""  # nothing readable by scripts
    shot("signed-in")

    # register the tiny model by upload, then upload a forget set of real zeros
    model_file = tmp_path / "mnist-ddpm-tiny.tar"
    model_file.write_bytes(tiny_model_archive())
    browser.get(f"{base}/dashboard/models/new")
    find(By.ID, "model-name").send_keys("mnist-ddpm-tiny")
    find(By.ID, "model-file").send_keys(str(model_file))
    find(By.ID, "model-submit").click()
    wait_for(lambda: "/dashboard/jobs/new?model=" in browser.current_url, what="the model upload")
    forget_file = tmp_path / "zeros.zip"
    forget_file.write_bytes(forget_zip(0, 8))
    browser.get(f"{base}/dashboard/forget-sets/new")
    find(By.ID, "fs-name").send_keys("the digit zero")
    find(By.ID, "fs-file").send_keys(str(forget_file))
    shot("forget-set-form")
    find(By.ID, "fs-submit").click()
    wait_for(lambda: "/dashboard/jobs/new?forget_set=" in browser.current_url, what="the forget-set upload")

    with Receiver([]) as receiver:
        job_ids = []
        for method, gamma in (("vdu", "0.5"), ("gradient_ascent", "")):
            browser.get(f"{base}/dashboard/jobs/new")
            Select(find(By.ID, "job-method")).select_by_value(method)
            find(By.ID, "job-steps").send_keys("3")
            find(By.ID, "job-gamma").send_keys(gamma)
            Select(find(By.ID, "job-posterior")).select_by_value("isotropic")
            params = {k: v for k, v in FAST_PARAMS.items() if method == "vdu" or k != "plasticity_target"}
            find(By.ID, "job-params").send_keys(json.dumps(params))
            find(By.ID, "job-evaluation").send_keys(json.dumps(EVALUATION))
            find(By.ID, "job-webhook").send_keys(receiver.url)
            if not job_ids:
                shot("new-job-form")
            find(By.ID, "job-submit").click()
            wait_for(lambda: "/dashboard/jobs/job_" in browser.current_url, what="the job page")
            job_ids.append(browser.current_url.rsplit("/", 1)[-1])

        # watch the first job live: the script updates status and progress without a reload
        browser.get(f"{base}/dashboard/jobs/{job_ids[0]}")
        seen: list[str] = []
        progress_seen: set[str] = set()

        def finished():
            status = text_of("job-status")
            if status == "running":
                progress_seen.add(text_of("job-progress-text"))
            if status and (not seen or seen[-1] != status):
                seen.append(status)
                shot(f"job-{status}")
            return status in ("succeeded", "failed", "cancelled")

        wait_for(finished, timeout=180, what="the job to finish")
        assert seen[-1] == "succeeded", (seen, find(By.ID, "job-error").text)
        assert "running" in seen  # it was watched, not found finished
        assert any("/" in text for text in progress_seen), progress_seen  # "phase step/total", updated live
        wait_for(lambda: browser.find_elements(By.ID, "download"), what="the evidence after the reload")

        # both grids loaded, the metrics with how each was computed, the loss curves of both terms
        for grid in ("grid-before", "grid-after"):
            wait_for(
                lambda grid=grid: browser.execute_script(
                    "const i = document.getElementById(arguments[0]); return i.complete && i.naturalWidth > 0;", grid
                ),
                what=f"{grid} to load",
            )
        pul = find(By.CSS_SELECTOR, '#metrics-table tr[data-metric="pul"]')
        assert pul.find_element(By.CLASS_NAME, "num").text and pul.find_element(By.CLASS_NAME, "how").text
        assert len(browser.find_elements(By.CSS_SELECTOR, "#metrics-table tbody tr")) >= 3
        plot = find(By.CSS_SELECTOR, "#loss-plot svg")
        assert len(plot.find_elements(By.TAG_NAME, "polyline")) == 2
        assert {t.text for t in plot.find_elements(By.CLASS_NAME, "term")} == {"stability", "plasticity"}
        assert find(By.ID, "job-progress").get_attribute("value") == "100"
        shot("job-evidence")

        # download the checkpoint from the button; its sha256 is the one the page shows
        expected_sha = find(By.ID, "checkpoint-sha256").text
        find(By.ID, "download").click()
        downloads: Path = browser.downloads

        def downloaded():
            done = [p for p in downloads.iterdir() if p.suffix == ".tar"]
            partial = [p for p in downloads.iterdir() if p.suffix == ".crdownload"]
            return done[0] if done and not partial else None

        archive = wait_for(downloaded, what="the checkpoint download")
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == expected_sha
        with tarfile.open(archive) as tf:
            names = tf.getnames()
        assert "model_index.json" in names and "unet/diffusion_pytorch_model.safetensors" in names

        # the second job (gradient ascent) ends too; compare the two side by side
        browser.get(f"{base}/dashboard/jobs/{job_ids[1]}")
        wait_for(
            lambda: text_of("job-status") in ("succeeded", "failed", "cancelled"),
            timeout=180,
            what="the second job",
        )
        browser.get(f"{base}/dashboard/compare?a={job_ids[0]}&b={job_ids[1]}")
        methods = [td.text for td in browser.find_elements(By.CSS_SELECTOR, '#compare-table td[data-field="method"]')]
        assert methods == ["vdu", "gradient_ascent"]
        assert browser.find_elements(By.CSS_SELECTOR, '#compare-table tr[data-metric="pul"]')
        assert not browser.find_elements(By.ID, "compare-warning")  # same model and forget set
        shot("compare")

        # the webhooks arrived from the worker, signed with the team's secret
        wait_for(lambda: len(receiver.received) >= 2, timeout=30, what="both webhooks")
        secret = httpx.get(f"{base}/v1/webhook-secret", headers={"Authorization": f"Bearer {key}"}).json()["secret"]
        events = [verify_webhook(secret, headers, body) for headers, body in receiver.received]
        assert {e["data"]["id"] for e in events} == set(job_ids)
        assert events[0]["type"] == "job.succeeded"

    # the jobs list shows both, finished; signing out ends the session
    browser.get(f"{base}/dashboard")
    rows = browser.find_elements(By.CSS_SELECTOR, "#jobs-table tbody tr")
    assert {r.get_attribute("data-job") for r in rows} == set(job_ids)
    shot("jobs-list")
    find(By.ID, "sign-out").click()
    wait_for(lambda: "/dashboard/login" in browser.current_url, what="the sign-in page")
    browser.get(f"{base}/dashboard")
    assert "/dashboard/login" in browser.current_url
