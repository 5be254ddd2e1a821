"""`kefu-triage serve`: every endpoint and error case on a real uvicorn (a thread, a free port), micro-batching
with outputs equal to TriageModel.predict, a full queue, and SIGTERM draining in a subprocess."""

from __future__ import annotations

import concurrent.futures
import copy
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from kefu_triage.core.artifact import read_manifest  # noqa: E402
from kefu_triage.runtime.batching import MicroBatcher, QueueFullError  # noqa: E402
from kefu_triage.runtime.model import TriageModel  # noqa: E402
from kefu_triage.runtime.server import ServeSettings, create_app  # noqa: E402

CTX = [{"role": "customer", "text": "鞋子尺码不对"}, {"role": "agent", "text": "可以换货哦"}]
TEXTS = [
    "快递三天没动了，急用！",
    "在吗",
    "我要退货",
    "发票怎么开",
    "优惠券用不了",
    "你们这什么破质量，我要投诉",
    "能便宜点吗",
    "什么时候发货",
    "地址填错了能改吗",
    "退款什么时候到账",
    "衣服洗了掉色",
    "客服电话多少",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def model(smoke):
    return TriageModel.load(smoke["artifact"], precision="fp32", batch_size=64)


@pytest.fixture(scope="module")
def settings(smoke):
    # a long max_wait so concurrent test requests reliably share batches; small limits to test them
    return ServeSettings(
        artifact=str(smoke["artifact"]),
        precision="fp32",
        max_batch=64,
        max_wait_ms=150,
        max_messages=4,
        max_text_chars=200,
        max_context_turns=3,
        max_body_bytes=4096,
    )


@pytest.fixture(scope="module")
def server(model, settings):
    with (
        ThreadServer(create_app(model, settings)) as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
    ):
        yield client


def same(a, b, tol: float = 1e-5) -> bool:
    """Equal, floats within ``tol``: onnxruntime's fp32 GEMMs round differently by batch shape (~1e-7 in the
    logits), which can move the 6th decimal of a probability; labels, routes and reasons must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y, tol) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def metric(client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_health_ready_docs(server, smoke):
    assert server.get("/healthz").json() == {"status": "ok"}
    ready = server.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    paths = server.get("/openapi.json").json()["paths"]
    assert {"/v1/triage", "/model/parse", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert server.get("/docs").status_code == 200


def test_triage_equals_predict(server, model, smoke):
    r = server.post(
        "/v1/triage", json={"messages": [{"text": TEXTS[0]}, {"text": "那退款吧", "context": CTX}]}
    )
    assert r.status_code == 200
    body = r.json()
    assert same(body["results"], model.predict([TEXTS[0], "那退款吧"], [None, CTX]))
    manifest = read_manifest(smoke["artifact"])
    assert body["model"]["sha256"] == manifest["files"]["model.onnx"]["sha256"]
    assert body["model"]["version"] == manifest["kefu_triage_version"] and body["model"]["name"]


def test_rasa_parse(server, model):
    r = server.post("/model/parse", json={"text": TEXTS[2], "message_id": "m-1"})
    assert r.status_code == 200
    body, expected = r.json(), model.predict([TEXTS[2]])[0]
    assert body["text"] == TEXTS[2] and body["message_id"] == "m-1" and body["entities"] == []
    assert same(body["intent"], {"name": expected["intent"], "confidence": expected["intent_prob"]})
    assert body["intent_ranking"][0]["name"] == expected["top_intents"][0]["intent"]
    assert (body["route"], body["reason"]) == (expected["route"], expected["reason"])
    assert same(body["urgent"]["confidence"], expected["urgent_prob"])
    assert body["urgent"]["is_urgent"] == (expected["urgent_prob"] >= model.thresholds.urgent)


@pytest.mark.parametrize(
    "path, payload, status, field",
    [
        ("/v1/triage", b"{not json", 400, "body"),
        ("/v1/triage", {"messages": "hi"}, 422, "messages"),
        ("/v1/triage", {"msgs": []}, 422, "messages"),
        ("/v1/triage", {"messages": []}, 422, "messages"),
        ("/v1/triage", {"messages": [{"text": 5}]}, 422, "messages.0.text"),
        ("/v1/triage", {"messages": [{"text": "a"}, {"text": None}]}, 422, "messages.1.text"),
        (
            "/v1/triage",
            {"messages": [{"text": "a", "context": [{"role": "boss", "text": "?"}]}]},
            422,
            "messages.0.context.0.role",
        ),
        ("/v1/triage", {"messages": [{"text": "a", "context": "previous turn"}]}, 422, "messages.0.context"),
        ("/v1/triage", {"messages": [{"text": "a"}] * 5}, 413, "messages"),
        ("/v1/triage", {"messages": [{"text": "长" * 201}]}, 422, "messages.0.text"),
        ("/v1/triage", {"messages": [{"text": "a", "context": [CTX[0]] * 4}]}, 422, "messages.0.context"),
        (
            "/v1/triage",
            {"messages": [{"text": "a", "context": [{"role": "agent", "text": "长" * 201}]}]},
            422,
            "messages.0.context.0.text",
        ),
        ("/v1/triage", b'{"messages": [{"text": "' + b"a" * 5000 + b'"}]}', 413, "body"),
        ("/model/parse", {"message_id": "x"}, 422, "text"),
        ("/model/parse", {"text": ["a"]}, 422, "text"),
        ("/model/parse", b"[1, 2", 400, "body"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(server, path, payload, status, field):
    kwargs = (
        {"content": payload, "headers": {"content-type": "application/json"}}
        if isinstance(payload, bytes)
        else {"json": payload}
    )
    r = server.post(path, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["field"] == field and err["message"]


def test_body_limit_without_content_length(server):
    def chunks():
        yield b'{"messages": [{"text": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}]}'

    r = server.post("/v1/triage", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_unknown_path_and_method_are_json_4xx(server):
    assert server.get("/nope").status_code == 404
    r = server.get("/v1/triage")
    assert r.status_code == 405 and r.json()["error"]["type"] == "http_error"


def test_concurrent_requests_share_batches_and_equal_predict(server, model):
    before_count = metric(server, "kefu_batch_size_count")
    before_single = metric(server, 'kefu_batch_size_bucket{le="1.0"}')
    contexts = [CTX if i % 3 == 0 else None for i in range(len(TEXTS))]

    def one(i):
        payload = {"messages": [{"text": TEXTS[i], "context": contexts[i]}]}
        return server.post("/v1/triage", json=payload).json()["results"][0]

    with concurrent.futures.ThreadPoolExecutor(len(TEXTS)) as pool:
        got = list(pool.map(one, range(len(TEXTS))))
    # fp32: the same as scoring each message alone (floats to rounding, see same())
    alone = [model.predict([t], [c])[0] for t, c in zip(TEXTS, contexts, strict=True)]
    assert all(same(g, a) for g, a in zip(got, alone, strict=True))
    batches = metric(server, "kefu_batch_size_count") - before_count
    multi = batches - (metric(server, 'kefu_batch_size_bucket{le="1.0"}') - before_single)
    assert 0 < batches < len(TEXTS) and multi > 0  # some model calls scored several requests at once


def test_metrics_exposition(server):
    server.post("/v1/triage", json={"messages": [{"text": "在吗"}]})
    server.post("/v1/triage", json={"messages": []})
    text = server.get("/metrics").text
    assert 'kefu_http_requests_total{endpoint="/v1/triage",status="200"}' in text
    assert 'kefu_http_requests_total{endpoint="/v1/triage",status="422"}' in text
    assert "kefu_http_request_duration_seconds_bucket" in text and "kefu_queue_depth" in text
    assert "kefu_routes_total{" in text and "kefu_model_info{" in text


def test_full_queue_is_503_with_retry_after(model, settings):
    gate, entered = threading.Event(), threading.Event()
    gate.set()  # open for the warm-up
    slow = copy.copy(model)

    def gated_predict(texts, contexts=None):
        entered.set()
        gate.wait(30)
        return model.predict(texts, contexts)

    slow.predict = gated_predict
    tight = ServeSettings(**{**settings.__dict__, "max_batch": 1, "max_wait_ms": 0, "max_queue": 1})
    with ThreadServer(create_app(slow, tight)) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        gate.clear()
        entered.clear()
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            held = [pool.submit(client.post, "/model/parse", json={"text": "在吗"})]
            assert entered.wait(10)  # the first request is in the worker ...
            held.append(pool.submit(client.post, "/model/parse", json={"text": "在吗"}))
            deadline = time.monotonic() + 10  # ... and the second one waits in the queue
            while metric(client, "kefu_queue_depth") < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            r = client.post("/model/parse", json={"text": "在吗"})
            gate.set()
            assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["type"] == "overloaded"
            assert [f.result().status_code for f in held] == [200, 200]


def test_batcher_rejects_over_queue_limit():
    import asyncio

    async def go():
        gate = threading.Event()
        b = MicroBatcher(lambda t, c: (gate.wait(10), [{"t": x} for x in t])[1], max_batch=2, max_queue=2)
        b.start()
        first = asyncio.ensure_future(b.submit(["a"], [None]))
        await asyncio.sleep(0.05)  # "a" is in the worker
        second = asyncio.ensure_future(b.submit(["b", "c"], [None, None]))
        await asyncio.sleep(0)
        with pytest.raises(QueueFullError):
            await b.submit(["d"], [None])
        gate.set()
        assert await first == [{"t": "a"}] and await second == [{"t": "b"}, {"t": "c"}]
        await b.close()

    asyncio.run(go())


def test_batcher_scores_batches_side_by_side_with_several_workers():
    import asyncio

    lock, inside, both = threading.Lock(), [], threading.Event()

    def predict(texts, contexts):
        with lock:
            inside.append(list(texts))
            if len(inside) == 2:
                both.set()
        assert both.wait(10), "the second worker never started while the first was busy"
        return [{"t": x} for x in texts]

    async def go():
        b = MicroBatcher(predict, max_batch=1, max_wait_ms=0, workers=2)
        b.start()
        got = await asyncio.gather(b.submit(["a"], [None]), b.submit(["b"], [None]))
        assert got == [[{"t": "a"}], [{"t": "b"}]]
        queued = [asyncio.ensure_future(b.submit([x], [None])) for x in "cde"]
        await asyncio.sleep(0)
        await b.close()  # scores what is queued before it returns
        assert [q.result() for q in queued] == [[{"t": x}] for x in "cde"]

    asyncio.run(go())


def test_cpu_plan_workers_and_threads(monkeypatch):
    from kefu_triage.runtime import server as server_module

    monkeypatch.setattr(server_module, "available_cores", lambda: 4)

    def plan(**kw):
        p = ServeSettings(artifact="a", **kw).plan_cpu()
        return p.workers, p.threads

    assert plan() == (4, 1)  # int8: one single-threaded worker per core
    assert plan(precision="fp32") == (1, None)  # one worker, onnxruntime uses every core
    assert plan(workers=2) == (2, 2)
    assert plan(workers=1) == (1, None)
    assert plan(threads=2) == (2, 2)
    assert plan(threads=4) == (1, 4)
    assert plan(workers=3, threads=1) == (3, 1)
    # int8 calls score one message each, so waiting for a fuller batch only adds latency; fp32 batches
    assert ServeSettings(artifact="a").plan_cpu().max_wait_ms == 0
    assert ServeSettings(artifact="a", precision="fp32").plan_cpu().max_wait_ms == 5
    assert ServeSettings(artifact="a", max_wait_ms=2.0).plan_cpu().max_wait_ms == 2.0
    assert ServeSettings.resolve({}, {"KEFU_ARTIFACT": "a", "KEFU_WORKERS": "3"}).workers == 3
    with pytest.raises(ValueError, match="KEFU_WORKERS"):
        ServeSettings.resolve({}, {"KEFU_ARTIFACT": "a", "KEFU_WORKERS": "0"})


def test_load_client_drives_the_server(server):
    pytest.importorskip("aiohttp")
    from kefu_triage.bench.load import drive, encode_bodies, run_async

    bodies = encode_bodies([{"text": t, "context": None} for t in TEXTS[:4]])
    row = run_async(drive(str(server.base_url).rstrip("/"), bodies, 4, 12, 30.0))
    assert row["requests"] == 12 and row["errors"] == 0 and row["throughput_msg_s"] > 0


def test_settings_from_env_and_flags():
    env = {"KEFU_ARTIFACT": "a", "KEFU_PORT": "9001", "KEFU_MAX_WAIT_MS": "2.5", "KEFU_ACCESS_LOG": "true"}
    s = ServeSettings.resolve({"port": 9002}, env)
    assert (s.artifact, s.port, s.max_wait_ms, s.access_log) == ("a", 9002, 2.5, True)
    with pytest.raises(ValueError, match="KEFU_MAX_BATCH"):
        ServeSettings.resolve({}, {"KEFU_ARTIFACT": "a", "KEFU_MAX_BATCH": "many"})
    with pytest.raises(ValueError, match="KEFU_MAX_WAIT_MS=.*float"):
        ServeSettings.resolve({}, {"KEFU_ARTIFACT": "a", "KEFU_MAX_WAIT_MS": "soon"})
    with pytest.raises(ValueError, match="KEFU_ARTIFACT"):
        ServeSettings.resolve({}, {})


def test_sigterm_drains_in_flight_requests_and_exits_0(smoke):
    port = free_port()
    # configured through the environment only, as a container would; a long max_wait keeps requests in flight
    env = {
        **os.environ,
        "KEFU_ARTIFACT": str(smoke["artifact"]),
        "KEFU_PORT": str(port),
        "KEFU_MAX_WAIT_MS": "1500",
        "KEFU_LOG_LEVEL": "warning",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "kefu_triage.cli", "serve"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "server not ready"
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(httpx.post, url + "/v1/triage", json={"messages": [{"text": t}]}, timeout=30)
                for t in TEXTS[:4]
            ]
            time.sleep(0.5)  # the requests now wait in the batcher
            proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        assert [r.status_code for r in responses] == [200] * 4
        assert all(len(r.json()["results"]) == 1 for r in responses)
        assert proc.wait(timeout=60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/healthz", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in proc.stderr.read()


def test_server_and_bulk_import_no_torch():
    code = (
        "import sys, kefu_triage.runtime.server, kefu_triage.runtime.batching, kefu_triage.runtime.bulk;"
        "bad = [m for m in ('torch', 'transformers', 'hydra', 'sklearn', 'yaml', 'ray') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
