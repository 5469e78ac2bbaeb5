"""`consort ui` serves the workspace's MLflow store on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from conftest import PROJECT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ui_serves_the_pipeline_runs(smoke_workspace):
    ws, _ = smoke_workspace
    port, page_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "--workspace", str(ws), "--port", str(port),
                             "--page-port", str(page_port)],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        first = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}" in first
        deadline, body = time.time() + 90, None
        while time.time() < deadline and body is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                                             data=json.dumps({"max_results": 10}).encode(),
                                             headers={"Content-Type": "application/json"})
                body = json.loads(urllib.request.urlopen(req, timeout=5).read())
            except OSError:
                assert proc.poll() is None, "the MLflow UI exited early"
                time.sleep(1)
        assert body is not None, "the MLflow UI did not answer within 90 s"
        assert "consort" in [e["name"] for e in body["experiments"]]
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode()
        assert "<html" in page.lower()
    finally:
        # SIGTERM to `consort ui` alone (as `kill PID` sends it): it must end both of its servers.
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    for p in (port, page_port):
        with socket.socket() as s:
            # SO_REUSEADDR: the connections this test made may linger in TIME_WAIT (CI on a loaded
            # machine failed on one), while a server still listening on the port still refuses the bind.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))  # raises if a server of `consort ui` still holds the port


def test_ui_without_a_store_says_what_to_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "ui", "--workspace", str(tmp_path)], cwd=PROJECT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "run `consort run` first" in proc.stderr
