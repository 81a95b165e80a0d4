"""The realtime model-querying HTTP service (FastAPI + uvicorn).

    expertpool serve --pool pool.db [--host 127.0.0.1] [--port 8000] [--workers N]

Endpoints (OpenAPI docs at ``/docs``):

* ``GET /healthz``
* ``GET /v1/tasks`` -> ``{"tasks": [{"name", "classes"}...], "input": {"shape", "mean", "std"}}``
* ``POST /v1/models`` ``{"tasks": [...]}`` or ``{"classes": [...], "only_requested": bool}``, ``"format":
  "onnx" | "safetensors" | "torch"`` -> ``{"model_id", "tasks", "labels", "label_groups", "input", "params",
  "flops", "build_ms", "artifact": {"url", "sha256", "bytes", ...}}``. ``model_id`` is a hash of the
  components' sha256 (from the pool) and the options: the same query gives the same id and is answered from
  a bounded in-memory LRU cache.
* ``GET /v1/models/{id}/artifact`` streams the exported file (built in memory, never from a request path).
* ``POST /v1/models/{id}/infer?k=5&resize=false``: PNG/JPEG images (raw ``image/png`` / ``image/jpeg`` body or
  multipart upload, any field name) or JSON ``{"tensor": [[[...]]], "normalize": false}``; returns the top-k
  labels with probabilities per image. Images are converted to the pool's channels (grey ``L`` or ``RGB``),
  scaled to [0, 1] and normalized with the pool's mean/std. An image of another size is refused (422) unless
  ``resize=true`` (bilinear). A JSON tensor is the model's input as it is (already normalized) unless
  ``"normalize": true`` (values in [0, 1]).

Every problem the client can fix is a 4xx JSON ``{"error": "..."}``: 404 unknown model id, 413 oversized
upload, 415 not a PNG/JPEG or unknown content type, 422 for everything else (unknown task or class, empty
query, duplicates, too many tasks, wrong image size, bad tensor).

The pool is opened once per process and its networks stay loaded; PyTorch runs with one intra-op thread
per worker by default (on 2 busy cores, two OpenMP threads per tiny forward were 100x slower than one):
scale with ``--workers``.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import UserError
from .export import MEDIA_TYPES, SUFFIX, Exporter

ID_RE = re.compile(r"^[0-9a-f]{32}$")
SPECS_ENV = "EXPERTPOOL_SERVICE_SPECS"
CONFIG_ENV = "EXPERTPOOL_SERVICE_CONFIG"


class ServiceError(UserError):
    """A client error with its HTTP status."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- schemas
class ModelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tasks: list[str] | None = Field(None, max_length=1000, description="primitive tasks, in output order",
                                    examples=[["light_tops", "warm_tops"]])
    classes: list[str | int] | None = Field(None, max_length=100000,
                                            description="class names or indices; the smallest set of tasks covering them is used")
    only_requested: bool = Field(False, description="drop the output rows of classes not asked for (class queries)")
    format: Literal["onnx", "safetensors", "torch"] = "onnx"


class InputSpec(BaseModel):
    shape: list[int]
    mean: list[float]
    std: list[float]


class Artifact(BaseModel):
    url: str
    sha256: str
    bytes: int
    format: str
    filename: str


class ModelAnswer(BaseModel):
    model_id: str
    tasks: list[str]
    labels: list[str]
    label_groups: dict[str, list[str]]
    input: InputSpec
    params: int
    flops: int
    build_ms: float = Field(description="composition time (library + experts, pruning), ms")
    artifact_ms: float = Field(description="time to export and verify the artifact, ms")
    cached: bool
    artifact: Artifact


class TaskInfo(BaseModel):
    name: str
    classes: list[str]


class TasksAnswer(BaseModel):
    tasks: list[TaskInfo]
    input: InputSpec


class TensorInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tensor: list = Field(description="[C, H, W] or [N, C, H, W] numbers")
    normalize: bool = Field(False, description="values are pixels in [0, 1]: apply the pool's mean/std")


class Prediction(BaseModel):
    label: str
    probability: float


class InferAnswer(BaseModel):
    model_id: str
    predictions: list[list[Prediction]]


# --------------------------------------------------------------------------- the model cache
class ModelService:
    """Queries -> composed models and their artifacts, with a bounded LRU cache keyed by ``model_id``."""

    def __init__(self, pool, max_tasks: int = 32, cache_size: int = 64, cache_mb: float = 512,
                 specs_dir: str | None = None):
        self.pool = pool
        self.max_tasks = max_tasks
        self.cache_size = cache_size
        self.cache_bytes = int(cache_mb * 2**20)
        self.cache: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.specs: collections.OrderedDict[str, dict] = collections.OrderedDict()  # id -> query, to rebuild
        self.specs_dir = Path(specs_dir) if specs_dir else None  # shared by the workers of one server
        self.exporter = Exporter()
        self.lock = threading.RLock()  # one build at a time (composition and export)
        self.cache_lock = threading.Lock()  # short: cache look-ups never wait for a build
        self.spec = pool.input_spec

    def describe(self) -> dict:
        with self.lock:
            return {"tasks": self.pool.describe_tasks(), "input": self.spec}

    def warm(self) -> None:
        """Load every component and the ONNX templates, so that the first query is fast too."""
        with self.lock:
            tasks = self.pool.tasks
            if tasks:
                self.pool.compose(tasks)
                self.exporter.onnx_bytes(self.pool.compose(tasks[:1]), self.spec)

    # ----------------------------------------------------------- resolving a query
    def _resolve(self, req: ModelRequest) -> tuple[list[str], list[int] | None]:
        """(tasks, class ids to keep or None) for a request; raises ServiceError for bad queries."""
        from .select import cover

        if req.tasks is not None and req.classes is not None:
            raise ServiceError("give either 'tasks' or 'classes', not both")
        if req.classes is not None:
            tasks, ids = cover(self.pool, req.classes)
            keep = sorted(ids) if req.only_requested else None
        else:
            tasks, keep = list(req.tasks or []), None
        if len(tasks) > self.max_tasks:
            raise ServiceError(f"too many tasks: {len(tasks)} (this server composes at most {self.max_tasks})")
        tasks = self.pool.check_query(tasks)
        if keep is not None and len(keep) == sum(len(self.pool.hierarchy.tasks[t]) for t in tasks):
            keep = None  # every class of the chosen tasks was asked for: nothing to drop
        return tasks, keep

    def model_id(self, tasks: list[str], keep: list[int] | None, fmt: str) -> str:
        from .store import expert_name

        parts = {"v": 1, "library": self.pool.library_sha256(),
                 "experts": [[t, self.pool.expert_sha256(t)] for t in tasks],
                 "keep": keep, "format": fmt, "input": self.spec}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]

    # ----------------------------------------------------------- building and caching
    def _cached(self, mid: str) -> dict | None:
        with self.cache_lock:
            entry = self.cache.get(mid)
            if entry is not None:
                self.cache.move_to_end(mid)
            return entry

    def query(self, req: ModelRequest) -> dict:
        tasks, keep = self._resolve(req)  # components are loaded at start (warm), so this only reads
        mid = self.model_id(tasks, keep, req.format)
        entry = self._cached(mid)
        if entry is not None:
            return {**entry["answer"], "cached": True}
        with self.lock:
            entry = self._cached(mid)  # built by another request while this one waited
            if entry is not None:
                return {**entry["answer"], "cached": True}
            entry = self._build(mid, tasks, keep, req.format)
            return {**entry["answer"], "cached": False}

    def _build(self, mid: str, tasks: list[str], keep: list[int] | None, fmt: str) -> dict:
        from .evaluate import count_flops, count_params
        from .select import only_requested

        t0 = time.perf_counter()
        model = self.pool.compose(tasks)
        if keep is not None:
            model = only_requested(model, keep)
        build_ms = (time.perf_counter() - t0) * 1000
        t1 = time.perf_counter()
        blob = self.exporter.to_bytes(model, fmt, self.spec)
        artifact_ms = (time.perf_counter() - t1) * 1000
        answer = {"model_id": mid, "tasks": model.tasks, "labels": model.labels, "label_groups": model.label_groups,
                  "input": self.spec, "params": count_params(model), "flops": count_flops(model, tuple(self.spec["shape"])),
                  "build_ms": round(build_ms, 3), "artifact_ms": round(artifact_ms, 3),
                  "artifact": {"url": f"/v1/models/{mid}/artifact", "sha256": hashlib.sha256(blob).hexdigest(),
                               "bytes": len(blob), "format": fmt, "filename": f"model-{mid[:12]}{SUFFIX[fmt]}"}}
        entry = {"model": model, "blob": blob, "answer": answer}
        with self.cache_lock:
            self.cache[mid] = entry
            while len(self.cache) > self.cache_size or (
                    len(self.cache) > 1 and sum(len(e["blob"]) for e in self.cache.values()) > self.cache_bytes):
                self.cache.popitem(last=False)
        self._remember(mid, {"tasks": tasks, "keep": keep, "format": fmt})
        return entry

    def _remember(self, mid: str, spec: dict) -> None:
        self.specs[mid] = spec
        while len(self.specs) > 100 * self.cache_size:
            self.specs.popitem(last=False)
        if self.specs_dir is not None:
            tmp = self.specs_dir / f".{mid}.{os.getpid()}"
            tmp.write_text(json.dumps(spec))
            os.replace(tmp, self.specs_dir / f"{mid}.json")

    def get(self, mid: str) -> dict:
        """The cache entry of ``mid``, rebuilt when it was evicted (or built by another worker); 404 if unknown."""
        if not ID_RE.match(mid):
            raise ServiceError(f"unknown model id {mid!r}", 404)
        entry = self._cached(mid)
        if entry is not None:
            return entry
        with self.lock:
            entry = self._cached(mid)
            if entry is not None:
                return entry
            spec = self.specs.get(mid)
            if spec is None and self.specs_dir is not None:  # the id is 32 hex digits: a safe file name
                f = self.specs_dir / f"{mid}.json"
                spec = json.loads(f.read_text()) if f.is_file() else None
            if spec is None:
                raise ServiceError(f"unknown model id {mid!r}; create it with POST /v1/models", 404)
            tasks = self.pool.check_query(spec["tasks"])
            if self.model_id(tasks, spec["keep"], spec["format"]) != mid:
                raise ServiceError(f"model {mid!r} is no longer available (its components changed)", 404)
            return self._build(mid, tasks, spec["keep"], spec["format"])

    # ----------------------------------------------------------- inference
    @staticmethod
    @torch.no_grad()
    def predict(model, x: torch.Tensor, k: int) -> list[list[dict]]:
        probs = model(x).softmax(dim=1)
        top = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"label": model.labels[j], "probability": round(float(p), 6)} for p, j in zip(ps, js)]
                for ps, js in zip(top.values.tolist(), top.indices.tolist())]


# --------------------------------------------------------------------------- inputs
def image_tensor(data: bytes, spec: dict, resize: bool, max_pixels: int = 4096 * 4096) -> torch.Tensor:
    """A PNG/JPEG as a normalized [C, H, W] tensor for the pool; ServiceError for anything else."""
    from PIL import Image, UnidentifiedImageError

    c, h, w = spec["shape"]
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ServiceError("not a PNG or JPEG image", 415) from None
    if img.format not in ("PNG", "JPEG"):
        raise ServiceError(f"{img.format} images are not accepted; send PNG or JPEG", 415)
    if img.width * img.height > max_pixels:
        raise ServiceError(f"image of {img.width}x{img.height} pixels is too large", 413)
    if (img.width, img.height) != (w, h):
        if not resize:
            raise ServiceError(f"image is {img.width}x{img.height}; this pool's models take {w}x{h} "
                               "(send ?resize=true to resize it)")
    mode = {1: "L", 3: "RGB"}.get(c)
    if mode is None:
        raise ServiceError(f"this pool's models take {c} channels; only tensors can be sent to it")
    try:
        img = img.convert(mode)
        if (img.width, img.height) != (w, h):
            img = img.resize((w, h), Image.BILINEAR)
        arr = np.asarray(img, dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise ServiceError(f"cannot decode image ({e})") from None
    x = torch.from_numpy(arr.reshape(h, w, c).transpose(2, 0, 1).copy())
    return normalize(x, spec)


def normalize(x: torch.Tensor, spec: dict) -> torch.Tensor:
    mean = torch.tensor(spec["mean"], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec["std"], dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


def json_tensor(body: bytes, spec: dict, max_batch: int) -> torch.Tensor:
    try:
        inp = TensorInput.model_validate_json(body)
    except ValueError as e:
        raise ServiceError(f"bad JSON tensor: {str(e).splitlines()[0]}") from None
    try:
        x = torch.tensor(inp.tensor, dtype=torch.float32)
    except (TypeError, ValueError) as e:
        raise ServiceError(f"'tensor' must be a rectangular array of numbers ({e})") from None
    shape = tuple(spec["shape"])
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.dim() != 4 or tuple(x.shape[1:]) != shape or x.shape[0] == 0:
        raise ServiceError(f"'tensor' has shape {list(x.shape)}; expected {list(shape)} or [N, {', '.join(map(str, shape))}]")
    if x.shape[0] > max_batch:
        raise ServiceError(f"too many images: {x.shape[0]} (at most {max_batch} per request)")
    if not torch.isfinite(x).all():
        raise ServiceError("'tensor' holds NaN or infinite values")
    return normalize(x, spec) if inp.normalize else x


async def read_limited(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ServiceError(f"upload of {int(declared)} bytes is over this server's limit of {limit} bytes", 413)
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise ServiceError(f"upload is over this server's limit of {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


async def multipart_files(request: Request, body: bytes, max_files: int) -> list[bytes]:
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=max_files)
    except StarletteHTTPException as e:
        raise ServiceError(f"bad multipart upload: {e.detail}", 413 if "exceed" in str(e.detail).lower() else 422) from None
    except Exception as e:  # malformed multipart bodies
        raise ServiceError(f"bad multipart upload ({type(e).__name__})") from None
    files = [await v.read() for _, v in form.multi_items() if hasattr(v, "read")]
    await form.close()
    if not files:
        raise ServiceError("the multipart upload holds no file")
    return files


# --------------------------------------------------------------------------- the app
def create_app(pool, max_tasks: int = 32, cache_size: int = 64, max_upload_bytes: int = 4 * 2**20,
               max_batch: int = 64, specs_dir: str | None = None, warm: bool = True, threads: int | None = 1) -> FastAPI:
    """The FastAPI app over ``pool`` (a path, opened once here, or an open ``Pool``)."""
    from . import __version__
    from .pool import open_pool

    if threads:
        torch.set_num_threads(threads)
    if isinstance(pool, (str, os.PathLike)):
        pool = open_pool(pool)
    service = ModelService(pool, max_tasks=max_tasks, cache_size=cache_size, specs_dir=specs_dir)
    if warm:
        service.warm()

    app = FastAPI(title="expertpool", version=__version__,
                  description="Pool of Experts: realtime, train-free composite models (Kim & Choi, SIGMOD 2021).")
    app.state.service = service

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError):
        return JSONResponse({"error": str(exc)}, status_code=getattr(exc, "status", 422))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        msgs = [f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
                for e in exc.errors()]
        return JSONResponse({"error": "; ".join(msgs)[:2000]}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})"}, status_code=500)

    @app.middleware("http")
    async def _limit_body(request: Request, call_next):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_upload_bytes:
            return JSONResponse({"error": f"request body of {declared} bytes is over this server's limit of "
                                          f"{max_upload_bytes} bytes"}, status_code=413)
        return await call_next(request)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok", "tasks": len(service.pool.tasks), "cached_models": len(service.cache)}

    @app.get("/v1/tasks", response_model=TasksAnswer)
    def tasks() -> dict:
        return service.describe()

    @app.post("/v1/models", response_model=ModelAnswer)
    def models(req: ModelRequest) -> dict:
        return service.query(req)

    @app.get("/v1/models/{model_id}/artifact", response_class=StreamingResponse,
             responses={200: {"content": {"application/octet-stream": {}}}})
    def artifact(model_id: str):
        entry = service.get(model_id)
        blob, art = entry["blob"], entry["answer"]["artifact"]

        def chunks():
            step = 1 << 16
            for i in range(0, len(blob), step):
                yield blob[i:i + step]

        return StreamingResponse(chunks(), media_type=MEDIA_TYPES[art["format"]],
                                 headers={"Content-Length": str(len(blob)), "X-Sha256": art["sha256"],
                                          "Content-Disposition": f'attachment; filename="{art["filename"]}"'})

    @app.post("/v1/models/{model_id}/infer", response_model=InferAnswer,
              openapi_extra={"requestBody": {"content": {
                  "application/json": {"schema": TensorInput.model_json_schema()},
                  "multipart/form-data": {"schema": {"type": "object", "properties": {
                      "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
                  "image/png": {"schema": {"type": "string", "format": "binary"}},
                  "image/jpeg": {"schema": {"type": "string", "format": "binary"}}}}})
    async def infer(model_id: str, request: Request, k: int = Query(5, ge=1, le=1000),
                    resize: bool = Query(False, description="resize images of another size (bilinear)")):
        entry = await run_in_threadpool(service.get, model_id)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        body = await read_limited(request, max_upload_bytes)
        if ctype == "application/json":
            x = json_tensor(body, service.spec, max_batch)
        elif ctype in ("image/png", "image/jpeg"):
            x = image_tensor(body, service.spec, resize).unsqueeze(0)
        elif ctype == "multipart/form-data":
            files = await multipart_files(request, body, max_batch)
            x = torch.stack([image_tensor(f, service.spec, resize) for f in files])
        else:
            raise ServiceError(f"unsupported content type {ctype or '(none)'!r}; send image/png, image/jpeg, "
                               "multipart/form-data or application/json", 415)
        preds = await run_in_threadpool(service.predict, entry["model"], x, k)
        return {"model_id": model_id, "predictions": preds}

    return app


def app_from_env() -> FastAPI:
    """Factory used by uvicorn's worker processes (``--workers N``): settings come from the environment."""
    cfg = json.loads(os.environ[CONFIG_ENV])
    return create_app(cfg.pop("pool"), specs_dir=os.environ.get(SPECS_ENV), **cfg)


def serve(pool: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 1, log_level: str = "info",
          **limits) -> None:
    import uvicorn

    if workers <= 1:
        uvicorn.run(create_app(pool, **limits), host=host, port=port, log_level=log_level)
        return
    from .pool import open_pool

    open_pool(pool).close()  # fail early, in the parent, on a bad pool
    with tempfile.TemporaryDirectory(prefix="expertpool-specs-") as specs:  # private (0700) to this server
        os.environ[CONFIG_ENV] = json.dumps({"pool": str(pool), **limits})
        os.environ[SPECS_ENV] = specs
        uvicorn.run("expertpool.service:app_from_env", factory=True, host=host, port=port, workers=workers,
                    log_level=log_level)
