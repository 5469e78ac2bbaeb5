"""An owner's trace service: one HTTP endpoint, `POST /trace`, over the owner's own index.

It listens on 127.0.0.1 unless the owner names another address, and then only over TLS (or with
an explicit --allow-insecure-remote): the coordinator reaches it with a client token the owner
handed out and checks the certificate the owner told it to expect.

The index is the owner's raw text, so the service answers only "trace this output" (DESIGN.md
sections 4 and 8): span offsets in the output, bucketed counts, keyed-hash document ids, a BM25
score, and snippets only if the owner's policy says so. There is no endpoint for counts, n-gram
probabilities or search (each is an extraction oracle), and no API docs endpoint either. Every
request, answered, refused or failed, is appended to the owner's audit log before it is answered.

The infini-gram engine crashes the process on some inputs (its C++ asserts are compiled out), so
it runs in a worker process: a crash costs one request a 503, and the worker is started again.
"""
from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from stages import params as P
from tracing.attribution import TraceSettings, count_bucket, keyed_doc_id

STATE_DIR = "trace"  # owners/<name>/trace: the service's key, client tokens, audit log and log
KEY_FILE = "trace_key"
CLIENTS_FILE = "trace_clients.json"
AUDIT_LOG = "trace_audit.jsonl"
MAX_BODY_BYTES = 1 << 20


@dataclass(frozen=True)
class OwnerService:
    """Everything one owner's service needs, all inside the owner's workspace."""
    owner: str
    index_dir: Path
    tokenizer_dir: Path
    state_dir: Path               # key, client tokens and audit log live here (in the owner's folder)
    policy: P.TracePolicy
    settings: TraceSettings

    @classmethod
    def from_workspace(cls, root: Path, owner: str, params: P.Params | None = None) -> OwnerService:
        params = params or P.load(root / "params.yaml")
        if owner not in params.owners:
            raise ValueError(f"unknown owner {owner!r}: params.yaml lists {', '.join(params.owners)}")
        policy = params.owners[owner].trace
        return cls(owner, root / "owners" / owner / "index", root / "models" / "tokenizer",
                   root / "owners" / owner / STATE_DIR, policy, TraceSettings.of(params.trace, policy))

    def key(self) -> bytes:
        """The owner's secret for document ids, made on first use."""
        path = self.state_dir / KEY_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(secrets.token_bytes(32))
            path.chmod(0o600)
        return path.read_bytes()

    def client_tokens(self) -> dict[str, str]:
        """One bearer token per client of the policy, made on first use (the owner hands them out)."""
        path = self.state_dir / CLIENTS_FILE
        tokens = json.loads(path.read_text()) if path.exists() else {}
        missing = [c for c in self.policy.clients if c not in tokens]
        if missing:
            tokens.update({c: secrets.token_urlsafe(24) for c in missing})
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(tokens, indent=2))
            path.chmod(0o600)
        return {c: tokens[c] for c in self.policy.clients}


# --- the engine, in a process of its own --------------------------------------------------------

def _engine_worker(conn, index_dir: str, tokenizer_dir: str, settings: dict) -> None:
    from transformers import AutoTokenizer

    from tracing.attribution import attribute, delimiter_ids
    from tracing.index import open_engine

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    engine = open_engine(Path(index_dir))
    delims = delimiter_ids(tokenizer)
    s = TraceSettings(**settings)
    conn.send(("ready", None))
    while True:
        try:
            prompt, output = conn.recv()
        except EOFError:  # the service is gone (stopped or killed): nothing is left to answer
            return
        try:
            spans = attribute(engine, tokenizer, prompt, output, s, delims)
            n_tokens = len(tokenizer(output, add_special_tokens=False)["input_ids"])
            conn.send(("ok", ([asdict(sp) for sp in spans], n_tokens)))
        except ValueError as err:
            conn.send(("error", str(err)))


class EngineCrashed(RuntimeError):
    pass


class EngineProcess:
    """The engine behind a pipe; restarted when it dies."""

    def __init__(self, service: OwnerService) -> None:
        self.service = service
        self.lock = threading.Lock()
        self.proc = None
        self.conn = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=_engine_worker, daemon=True,
                                args=(child, str(self.service.index_dir), str(self.service.tokenizer_dir),
                                      asdict(self.service.settings)))
        self.proc.start()
        self.conn = parent
        if not parent.poll(120) or parent.recv()[0] != "ready":
            raise RuntimeError(f"trace engine for {self.service.owner} did not start (index {self.service.index_dir})")

    def trace(self, prompt: str, output: str) -> tuple[list[dict], int]:
        with self.lock:
            try:
                self.conn.send((prompt, output))
                status, value = self.conn.recv()
            except (EOFError, OSError, BrokenPipeError):
                self.restarts += 1
                self.proc.join(timeout=1)
                self._start()
                raise EngineCrashed("the index engine stopped while answering; it has been restarted") from None
        if status != "ok":
            raise ValueError(value)
        return value

    def close(self) -> None:
        if self.proc is not None and self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)


# --- policy: what leaves the owner ----------------------------------------------------------------

def disclose(spans: list[dict], policy: P.TracePolicy, key: bytes) -> list[dict]:
    """The owner's answer: offsets, bucketed counts, keyed ids, scores, snippets only if allowed."""
    out = []
    for sp in spans:
        docs = []
        for d in sp["documents"]:
            doc = {"id": keyed_doc_id(key, d["doc_id"]), "score": round(d["score"], 3)}
            if policy.disclosure == "snippets":
                doc["snippet"], doc["match_start"], doc["match_end"] = snippet(d, policy.snippet_chars)
            docs.append(doc)
        out.append({"start": sp["start"], "end": sp["end"], "count": count_bucket(sp["count"]), "documents": docs})
    return out


def snippet(doc: dict, limit: int) -> tuple[str, int, int]:
    """At most `limit` characters of the fetched window, centred on the match; (text, match start, end)."""
    text, a, b = doc["text"], doc["needle_start"], doc["needle_end"]
    if b - a >= limit:
        return text[a:a + limit], 0, limit
    lo = max(0, min(a - (limit - (b - a)) // 2, len(text) - limit))
    return text[lo:lo + limit], a - lo, b - lo


class BadBody(ValueError):
    pass


def _refuse_constant(name: str):
    raise BadBody(f"request body is not JSON ({name} is not a JSON number)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise BadBody(f"request body holds a number out of range ({text[:20]}...)")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 18:  # no field takes a number: a huge one is an attack on the parser
        raise BadBody(f"request body holds an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def parse_body(body: bytes):
    """The request's JSON, strictly: BadBody (a 400) for anything that is not plain, finite JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadBody("request body is not valid UTF-8") from None
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)
    except BadBody:
        raise
    except json.JSONDecodeError as err:
        raise BadBody(f"request body is not JSON ({err.msg})") from None
    except RecursionError:
        raise BadBody("request body is nested too deeply") from None
    except (ValueError, OverflowError) as err:  # any other parser limit
        raise BadBody(f"request body is not acceptable JSON ({err})") from None


class RateLimiter:
    """At most n requests per client in any 60 s window."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.times: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()

    def allow(self, client: str, now: float) -> bool:
        with self.lock:
            q = self.times[client]
            while q and q[0] <= now - 60:
                q.popleft()
            if len(q) >= self.per_minute:
                return False
            q.append(now)
            return True


# --- the HTTP app ---------------------------------------------------------------------------------

def create_app(service: OwnerService, engine=None):
    """The FastAPI app of one owner: POST /trace and nothing else."""
    app = FastAPI(title=f"consort trace service ({service.owner})", docs_url=None, redoc_url=None, openapi_url=None)
    tokens = {token: client for client, token in service.client_tokens().items()}
    key = service.key()
    limiter = RateLimiter(service.policy.requests_per_minute)
    audit_path = service.state_dir / AUDIT_LOG
    audit_lock = threading.Lock()
    state = {"engine": engine}

    def audit(client: str | None, status: int, spans: list[dict] | None = None, detail: str = "") -> None:
        row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client": client, "status": status, "detail": detail,
               "spans": [[s["start"], s["end"]] for s in spans or []],
               "documents": sorted({d["id"] for s in spans or [] for d in s["documents"]})}
        with audit_lock, audit_path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    def refuse(client: str | None, status: int, detail: str, headers: dict | None = None):
        audit(client, status, detail=detail)
        return JSONResponse({"error": detail}, status_code=status, headers=headers)

    @app.middleware("http")
    async def audit_other_routes(request: Request, call_next):
        """Requests for anything but POST /trace get their 404/405 and a line in the audit log too."""
        response = await call_next(request)
        if (request.method, request.url.path) != ("POST", "/trace"):
            audit(None, response.status_code, detail=f"{request.method} {request.url.path[:200]}")
        return response

    @app.post("/trace")
    async def trace(request: Request):
        auth = request.headers.get("authorization", "")
        client = tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
        try:
            return await answer_trace(request, client)
        except Exception as err:  # the audit log holds every request, the ones that fail too
            audit(client, 500, detail=f"internal error: {type(err).__name__}")
            return JSONResponse({"error": "internal error; the owner's audit log records it"}, status_code=500)

    async def answer_trace(request: Request, client: str | None):
        if client is None:
            return refuse(None, 401, "missing or unknown client token (send 'Authorization: Bearer <token>')")
        if not limiter.allow(client, time.monotonic()):
            return refuse(client, 429, f"rate limit: {service.policy.requests_per_minute} requests per minute",
                          {"Retry-After": "60"})
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return refuse(client, 413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            payload = parse_body(body)
        except BadBody as err:
            return refuse(client, 400, str(err))
        if not isinstance(payload, dict):
            return refuse(client, 422, "body must be a JSON object with 'output' (text) and optionally 'prompt' (text)")
        extra = sorted(set(payload) - {"prompt", "output"})
        if extra:  # token ids, counts, queries: this service takes text to trace and nothing else
            return refuse(client, 422, f"unknown field(s) {extra}: send only 'output' and optionally 'prompt'")
        prompt, output = payload.get("prompt", ""), payload.get("output")
        if not isinstance(output, str) or not isinstance(prompt, str):
            return refuse(client, 422, "'output' and 'prompt' must be strings")
        if not output.strip():
            return refuse(client, 422, "'output' is empty: there is nothing to trace")
        if len(output) > service.policy.max_output_chars or len(prompt) > service.policy.max_output_chars:
            return refuse(client, 413, f"'output' or 'prompt' longer than {service.policy.max_output_chars} characters")
        if "\x00" in output or "\x00" in prompt:
            return refuse(client, 422, "text must not contain NUL characters")
        try:
            output.encode("utf-8"), prompt.encode("utf-8")
        except UnicodeEncodeError:
            return refuse(client, 422, "text holds a lone surrogate (\\ud800-\\udfff escape): not valid Unicode")
        try:
            if state["engine"] is None:
                state["engine"] = await run_in_threadpool(EngineProcess, service)
            spans, n_tokens = await run_in_threadpool(state["engine"].trace, prompt, output)
        except EngineCrashed as err:
            return refuse(client, 503, str(err), {"Retry-After": "1"})
        except ValueError as err:
            return refuse(client, 422, str(err))
        answer = disclose(spans, service.policy, key)
        audit(client, 200, answer)
        return {"owner": service.owner, "output_tokens": n_tokens, "disclosure": service.policy.disclosure,
                "spans": answer}

    app.state.engine = state
    return app


@dataclass(frozen=True)
class Listen:
    """Where a service listens, and the TLS certificate and key it presents (None: plain HTTP)."""
    host: str = "127.0.0.1"
    port: int = 0
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls_cert else 'http'}://{host}:{self.port}"


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only; a host name other than localhost resolves to
    whatever the network says, so it is not."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_listen(listen: Listen, allow_insecure: bool = False) -> None:
    """Refuse what would expose the owner's index badly: half a TLS pair, missing files, or a
    non-loopback address in plain HTTP (client tokens and traced text would cross the network
    readable) unless the owner says so explicitly."""
    if (listen.tls_cert is None) != (listen.tls_key is None):
        raise ValueError("TLS needs both a certificate (--tls-cert) and its private key (--tls-key)")
    for path in (listen.tls_cert, listen.tls_key):
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such TLS file")
    if not is_loopback(listen.host) and listen.tls_cert is None and not allow_insecure:
        raise ValueError(f"--host {listen.host} is not a loopback address: serve it over TLS (--tls-cert and "
                         "--tls-key), or pass --allow-insecure-remote if the network itself is trusted")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("owner")
    ap.add_argument("--workspace", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (not loopback: TLS required)")
    ap.add_argument("--tls-cert", type=Path, help="PEM certificate the service presents")
    ap.add_argument("--tls-key", type=Path, help="PEM private key of that certificate")
    ap.add_argument("--allow-insecure-remote", action="store_true",
                    help="listen on a non-loopback address without TLS (a trusted network only)")
    args = ap.parse_args(argv)
    import uvicorn

    listen = Listen(args.host, args.port, args.tls_cert, args.tls_key)
    try:
        check_listen(listen, args.allow_insecure_remote)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"trace service of {args.owner}: {err}") from None
    service = OwnerService.from_workspace(args.workspace.resolve(), args.owner)
    engine = EngineProcess(service)  # start (and check) the index before accepting connections
    tls = {"ssl_certfile": str(listen.tls_cert), "ssl_keyfile": str(listen.tls_key)} if listen.tls_cert else {}
    try:
        uvicorn.run(create_app(service, engine), host=listen.host, port=listen.port, log_level="warning",
                    limit_concurrency=64, **tls)
    finally:
        engine.close()


if __name__ == "__main__":
    main()
