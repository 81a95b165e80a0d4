"""The HTTP service, tested over real HTTP: a uvicorn server on a free loopback port, talked to with httpx."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
import time

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from expertpool import open_pool
from expertpool.export import load_safetensors, read_onnx_metadata


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(tiny_pool_path):
    """Base URL of a real server over the tiny pool (at most 3 tasks per query, 64 KiB uploads)."""
    import uvicorn

    from expertpool.service import create_app

    app = create_app(str(tiny_pool_path), max_tasks=3, max_upload_bytes=64 * 1024)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    else:
        pytest.fail("server did not start")
    yield url
    srv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def pool(tiny_pool_path):
    return open_pool(tiny_pool_path)


def _png(size: tuple[int, int], mode: str = "RGB", fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(0)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, fmt)
    return buf.getvalue()


def _error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]
    return body["error"]


def test_health_and_tasks(client, pool):
    assert client.get("/healthz").json()["status"] == "ok"
    body = client.get("/v1/tasks").json()
    assert body["tasks"] == pool.describe_tasks()
    assert body["input"] == {k: list(v) for k, v in pool.input_spec.items()}
    assert client.get("/docs").status_code == 200


def test_two_task_model_contract_and_onnx_artifact(client, pool):
    tasks = pool.tasks[:2]
    r = client.post("/v1/models", json={"tasks": tasks, "format": "onnx"})
    assert r.status_code == 200, r.text
    a = r.json()
    model = pool.compose(tasks)
    assert {"model_id", "labels", "label_groups", "input", "params", "flops", "build_ms", "artifact"} <= set(a)
    assert a["labels"] == model.labels and a["label_groups"] == model.label_groups
    assert a["input"]["shape"] == list(pool.input_shape)
    assert a["params"] == sum(p.numel() for p in model.parameters()) and a["flops"] > 0 and a["build_ms"] >= 0
    art = client.get(a["artifact"]["url"])
    assert art.status_code == 200
    assert len(art.content) == a["artifact"]["bytes"]
    assert hashlib.sha256(art.content).hexdigest() == a["artifact"]["sha256"]
    assert read_onnx_metadata(art.content)["labels"] == model.labels
    sess = ort.InferenceSession(art.content, providers=["CPUExecutionProvider"])
    x = torch.randn(4, *pool.input_shape)
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(sess.run(None, {"input": x.numpy()})[0] - want).max() < 1e-4


def test_same_query_same_id_from_cache(client, pool):
    q = {"tasks": [pool.tasks[1], pool.tasks[0]], "format": "safetensors"}
    first, second = client.post("/v1/models", json=q).json(), client.post("/v1/models", json=q).json()
    assert first["model_id"] == second["model_id"] and second["cached"]
    assert first["artifact"]["sha256"] == second["artifact"]["sha256"]
    other = client.post("/v1/models", json={**q, "format": "onnx"}).json()
    assert other["model_id"] != first["model_id"]
    reordered = client.post("/v1/models", json={**q, "tasks": q["tasks"][::-1]}).json()
    assert reordered["model_id"] != first["model_id"]  # output columns differ


def test_bad_queries_get_4xx_json_and_server_keeps_serving(client, pool):
    assert "unknown task 'nope'" in _error(client.post("/v1/models", json={"tasks": ["nope"]}), 422)
    assert "empty query" in _error(client.post("/v1/models", json={"tasks": []}), 422)
    assert "empty query" in _error(client.post("/v1/models", json={}), 422)
    assert "duplicate" in _error(client.post("/v1/models", json={"tasks": [pool.tasks[0]] * 2}), 422)
    assert "too many tasks" in _error(client.post("/v1/models", json={"tasks": pool.tasks[:4]}), 422)
    assert "unknown class" in _error(client.post("/v1/models", json={"classes": ["no_such_class"]}), 422)
    assert "format" in _error(client.post("/v1/models", json={"tasks": pool.tasks[:1], "format": "pickle"}), 422)
    assert "not both" in _error(client.post("/v1/models", json={"tasks": pool.tasks[:1], "classes": [0]}), 422)
    _error(client.post("/v1/models", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert "unknown model id" in _error(client.get("/v1/models/" + "0" * 32 + "/artifact"), 404)
    _error(client.get("/v1/models/..%2F..%2Fetc%2Fpasswd/artifact"), 404)
    _error(client.post("/v1/models/deadbeef/infer", content=_png((4, 4)), headers={"content-type": "image/png"}), 404)
    assert client.get("/v1/tasks").status_code == 200


def test_class_query_picks_the_covering_tasks(client, pool):
    t0, t2 = pool.tasks[0], pool.tasks[2]
    classes = [pool.task_classes(t2)[1], pool.task_classes(t0)[0]]
    a = client.post("/v1/models", json={"classes": classes}).json()
    assert a["tasks"] == [t0, t2] and a["labels"] == pool.task_classes(t0) + pool.task_classes(t2)
    same = client.post("/v1/models", json={"tasks": [t0, t2]}).json()
    assert same["model_id"] == a["model_id"]  # the same parts and options: the same model


def test_only_requested_drops_rows_and_keeps_logits(client, pool):
    t0, t2 = pool.tasks[0], pool.tasks[2]
    classes = [pool.task_classes(t2)[1], pool.task_classes(t0)[0]]
    a = client.post("/v1/models", json={"classes": classes, "only_requested": True, "format": "safetensors"}).json()
    assert a["labels"] == [pool.task_classes(t0)[0], pool.task_classes(t2)[1]]
    assert a["label_groups"] == {t0: [pool.task_classes(t0)[0]], t2: [pool.task_classes(t2)[1]]}
    full = pool.compose([t0, t2])
    assert a["params"] == sum(p.numel() for p in full.parameters()) - 4 * (full.experts[0].fc.in_features + 1)
    pruned = load_safetensors(client.get(a["artifact"]["url"]).content)
    assert pruned.labels == a["labels"]
    cols = [full.labels.index(label) for label in pruned.labels]
    # the kept rows are the very same weights ...
    assert torch.equal(pruned.experts[0].fc.weight, full.experts[0].fc.weight[[0]])
    assert torch.equal(pruned.experts[1].fc.bias, full.experts[1].fc.bias[[1]])
    # ... so the logits are the full model's on those columns (up to GEMM summation order)
    x = torch.randn(8, *pool.input_shape)
    with torch.no_grad():
        assert torch.allclose(pruned(x), full(x)[:, cols], rtol=0, atol=1e-5)


def test_torch_format_is_a_torch_export_program(client, pool):
    a = client.post("/v1/models", json={"tasks": pool.tasks[:1], "format": "torch"}).json()
    program = torch.export.load(io.BytesIO(client.get(a["artifact"]["url"]).content))
    x = torch.randn(3, *pool.input_shape)
    with torch.no_grad():
        assert (program.module()(x) - pool.compose(pool.tasks[:1])(x)).abs().max() < 1e-5


def test_infer_on_images_and_tensors(client, pool):
    tasks = pool.tasks[:2]
    mid = client.post("/v1/models", json={"tasks": tasks}).json()["model_id"]
    labels = set(pool.task_classes(tasks[0]) + pool.task_classes(tasks[1]))
    c, h, w = pool.input_shape
    png = _png((w, h))
    r = client.post(f"/v1/models/{mid}/infer?k=3", files=[("file", ("a.png", png, "image/png")),
                                                         ("file", ("b.jpg", _png((w, h), "L", "JPEG"), "image/jpeg"))])
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert len(preds) == 2 and all(len(p) == 3 for p in preds)
    assert {p["label"] for p in preds[0]} <= labels and preds[0][0]["probability"] >= preds[0][1]["probability"]
    # the same image as a raw body, and as a JSON tensor normalized by the server, gives the same answer
    raw = client.post(f"/v1/models/{mid}/infer?k=3", content=png, headers={"content-type": "image/png"}).json()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255
    tensor = client.post(f"/v1/models/{mid}/infer?k=3", json={"tensor": pixels.tolist(), "normalize": True}).json()
    assert raw["predictions"][0] == preds[0] == tensor["predictions"][0]
    # bad inputs
    assert "resize=true" in _error(client.post(f"/v1/models/{mid}/infer", content=_png((w + 3, h)),
                                               headers={"content-type": "image/png"}), 422)
    assert client.post(f"/v1/models/{mid}/infer?resize=true", content=_png((w + 3, h)),
                       headers={"content-type": "image/png"}).status_code == 200
    _error(client.post(f"/v1/models/{mid}/infer", files={"file": ("a.txt", b"hello", "text/plain")}), 415)
    buf = io.BytesIO()
    Image.new("RGB", (w, h)).save(buf, "GIF")
    assert "GIF" in _error(client.post(f"/v1/models/{mid}/infer", content=buf.getvalue(),
                                       headers={"content-type": "image/png"}), 415)
    _error(client.post(f"/v1/models/{mid}/infer", content=b"x" * (65 * 1024), headers={"content-type": "image/png"}), 413)
    _error(client.post(f"/v1/models/{mid}/infer", content=b"\0", headers={"content-type": "text/plain"}), 415)
    assert "shape" in _error(client.post(f"/v1/models/{mid}/infer", json={"tensor": [[1, 2]]}), 422)
    assert client.get("/healthz").status_code == 200
