"""report.html: one self-contained file, built from what `imgcls train` and `imgcls eval` wrote, that
opens from disk; checked as text and in headless Chromium (Debian's chromium and chromium-driver).

The browser tests fail, never skip, when selenium or Chromium is missing: CI installs both."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import markupsafe
import pytest
from PIL import Image

import imgcls
from imgcls.errors import ImgclsError
from imgcls.report import render_in_browser, write_report
from tests.conftest import CLASSES, train_tiny_run

REPOSITORY = Path(__file__).resolve().parents[1]
HEADINGS = ("Summary", "Data", "Training curves", "Per-class results", "Confusion matrix", "Most-confused pairs",
            "Errors", "Calibration", "Explanations", "Config", "Environment")
SECTION_IDS = ["summary", "data", "curves", "per-class", "confusion", "most-confused", "errors", "calibration",
               "explanations", "config", "environment"]
# every figure `imgcls eval` writes for a split (and curves.png for the run), all embedded in the report
FIGURES = ("curves.png", "confusion_{tag}.png", "confusion_{tag}_normalized.png", "reliability_{tag}.png",
           "mistakes_loss_{tag}.png", "mistakes_confident_{tag}.png", "gradcam_{tag}.png",
           "activations_{tag}.png", "projection_{tag}.png")
NOT_AVAILABLE = "Not available"


@pytest.fixture(scope="module")
def evaluated_run(shapes_folder, tmp_path_factory) -> Path:
    """A tiny real run (2 epochs of small_resnet, ~5 s), then `evaluate` with explanations (~5 s):
    every file the report reads, as the real code writes it."""
    run = train_tiny_run(shapes_folder, tmp_path_factory.mktemp("report") / "runs", tmp_path_factory)
    with pytest.MonkeyPatch.context() as patch:  # the decoded-image cache stays in the test's folders
        patch.setenv("IMGCLS_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        imgcls.evaluate(run, "test", quiet=True)  # explain=True: Grad-CAM, activation maps, t-SNE
    return run


def copy_run(run: Path, target: Path) -> Path:
    """A copy without the checkpoints' training state (the report reads only model.safetensors)."""
    return Path(shutil.copytree(run, target, ignore=shutil.ignore_patterns("*.ckpt")))


def image_sources(page: str) -> list[str]:
    return re.findall(r'<img[^>]*\ssrc="([^"]*)"', page)


# ----------------------------------------------------------------------------------------------------
# the HTML as text
# ----------------------------------------------------------------------------------------------------

def test_report_is_one_self_contained_file_with_every_section(evaluated_run):
    path = write_report(evaluated_run)
    assert path == evaluated_run / "report.html"
    page = path.read_text(encoding="utf-8")

    # self-contained: every image a data URI, no script, stylesheet or other file to fetch
    figures = [name.format(tag="test") for name in FIGURES]
    assert all((evaluated_run / name).is_file() for name in figures), "evaluate no longer writes every figure"
    sources = image_sources(page)
    assert len(sources) == len(figures)
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    assert 'src="' not in re.sub(r'src="data:[^"]*"', "", page)
    assert "<script" not in page and "<link rel=\"stylesheet\"" not in page and "url(" not in page

    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    for section in SECTION_IDS:
        assert f'id="{section}"' in page and f'href="#{section}"' in page  # anchors and their contents entry
    for name in CLASSES:
        assert f'<td class="text">{name}</td>' in page  # data and per-class tables
    assert str(markupsafe.escape((evaluated_run / "config.yaml").read_text())) in page  # as Jinja escapes it
    assert "small_resnet" in page and "evaluated split <strong>test</strong>" in page
    metrics = json.loads((evaluated_run / "metrics_test.json").read_text())
    assert f"{metrics['acc1'] * 100:.2f}%" in page  # the top-1 card
    assert NOT_AVAILABLE not in page  # a fully evaluated run has every part


def test_tables_show_pairs_rates_and_escape_text(evaluated_run, tmp_path):
    """Pairs, errors and per-class rows come from analysis_<tag>.json; names are escaped, never markup.
    (The tiny run classifies its 12 test images perfectly, so its own analysis has no pairs.)"""
    run = copy_run(evaluated_run, tmp_path / "run")
    analysis = json.loads((run / "analysis_test.json").read_text())
    odd = '<img src=x onerror="alert(1)">&co'
    analysis["most_confused"] = [{"class_a": odd, "class_b": "square", "a_as_b": 3, "a_as_b_rate": 0.375,
                                  "b_as_a": 1, "b_as_a_rate": 0.125, "total": 4}]
    analysis["errors"].update(errors=4, errors_true_in_top5=4, errors_true_in_top5_share=1.0,
                              confident_errors=1, confident_errors_share=0.25)
    analysis["per_class"] = [{"class": "square", "precision": 0.5, "recall": 0.25, "f1": 0.3333, "support": 4, "auroc": 0.75},
                             {"class": odd, "precision": 0.9, "recall": 0.9, "f1": 0.9, "support": 4, "auroc": None}]
    (run / "analysis_test.json").write_text(json.dumps(analysis))
    page = write_report(run).read_text()

    escaped = str(markupsafe.escape(odd))  # what Jinja's autoescape writes (quotes as &#34;)
    assert odd not in page and escaped in page
    pairs = page[page.index('<section id="most-confused">'):]
    row = re.search(r"<tr><td>1</td>(.*?)</tr>", pairs, re.S).group(1)  # the first most-confused row
    assert [cell for cell in re.findall(r"<td[^>]*>(.*?)</td>", row)] == [
        escaped, "square", "3", "37.5%", "1", "12.5%", "4"]
    assert "Most confused pair:" in page and "taken for square 3 times" in page
    assert "25.0% of the errors" in page  # confident errors
    per_class = page.index("<h2>Per-class results</h2>")
    assert page.index("square", per_class) < page.index(escaped, per_class)  # worst F1 first
    assert "0.333" in page and "—" in page  # an undefined AUROC is a dash


def test_missing_files_give_notes_not_errors(evaluated_run, tmp_path, caplog):
    # the imgcls logger stops propagating once training set up logging: listen to it directly
    logger = logging.getLogger("imgcls")
    logger.addHandler(caplog.handler)
    try:
        check_missing_files(evaluated_run, tmp_path, caplog)
    finally:
        logger.removeHandler(caplog.handler)


def check_missing_files(evaluated_run: Path, tmp_path: Path, caplog) -> None:
    run = copy_run(evaluated_run, tmp_path / "run")
    for pattern in ("analysis_*", "metrics_*", "*.png", "classification_report_*", "splits.csv", "env.json",
                    "metrics.csv", "summary.json"):
        for path in run.glob(pattern):
            path.unlink()
    shutil.rmtree(run / "checkpoints")
    page = write_report(run).read_text()

    for heading in HEADINGS:
        assert f"<h2>{heading}</h2>" in page
    assert image_sources(page) == []
    notes = re.findall(r'<p class="missing">(.*?)</p>', page, re.S)
    assert len(notes) >= 12  # metrics, data, per-class, confusion, pairs, errors, 2 galleries, 3 explanations, ...
    assert f"imgcls eval {run} --split test" in page  # each says what writes the missing part
    assert "env.json" in page and "splits.csv" in page
    assert "image_size: 32" in page  # what is there is still shown
    assert "analysis_test.json" in caplog.text  # and the console says what to run

    (run / "config.yaml").unlink()
    (run / "summary.json").write_text("{not json")
    page = write_report(run).read_text()
    assert "summary.json is not valid JSON" in page and "config.yaml" in page

    with pytest.raises(ImgclsError, match="run folder not found"):
        write_report(tmp_path / "no-such-run")


def test_run_without_a_test_split_reports_val(evaluated_run, tmp_path):
    """A run whose data has no test split is evaluated on val by training; the report follows."""
    run = copy_run(evaluated_run, tmp_path / "run")
    for path in run.glob("*_test*"):
        path.unlink()
    splits = (run / "splits.csv").read_text().splitlines()
    (run / "splits.csv").write_text("\n".join(line for line in splits if not line.endswith(",test")) + "\n")
    imgcls.evaluate(run, "val", quiet=True, explain=False)  # what train.py does for such a run
    page = write_report(run).read_text()

    assert "evaluated split <strong>val</strong>" in page
    assert len(image_sources(page)) == len(FIGURES) - 3  # all but the explanations, which explain=False skips
    assert page.count(NOT_AVAILABLE) == 3 and f"imgcls eval {run} --split val" in page
    assert "<th>test</th>" not in page  # the data table has train and val only


# ----------------------------------------------------------------------------------------------------
# in a browser
# ----------------------------------------------------------------------------------------------------

def test_report_renders_in_headless_chromium(evaluated_run, tmp_path):
    path = write_report(evaluated_run, path=tmp_path / "report.html")
    check = render_in_browser(path, screenshot_png=tmp_path / "report.png")

    assert check["ready_state"] == "complete"
    assert check["title"] == f"imgcls report: {evaluated_run.name}"
    assert check["images"] == len(FIGURES)
    assert check["broken_images"] == [] and check["external_images"] == []
    assert check["console_errors"] == []
    assert check["sections"] == SECTION_IDS
    with Image.open(check["screenshot"]) as image:
        assert image.size == (1200, check["height"])  # the whole page, not the first screen


def test_screenshot_script(evaluated_run, tmp_path):
    out = tmp_path / "shots" / "report.png"
    result = subprocess.run([sys.executable, str(REPOSITORY / "scripts" / "screenshot_report.py"), str(evaluated_run),
                             str(out), "--width", "1000"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (evaluated_run / "report.html").is_file() and f"{len(FIGURES)} images" in result.stdout
    with Image.open(out) as image:
        assert image.width == 1000 and image.height > 3000


def test_missing_browser_is_a_clear_error(tmp_path, monkeypatch):
    page = tmp_path / "page.html"
    page.write_text("<!DOCTYPE html><title>x</title>")
    monkeypatch.setenv("IMGCLS_CHROMIUM", str(tmp_path / "no-chromium"))
    with pytest.raises(ImgclsError, match=r"pip install selenium; apt-get install chromium chromium-driver"):
        render_in_browser(page)
    monkeypatch.delenv("IMGCLS_CHROMIUM")
    monkeypatch.setitem(sys.modules, "selenium", None)  # as if selenium were not installed
    with pytest.raises(ImgclsError, match=r"pip install selenium"):
        render_in_browser(page)


def test_files_of_another_shape_read_as_missing(evaluated_run, tmp_path):
    """Keys renamed or retyped in a later version of `imgcls eval` give notes, not a traceback."""
    run = copy_run(evaluated_run, tmp_path / "run")
    (run / "analysis_test.json").write_text(json.dumps({
        "most_confused": {"class_a": "circle"}, "errors": [1, 2], "per_class": "circle",
        "calibration": 3, "auroc": {"per_class": [0.5, 0.5, 0.5]}, "highest_loss": [None, {"path": 7}],
    }))
    (run / "metrics_test.json").write_text("[1, 2]")
    (run / "env.json").write_text('"a string"')
    page = write_report(run).read_text()
    assert "<h2>Most-confused pairs</h2>" in page
    assert "the error analysis (analysis_test.json)" in page and "the error summary" in page
    assert "Not available: env.json" in page
    assert '<td class="text">circle</td>' in page  # the per-class table falls back to the CSV report


def test_report_command_evaluates_what_is_missing_then_writes_the_report(shapes_folder, tmp_path, capsys):
    from imgcls.cli import main

    runs = tmp_path / "runs"
    assert main(["train", str(shapes_folder), "model.name=small_resnet", "data.image_size=32", "train.epochs=1",
                 "train.batch_size=16", "seed=0", f"run.dir={runs}", "run.name=r"]) == 0
    run = runs / "r"
    assert not (run / "gradcam_test.png").exists()  # training skips the slow explanations
    assert main(["report", str(run)]) == 0
    assert (run / "gradcam_test.png").is_file() and (run / "projection_test.png").is_file()
    text = (run / "report.html").read_text()
    assert NOT_AVAILABLE not in text and text.count("data:image/png;base64,") == len(FIGURES)
    assert main(["report", str(tmp_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err
