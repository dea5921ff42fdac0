"""`imgcls serve`: the HTTP prediction API and its upload page, against a tiny real model.

One small_resnet is trained for 2 epochs on generated shapes and exported to ONNX once per module
(~15 s); every test serves that model for real, with no mock between a request and the model:

- in process, through FastAPI's TestClient: /predict answers what `OnnxClassifier.predict` answers for
  the same real photos (labels, probabilities, top-k, rejection), and /health, /metadata, /docs and
  the OpenAPI schema are served;
- bad uploads (not an image, empty, a decompression bomb, too many bytes, not multipart, no `file`
  field) get a 4xx JSON answer that names the file, and the server keeps answering;
- uploads are parsed in memory: a 5 MB upload, over the 1 MB at which Starlette would spool it to a
  temporary file, writes nothing to disk;
- a real uvicorn server batches concurrent requests into shared forward passes;
- the upload page, in headless Chromium (Debian's chromium and chromium-driver), shows the model's label
  and top-k bars for a photo picked in its file input; it fails, never skips, when the browser is missing;
- `python -m imgcls serve model.onnx --port N` starts, answers and stops on SIGTERM.

Real photos are scikit-learn's sample images (china.jpg, flower.jpg) saved as JPEG files.
"""

from __future__ import annotations

import io
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

import imgcls
from imgcls.prediction import UNKNOWN, OnnxClassifier
from imgcls.serving import MAX_FILE_BYTES, MAX_REQUEST_BYTES, create_app
from tests.conftest import train_tiny_run

TOPK = 5  # the API's default top-k
STARLETTE_SPOOL_BYTES = 2**20  # Starlette's MultiPartParser spools a larger upload to a disk file
WAIT_SECONDS = 30  # for a server to start


# ----------------------------------------------------------------------------------------------------
# the model, the photos and the servers
# ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_path(shapes_folder, tmp_path_factory) -> Path:
    """A tiny real run (2 epochs of small_resnet, ~10 s) exported to ONNX (~3 s)."""
    run = train_tiny_run(shapes_folder, tmp_path_factory.mktemp("serve") / "runs", tmp_path_factory)
    imgcls.export(run)
    return run / "export" / "model.onnx"


@pytest.fixture(scope="module")
def classifier(onnx_path) -> OnnxClassifier:
    return OnnxClassifier(onnx_path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    """scikit-learn's two sample photos (427 x 640) as JPEG files."""
    from sklearn.datasets import load_sample_images

    folder = tmp_path_factory.mktemp("photos")
    sample = load_sample_images()
    paths = []
    for pixels, name in zip(sample.images, sample.filenames):
        path = folder / Path(name).name
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def client(classifier):
    """The app in process; the `with` runs its lifespan (the batcher)."""
    with TestClient(create_app(classifier)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def server_url(onnx_path):
    """A real uvicorn server in a background thread, batching for up to 50 ms; yields its URL."""
    app = create_app(OnnxClassifier(onnx_path), max_batch=32, max_wait_ms=50)
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listening]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the uvicorn server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)
    listening.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def upload(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    """The multipart `files` argument of httpx for these image files, in the field `file`."""
    return [("file", (path.name, path.read_bytes(), "image/jpeg")) for path in paths]


def expected_rows(classifier: OnnxClassifier, paths: list[Path], reject: str | float | None = None) -> list[dict]:
    """What `imgcls predict` answers for the files on disk."""
    rows = classifier.predict(paths, topk=TOPK, reject=reject)
    assert not any(row["error"] for row in rows)
    return rows


# ----------------------------------------------------------------------------------------------------
# the API in process
# ----------------------------------------------------------------------------------------------------

def test_predictions_equal_the_onnx_classifier_on_the_same_files(client, classifier, photos):
    response = client.post("/predict", files=upload(*photos))
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    expected = expected_rows(classifier, photos)
    assert [prediction["filename"] for prediction in predictions] == [path.name for path in photos]
    top = min(TOPK, len(classifier.class_names))
    for prediction, row in zip(predictions, expected):
        assert prediction["label"] == row["label"] != UNKNOWN
        assert prediction["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
        assert len(prediction["topk"]) == top
        for rank, entry in enumerate(prediction["topk"], start=1):
            assert entry["label"] == row[f"label_{rank}"]
            assert entry["probability"] == pytest.approx(row[f"prob_{rank}"], abs=1e-5)
        assert sum(entry["probability"] for entry in prediction["topk"]) == pytest.approx(1, abs=1e-5)


def test_topk_query_limits_the_entries(client, photos):
    response = client.post("/predict", params={"topk": 2}, files=upload(photos[0]))
    assert response.status_code == 200, response.text
    (prediction,) = response.json()["predictions"]
    assert len(prediction["topk"]) == 2
    assert prediction["topk"][0]["label"] == prediction["label"]


def test_reject_answers_unknown_below_the_threshold(client, classifier, photos):
    """reject=auto uses the threshold stored at calibration, as `predict --reject auto` does; a
    threshold above every confidence answers unknown, while the top-k still names the model's answer."""
    automatic = client.post("/predict", params={"reject": "auto"}, files=upload(*photos))
    assert automatic.status_code == 200, automatic.text
    expected = expected_rows(classifier, photos, reject="auto")
    assert [prediction["label"] for prediction in automatic.json()["predictions"]] == [row["label"] for row in expected]

    strict = client.post("/predict", params={"reject": "0.9999"}, files=upload(*photos))
    assert strict.status_code == 200, strict.text
    for prediction, row in zip(strict.json()["predictions"], expected_rows(classifier, photos)):
        assert row["confidence"] < 0.9999  # else this case tests nothing
        assert prediction["label"] == UNKNOWN
        assert prediction["topk"][0]["label"] == row["label"]

    invalid = client.post("/predict", params={"reject": "2"}, files=upload(photos[0]))
    assert invalid.status_code == 400 and "--reject 2" in invalid.json()["detail"]


def test_health_metadata_docs_and_openapi(client, classifier):
    health = client.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["engine"] == "onnxruntime"

    metadata = client.get("/metadata")
    assert metadata.status_code == 200
    assert metadata.json()["class_names"] == classifier.class_names
    assert metadata.json()["preprocessing"]["image_size"] == classifier.image_size
    assert metadata.json()["calibration"]["reject_threshold"] == pytest.approx(classifier.reject_threshold("auto"))

    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()

    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    body = schema.json()["paths"]["/predict"]["post"]["requestBody"]
    form = body["content"]["multipart/form-data"]["schema"]
    assert "file" in form["required"]
    assert form["properties"]["file"]["items"]["format"] == "binary"


def test_upload_page_is_served(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="file"' in page.text and 'id="reject"' in page.text


# ----------------------------------------------------------------------------------------------------
# bad uploads
# ----------------------------------------------------------------------------------------------------

def decompression_bomb() -> bytes:
    """A valid PNG of 10000 x 10000 black pixels (100 megapixels) in ~100 KB."""
    buffer = io.BytesIO()
    Image.new("L", (10_000, 10_000)).save(buffer, "PNG")
    return buffer.getvalue()


def random_bytes(size: int) -> bytes:
    """Noise that no image decoder reads."""
    return np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()


TOO_MANY_BYTES = 30_000_000
assert MAX_FILE_BYTES < TOO_MANY_BYTES < MAX_REQUEST_BYTES  # over the limit per file, under the one per request


def multipart(filename: str, content: bytes, content_type: str = "image/jpeg") -> dict:
    """httpx arguments that upload `content` as `filename` in the field `file`."""
    return {"files": {"file": (filename, content, content_type)}}


# the filename the answer names (None: no file was sent), the httpx arguments, the expected status
BAD_UPLOADS = [
    pytest.param("notes.txt", lambda: multipart("notes.txt", b"just some text\n" * 20, "text/plain"), 400,
                 id="not_an_image"),
    pytest.param("empty.jpg", lambda: multipart("empty.jpg", b""), 400, id="empty"),
    pytest.param("bomb.png", lambda: multipart("bomb.png", decompression_bomb(), "image/png"), 413,
                 id="decompression_bomb"),
    pytest.param("huge.jpg", lambda: multipart("huge.jpg", random_bytes(TOO_MANY_BYTES)), 413, id="too_many_bytes"),
    pytest.param(None, lambda: {"content": b"\xff\xd8\xff" + random_bytes(1000),
                                "headers": {"content-type": "image/jpeg"}}, 415, id="not_multipart"),
    pytest.param(None, lambda: {"data": {"image": "photo.jpg"}, "files": {"other": ("a.jpg", b"x")}}, 422,
                 id="no_file_field"),
]


@pytest.mark.parametrize("filename, arguments, status", BAD_UPLOADS)
def test_bad_upload_is_a_4xx_naming_the_file(client, photos, filename, arguments, status):
    """A 4xx JSON answer whose detail names the file; the next good request is still answered."""
    response = client.post("/predict", **arguments())
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["filename"] == filename
    assert answer["detail"]
    if filename is not None:
        assert filename in answer["detail"]

    after = client.post("/predict", files=upload(photos[0]))
    assert after.status_code == 200, after.text


# ----------------------------------------------------------------------------------------------------
# uploads stay in memory
# ----------------------------------------------------------------------------------------------------

def record_calls(monkeypatch, calls: list[str]) -> None:
    """Record every tempfile function that creates a disk file, and every SpooledTemporaryFile rollover."""

    def recording(name, original):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return original(*args, **kwargs)
        return wrapper

    for name in ("TemporaryFile", "NamedTemporaryFile", "mkstemp", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, recording(name, getattr(tempfile, name)))
    rollover = tempfile.SpooledTemporaryFile.rollover
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", recording("SpooledTemporaryFile.rollover", rollover))


def test_uploads_are_parsed_in_memory_never_spooled_to_disk(client, classifier, photos, tmp_path, monkeypatch):
    """A photo as an uncompressed BMP of ~5 MB: Starlette's parser would roll it over to a temporary
    file above 1 MB; the server's parser must keep it in memory."""
    with Image.open(photos[0]) as photo:
        large = photo.resize((photo.width * 5 // 2, photo.height * 5 // 2))
    path = tmp_path / "large.bmp"
    large.save(path)
    assert path.stat().st_size > 4 * STARLETTE_SPOOL_BYTES

    calls: list[str] = []
    record_calls(monkeypatch, calls)
    with tempfile.SpooledTemporaryFile(max_size=10) as probe:  # the recording sees a rollover
        probe.write(b"x" * 11)
    assert calls == ["SpooledTemporaryFile.rollover", "TemporaryFile"]
    calls.clear()

    response = client.post("/predict", files=[("file", (path.name, path.read_bytes(), "image/bmp"))])
    assert response.status_code == 200, response.text
    assert calls == [], f"the upload was written to disk: {calls}"
    (prediction,) = response.json()["predictions"]
    assert prediction["label"] == expected_rows(classifier, [path])[0]["label"]


# ----------------------------------------------------------------------------------------------------
# a real server: batching, the upload page in a browser, the command line
# ----------------------------------------------------------------------------------------------------

def counters(url: str) -> tuple[int, int]:
    health = httpx.get(f"{url}/health").json()
    return health["batches"], health["images"]


def test_concurrent_requests_share_batches(server_url, photos):
    requests = 16
    batches_before, images_before = counters(server_url)
    start = threading.Barrier(requests)

    def post(index: int) -> httpx.Response:
        start.wait()
        return httpx.post(f"{server_url}/predict", files=upload(photos[index % 2]), timeout=30)

    with ThreadPoolExecutor(requests) as pool:
        responses = list(pool.map(post, range(requests)))
    assert [response.status_code for response in responses] == [200] * requests
    batches_after, images_after = counters(server_url)
    assert images_after - images_before == requests
    batches = batches_after - batches_before
    assert batches < requests, f"{requests} concurrent images took {batches} forward passes: no batching"


def test_upload_page_in_headless_chromium(server_url, classifier, photos):
    """Pick a photo in the page's file input; the card shows the model's label and its top-k bars."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    # the headless Chromium of `imgcls report`: raises ImgclsError (the test fails) when it is missing
    from imgcls.report import _chromium

    photo = photos[0]
    with _chromium() as driver:
        driver.get(f"{server_url}/")
        driver.find_element(By.CSS_SELECTOR, "input#file").send_keys(str(photo))
        WebDriverWait(driver, 20).until(lambda browser: browser.find_elements(
            By.CSS_SELECTOR, "[data-testid=label], #status .error"))
        errors = driver.find_elements(By.CSS_SELECTOR, "#status .error")
        assert not errors, errors[0].text
        (label,) = driver.find_elements(By.CSS_SELECTOR, "[data-testid=label]")
        assert label.text == expected_rows(classifier, [photo])[0]["label"]
        card = driver.find_element(By.CSS_SELECTOR, ".result")
        assert card.get_attribute("data-filename") == photo.name
        bars = card.find_elements(By.CSS_SELECTOR, ".bar")
        assert len(bars) == min(TOPK, len(classifier.class_names))
        # each bar is drawn as long as its probability: the fill's share of a visibly wide track
        (row,) = expected_rows(classifier, [photo])
        for rank, bar in enumerate(bars, start=1):
            track = bar.find_element(By.CSS_SELECTOR, ".track").size["width"]
            fill = bar.find_element(By.CSS_SELECTOR, ".fill").size["width"]
            assert track > 100
            assert fill / track == pytest.approx(row[f"prob_{rank}"], abs=0.02)


def test_command_line_serves_an_onnx_file(onnx_path, classifier, photos, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("wb") as output:
        process = subprocess.Popen([sys.executable, "-m", "imgcls", "serve", str(onnx_path), "--port", str(port)],
                                   stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until_healthy(url, process, log)
        response = httpx.post(f"{url}/predict", files=upload(photos[1]), timeout=30)
        assert response.status_code == 200, response.text
        assert response.json()["predictions"][0]["label"] == expected_rows(classifier, [photos[1]])[0]["label"]
        process.terminate()
        assert process.wait(timeout=15) is not None
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, f"imgcls serve exited with {process.returncode}:\n{log.read_text()}"
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"imgcls serve did not answer /health in {WAIT_SECONDS} s:\n{log.read_text()}")
