"""OLMoTrace attribution on one owner's index (DESIGN.md section 4), run on the owner's side.

For an output (and its prompt): the engine finds, at every word start, the longest span of the
output that occurs in the corpus, cut after a delimiter ('.' or a newline), made of whole words,
occurring at most `max_count` times, and drops spans contained in others. We keep the
ceil(span_fraction * L) spans with the lowest summed unigram log-probability (the rarest), fetch
up to `docs_per_span` documents for each, and rank the documents by BM25 against prompt + output.
What leaves the owner is decided by its policy (tracing/service.py), not here.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
from dataclasses import dataclass, field

import bm25s

from stages import params as P

DELIMITERS = (".", "\n")


@dataclass(frozen=True)
class TraceSettings:
    """What one owner's attribution runs with: params.yaml's `trace` section, shared by every
    owner, and the owner's own `min_span_tokens` (its policy). No defaults of its own: they are
    params.py's, through `of`."""
    span_fraction: float          # keep ceil(span_fraction * output tokens) spans, the rarest
    max_count: int                # spans occurring more often are dropped (and the engine stays fast)
    docs_per_span: int
    min_span_tokens: int
    context_tokens: int           # tokens fetched on each side of a span for a snippet

    @classmethod
    def of(cls, trace: P.TraceParams, policy: P.TracePolicy) -> TraceSettings:
        return cls(span_fraction=trace.span_fraction, max_count=trace.max_count, docs_per_span=trace.docs_per_span,
                   min_span_tokens=policy.min_span_tokens, context_tokens=trace.context_tokens)


@dataclass
class TracedDocument:
    doc_id: str                   # the owner's own id; keyed-hashed before it leaves the owner
    text: str                     # the fetched window around the span (never leaves without a policy)
    needle_start: int             # character offsets of the span in `text`
    needle_end: int
    score: float = 0.0            # BM25 against prompt + output


@dataclass
class TracedSpan:
    start: int                    # character offsets in the output
    end: int
    token_start: int
    token_end: int
    count: int                    # occurrences in the corpus (bucketed before it leaves the owner)
    unigram_logprob: float
    documents: list[TracedDocument] = field(default_factory=list)


def delimiter_ids(tokenizer) -> list[int]:
    """Tokens that end a span: '.' and newline on their own or at the end of a token."""
    vocab = tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if tokenizer.convert_tokens_to_string([t]).endswith(DELIMITERS))


def keyed_doc_id(key: bytes, doc_id: str) -> str:
    """An opaque, stable id: HMAC, so nobody without the owner's key can test a guess of a document."""
    return hmac.new(key, doc_id.encode(), hashlib.sha256).hexdigest()[:20]


def count_bucket(count: int) -> str:
    """Counts leave the owner only as an order of magnitude."""
    if count <= 1:
        return "1"
    if count < 10:
        return "2-9"
    if count < 100:
        return "10-99"
    return "100+"


def _char_span(offsets: list[tuple[int, int]], text: str, first: int, stop: int) -> tuple[int, int]:
    start, end = offsets[first][0], offsets[stop - 1][1]
    while start < end and text[start].isspace():  # byte-level tokens carry the space before a word
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _ends_word(output: str, offsets: list[tuple[int, int]], r: int) -> bool:
    """Whether the token span ending before token r ends at a word boundary of the output."""
    end = offsets[r - 1][1]
    return end >= len(output) or not (output[end].isalnum() and output[end - 1].isalnum())


def whole_word_spans(engine, spans: list[dict], ids: list[int], offsets: list[tuple[int, int]], output: str,
                     s: TraceSettings) -> list[dict]:
    """The engine's spans (which start at word starts) cut back to end at a word end too.

    A cut span is a prefix of one found in the corpus, so it still occurs there (the engine's
    document pointers stay valid), but it may occur more often: it is counted again, dropped above
    the frequency cap, and its unigram log-probability summed again. Spans that end up inside
    another are dropped, as the engine does.
    """
    kept = []
    total = None
    for sp in spans:
        r = sp["r"]
        while r > sp["l"] and not _ends_word(output, offsets, r):
            r -= 1
        if r - sp["l"] < s.min_span_tokens:
            continue
        if r != sp["r"]:
            count = engine.count(input_ids=ids[sp["l"]:r])["count"]
            if count > s.max_count:
                continue
            total = total or engine.count(input_ids=[])["count"]
            logprob = sum(math.log(max(engine.count(input_ids=[t])["count"], 1) / total) for t in ids[sp["l"]:r])
            sp = {**sp, "r": r, "length": r - sp["l"], "count": count, "unigram_logprob_sum": logprob}
        kept.append(sp)
    return [sp for sp in kept if not any(o["l"] <= sp["l"] and sp["r"] <= o["r"] and (o["l"], o["r"]) != (sp["l"], sp["r"])
                                         for o in kept)]


def _decode_window(tokenizer, token_ids: list[int], needle_offset: int, needle_len: int) -> tuple[str, int, int]:
    before = tokenizer.decode(token_ids[:needle_offset])
    needle = tokenizer.decode(token_ids[needle_offset:needle_offset + needle_len])
    after = tokenizer.decode(token_ids[needle_offset + needle_len:])
    return before + needle + after, len(before), len(before) + len(needle)


def attribute(engine, tokenizer, prompt: str, output: str, s: TraceSettings,
              delims: list[int] | None = None) -> list[TracedSpan]:
    """The rarest maximal spans of `output` found in the index, each with its ranked documents."""
    enc = tokenizer(output, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if not ids:
        return []
    found = engine.attribute(input_ids=ids, delim_ids=delims if delims is not None else delimiter_ids(tokenizer),
                             min_len=s.min_span_tokens, max_cnt=s.max_count, enforce_bow=True)
    if "error" in found:
        raise ValueError(f"the index refused the query: {found['error']}")
    spans = whole_word_spans(engine, found["spans"], ids, offsets, output, s)
    spans = sorted(spans, key=lambda sp: sp["unigram_logprob_sum"])[:math.ceil(s.span_fraction * len(ids))]
    traced = []
    for sp in sorted(spans, key=lambda sp: sp["l"]):
        start, end = _char_span(offsets, output, sp["l"], sp["r"])
        requests = [(d["s"], d["ptr"], sp["length"], s.context_tokens) for d in sp["docs"][:s.docs_per_span]]
        docs = []
        for got in engine.get_docs_by_ptrs_2(requests) if requests else []:
            text, a, b = _decode_window(tokenizer, got["token_ids"], got["needle_offset"], sp["length"])
            docs.append(TracedDocument(json.loads(got["metadata"])["doc_id"], text, a, b))
        traced.append(TracedSpan(start, end, sp["l"], sp["r"], sp["count"], sp["unigram_logprob_sum"], docs))
    rank_documents(traced, prompt + "\n" + output)
    return traced


def rank_documents(spans: list[TracedSpan], query: str) -> None:
    """BM25 score of every fetched document against the query, documents sorted best first per span."""
    docs = [d for sp in spans for d in sp.documents]
    if not docs:
        return
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d.text for d in docs], stopwords=None, show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize([query], stopwords=None, show_progress=False, return_ids=False)[0] or [""]
    scores = retriever.get_scores(query_tokens)
    for d, score in zip(docs, scores):
        d.score = float(score)
    for sp in spans:
        sp.documents.sort(key=lambda d: -d.score)


def merge_for_display(spans: list[dict]) -> list[dict]:
    """Overlapping spans (from one owner or several) merged into display segments.

    Each input has 'start', 'end' and anything else; each segment lists the spans it covers.
    """
    segments: list[dict] = []
    for sp in sorted(spans, key=lambda sp: (sp["start"], -sp["end"])):
        if segments and sp["start"] < segments[-1]["end"]:
            segments[-1]["end"] = max(segments[-1]["end"], sp["end"])
            segments[-1]["spans"].append(sp)
        else:
            segments.append({"start": sp["start"], "end": sp["end"], "spans": [sp]})
    return segments
