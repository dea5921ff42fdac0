"""`imgcls serve`: an HTTP prediction API with an upload page, on FastAPI + uvicorn.

    POST /predict   multipart form, one or more images in the field `file`; ?reject=auto|0.8, ?topk=5
                    (a multi-label model: the label sets; ?threshold=0.5 for every label)
    GET  /health    {"status": "ok", ...}
    GET  /metadata  class names, preprocessing, calibration and the run's metrics
    GET  /docs      OpenAPI (Swagger UI)
    GET  /          an upload page: pick or drop images, see the top-k as bars

FastAPI + uvicorn rather than LitServe: both batch, but FastAPI is the stack most Python services
already run, its OpenAPI page comes free, and it adds nothing between a request and our own batcher.

Requests are batched on the server: uploads are decoded in worker threads (the same `load_square`
as training), queued, and one inference thread runs up to `max_batch` images per forward pass: those
that arrived while the previous pass ran (see `Batcher`). Uploads are parsed in memory and never written to disk;
one that is not an image, empty, too large or a decompression bomb gets a 4xx JSON answer that names
the file, and the server keeps serving.

No `from __future__ import annotations` here: FastAPI reads the route functions' annotations at run
time, and `Request` is imported inside `create_app` (FastAPI is optional).
"""

import asyncio
import io
import logging
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from imgcls.errors import ImgclsError
from imgcls.prediction import OnnxClassifier, Predictor, imgcls_version, load

__all__ = ["serve", "create_app", "load_engine", "MAX_FILE_BYTES", "MAX_REQUEST_BYTES", "MAX_PIXELS"]

log = logging.getLogger("imgcls")

MAX_FILE_BYTES = 20 * 2**20  # one upload; a 24-megapixel JPEG is 5-15 MB
MAX_REQUEST_BYTES = 64 * 2**20  # a whole request (several files)
MAX_PIXELS = 50_000_000  # width x height of one upload: larger is refused before it is decoded
PAGE = Path(__file__).parent / "templates" / "serve.html"

Engine = Literal["auto", "onnx", "torch"]


class UploadError(Exception):
    """A bad upload: answered with `status` and {"detail": message, "filename": filename}."""

    def __init__(self, status: int, message: str, filename: str | None = None):
        super().__init__(message)
        self.status, self.message, self.filename = status, message, filename


# ----------------------------------------------------------------------------------------------------
# the model, and the batches it runs


def load_engine(model: str | Path, engine: Engine = "auto") -> Predictor:
    """The predictor to serve: an .onnx file runs in ONNX Runtime; a run folder (or model.safetensors)
    in ONNX Runtime too when it is installed (exported in memory at start, with the parity check of
    `imgcls export`), since it answered faster than eager PyTorch on CPU in benchmarks/inference.py;
    `engine="torch"` keeps PyTorch.

    Raises:
        ImgclsError: a missing model, or engine="onnx" without onnxruntime.
    """
    if str(model).endswith(".onnx"):
        if engine == "torch":
            raise ImgclsError("--engine torch needs a run folder or model.safetensors, not an .onnx file")
        return OnnxClassifier(model, spinning=False)
    classifier = load(model, device="auto")
    if engine == "torch":
        return classifier
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        if engine == "onnx":
            raise ImgclsError("--engine onnx needs onnxruntime and onnxscript: pip install 'imgcls[export]'") from None
        log.info("serving with PyTorch (pip install 'imgcls[export]' to serve with ONNX Runtime)")
        return classifier
    from imgcls.exporting import onnx_in_memory

    try:
        return onnx_in_memory(classifier, spinning=False)
    except Exception as error:  # an operation the exporter lacks, or failed parity: PyTorch still serves
        if engine == "onnx":
            raise
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        log.warning(f"serving with PyTorch: the model could not be exported to ONNX ({reason})")
        return classifier


@dataclass
class _Pending:
    image: np.ndarray  # uint8 HWC
    future: asyncio.Future


@dataclass
class Batcher:
    """Collects decoded images from concurrent requests into batches of up to `max_batch` for one
    inference thread.

    A batch is whatever waits when the inference thread becomes free: alone, a request runs at once
    (a fixed wait would add its whole length to every request at low load); under load, the images that
    arrived while the previous batch ran go together. `max_wait_ms` > 0 also lets a batch's first image
    wait that long for more (fuller batches for slow models, at that cost in latency).
    """

    predictor: Predictor
    max_batch: int = 32
    max_wait_ms: float = 0.0
    batches: int = 0
    images: int = 0
    queue: asyncio.Queue | None = None  # made, with the executor, when the app starts (in its event loop)
    executor: ThreadPoolExecutor | None = None

    async def probabilities(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Calibrated probabilities of each uint8 HWC image, computed in the shared batches."""
        loop = asyncio.get_running_loop()
        pending = [_Pending(image, loop.create_future()) for image in images]
        for item in pending:
            self.queue.put_nowait(item)
        return list(await asyncio.gather(*(item.future for item in pending)))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # one turn of the event loop: requests decoded meanwhile join the batch
            deadline = loop.time() + self.max_wait_ms / 1000
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            images = np.ascontiguousarray(np.stack([item.image for item in batch]).transpose(0, 3, 1, 2))
            try:
                probabilities = await loop.run_in_executor(self.executor, self.predictor.batch_probabilities, images)
            except Exception as error:  # answer the waiting requests (500), keep serving the next ones
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            self.batches, self.images = self.batches + 1, self.images + len(batch)
            for item, row in zip(batch, probabilities):
                if not item.future.done():  # the client may have gone
                    item.future.set_result(row)


# ----------------------------------------------------------------------------------------------------
# uploads: read in memory, decoded as in training


async def _read_body(request) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_REQUEST_BYTES:
        raise UploadError(413, f"the request is {int(declared) / 2**20:.1f} MiB; send at most "
                               f"{MAX_REQUEST_BYTES // 2**20} MiB per request (fewer files at a time)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_REQUEST_BYTES:
            raise UploadError(413, f"the request is over {MAX_REQUEST_BYTES // 2**20} MiB; send fewer files at a time")
        chunks.append(chunk)
    return b"".join(chunks)


async def _uploaded_files(request) -> list[tuple[str, bytes]]:
    """(filename, bytes) of every part in the field `file`, parsed in memory."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    class InMemoryParser(MultiPartParser):
        spool_max_size = MAX_REQUEST_BYTES + 1  # SpooledTemporaryFile: never rolls over to a disk file

    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise UploadError(415, "send the images as multipart/form-data in the field 'file' "
                               "(curl -F file=@photo.jpg ...)")
    body = await _read_body(request)

    async def stream():
        yield body

    try:
        form = await InMemoryParser(request.headers, stream(), max_files=256, max_fields=64).parse()
    except MultiPartException as error:
        raise UploadError(400, f"malformed multipart body: {error}") from None
    files = []
    for item in form.getlist("file"):
        if isinstance(item, str):
            raise UploadError(422, "the field 'file' holds text, not a file; upload the image itself "
                                   "(curl -F file=@photo.jpg)")
        files.append((item.filename or "upload", await item.read()))
    if not files:
        raise UploadError(422, "no file in the field 'file'; send one or more images as file=@photo.jpg")
    return files


def _decode(name: str, data: bytes, size: int, resize: str) -> np.ndarray:
    """One upload to a square uint8 HWC image, by the decoding training used.

    Raises:
        UploadError: empty, too large (bytes or pixels, checked before decoding), or not an image.
    """
    from PIL import Image

    from imgcls.data.images import fit_to_square, load_image

    if not data:
        raise UploadError(400, f"{name}: the file is empty", name)
    if len(data) > MAX_FILE_BYTES:
        raise UploadError(413, f"{name}: {len(data) / 2**20:.1f} MiB is over the {MAX_FILE_BYTES // 2**20} MiB "
                               "limit per file; resize the image first", name)
    try:
        with warnings.catch_warnings():  # the size is checked below, with the file's name
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except Exception:
        raise UploadError(400, f"{name}: not an image that can be read (JPEG, PNG, WebP, BMP, TIFF or GIF)",
                          name) from None
    if width * height > MAX_PIXELS:
        raise UploadError(413, f"{name}: {width} x {height} pixels is over the {MAX_PIXELS / 1e6:.0f} megapixels "
                               "this server decodes (a decompression bomb?); resize the image first", name)
    try:
        return fit_to_square(load_image(io.BytesIO(data), draft_size=size), size, resize)
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UploadError(400, f"{name}: the image cannot be decoded ({reason})", name) from None


def _answer(filename: str, row: dict[str, Any], topk: int) -> dict[str, Any]:
    """A `Predictor.answers` row in the API's shape (multi-label: the label set and every label's
    probability)."""
    if "label_set" in row:
        return {"filename": filename, "labels": row["label_set"],
                "probabilities": {key.removeprefix("prob_"): value for key, value in row.items() if key.startswith("prob_")}}
    ranks = range(1, topk + 1)
    return {"filename": filename, "label": row["label"], "confidence": row["confidence"],
            "topk": [{"label": row[f"label_{rank}"], "probability": row[f"prob_{rank}"]} for rank in ranks]}


# ----------------------------------------------------------------------------------------------------
# the application


def create_app(predictor: Predictor, max_batch: int = 32, max_wait_ms: float = 0.0, engine: str = ""):
    """The FastAPI application serving `predictor` (see the module docstring for the routes)."""
    try:
        from fastapi import FastAPI, Request
        from fastapi.responses import HTMLResponse, JSONResponse
    except ImportError:
        raise ImgclsError("imgcls serve needs FastAPI and uvicorn: pip install 'imgcls[serve]'") from None
    from contextlib import asynccontextmanager

    batcher = Batcher(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms)
    decoders: ThreadPoolExecutor | None = None
    engine = engine or ("onnxruntime" if isinstance(predictor, OnnxClassifier) else "torch")
    started = time.time()

    @asynccontextmanager
    async def lifespan(_app):
        # made at every start, so that one app can be started again (as tests do)
        nonlocal decoders
        decoders = ThreadPoolExecutor(4, thread_name_prefix="decode")  # PIL releases the GIL while decoding
        batcher.executor = ThreadPoolExecutor(1, thread_name_prefix="inference")
        batcher.queue = asyncio.Queue()
        task = asyncio.create_task(batcher.run())
        yield
        task.cancel()
        batcher.executor.shutdown(wait=False)
        decoders.shutdown(wait=False)

    app = FastAPI(title="imgcls", version=imgcls_version(), lifespan=lifespan,
                  description=f"Image classification with {predictor.metadata.get('model_name', 'a model')} "
                              f"over {len(predictor.class_names)} classes.")

    @app.exception_handler(UploadError)
    async def upload_error(_request, error: UploadError):
        return JSONResponse({"detail": error.message, "filename": error.filename}, status_code=error.status)

    @app.exception_handler(ImgclsError)
    async def imgcls_error(_request, error: ImgclsError):
        return JSONResponse({"detail": str(error), "filename": None}, status_code=400)

    upload_schema = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "required": ["file"],
        "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                "description": "one or more images (JPEG, PNG, WebP, BMP, TIFF, GIF)"}}}}}}}

    @app.post("/predict", openapi_extra=upload_schema,
              summary="Classify one or more images (multipart field 'file')")
    async def predict(request: Request, reject: str | None = None, topk: int = 5,
                      threshold: float | None = None) -> dict[str, Any]:
        """Top-k labels with calibrated probabilities; `reject=auto` (the stored threshold) or a
        confidence answers `unknown` below it. A multi-label model answers the set of labels that reach
        their thresholds (the stored ones; `threshold` for all), with every label's probability."""
        decision = predictor.decision(reject, threshold)
        topk = max(1, min(topk, len(predictor.class_names)))
        files = await _uploaded_files(request)
        loop = asyncio.get_running_loop()
        images = await asyncio.gather(*(
            loop.run_in_executor(decoders, _decode, name, data, predictor.image_size, predictor.resize)
            for name, data in files), return_exceptions=True)
        for outcome in images:
            if isinstance(outcome, BaseException):
                raise outcome
        probabilities = await batcher.probabilities(list(images))
        rows = predictor.answers(np.stack(probabilities), topk, decision)
        return {"predictions": [_answer(name, row, topk) for (name, _), row in zip(files, rows)]}

    @app.get("/health", summary="Liveness and counters")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "engine": engine, "uptime_seconds": round(time.time() - started, 1),
                "batches": batcher.batches, "images": batcher.images}

    @app.get("/metadata", summary="Classes, preprocessing, calibration and metrics of the model")
    async def metadata() -> dict[str, Any]:
        stored = predictor.metadata
        calibration = stored.get("calibration") or {}
        return {
            "model_name": stored.get("model_name"), "class_names": predictor.class_names,
            "preprocessing": stored.get("preprocessing"),
            "task": predictor.task.name,
            "calibration": {"temperature": predictor.temperature,
                            "reject_threshold": (calibration.get("reject") or {}).get("threshold"),
                            "thresholds": calibration.get("thresholds")},
            "metrics": stored.get("metrics"), "epoch": stored.get("epoch"),
            "engine": engine, "max_batch": max_batch, "imgcls_version": imgcls_version(),
            "limits": {"bytes_per_file": MAX_FILE_BYTES, "bytes_per_request": MAX_REQUEST_BYTES,
                       "pixels_per_image": MAX_PIXELS},
        }

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> str:
        return PAGE.read_text(encoding="utf-8")

    return app


def serve(model: str | Path, host: str = "127.0.0.1", port: int = 8000, engine: Engine = "auto",
          max_batch: int = 32, max_wait_ms: float = 0.0) -> None:
    """Serve `model` (a run folder, model.safetensors or model.onnx) until interrupted."""
    try:
        import uvicorn
    except ImportError:
        raise ImgclsError("imgcls serve needs FastAPI and uvicorn: pip install 'imgcls[serve]'") from None
    if max_batch < 1:
        raise ImgclsError(f"--max-batch {max_batch}: give at least 1")
    predictor = load_engine(model, engine)
    app = create_app(predictor, max_batch=max_batch, max_wait_ms=max_wait_ms)
    log.info(f"serving {model} ({len(predictor.class_names)} classes) on http://{host}:{port}/  "
             f"(API docs at /docs; Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
