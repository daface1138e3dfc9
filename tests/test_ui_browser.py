"""The MLflow UI (3.17) of a tiny pipeline, driven in headless Chromium as a user clicks it.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make test`` installs them; nothing is
downloaded at test time). Checks what the pages render, following docs/comparing.md: the
experiment opens on the runs table once *Model training* is chosen, the ``cv`` row shows its CV
and test Dice and its dataset, the registry shows ``@champion`` and the model card, a fold's
chart shows ``val_dice``; and ``dvc plots show``'s page draws its charts with no network. The
walkthrough at the top of docs/comparing.md (baseline against a ``dvc exp``, curves side by
side) is its own test, whose screenshots are the page's.
Screenshots go to ``$LIVERSEG_SCREENSHOTS`` (``make ui-check`` sets ``docs/``), else to the
test's temporary folder, whose path the test prints.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

from conftest import run, stop_group

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
UI_START_TIMEOUT_S = 180
WAIT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def ui(tiny_repo: Path) -> Iterator[str]:
    """``mlflow ui`` over the tiny repository's store, on a free 127.0.0.1 port."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri"]
    cmd += [f"sqlite:///{tiny_repo / 'mlruns/mlflow.db'}", "-h", "127.0.0.1", "-p", str(port)]
    log = open(tiny_repo.parent / "mlflow-ui.log", "w")  # noqa: SIM115 (closed below)
    # its own process group: `mlflow ui` runs uvicorn and its workers as child processes
    proc = subprocess.Popen(
        [*cmd, "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + UI_START_TIMEOUT_S
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow ui did not start: {log.name}")
            time.sleep(1)
        yield url
    finally:
        stop_group(proc)
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.fail("needs Debian's chromium and chromium-driver (make test installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(arg)
    options.add_argument("--window-size=2000,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("LIVERSEG_SCREENSHOTS") or tmp_path_factory.mktemp("shots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"screenshots in {folder}")
    return folder


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


def page_text(driver: Any) -> str:
    return str(driver.execute_script("return document.body.innerText"))


def click_text(driver: Any, text: str) -> None:
    """Click the element that shows exactly ``text`` (JS click: popovers may cover it)."""
    from selenium.webdriver.common.by import By

    el = wait_for(
        f"'{text}' on the page",
        lambda: driver.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"),
    )
    driver.execute_script("arguments[0].click()", el[0])


def add_column(driver: Any, name: str) -> None:
    """Runs table: Columns > search ``name`` > tick it, as a user does."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    search = "//input[@placeholder='Search columns']"
    if not driver.find_elements(By.XPATH, search):
        button = driver.find_element(By.XPATH, "//button[contains(., 'Columns')]")
        driver.execute_script("arguments[0].click()", button)
    box = wait_for("the column search", lambda: driver.find_elements(By.XPATH, search))[0]
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(name)
    node = wait_for(
        f"column {name} in the list",
        lambda: driver.execute_script(
            """const n = arguments[0]; let hit = null;
            for (const el of document.querySelectorAll('[class*=tree-treenode]'))
                if (el.textContent.trim() === n) hit = el;
            return hit && (hit.querySelector('[class*=tree-checkbox]') || hit);""",
            name,
        ),
    )
    node.click()


def test_mlflow_ui_shows_what_a_user_compares(
    tiny_repo: Path, ui: str, browser: Any, shots: Path
) -> None:
    from selenium.webdriver.common.keys import Keys

    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlruns/mlflow.db'}")
    try:
        exp = mlflow.get_experiment_by_name("liverseg")
        assert exp is not None
        runs = mlflow.search_runs([exp.experiment_id], output_format="pandas")
        cv = runs[(runs["tags.stage"] == "train") & (runs["tags.dvc_exp"] == "")].iloc[0]
        fold0 = runs[
            (runs["tags.mlflow.runName"] == "fold-0")
            & (runs["tags.mlflow.parentRunId"] == cv["run_id"])
        ].iloc[0]
    finally:
        mlflow.set_tracking_uri(None)
    base = f"{ui}/#/experiments/{exp.experiment_id}"

    # 1. The experiment, as docs/comparing.md says: choose "Model training", the runs table opens.
    browser.get(base)
    click_text(browser, "Model training")
    wait_for("the runs table", lambda: "Run Name" in page_text(browser))
    wait_for("the cv row", lambda: "\ncv\n" in page_text(browser) + "\n")
    text = page_text(browser)
    assert "Liver segmentation in abdominal CT" in text  # the experiment's description
    assert "No data available" not in text
    # The Dataset column names the data version of the cv run.
    assert f"data/prepared ({cv['tags.data_dvc_md5'][:8]}" in text.replace("\n", " ")

    # 2. Its CV and test Dice as columns of the cv row.
    for column in ("cv_val_dice_mean", "test_dice_mean"):
        add_column(browser, column)
    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)

    def table() -> str:
        text = page_text(browser)
        return text.split("Run Name", 1)[-1] if "test_dice_mean" in text else ""

    table_text = wait_for("the metric columns", table)
    for metric in ("cv_val_dice_mean", "test_dice_mean"):
        assert metric in table_text
        # the UI shows the value rounded; its first two decimals are enough to find it
        assert f"{cv[f'metrics.{metric}']:.4f}"[:4] in table_text, (metric, table_text[:800])
    browser.save_screenshot(str(shots / "mlflow-runs-table.png"))

    # 3. A fold's chart view shows its validation Dice curve.
    browser.get(f"{base}/runs/{fold0['run_id']}/model-metrics")
    wait_for("the val_dice chart", lambda: "val_dice" in page_text(browser))
    assert "fold-0" in page_text(browser)
    charts = "//input[@placeholder='Search metric charts']"
    box = wait_for("the chart search", lambda: browser.find_elements("xpath", charts))[0]
    box.send_keys("val_")  # the validation curves only: val_dice, val_iou, val_loss
    wait_for("the filtered charts", lambda: "best_epoch" not in page_text(browser))
    assert "val_dice" in page_text(browser)
    browser.save_screenshot(str(shots / "mlflow-fold-curves.png"))

    # 4. The registry: @champion and the model card.
    browser.get(f"{ui}/#/models/liver-unet")
    wait_for("the registered model", lambda: "not a medical device" in page_text(browser))
    text = page_text(browser)
    assert re.search(r"Decision: \W*champion", text), text[:2000]
    browser.save_screenshot(str(shots / "mlflow-registry.png"))


def test_dvc_plots_page_draws_offline(tiny_repo: Path, browser: Any, shots: Path) -> None:
    """`dvc plots show` writes a page that renders without network (this machine has none
    to a CDN): two charts, a line per fold."""
    template = tiny_repo / ".dvc/plots/offline.html"
    assert template.is_file(), f"{template}: missing; `make venv` writes it (liverseg.plots_page)"
    out = tiny_repo.parent / "plots-page"
    run(["dvc", "plots", "show", "-o", str(out)], tiny_repo)
    html = (out / "index.html").read_text()
    assert "cdn.jsdelivr.net/npm/vega@" not in html
    browser.get((out / "index.html").as_uri())
    wait_for(
        "two rendered charts",
        lambda: (
            browser.execute_script(
                "return [...document.querySelectorAll('.vega-embed canvas, .vega-embed svg')]"
                ".filter(c => c.getBoundingClientRect().width > 200).length"
            )
            >= 2
        ),
    )
    browser.save_screenshot(str(shots / "dvc-plots.png"))


EXPERIMENT = "epochs-1"


def test_baseline_vs_experiment_curves_as_docs_comparing_walks_it(
    tiny_repo: Path, ui: str, browser: Any, shots: Path
) -> None:
    """docs/comparing.md, step by step: an experiment beside the committed baseline, then the
    page its link opens: the fold runs of both in the chart view, told apart by name, and
    the cv runs with their rounded headline figures in the table."""
    import urllib.parse

    run(["dvc", "exp", "run", "--temp", "-n", EXPERIMENT, "-S", "train.epochs=1"], tiny_repo)
    shown = run(["dvc", "exp", "show", "--csv"], tiny_repo).stdout
    out = subprocess.run(
        [sys.executable, "-m", "liverseg.compare"],
        input=shown,
        capture_output=True,
        text=True,
        cwd=tiny_repo,
        check=True,
    ).stdout
    assert "params that differ:" in out and "train.epochs" in out, out

    mlflow.set_tracking_uri(f"sqlite:///{tiny_repo / 'mlruns/mlflow.db'}")
    try:
        exp = mlflow.get_experiment_by_name("liverseg")
        assert exp is not None
        runs = mlflow.search_runs([exp.experiment_id], output_format="pandas")
    finally:
        mlflow.set_tracking_uri(None)
    names = set(runs["tags.mlflow.runName"])
    assert {"fold-0", f"fold-0-{EXPERIMENT}", "cv", f"cv-{EXPERIMENT}"} <= names, names

    # The doc's first link: the fold runs of every train in the chart view.
    query = {
        "workflowType": "machine_learning",
        "compareRunsMode": "CHART",
        "searchFilter": "attributes.run_name LIKE 'fold-%'",
    }
    runs_page = f"{ui}/#/experiments/{exp.experiment_id}/runs"
    browser.get(f"{runs_page}?{urllib.parse.urlencode(query)}")
    wait_for("the cv rows", lambda: f"cv-{EXPERIMENT}" in page_text(browser))
    # the matching folds sit under their cv rows: expand both (the + before each name)
    for button in browser.find_elements("css selector", ".ag-cell-value button"):
        browser.execute_script("arguments[0].click()", button)
    charts = "//input[@placeholder='Search metric charts']"
    box = wait_for("the chart search", lambda: browser.find_elements("xpath", charts))[0]
    box.send_keys("val_dice")

    def legends() -> str:
        text = str(browser.execute_script("return document.body.textContent"))
        # the search applied (best_epoch's chart gone), both trains' folds drawn
        found = f"fold-0-{EXPERIMENT} (val_dice)" in text and "fold-0 (val_dice)" in text
        return text if found and "(best_epoch)" not in text else ""

    text = wait_for("both trains' fold curves in the val_dice chart", legends)
    assert f"fold-1-{EXPERIMENT} (val_dice)" in text and "fold-1 (val_dice)" in text
    # the val_dice chart (the search also keeps best_val_dice and the cv figures) at the top
    title = browser.find_elements("xpath", "//*[normalize-space(text())='val_dice']")[0]
    browser.execute_script("arguments[0].scrollIntoView({block: 'start'})", title)
    time.sleep(2)  # the charts draw their lines after the legend
    browser.save_screenshot(str(shots / "mlflow-compare-curves.png"))

    # The doc's second link: the cv runs in the table, their headline figures as columns.
    query.update(compareRunsMode="TABLE", searchFilter="attributes.run_name LIKE 'cv%'")
    browser.get(f"{runs_page}?{urllib.parse.urlencode(query)}")
    wait_for("the cv rows", lambda: f"cv-{EXPERIMENT}" in page_text(browser))
    shown = page_text(browser).split("Run Name", 1)[-1]
    for column in ("cv_val_dice_mean", "test_dice_mean"):
        if column not in shown:  # the UI remembers the columns chosen for the experiment
            add_column(browser, column)
    from selenium.webdriver.common.keys import Keys

    browser.find_element("tag name", "body").send_keys(Keys.ESCAPE)
    for _, row in runs[runs["tags.mlflow.runName"].isin(["cv", f"cv-{EXPERIMENT}"])].iterrows():
        value = row["metrics.cv_val_dice_mean"]
        assert value == round(value, 4)  # logged rounded: the table shows it whole
        wait_for(f"{value:g} in the table", lambda v=value: f"{v:g}" in page_text(browser))
    browser.save_screenshot(str(shots / "mlflow-compare-table.png"))
