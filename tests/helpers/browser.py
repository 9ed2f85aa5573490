"""A headless Chromium page on an MLflow UI (Playwright launching Debian's chromium; `.ci/run` installs it) and the
checks the UI tests make on an experiment's runs table (tests/system/test_mlflow_ui.py, test_shared_mlflow.py).
Screenshots are kept under tests/artifacts/."""

import re
import shutil
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).parents[1] / "artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@contextmanager
def browser_page(url: str, route: str, width: int, height: int, credentials: dict[str, str] | None = None):
    """A headless Chromium page open at ``url/#/route``. ``credentials`` ({"username", "password"}): the HTTP basic
    login a server with MLflow's basic-auth app asks for (Playwright answers its 401 challenges)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height}, http_credentials=credentials)
            page.goto(f"{url}/#/{route}")
            yield page
        finally:
            browser.close()


def runs_table_with_test_acc(page, names, screenshot: str) -> str:
    """On an experiment's runs page: show the test/acc column, expand the sweep's parent run until the runs
    ``names`` are listed, save a screenshot under tests/artifacts/; return the table's text."""
    page.get_by_text("matching runs").wait_for(timeout=60_000)
    # Show the test/acc column (Columns -> search -> tick it).
    page.get_by_role("button", name="Columns", exact=True).click()  # not "Show more columns (N total)"
    page.get_by_placeholder("Search columns").fill("test/acc")
    # The filtered Metrics group may or may not be expanded already: expand it only while test/acc is hidden.
    title = page.locator("[class*='tree-title']").filter(has_text=re.compile(r"^test/acc$")).first
    switcher = (
        page.locator("[class*='tree-treenode']").filter(has_text="Metrics (").locator("[class*='tree-switcher']").first
    )
    for _ in range(10):
        page.wait_for_timeout(1000)
        if title.is_visible():
            break
        switcher.click()
    title.click()
    page.keyboard.press("Escape")
    # Expand the sweep's parent run to show its children.
    page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
    for name in names:
        page.get_by_text(name, exact=True).wait_for(timeout=30_000)
    page.wait_for_timeout(1000)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / screenshot))
    return page.locator("[role='grid']").first.inner_text()


def check_accuracies_shown(grid: str, accs: dict[str, float]) -> None:
    """Each run's name and its test/acc (as the UI rounds it) are in the runs table's text."""
    for name, acc in accs.items():
        assert name in grid
        assert f"{acc:.2f}".rstrip("0").rstrip(".") in grid or str(round(acc, 4)) in grid, (acc, grid[:2000])
