"""What a reviewer sees in the MLflow UI, checked in a real browser: ``mlflow server`` on loopback
over a retrain's own store, pages rendered by headless Chromium (``make test`` installs Debian's
``chromium``). The registered model's page shows the champion alias and the gate tags; the run's
forgetting report renders. Screenshots are kept in ``.test-artifacts/mlflow-ui/``."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from flows.core.config import load_params
from flows.drivers.retrain import retrain
from tests.conftest import write_params
from tests.flows.mlflow_server import MlflowServer

pytestmark = pytest.mark.usefixtures("prefect_harness")

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / ".test-artifacts" / "mlflow-ui"


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    assert found, "Chromium is missing: `make test` installs it (Debian package chromium)"
    return found


def render(url: str, screenshot: Path) -> str:
    """The DOM of ``url`` after its scripts ran, and a screenshot of it."""
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    common = [
        chromium(),
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--window-size=1400,1100",
        "--virtual-time-budget=20000",
    ]
    subprocess.run(
        [*common, f"--screenshot={screenshot}", url], capture_output=True, timeout=180, check=True
    )
    done = subprocess.run(
        [*common, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=True
    )
    return done.stdout


@pytest.fixture(scope="module")
def served_retrain(tmp_path_factory, tiny_model_dir, demo_dir):
    """One promoted retrain on the tiny model, and ``mlflow server`` over its store."""
    tmp = tmp_path_factory.mktemp("ui")
    params_file = write_params(tmp, tiny_model_dir, demo_dir)
    summary = retrain(params_file=str(params_file))
    assert summary.promotion.promoted
    params = load_params(params_file)
    server = MlflowServer(tmp, backend_store_uri=params.tracking_uri)
    server.start()
    yield server.url, summary, params
    server.stop()


def test_the_registered_model_page_shows_the_champion_alias_and_the_gate_tags(served_retrain):
    url, summary, params = served_retrain
    name, version = summary.registration.name, summary.registration.version
    dom = render(f"{url}/#/models/{name}/versions/{version}", SHOTS / "model_version.png")
    (SHOTS / "model_version.html").write_text(dom)
    assert 'title="champion"' in dom, "the champion alias is not on the page"
    assert re.search(r'data-row-key="gate".*?>gate</td>.*?>passed</div>', dom), "no gate tag"
    assert "releases_learned" in dom and "wiki-topics-1" in dom
    assert (SHOTS / "model_version.png").stat().st_size > 20_000  # a rendered page, not blank


def test_the_forgetting_report_renders_in_the_runs_artifact_view(served_retrain):
    url, summary, params = served_retrain
    run_id = summary.registration.run_id
    experiment = MlflowClient(params.tracking_uri).get_run(run_id).info.experiment_id
    page = f"{url}/#/experiments/{experiment}/runs/{run_id}/artifacts/report/forgetting_report.html"
    dom = render(page, SHOTS / "forgetting_report.png")
    assert "forgetting_report.html" in dom  # the file is listed in the artifact tree
    assert 'class="mlflow-html-iframe"' in dom  # and shown by the UI's HTML viewer
    assert (SHOTS / "forgetting_report.png").stat().st_size > 20_000
    # The bytes the server hands the viewer, rendered on their own: the report's content.
    served = mlflow.artifacts.download_artifacts(
        run_id=run_id,
        artifact_path="report/forgetting_report.html",
        tracking_uri=url,
        dst_path=str(SHOTS / "download"),
    )
    frame = render(Path(served).as_uri(), SHOTS / "forgetting_report_page.png")
    assert "gate PASSED; promoted: v1 is champion" in frame
    assert "<h2>Retention on the test probes</h2>" in frame and "general-knowledge" in frame
    assert frame.count("data:image/png;base64,") >= 2  # the interval plot and the heatmap inline
