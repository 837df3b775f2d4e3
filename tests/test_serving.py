"""`mlflow models serve` on the registered model, over loopback: payload forms, bad payloads, limits."""

from __future__ import annotations

import base64
import http.client
import io
import json
import math
import os
import shutil
import subprocess
import urllib.error
import urllib.request

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from PIL import Image

from smids_ml.data import MAX_PIXELS, SMIDS_CLASSES
from smids_ml.predict import main as predict
from smids_ml.serving import MAX_IMAGE_BYTES, MAX_REQUEST_IMAGES
from tests.conftest import BIN, ROOT, free_port, stop, wait_for_http
from tests.helpers import write_wide_twins


@pytest.fixture(scope="module")
def server(trained_model, tmp_path_factory):
    """One scoring server for the module, serving models:/tiny/<version> on a free loopback port."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, MLFLOW_TRACKING_URI=trained_model["tracking_uri"])
    process = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", trained_model["uri"], "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", process)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="module")
def images(synth_data, trained_model, tmp_path_factory):
    """One crop per class, base64-encoded, and the probabilities `predict` gives for them."""
    files = [synth_data / label / f"{label} (4).bmp" for label in SMIDS_CLASSES]
    out = tmp_path_factory.mktemp("expected") / "predictions.csv"
    mlflow.set_tracking_uri(trained_model["tracking_uri"])
    result = CliRunner().invoke(predict, [trained_model["uri"], *map(str, files), "--output", str(out)])
    assert result.exit_code == 0, result.output
    encoded = [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]
    return encoded, pd.read_csv(out)


def post(url: str, body) -> tuple[int, dict | str]:
    """POST to /invocations: (status, parsed JSON or raw text)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/invocations", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def payload(form: str, images: list[str]) -> dict:
    return {"dataframe_split": {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}},
            "dataframe_records": {"dataframe_records": [{"image": i} for i in images]},
            "inputs": {"inputs": {"image": images}}}[form]


@pytest.mark.parametrize("form", ["dataframe_split", "dataframe_records", "inputs"])
def test_each_payload_form_gives_the_predict_probabilities(server, images, form):
    encoded, expected = images
    status, answer = post(server, payload(form, encoded))
    assert status == 200, answer
    served = pd.DataFrame(answer["predictions"])
    assert list(served["label"]) == list(expected["label"])
    np.testing.assert_allclose(served[list(SMIDS_CLASSES)], expected[list(SMIDS_CLASSES)], atol=1e-5)
    np.testing.assert_allclose(served["confidence"], expected["confidence"], atol=1e-5)


def tiny_png() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 150, 220)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def over_pixel_limit_png() -> str:
    """A real PNG over MAX_PIXELS that is only a few kB: 1 bit per pixel, all zero."""
    side = math.isqrt(MAX_PIXELS) + 1
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


BAD_PAYLOADS = {
    "not base64": (lambda: payload("dataframe_split", ["***not base64***"]), "not valid base64"),
    "not an image": (lambda: payload("dataframe_records", [base64.b64encode(b"hello").decode()]),
                     "not an image in a readable format"),
    "over the byte limit": (lambda: payload("dataframe_split", ["A" * (MAX_IMAGE_BYTES * 4 // 3 + 8)]),
                            f"over the size limit of {MAX_IMAGE_BYTES:,} bytes"),
    "over the pixel limit": (lambda: payload("inputs", [over_pixel_limit_png()]), "pixels is over the limit"),
    "too many images": (lambda: payload("dataframe_split", [tiny_png()] * (MAX_REQUEST_IMAGES + 1)),
                        f"the limit is {MAX_REQUEST_IMAGES}"),
    "no image column": (lambda: {"dataframe_records": [{"picture": tiny_png()}]}, "missing inputs ['image']"),
    "not JSON": (lambda: b"this is not json", "valid JSON"),
    "no payload key": (lambda: {"images": [tiny_png()]}, "exactly one of the input fields"),
}


@pytest.mark.parametrize("case", list(BAD_PAYLOADS))
def test_bad_payload_is_a_400_naming_the_problem_and_the_server_keeps_serving(server, images, case):
    body, problem = BAD_PAYLOADS[case]
    status, answer = post(server, body())
    assert status == 400, answer
    assert problem in answer["message"]
    status, answer = post(server, payload("inputs", images[0][:1]))
    assert status == 200 and len(answer["predictions"]) == 1


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """deploy/nginx.conf in front of the scoring server, its two addresses moved to loopback test ports."""
    prefix = tmp_path_factory.mktemp("proxy")
    (prefix / "tmp").mkdir()
    port = free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    assert "server 127.0.0.1:5001;" in conf and "listen 127.0.0.1:8080;" in conf
    conf = conf.replace("server 127.0.0.1:5001;", f"server {server.removeprefix('http://')};")
    (prefix / "nginx.conf").write_text(conf.replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{port};"))
    process = subprocess.Popen([NGINX, "-p", str(prefix), "-c", "nginx.conf", "-g",
                                f"daemon off; pid {prefix}/nginx.pid; error_log {prefix}/error.log;"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", process, timeout=30)
        yield url
    finally:
        stop(process)


def raw_post(url: str, body: bytes, content_type: str | None = "application/json") -> tuple[int, str]:
    """POST a body to /invocations with this Content-Type (None: no such header) and return the status and the
    answer, even when the server answers before reading the body."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    connection.putrequest("POST", "/invocations")
    if content_type:
        connection.putheader("Content-Type", content_type)
    connection.putheader("Content-Length", str(len(body)))
    connection.endheaders()
    try:
        connection.send(body)
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = connection.getresponse()
    status, text = response.status, response.read().decode(errors="replace")
    connection.close()
    return status, text


def test_the_proxy_refuses_an_oversize_body_and_passes_good_requests(proxy, images):
    encoded, expected = images
    status, answer = post(proxy, payload("inputs", encoded))
    assert status == 200, answer
    np.testing.assert_allclose(pd.DataFrame(answer["predictions"])[list(SMIDS_CLASSES)],
                               expected[list(SMIDS_CLASSES)], atol=1e-5)
    oversize = b'{"inputs": {"image": ["' + b"A" * (33 * 1024 * 1024) + b'"]}}'
    assert raw_post(proxy, oversize)[0] == 413
    assert post(proxy, payload("inputs", encoded[:1]))[0] == 200  # and it keeps serving


def test_the_proxy_answers_a_wrong_content_type_415_and_names_the_500_of_a_deeply_nested_body(proxy, server, images):
    """MLflow's own scoring server answers both with a bare 500 (its FastAPI app, not this project's code to change):
    the proxy in front says what went wrong instead, and keeps serving."""
    body = json.dumps(payload("inputs", images[0][:1])).encode()
    deep = b'{"a":' * 5000 + b"1" + b"}" * 5000
    assert raw_post(server, body, None)[0] == 500 and raw_post(server, deep)[0] == 500  # what the proxy replaces
    for content_type in (None, "text/plain", "application/x-www-form-urlencoded"):
        status, text = raw_post(proxy, body, content_type)
        assert status == 415 and "Content-Type: application/json" in json.loads(text)["message"], (content_type, text)
    assert raw_post(proxy, body, "application/json; charset=utf-8")[0] == 200
    status, text = raw_post(proxy, deep)
    assert status == 500 and "nested too deeply" in json.loads(text)["message"], text
    assert post(proxy, payload("inputs", images[0][:1]))[0] == 200


def test_the_served_model_answers_wide_images_as_their_8bit_twins(server, tmp_path):
    twins = write_wide_twins(tmp_path)
    files = [f for pair in twins.values() for f in pair]
    status, answer = post(server, payload("inputs", [base64.b64encode(f.read_bytes()).decode("ascii") for f in files]))
    assert status == 200, answer
    rows = answer["predictions"]
    for i in range(0, len(rows), 2):  # each 8-bit file, then its wide twin
        narrow, wide = rows[i], rows[i + 1]
        assert wide["label"] == narrow["label"]
        for name in SMIDS_CLASSES:
            assert math.isclose(wide[name], narrow[name], abs_tol=1e-6), (files[i + 1].name, name)
