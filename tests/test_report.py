"""`probkit report`: one self-contained, escaped HTML page whose numbers are run.json's."""

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html import escape
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

import probkit
from probkit import api
from probkit.cli import app
from probkit.data import uniform_bits_per_dim
from probkit.report import baseline_bits_per_dim, fitted_on
from probkit.runs import load_run

runner = CliRunner()
TINY = Path(__file__).parent / "specs" / "tiny-mixture.yaml"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

NO_LATENT = """\
probkit: 1
name: tiny-pixels
description: "per-pixel Bernoullis <script>alert('description')</script> & </pre><b>bold</b>"
data:
  source: digits
  size: 8
  transform: binary
params:
  probs:
    shape: [D]
    prior: Beta(2.0, 2.0)
likelihood:
  x: Bernoulli(probs=probs)
fit:
  optimizer: adam
  steps: 3
"""


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


class _Page(HTMLParser):
    """Every start tag with its attributes, and the text of each section by id."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.sections: dict[str, str] = {}
        self._section = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "section":
            self._section = attrs.get("id")
            self.sections.setdefault(self._section, "")

    def handle_data(self, data):
        if self._section:
            self.sections[self._section] += data + " "


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    api.fit(TINY, steps=5, device="cpu", out=run, samples=0)
    return run


@pytest.fixture(scope="module")
def page(fitted):
    """The report at its default path, written through the CLI."""
    result = _invoke("report", fitted, "--device", "cpu")
    assert result.exit_code == 0, result.output
    path = fitted / "report.html"
    assert f"report: {path}" in result.output
    return path.read_text()


def test_the_default_path_is_the_run_folder_and_is_printed(fitted, page):
    assert (fitted / "report.html").is_file()
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")


def test_the_page_parses_and_needs_no_network(page):
    parsed = _parse(page)
    tags = {tag for tag, _ in parsed.tags}
    assert {"html", "head", "body", "table", "img", "pre"} <= tags
    assert not tags & {"script", "link", "iframe", "object", "embed"}
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert not re.search(r"url\(|@import|src=['\"](?!data:)", page)
    for _, attrs in parsed.tags:
        assert "href" not in attrs, attrs


def test_every_picture_is_an_embedded_valid_png(page):
    images = [attrs for tag, attrs in _page_tags(page) if tag == "img"]
    assert len(images) == 4  # training curves, component usage, samples, completions
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix), attrs["src"][:40]
        data = base64.b64decode(attrs["src"][len(prefix):], validate=True)
        assert data.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        assert attrs.get("alt")


def _page_tags(page):
    return _parse(page).tags


def test_the_numbers_shown_are_run_json_s(fitted, page):
    info = json.loads((fitted / "run.json").read_text())
    sections = _parse(page).sections
    metrics = " ".join(sections["metrics"].split())
    baseline = info["baseline_bits_per_dim"]
    for part in ("train", "test"):
        nll, bpd = info[part]["nll"], info[part]["bits_per_dim"]
        assert f"{nll:.3f}" in metrics and f"{bpd:.4f}" in metrics, part
        assert f"{baseline - bpd:.4f} below ({(baseline - bpd) / baseline:.1%})" in metrics, part
    assert f"uniform baseline ({baseline:.4f} bits/dim)" in metrics
    overview = " ".join(sections["overview"].split())
    data = info["data"]
    for text in (data["source"], data["transform"], "1×8×8", str(data["n_train"]), str(data["n_test"]),
                 data["fingerprint"], "MAP", f"{info['optimizer']} ({info['optimizer_choice']})", info["stopped"],
                 f"torch {info['torch']}", f"pyro {info['pyro']}", info["device"]):
        assert text in overview, text
    usage = " ".join(sections["components"].split())
    assert "all 3 values in use" in usage
    spec = (fitted / "spec.yaml").read_text()
    assert escape(spec) in page


def test_completion_and_memorisation_are_shown(page):
    sections = _parse(page).sections
    completion = " ".join(sections["completion"].split())
    assert "method" in completion and "conditional NLL" in completion and "PSNR" in completion
    memorisation = " ".join(sections["memorisation"].split())
    assert "samples 200" in memorisation and "ratio (train / held-out)" in memorisation
    assert "How to read it" in memorisation
    samples = " ".join(sections["samples"].split())
    assert "36 fresh draws" in samples


def test_out_writes_the_given_file(fitted, tmp_path):
    out = tmp_path / "elsewhere.html"
    result = _invoke("report", fitted, "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert out.is_file() and "elsewhere.html" in result.output
    assert _parse(out.read_text()).sections["metrics"]


@pytest.mark.parametrize("where", ["missing/report.html", "a-file/report.html"])
def test_out_into_a_missing_place_exits_2_naming_out(fitted, tmp_path, where):
    (tmp_path / "a-file").write_text("not a folder")
    result = _invoke("report", fitted, "--out", tmp_path / where)
    assert result.exit_code == 2, result.output
    flat = " ".join(result.output.split())
    assert "--out" in flat and "does not exist" in flat and "Traceback" not in flat


def test_out_never_replaces_a_file_that_is_not_a_page_nor_a_device(fitted, tmp_path):
    """`--out spec.yaml` would have replaced the spec with HTML, and (as root) `--out /dev/null` the
    device with a file: both are refused before any work, and left as they were."""
    spec = tmp_path / "spec.yaml"
    spec.write_text("probkit: 1\n")
    os.mkfifo(tmp_path / "pipe.html")
    for out, message in ((spec, "already exists and is not an HTML page; the report would replace it"),
                         (tmp_path / "pipe.html", "is a device, a pipe or a socket, not a file"),
                         (tmp_path / ("n" * 300 + ".html"), "cannot write there (File name too long)")):
        result = _invoke("report", fitted, "--out", out)
        assert result.exit_code == 2, result.output
        assert message in " ".join(result.output.split())
    assert spec.read_text() == "probkit: 1\n" and not (tmp_path / "pipe.html").is_file()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_out_into_a_read_only_folder_exits_2(fitted, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        result = _invoke("report", fitted, "--out", locked / "r.html")
    finally:
        locked.chmod(0o700)
    assert result.exit_code == 2, result.output
    assert "permission denied" in " ".join(result.output.split())


def test_a_folder_that_is_not_a_run_exits_1(tmp_path):
    result = _invoke("report", tmp_path)
    assert result.exit_code == 1, result.output
    assert "is not a fitted run (no run.json)" in " ".join(result.output.split())


def test_a_spec_without_a_run_exits_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = _invoke("report", TINY)
    assert result.exit_code == 1, result.output
    assert "has no fitted run" in " ".join(result.output.split())


def test_user_text_is_escaped_and_a_model_without_latents_says_so(write_spec, tmp_path):
    run = tmp_path / "run <i>folder</i>"
    api.fit(write_spec(NO_LATENT), device="cpu", out=run, samples=0)
    info_path = run / "run.json"
    info = json.loads(info_path.read_text())
    info["name"] = "<script>alert('name')</script>"
    info_path.write_text(json.dumps(info))
    path = probkit.report(run, device="cpu")
    assert path == run / "report.html"
    page = path.read_text()
    parsed = _parse(page)
    assert not any(tag in ("script", "i", "b") for tag, _ in parsed.tags)
    assert "<script" not in page.lower()
    assert escape("<script>alert('name')</script>") in page
    assert escape("</pre><b>bold</b>") in page
    assert escape("run <i>folder</i>") in page
    assert "no summed-out latent variable" in " ".join(parsed.sections["components"].split())
    assert len([1 for tag, _ in parsed.tags if tag == "img"]) == 3


def test_old_runs_fall_back_to_the_transform_s_baseline_and_the_file_date(fitted):
    run = load_run(fitted)
    info = dict(run.info)
    assert baseline_bits_per_dim(info) == info["baseline_bits_per_dim"]
    del info["baseline_bits_per_dim"]
    assert baseline_bits_per_dim(info) == uniform_bits_per_dim("binary") == 1.0
    os.utime(fitted / "run.json", (1_700_000_000, 1_700_000_000))
    run.info = {key: value for key, value in run.info.items() if key != "fitted_at"}
    assert fitted_on(run).startswith("2023-11-1")
    run.info["fitted_at"] = "2024-01-02T03:04:05+00:00"
    assert fitted_on(run) == "2024-01-02 03:04 UTC"
    run.info["fitted_at"] = "last Tuesday"
    assert fitted_on(run) == "last Tuesday"


def _headless_chromium() -> list[str] | None:
    """The command line of a headless Chromium found on this machine, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "chromium-headless-shell", "headless_shell"):
        found = shutil.which(name)
        if found:
            return [found, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    try:
        with sync_playwright() as playwright:
            found = playwright.chromium.executable_path
    except PlaywrightError:
        return None
    if not os.path.exists(found):  # the package is installed, its browser download is not
        return None
    return [found, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]


def test_the_page_renders_in_a_headless_browser(fitted, page, tmp_path):
    browser = _headless_chromium()
    if browser is None:
        pytest.skip("no headless Chromium here (looked for chromium, chromium-browser, google-chrome, "
                    "chromium-headless-shell, headless_shell and playwright's); `apt-get install chromium` brings one")
    shot = tmp_path / "shot.png"
    done = subprocess.run([*browser, "--window-size=1000,1600", f"--screenshot={shot}",
                           (fitted / "report.html").resolve().as_uri()],
                          check=False, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), done.stderr[-2000:]
    with Image.open(shot) as image:
        grey = image.convert("L")
        assert grey.size == (1000, 1600)
        low, high = grey.getextrema()
        histogram = grey.histogram()
    assert high - low > 128, "the screenshot is blank"
    assert sum(1 for count in histogram if count) > 32, "the screenshot has almost no shades: nothing rendered"
    dark = sum(histogram[:128]) / sum(histogram)
    assert 0.005 < dark < 0.6, f"{dark:.1%} of the screenshot is dark: text and pictures missing or a black page"


def test_a_damaged_run_json_gives_a_page_of_what_it_still_says(fitted, tmp_path):
    """Metrics that are not numbers, a wall time too large for a float, or component counts that
    are text were tracebacks; the page leaves out what it cannot read."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted, run)
    info = json.loads((run / "run.json").read_text())
    info.update({"test": {"nll": float("nan"), "bits_per_dim": "x"}, "train": None, "wall_time_s": 10**400,
                 "baseline_bits_per_dim": "one", "components": {"z": {"expected_images": "many"}}})
    (run / "run.json").write_text(json.dumps(info))
    result = _invoke("report", run, "--out", tmp_path / "page.html", "--device", "cpu")
    assert result.exit_code == 0, result.output
    sections = _parse((tmp_path / "page.html").read_text()).sections
    assert "run.json records no metrics" in sections["metrics"]
    assert "no component usage to show" in sections["components"]
