"""Headless Chromium (Debian's, driven by playwright; never `playwright install`) on the stack's UIs.

The browser stays off the network: requests to any host but the UI's loopback address are
aborted (the Prefect UI tries an analytics host).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from urllib.parse import quote, urlparse

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        raise RuntimeError("chromium not found: apt-get install chromium (.ci/run installs it)")
    return found


def _page_text(context, url: str, shot: Path, wait_for: list[str], tab: str | None = None) -> str:
    """Open `url` (and click `tab`), wait until its visible text holds every string of `wait_for`
    (the pages render client-side), screenshot it; its visible text."""
    page = context.new_page()
    page.goto(url, wait_until="load", timeout=60_000)  # not networkidle: the MLflow UI keeps polling
    if tab:
        page.get_by_text(tab, exact=True).first.click(timeout=30_000)
    text = ""
    for _ in range(60):
        text = page.inner_text("body")
        if all(needle in text for needle in wait_for):
            break
        page.wait_for_timeout(500)
    page.screenshot(path=str(shot), full_page=True)
    return text


def screenshot_pages(urls: dict[str, str], flow_run_id, experiment_id: str, run_ids: list[str],
                     out: Path) -> dict[str, str]:
    """Screenshots of the Prefect flow-run page (its task runs) and MLflow's run comparison;
    returns each page's visible text."""
    from playwright.sync_api import sync_playwright

    allowed = {urlparse(u).netloc for u in urls.values()}
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium(), args=CHROMIUM_FLAGS,
                                                        headless=True, viewport={"width": 1600, "height": 1200})
        context.route("**/*", lambda route: route.continue_() if urlparse(route.request.url).netloc in allowed
                      else route.abort())
        prefect = _page_text(context, f"{urls['prefect_ui']}/runs/flow-run/{flow_run_id}",
                             out / "prefect-flow-run.png", ["train@embedding", "register"], tab="Task Runs")
        compare = (f"{urls['mlflow']}/#/compare-runs?runs={quote(json.dumps(run_ids))}"
                   f"&experiments={quote(json.dumps([experiment_id]))}")
        mlflow = _page_text(context, compare, out / "mlflow-compare.png", ["stages.syntax.train.max_steps"])
        context.close()
    return {"prefect": prefect, "mlflow": mlflow}
