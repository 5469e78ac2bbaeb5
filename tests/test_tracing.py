"""Tracing: a real infini-gram index of an owner's corpus, OLMoTrace attribution checked by brute force,
the owner's HTTP service on 127.0.0.1 (policy, bad input, fuzz, audit), the coordinator's fan-out, the CLI."""
import json
import random
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import run_consort
from transformers import AutoTokenizer

from stages import params as P
from stages.io import read_jsonl
from tracing.attribution import TraceSettings, attribute
from tracing.index import IndexBuildError, bow_token_ids, open_engine, token_dtype, write_index
from tracing.service import AUDIT_LOG, OwnerService, create_app

OWNER = "news"


@pytest.fixture(scope="module")
def corpus(smoke_workspace):
    ws, _ = smoke_workspace
    tok = AutoTokenizer.from_pretrained(ws / "models" / "tokenizer")
    docs = {row["id"]: row["text"] for row in read_jsonl(ws / "owners" / OWNER / "corpus" / "train.jsonl")}
    ids = {d: tok(t, add_special_tokens=False)["input_ids"] for d, t in docs.items()}
    return ws, tok, docs, ids


def occurrences(needle: list[int], haystack: list[int]) -> int:
    n = len(needle)
    return sum(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


def planted_output(docs: dict[str, str], rng: random.Random) -> tuple[str, str]:
    """Gibberish, then a run of whole words from a corpus document, then gibberish: (output, passage)."""
    while True:  # a run of 8 words with no delimiter inside (a span is cut after '.' and newlines)
        words = rng.choice([t for t in docs.values() if len(t) > 600]).split(" ")
        start = rng.randrange(1, len(words) - 8)
        run = words[start:start + 8]
        if all(w and w.isprintable() and "." not in w and not w.isspace() for w in run):
            passage = " ".join(run)
            return f"Zqxv wqkj {passage} vqzx kjqw, the company said on Monday that its shares rose", passage


def test_spans_occur_verbatim_and_every_document_contains_them(corpus):
    ws, tok, docs, ids = corpus
    engine = open_engine(ws / "owners" / OWNER / "index")
    rng = random.Random(0)
    settings = TraceSettings.of(P.TraceParams(span_fraction=1.0), P.TracePolicy(min_span_tokens=1))
    checked = 0
    for _ in range(5):
        output, _ = planted_output(docs, rng)
        out_ids = tok(output, add_special_tokens=False)["input_ids"]
        for sp in attribute(engine, tok, "", output, settings):
            needle = out_ids[sp.token_start:sp.token_end]
            total = sum(occurrences(needle, doc) for doc in ids.values())
            assert total == sp.count and 1 <= total <= settings.max_count, output[sp.start:sp.end]
            assert len(sp.documents) == min(total, settings.docs_per_span)
            for d in sp.documents:
                assert occurrences(needle, ids[d.doc_id]) >= 1, (d.doc_id, output[sp.start:sp.end])
                assert output[sp.start:sp.end] in docs[d.doc_id]
            assert output[sp.start:sp.end] == output[sp.start:sp.end].strip()
            checked += 1
    assert checked >= 10


def test_planted_passages_are_found_whole(corpus):
    ws, tok, docs, _ = corpus
    engine = open_engine(ws / "owners" / OWNER / "index")
    rng = random.Random(1)
    for _ in range(8):
        output, passage = planted_output(docs, rng)
        spans = attribute(engine, tok, "", output, TraceSettings.of(P.TraceParams(), P.TracePolicy(min_span_tokens=1)))
        texts = [output[sp.start:sp.end] for sp in spans]
        assert passage in texts, (passage, texts)  # the rarest span: kept by the 5 % cut


def test_index_refuses_what_would_crash_the_engine(tmp_path):
    with pytest.raises(IndexBuildError, match="word 'table'"):
        write_index([("a", [1, 2])], 100, [], tmp_path / "stable" / "idx", eos_token_id=0)
    with pytest.raises(IndexBuildError, match="document 'b': token id 100 outside"):
        write_index([("a", [1, 2]), ("b", [3, 100])], 100, [], tmp_path / "idx", eos_token_id=0)
    with pytest.raises(IndexBuildError, match="empty"):
        write_index([], 100, [], tmp_path / "idx", eos_token_id=0)
    assert not (tmp_path / "idx").exists() and not list(tmp_path.glob(".idx*"))  # nothing half-written
    with pytest.raises(IndexBuildError, match="not an index written by consort"):
        open_engine(tmp_path)


@pytest.mark.parametrize("vocab_size", [60_000, 70_000])  # u16 and u32 tokens
def test_our_suffix_sort_is_the_byte_order_the_engine_searches(tmp_path, vocab_size):
    """The suffix array against sorting every token-aligned suffix by its bytes, over documents that share
    long runs (the separators and a repeated passage); for u16, byte for byte against infini-gram's own
    indexer, whose format it is (for u32 that indexer asks for 32 GiB and aborts). The engine then counts
    the repeated passage in every document that holds it."""
    import shutil

    import numpy as np

    rng = np.random.default_rng(0)
    passage = rng.integers(0, vocab_size, 40).tolist()
    docs = [(str(i), rng.integers(0, vocab_size, int(rng.integers(1, 60))).tolist() + (passage if i % 3 else []))
            for i in range(30)]
    write_index(docs, vocab_size, [], tmp_path / "ours", eos_token_id=0)
    width = {"u16": 2, "u32": 4}[token_dtype(vocab_size)]
    data = (tmp_path / "ours" / "tokenized.0").read_bytes()
    pointer_bytes = int(np.ceil(np.log2(len(data)) / 8))
    ours = (tmp_path / "ours" / "table.0").read_bytes()
    offsets = [int.from_bytes(ours[k:k + pointer_bytes], "little") for k in range(0, len(ours), pointer_bytes)]
    assert offsets == sorted(range(0, len(data), width), key=lambda o: data[o:])
    if width == 2:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        shutil.copy(tmp_path / "ours" / "tokenized.0", theirs / "tokenized.0")
        args = dict(save_dir=str(theirs), temp_dir=str(theirs), worker_id=0, workers=1, shards=1, mem=1, cpus=1,
                    token_width=width)
        subprocess.run([sys.executable, "-c", "import json, sys; from argparse import Namespace; "
                        "from infini_gram.indexing import build_sa; build_sa(Namespace(**json.loads(sys.argv[1])))",
                        json.dumps(args)], check=True, capture_output=True)
        assert ours == (theirs / "table.0").read_bytes()
    assert open_engine(tmp_path / "ours").count(input_ids=passage)["count"] == sum(1 for i in range(30) if i % 3)


def test_index_answers_like_brute_force_on_a_small_corpus(tmp_path, corpus):
    _, tok, docs, _ = corpus
    texts = ["the cat sat on the mat.", "a dog sat on the log.", "the cat ran."]
    stats = write_index(((str(i), tok(t, add_special_tokens=False)["input_ids"]) for i, t in enumerate(texts)),
                        len(tok), bow_token_ids(tok), tmp_path / "idx", tok.eos_token_id)
    assert stats.documents == 3
    engine = open_engine(tmp_path / "idx")
    tokenized = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    expected = {" sat on the": 2, " the mat": 1, " cat": 2, " bird": 0}
    for phrase, n in expected.items():
        needle = tok(phrase, add_special_tokens=False)["input_ids"]
        assert sum(occurrences(needle, t) for t in tokenized) == n, phrase  # the expectation itself
        assert engine.count(input_ids=needle)["count"] == n, phrase


# --- the owner's service over HTTP ---------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An owner's app served by uvicorn on 127.0.0.1 in a thread (a real HTTP server)."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def owner_service(ws: Path, state_dir: Path, **policy) -> OwnerService:
    base = OwnerService.from_workspace(ws, OWNER)
    return OwnerService(OWNER, base.index_dir, base.tokenizer_dir, state_dir,
                        base.policy.model_copy(update=policy), base.settings)


@pytest.fixture(scope="module")
def ids_server(corpus, tmp_path_factory):
    ws = corpus[0]
    service = owner_service(ws, tmp_path_factory.mktemp("ids"), disclosure="ids", requests_per_minute=100000,
                            clients=["coordinator", "fuzzer"])
    server = Server(create_app(service))
    yield server, service
    server.stop()
    engine = server.server.config.app.state.engine["engine"]
    if engine:
        engine.close()


def post(server, body, token=None, raw: bytes | None = None, service=None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        return httpx.post(f"{server.url}/trace", content=raw, headers=headers, timeout=30)
    return httpx.post(f"{server.url}/trace", json=body, headers=headers, timeout=30)


def test_ids_disclosure_never_returns_document_text(ids_server, corpus):
    server, service = ids_server
    _, _, docs, _ = corpus
    token = service.client_tokens()["coordinator"]
    output, passage = planted_output(docs, random.Random(2))
    r = post(server, {"prompt": "", "output": output}, token)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["spans"] and body["disclosure"] == "ids"
    for sp in body["spans"]:
        assert set(sp) == {"start", "end", "count", "documents"} and sp["count"] in {"1", "2-9", "10-99", "100+"}
        for d in sp["documents"]:
            assert set(d) == {"id", "score"} and len(d["id"]) == 20
    # Nothing of a document beyond what the output already holds: no 20-character run of any
    # document that is not in the output appears in the answer.
    answer = r.text
    for text in docs.values():
        for i in range(0, max(1, len(text) - 20), 97):
            piece = text[i:i + 20]
            assert piece in output or piece not in answer


def test_snippets_are_cut_to_the_policy_length(corpus, tmp_path):
    ws, _, docs, _ = corpus
    service = owner_service(ws, tmp_path, disclosure="snippets", snippet_chars=50)
    server = Server(create_app(service))
    try:
        output, passage = planted_output(docs, random.Random(3))
        r = post(server, {"output": output}, service.client_tokens()["coordinator"])
        assert r.status_code == 200, r.text
        found = [d for sp in r.json()["spans"] for d in sp["documents"]]
        assert found and all(len(d["snippet"]) <= 50 for d in found)
        assert all(0 <= d["match_start"] <= d["match_end"] <= 50 for d in found)
    finally:
        server.stop()


def test_bad_input_gets_a_clear_4xx_and_is_audited(ids_server):
    server, service = ids_server
    token = service.client_tokens()["coordinator"]
    audit = service.state_dir / AUDIT_LOG
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    cases = [
        (dict(body={"output": ""}, token=token), 422, "empty"),
        (dict(body={"output": "x " * 20000}, token=token), 413, "longer than"),
        (dict(body=None, raw=b'{"output": "caf\xc3\x28"}', token=token), 400, "UTF-8"),
        (dict(body=None, raw=b"{not json", token=token), 400, "not JSON"),
        (dict(body=None, raw=b"[" * 100000, token=token), 400, "nested"),
        (dict(body=None, raw=b'{"output": ' + b"7" * 5000 + b"}", token=token), 400, "5000 digits"),
        (dict(body=None, raw=b'{"output": "a", "prompt": -' + b"9" * 100000 + b"}", token=token), 400, "digits"),
        (dict(body=None, raw=b'{"output": NaN}', token=token), 400, "NaN"),
        (dict(body=None, raw=b'{"output": "the", "prompt": -Infinity}', token=token), 400, "Infinity"),
        (dict(body=None, raw=b'{"output": 1e999999}', token=token), 400, "out of range"),
        (dict(body={"output": "the", "output_ids": [1, 99999999]}, token=token), 422, "unknown field"),
        (dict(body={"output": 42}, token=token), 422, "strings"),
        (dict(body=["output"], token=token), 422, "JSON object"),
        (dict(body={"output": "the cat"}, token="wrong-token"), 401, "client token"),
        (dict(body={"output": "the cat"}), 401, "client token"),
    ]
    for kwargs, status, words in cases:
        r = post(server, **kwargs)
        assert r.status_code == status and words in r.json()["error"], (kwargs.get("body"), r.status_code, r.text)
    others = [("/docs", "GET"), ("/openapi.json", "GET"), ("/count", "POST"), ("/ntd", "POST"), ("/search", "POST"),
              ("/trace", "GET")]
    for path, method in others:
        assert httpx.request(method, f"{server.url}{path}").status_code in (404, 405), path
    # One audit line per request, refused ones and other routes included, in order.
    rows = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
    assert [row["status"] for row in rows[:len(cases)]] == [status for _, status, _ in cases]
    assert [row["detail"] for row in rows[len(cases):]] == [f"{m} {p}" for p, m in others]


def test_rate_limit_per_client(corpus, tmp_path):
    ws = corpus[0]
    service = owner_service(ws, tmp_path, requests_per_minute=3, clients=["a", "b"])
    server = Server(create_app(service))
    try:
        tokens = service.client_tokens()
        codes = [post(server, {"output": "the company said"}, tokens["a"]).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        assert post(server, {"output": "the company said"}, tokens["b"]).status_code == 200  # its own budget
        rows = [json.loads(line) for line in (tmp_path / AUDIT_LOG).read_text().splitlines()]
        assert [r["client"] for r in rows] == ["a"] * 5 + ["b"] and rows[3]["status"] == 429
    finally:
        server.stop()


def test_a_crashed_engine_costs_one_request_and_restarts(ids_server):
    server, service = ids_server
    token = service.client_tokens()["coordinator"]
    assert post(server, {"output": "the company said"}, token).status_code == 200
    engine = server.server.config.app.state.engine["engine"]
    engine.proc.kill()
    engine.proc.join()
    r = post(server, {"output": "the company said"}, token)
    assert r.status_code == 503 and "restarted" in r.json()["error"]
    assert post(server, {"output": "the company said"}, token).status_code == 200


def test_fuzz_thousands_of_random_requests_leave_the_service_up(ids_server):
    server, service = ids_server
    token = service.client_tokens()["fuzzer"]
    rng = random.Random(7)
    words = ["the", "company", "said", "shares", ".", "\n", "\x00", "é", "🙂", "\ud800", "{", "\"", "\\"]
    # Bodies that attack the parser rather than the policy.
    hostile = [b'{"output": ' + b"1" * 5000 + b"}", b'{"output": ' + b"1" * 100000 + b"}", b"[" * 50000 + b"]" * 50000,
               b'{"output": ' * 20000, b'{"output": NaN}', b'{"output": 1e999999}', b'{"output": -Infinity}',
               b'{"output": "x", "prompt": 1e999999}', b'{"output": "the", "x": 12345678901234567890123}']
    audit = service.state_dir / AUDIT_LOG
    before = len(audit.read_text().splitlines()) if audit.exists() else 0
    statuses = {}
    with httpx.Client(timeout=30) as client:
        for i in range(2000):
            kind = i % 5
            if kind == 4:
                content = hostile[(i // 5) % len(hostile)]
            elif kind == 0:
                content = rng.randbytes(rng.randrange(0, 200))
            elif kind == 1:
                text = " ".join(rng.choice(words) for _ in range(rng.randrange(0, 60)))
                content = json.dumps({"output": text}).encode()
            elif kind == 2:
                value = rng.choice([None, 1, [], {}, "a" * rng.randrange(50)])
                content = json.dumps({rng.choice(["output", "prompt", "x"]): value}).encode()
            else:
                text = "".join(chr(rng.randrange(1, 0x2FFF)) for _ in range(rng.randrange(1, 80)))
                content = json.dumps({"prompt": text, "output": text}).encode()
            r = client.post(f"{server.url}/trace", content=content, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code < 500, (content[:200], r.status_code, r.text)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
    assert statuses.get(200, 0) > 300 and statuses.get(400, 0) >= 400 and sum(statuses.values()) == 2000
    assert len(audit.read_text().splitlines()) - before == 2000  # exactly one audit line per request
    assert post(server, {"output": "the company said"}, token).status_code == 200


# --- the coordinator: all owners' services as processes, the CLI ----------------------------------

def test_serve_trace_and_an_owner_that_is_down(corpus):
    ws, _, docs, _ = corpus
    from tracing.coordinator import load_registry, start_services, stop_services, trace_everywhere

    procs = start_services(ws, ["news", "code"])
    try:
        output, passage = planted_output(docs, random.Random(4))
        # One of the three owners is not served: the answer says so and the command fails.
        cli = run_consort("trace", "--text", output, "--json", "--workspace", str(ws), cwd=ws.parent, check=False)
        assert cli.returncode == 1, cli.stderr
        named = sorted(line.split()[1] for line in cli.stderr.splitlines() if " not searched: start it with " in line)
        assert named == ["math"], cli.stderr
        result = json.loads(cli.stdout)
        assert result["owners"]["news"]["status"] == "ok" and result["owners"]["code"]["status"] == "ok"
        assert result["owners"]["math"]["status"] == "unavailable"
        news_spans = [sp for seg in result["segments"] for sp in seg["spans"] if sp["owner"] == "news"]
        assert any(output[sp["start"]:sp["end"]] == passage for sp in news_spans)
        assert all(0 <= sp["relevance"] <= 1 for seg in result["segments"] for sp in seg["spans"])
        text = run_consort("trace", "--text", output, "--workspace", str(ws), cwd=ws.parent, check=False).stdout
        assert "[news]" in text and passage in text
        stop_services({"news": procs.pop("news")})
        partial = trace_everywhere(load_registry(ws), "", output)
        assert partial["owners"]["news"]["status"] == "unavailable"
        assert partial["owners"]["code"]["status"] == "ok"
        stop_services({"code": procs.pop("code")})
        # Every service down: a failure naming them, never "no span was found".
        down = run_consort("trace", "--text", output, "--workspace", str(ws), cwd=ws.parent, check=False)
        assert down.returncode == 1 and "no span" not in down.stdout
        assert "consort: code not searched: start it with `consort serve" in down.stderr
        assert "consort: news not searched: start it with `consort serve" in down.stderr
    finally:
        stop_services(procs)


def self_signed(folder: Path, ip: str) -> tuple[Path, Path]:
    """A self-signed certificate for `ip` (its own CA) and its key, as PEM files."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"consort test {ip}")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
    return folder / "cert.pem", folder / "key.pem"


def test_an_owner_on_another_address_is_traced_over_tls_and_only_with_its_certificate(corpus, tmp_path):
    """The owner serves on 127.0.0.2 with a self-signed certificate; a coordinator with its own
    workspace records it as a remote owner and traces through it; a coordinator expecting another
    certificate, or speaking plain HTTP, gets no answer."""
    from tracing.coordinator import (
        add_remote_owner,
        load_registry,
        start_services,
        stop_services,
        trace_everywhere,
        write_registry,
    )
    from tracing.service import Listen

    ws, _, docs, _ = corpus
    cert, key = self_signed(tmp_path / "owner", "127.0.0.2")
    other_cert, _ = self_signed(tmp_path / "stranger", "127.0.0.2")
    coordinator = tmp_path / "coordinator"
    port, procs = free_port(), {}
    try:
        add_remote_owner(ws, "partner", "https://127.0.0.3:9", "t", None)  # recorded before `consort serve`
        procs = start_services(ws, [OWNER], base_port=port - list(P.load(ws / "params.yaml").owners).index(OWNER),
                               listen=Listen("127.0.0.2", 0, cert, key))
        local = load_registry(ws)
        assert local[OWNER]["url"] == f"https://127.0.0.2:{port}" and local["partner"]["remote"]  # kept
        output, passage = planted_output(docs, random.Random(9))
        add_remote_owner(coordinator, OWNER, local[OWNER]["url"], local[OWNER]["token"], cert)
        answer = trace_everywhere(load_registry(coordinator), "", output)["owners"][OWNER]
        assert answer["status"] == "ok" and any(output[sp["start"]:sp["end"]] == passage for sp in answer["spans"])
        add_remote_owner(coordinator, OWNER, local[OWNER]["url"], local[OWNER]["token"], other_cert)
        refused = trace_everywhere(load_registry(coordinator), "", output)["owners"][OWNER]
        assert refused["status"] == "unavailable" and "CERTIFICATE_VERIFY_FAILED" in refused["error"]
        add_remote_owner(coordinator, OWNER, f"http://127.0.0.2:{port}", local[OWNER]["token"], None)
        assert trace_everywhere(load_registry(coordinator), "", output)["owners"][OWNER]["status"] == "unavailable"
    finally:
        stop_services(procs)
        # The workspace is shared with other tests: leave its registry as `consort serve` writes it.
        write_registry(ws, {o: e for o, e in load_registry(ws).items() if o != "partner"})


def test_a_service_off_loopback_needs_tls_and_a_remote_owner_https(corpus, tmp_path):
    ws = corpus[0]
    proc = subprocess.run([sys.executable, "-m", "tracing.service", OWNER, "--workspace", str(ws), "--host",
                           "192.0.2.10", "--port", str(free_port())], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "192.0.2.10 is not a loopback address: serve it over TLS" in proc.stderr
    cert, _ = self_signed(tmp_path, "127.0.0.2")
    half = subprocess.run([sys.executable, "-m", "tracing.service", OWNER, "--workspace", str(ws), "--port",
                           str(free_port()), "--tls-cert", str(cert)], capture_output=True, text=True, timeout=120)
    assert half.returncode != 0 and "TLS needs both a certificate" in half.stderr
    from tracing.coordinator import add_remote_owner

    with pytest.raises(ValueError, match="reached over https only"):
        add_remote_owner(tmp_path / "c", "news", "http://192.0.2.10:8700", "t", None)
    with pytest.raises(FileNotFoundError, match="no such certificate file"):
        add_remote_owner(tmp_path / "c", "news", "https://192.0.2.10:8700", "t", tmp_path / "missing.pem")
    assert not (tmp_path / "c" / "tracing" / "services.json").exists()


def test_overlapping_spans_merge_into_one_display_segment():
    from tracing.attribution import merge_for_display

    spans = [{"start": 10, "end": 20, "owner": "a"}, {"start": 0, "end": 5, "owner": "b"},
             {"start": 15, "end": 30, "owner": "b"}, {"start": 30, "end": 35, "owner": "a"}]
    segments = merge_for_display(spans)
    assert [(s["start"], s["end"], [sp["owner"] for sp in s["spans"]]) for s in segments] == [
        (0, 5, ["b"]), (10, 30, ["a", "b"]), (30, 35, ["a"])]


def test_differencing_learns_nothing_beyond_per_span_buckets(ids_server, corpus):
    """DESIGN.md section 8: count(target OR common) - count(common) recovered an exact count behind a
    threshold. Here there are no OR queries and no totals: each span carries only its own bucket,
    the same whether it is asked alone or next to a common span."""
    server, service = ids_server
    _, _, docs, _ = corpus
    token = service.client_tokens()["coordinator"]
    _, target = planted_output(docs, random.Random(5))
    common = "the company said"

    def spans(text):
        r = post(server, {"output": text}, token)
        assert r.status_code == 200, r.text
        return {text[s["start"]:s["end"]]: s["count"] for s in r.json()["spans"]}

    alone, together = spans(f"Zqxv {target} vqzx."), spans(f"{common} on Monday. Zqxv {target} vqzx.")
    assert alone == {target: "1"}
    assert together[target] == "1" and set(together.values()) <= {"1", "2-9", "10-99", "100+"}
    # A single token (a next-token probe) is below every owner's minimum span length: no answer.
    assert spans("the") == {}


def test_remote_owner_command_adds_lists_and_removes(tmp_path):
    cert, _ = self_signed(tmp_path / "cert", "127.0.0.2")
    ws = tmp_path / "coordinator"
    added = run_consort("remote-owner", "add", "clinic", "https://127.0.0.2:8750", "--token", "t0k",
                        "--ca", str(cert), "--workspace", str(ws), cwd=tmp_path)
    assert f"clinic: https://127.0.0.2:8750, expecting the certificate {cert}" in added.stdout
    listed = run_consort("remote-owner", "list", "--workspace", str(ws), cwd=tmp_path).stdout
    assert "clinic" in listed and "remote" in listed
    insecure = run_consort("remote-owner", "add", "clinic", "http://10.1.2.3:8750", "--workspace", str(ws),
                           cwd=tmp_path, check=False)
    assert insecure.returncode == 2 and "over https only" in insecure.stderr
    run_consort("remote-owner", "remove", "clinic", "--workspace", str(ws), cwd=tmp_path)
    assert json.loads((ws / "tracing" / "services.json").read_text()) == {}
    again = run_consort("remote-owner", "remove", "clinic", "--workspace", str(ws), cwd=tmp_path, check=False)
    assert again.returncode == 2 and "no remote owner 'clinic'" in again.stderr
