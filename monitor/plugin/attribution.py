"""Which rows of a step belong to which request, from CPU-side state only (no GPU reads, no sync).

V1 runner: after `execute_model`, `input_batch.req_ids[:num_reqs]` is the forward order and each
request contributes `scheduler_output.num_scheduled_tokens[req_id]` consecutive rows, starting at
absolute position `num_computed_tokens` (the tokens computed before this step, prefix-cache hits
included: cached positions get no forward pass, so they get no rows, and the reader reports them
as not covered rather than inventing rows).

Token ids come from the same CPU state (`input_batch.token_ids_cpu`, the row's input token): a few
bytes per row, no text, nothing read from the device.

Ids: a worker sees `"{external}-{8 hex}"`, or `"{i}_{external}-{8 hex}"` for the i-th of n > 1
samples. The OpenAI server's external id is `chatcmpl-` / `cmpl-` + the `X-Request-Id` header,
which our middleware guarantees is set, so alerts name an id the caller can find. An id over
`MAX_ID_CHARS` is written cut (`wire_id`), in segments and finished lists alike.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from monitor.transport.meta import Segment, parse_request_id, wire_id

def v1_segments(runner, scheduler_output) -> tuple[list[Segment], np.ndarray | None]:
    """The step's segments, and each row's input token id (in row order)."""
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    scheduled = scheduler_output.num_scheduled_tokens
    token_ids = getattr(batch, "token_ids_cpu", None)
    segments: list[Segment] = []
    ids: list[np.ndarray] = []
    row = 0
    for i, req in enumerate(batch.req_ids[:num_reqs]):
        n = scheduled.get(req, 0)
        if n == 0:
            continue
        req = wire_id(req)
        external, request_id, sample = parse_request_id(req)
        start = int(batch.num_computed_tokens_cpu[i])
        segments.append(Segment(
            req=req, external_id=external, request_id=request_id, sample=sample,
            start=start, n=int(n), n_prompt=int(batch.num_prompt_tokens[i]), row=row,
        ))
        if token_ids is not None:
            ids.append(token_ids[i, start : start + n])
        row += n
    if token_ids is None or not ids:
        return segments, None
    return segments, np.concatenate(ids).astype(np.int32, copy=False)


def split_segments(segments: list[Segment], max_rows: int) -> list[tuple[int, int, list[Segment]]]:
    """Cut a step's segments into chunks of at most `max_rows` rows: (first row, rows, segments)."""
    total = sum(s.n for s in segments)
    if total <= max_rows:  # the usual step: one slot, segments as they are (no copies on the inference thread)
        return [(0, total, segments)]
    chunks: list[tuple[int, int, list[Segment]]] = []
    current: list[Segment] = []
    chunk_start, used = 0, 0
    for seg in segments:
        offset = 0
        while offset < seg.n:
            take = min(seg.n - offset, max_rows - used)
            current.append(replace(seg, start=seg.start + offset, n=take, row=used))
            used += take
            offset += take
            if used == max_rows:
                chunks.append((chunk_start, used, current))
                chunk_start, used, current = chunk_start + used, 0, []
    if current:
        chunks.append((chunk_start, used, current))
    return chunks


def v2_segments(runner, scheduler_output) -> tuple[list[Segment], np.ndarray | None]:
    """V2 runner (vLLM >= 0.33 with Triton): the step's batch lives on `execute_model_state` until
    `sample_tokens` runs. Rows are laid out by `query_start_loc_np` (decode-first order).

    Written against the 0.32 source; only a GPU build runs V2, so it is not exercised on CPU CI.
    Its input ids live on the device only: no token ids are sent (reading them would sync).
    """
    state = runner.execute_model_state
    if state is None:
        return [], None
    b = state.input_batch
    segments = []
    for i in range(b.num_reqs):
        req = b.req_ids[i]
        n = int(b.num_scheduled_tokens[i])
        if n == 0:
            continue
        req = wire_id(req)
        external, request_id, sample = parse_request_id(req)
        segments.append(Segment(
            req=req, external_id=external, request_id=request_id, sample=sample,
            start=int(b.num_computed_tokens_np[i]), n=n, n_prompt=int(b.prefill_len_np[i]),
            row=int(b.query_start_loc_np[i]),
        ))
    return segments, None
