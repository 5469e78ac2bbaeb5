"""Stages start in forks of one interpreter that has already imported torch, transformers and the stage
code, instead of each paying those imports again (about 5 s of CPU a stage, most of a smoke stage,
measured 2026-12-07).

DVC still runs each stage's own command, `python -m stages.<name> ...`: while the pipeline runs, the
`python` first on PATH is a two-line shim that calls `client()` below. The client hands its argv, working
directory, environment and standard streams to the server over a Unix socket; the server forks, the child
takes them over and runs the module as `python -m` would, and the child's exit status comes back as the
client's. Anything else (another module, the server not ready or gone) runs the real interpreter instead,
so a stage behaves the same either way. If the client dies (DVC stopping a stage), its child is killed.
`CONSORT_STAGE_SERVER=off` turns the server off.

Run as a script by the shim, this file imports only the standard library (the shim skips site-packages
to start in milliseconds).
"""
from __future__ import annotations

import array
import contextlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

SERVER_VARIABLE = "CONSORT_STAGE_SERVER"  # the socket's path while the pipeline runs; "off": never start one
REAL_PYTHON_VARIABLE = "CONSORT_REAL_PYTHON"  # the interpreter the shim stands in for
SERVED_PACKAGES = ("stages",)  # `python -m` of a module in these runs in a fork; anything else runs as usual
STREAMS = 3  # stdin, stdout, stderr


def _send(sock: socket.socket, payload: bytes, fds: list[int] = ()) -> None:
    sock.sendmsg([len(payload).to_bytes(8, "big") + payload],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else [])


def _receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the descriptors that came with it."""
    fds = array.array("i")
    head, ancillary, _, _ = sock.recvmsg(8, socket.CMSG_LEN(STREAMS * fds.itemsize))
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if len(head) < 8:
        raise ConnectionError("the other side closed the connection")
    size, body = int.from_bytes(head, "big"), b""
    while len(body) < size:
        chunk = sock.recv(size - len(body))
        if not chunk:
            raise ConnectionError("the other side closed the connection mid-message")
        body += chunk
    return body, list(fds)


# --- the client: what the shim runs in place of `python` ---

def client(argv: list[str]) -> int:
    """Run `python argv...` in a fork of the server when it is a served module and the server is up."""
    real = os.environ.get(REAL_PYTHON_VARIABLE, "python3")
    address = os.environ.get(SERVER_VARIABLE, "")
    served = len(argv) >= 2 and argv[0] == "-m" and argv[1].split(".")[0] in SERVED_PACKAGES
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if not served:
            raise OSError("not a served module")
        sock.connect(address)
    except OSError:
        sock.close()
        os.execv(real, [real, *argv])
    request = {"module": argv[1], "args": argv[2:], "cwd": os.getcwd(), "env": dict(os.environ)}
    _send(sock, json.dumps(request).encode(), list(range(STREAMS)))
    try:
        status, _ = _receive(sock)
    except ConnectionError:
        print(f"consort: the stage server stopped while it ran {argv[1]}", file=sys.stderr)
        return 1
    return int(status)


# --- the server: preloaded, forks a child per stage ---

def preload() -> None:
    """Import what stages import, so that every fork starts with it: the heavy libraries and every module
    of the served packages. Entry modules are then forgotten, so that runpy runs each afresh as __main__
    (as `python -m` does: a module imported under its own name is a different object from __main__)."""
    import importlib
    import pkgutil

    import torch  # noqa: F401
    import transformers

    for name in ("FlexOlmoForCausalLM", "Qwen2MoeForCausalLM", "Olmo2ForCausalLM", "LlamaForCausalLM",
                 "AutoTokenizer", "PreTrainedTokenizerFast"):
        getattr(transformers, name)  # transformers imports a model's module lazily, on first use
    for package_name in SERVED_PACKAGES:
        package = importlib.import_module(package_name)
        for info in pkgutil.walk_packages(package.__path__, f"{package_name}."):
            module = importlib.import_module(info.name)
            with open(module.__file__) as source:
                if '__name__ == "__main__"' in source.read():
                    del sys.modules[info.name]


def serve(path: str) -> dict:
    """Listen on `path` until stdin closes (the pipeline gone); returns only in a forked child, its request."""
    import threading

    preload()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the stages themselves (same process group)
    children: set[int] = set()

    def stop_when_orphaned() -> None:
        while os.read(0, 4096):  # the raw descriptor: a thread blocked in sys.stdin would hold its lock in every fork
            pass
        for pid in list(children):
            _kill(pid)
        os._exit(0)

    threading.Thread(target=stop_when_orphaned, daemon=True).start()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".new")
    listener.listen(64)
    os.rename(path + ".new", path)  # clients see the socket only once it accepts
    while True:
        conn, _ = listener.accept()
        try:
            body, fds = _receive(conn)
        except ConnectionError:
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()  # or the child would write the server's buffered output into the stage's log
        pid = os.fork()
        if pid == 0:
            listener.close()
            conn.close()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            request = json.loads(body)
            request["fds"] = fds
            return request
        for fd in fds:
            os.close(fd)
        print(f"forked {pid}: {json.loads(body)['module']}", flush=True)
        children.add(pid)
        threading.Thread(target=_report, args=(conn, pid, children), daemon=True).start()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _report(conn: socket.socket, pid: int, children: set[int]) -> None:
    """Send the child's exit status to its client; kill the child if the client goes first."""
    with conn:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                with contextlib.suppress(OSError):  # a client that hung up has no use for it
                    _send(conn, str(code if code >= 0 else 128 - code).encode())
                return
            readable, _, _ = select.select([conn], [], [], 0.2)
            if readable and not conn.recv(1):  # the client hung up: nobody waits for this stage any more
                _kill(pid)


def become(request: dict) -> None:
    """Turn this fork into the process the client would have started."""
    for target, fd in enumerate(request["fds"]):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.path[0] = request["cwd"]  # `python -m` puts the working directory first
    sys.argv = [request["module"], *request["args"]]


@contextlib.contextmanager
def running(workspace: Path, log: Path):
    """While the block runs, the stage commands DVC starts in `workspace` fork from a stage server
    (its output in `log`); with CONSORT_STAGE_SERVER=off they start as separate interpreters."""
    if os.environ.get(SERVER_VARIABLE) == "off":
        yield
        return
    folder = Path(tempfile.mkdtemp(prefix="consort-stages-"))  # short: a socket's path must fit in 108 bytes
    shim = folder / "python"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{Path(__file__).resolve()}" "$@"\n')
    shim.chmod(0o755)
    log.parent.mkdir(parents=True, exist_ok=True)
    saved = {name: os.environ.get(name) for name in ("PATH", SERVER_VARIABLE, REAL_PYTHON_VARIABLE)}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "flows.stage_server", "serve", str(folder / "socket")],
                                  cwd=workspace, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT)
    os.environ.update(PATH=f"{folder}{os.pathsep}{os.environ.get('PATH', '')}",
                      **{SERVER_VARIABLE: str(folder / "socket"), REAL_PYTHON_VARIABLE: sys.executable})
    try:
        yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None) if value is None else os.environ.update({name: value})
        server.stdin.close()  # the server stops when its stdin closes
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)


def run_module(module: str) -> int:
    """Run `module` as __main__ and end as the interpreter would: uncaught errors through sys.excepthook
    (a stage records its cause there), non-daemon threads joined, atexit handlers run, streams flushed.
    The caller then leaves with os._exit: tearing down the thousands of preloaded modules one by one
    took 3 s a process (2026-12-07), longer than most smoke stages run."""
    import atexit
    import runpy
    import threading

    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 0 if done.code is None else 1
        if not isinstance(done.code, int | None):
            print(done.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 130 if isinstance(sys.exc_info()[1], KeyboardInterrupt) else 1
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    return code


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        request = serve(argv[1])
        become(request)
        code = run_module(request["module"])
        os._exit(code)
    return client(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
