"""`pdmesh batch`: submit a JSONL file as a durable batch job, follow it with a progress bar,
collect its results into a JSONL file, and status / list / cancel jobs.

Input, one request per line (blank lines are skipped), the OpenAI batch shape:
    {"custom_id": "q1", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "The capital of France is", "max_tokens": 30, "temperature": 0}}
or the same fields without the envelope: {"custom_id": "q1", "prompt": "...", "max_tokens": 30}.
`prompt` is text or a list of token ids; optional: temperature, top_p, seed, ignore_eos.
Output, one result per line in input order:
    {"custom_id": "q1", "response": {"text", "token_ids", "finish_reason", "usage"}, "error": null}
    {"custom_id": "q2", "response": null, "error": {"code": "INVALID_ARGUMENT", "message": "..."}}
"""

import argparse
import json
import os
import sys
import time

_BODY_KEYS = {"prompt", "max_tokens", "temperature", "top_p", "seed", "ignore_eos"}


class InputError(ValueError):
    """A line of the input file is not a request; the message names the line."""


def parse_line(line: str, number: int):
    """(custom_id, GenerateRequest) of one input line."""
    from pdmesh.v1 import common_pb2, router_pb2

    try:
        data = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"line {number}: not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("custom_id"), str) or not data["custom_id"]:
        raise InputError(f"line {number}: needs a non-empty string \"custom_id\"")
    body = data.get("body", data)
    if not isinstance(body, dict):
        raise InputError(f"line {number}: \"body\" must be an object")
    if "messages" in body:
        raise InputError(f"line {number}: chat \"messages\" are not supported; send a completion \"prompt\"")
    unknown = set(body) - _BODY_KEYS - {"model", "custom_id"}  # model: the mesh serves one; ignored
    if unknown:
        raise InputError(f"line {number}: unknown fields {sorted(unknown)}; known: {sorted(_BODY_KEYS)}")
    prompt = body.get("prompt")
    try:
        request = router_pb2.GenerateRequest(max_tokens=int(body.get("max_tokens", 64)),
                                             ignore_eos=bool(body.get("ignore_eos", False)))
        sampling = common_pb2.SamplingParams(temperature=float(body.get("temperature", 0.0)))
        if "top_p" in body:
            sampling.top_p = float(body["top_p"])
        if "seed" in body:
            sampling.seed = int(body["seed"])
    except (TypeError, ValueError) as exc:
        raise InputError(f"line {number}: max_tokens, temperature, top_p and seed must be numbers ({exc})") from None
    if isinstance(prompt, str) and prompt:
        request.text = prompt
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and t >= 0 for t in prompt):
        request.token_ids.ids.extend(prompt)
    else:
        raise InputError(f"line {number}: \"prompt\" must be non-empty text or a list of token ids")
    request.sampling.CopyFrom(sampling)
    return data["custom_id"], request


def read_items(path: str):
    from pdmesh.v1 import batch_pb2

    with open(path) as f:
        return [batch_pb2.BatchItem(custom_id=cid, request=request) for cid, request in
                (parse_line(line, n) for n, line in enumerate(f, 1) if line.strip())]


def result_to_json(result) -> dict:
    import grpc

    from pdmesh.v1 import common_pb2

    if result.error_code:
        code = next((c.name for c in grpc.StatusCode if c.value[0] == result.error_code), str(result.error_code))
        return {"custom_id": result.custom_id, "response": None, "error": {"code": code,
                                                                           "message": result.error_message}}
    finish = common_pb2.FinishReason.Name(result.finish_reason).removeprefix("FINISH_REASON_").lower()
    usage = result.usage
    return {"custom_id": result.custom_id, "error": None, "response": {
        "text": result.text, "token_ids": list(result.token_ids), "finish_reason": finish,
        "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                  "cached_prompt_tokens": usage.cached_prompt_tokens}}}


def job_to_json(job) -> dict:
    from pdmesh.v1 import batch_pb2

    return {"job_id": job.job_id, "tenant_id": job.tenant_id,
            "status": batch_pb2.BatchJobStatus.Name(job.status).removeprefix("BATCH_JOB_STATUS_").lower(),
            "total": job.total_items, "completed": job.completed_items, "failed": job.failed_items,
            "progress": round(job.progress, 4), "created_unix_ms": job.created_unix_ms,
            "started_unix_ms": job.started_unix_ms, "ended_unix_ms": job.ended_unix_ms,
            "metadata": dict(job.metadata), **({"error": job.error} if job.error else {})}


def _write_results(path: str, results) -> None:
    results = sorted(results, key=lambda r: r.item_index)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for result in results:
            f.write(json.dumps(result_to_json(result)) + "\n")
    os.replace(tmp, path)


def _follow(stub, tenant: str, job, out: str | None, quiet: bool, auth=()) -> int:
    """Streams the job's results with a progress bar until it ends; writes them to `out`. `auth`: call metadata."""
    from tqdm import tqdm

    from pdmesh.v1 import batch_pb2

    results, token = [], ""
    with tqdm(total=job.total_items, unit="req", desc=job.job_id, disable=quiet, file=sys.stderr) as bar:
        while True:  # a broken stream (router restart) resumes after the last result received
            try:
                for message in stub.StreamBatchResults(batch_pb2.StreamBatchResultsRequest(
                        tenant_id=tenant, job_id=job.job_id, page_token=token), metadata=auth):
                    results.append(message.result)
                    token = message.resume_token
                    bar.update(1)
                break
            except Exception as exc:  # grpc.RpcError
                code = exc.code().name if hasattr(exc, "code") else ""
                if code not in ("UNAVAILABLE", "CANCELLED"):
                    raise
                bar.write(f"router unavailable ({exc.details()}); retrying in 2 s")
                time.sleep(2)
    job = stub.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant_id=tenant, job_id=job.job_id), metadata=auth).job
    if out:
        _write_results(out, results)
        print(f"{len(results)} results written to {out}", file=sys.stderr)
    print(json.dumps(job_to_json(job)))
    return 0 if job.failed_items == 0 and job.status == batch_pb2.BATCH_JOB_STATUS_COMPLETED else 1


def cmd_batch(args: argparse.Namespace) -> int:
    import grpc

    from pdmesh.v1 import batch_pb2, batch_pb2_grpc
    from services.common.tls import blocking_channel, tls_from_args

    auth = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    try:
        with blocking_channel(args.router, tls_from_args(args, warn_plaintext=False)) as channel:
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            tenant = args.tenant
            if args.action == "submit":
                items = read_items(args.target)
                metadata = {"source": os.path.basename(args.target)}
                job = stub.CreateBatchJob(batch_pb2.CreateBatchJobRequest(
                    tenant_id=tenant, items=items, metadata=metadata, idempotency_key=args.idempotency_key),
                    timeout=120, metadata=auth).job
                print(f"submitted {job.job_id} ({job.total_items} requests)", file=sys.stderr)
                if args.wait or args.out:
                    return _follow(stub, tenant, job, args.out, args.quiet, auth)
                print(job.job_id)
                return 0
            if args.action == "list":
                response = stub.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant_id=tenant, page_size=args.limit),
                                               metadata=auth)
                for job in response.jobs:
                    j = job_to_json(job)
                    print(f"{j['job_id']}  {j['status']:<10} {j['completed']:>6}/{j['total']:<6} failed {j['failed']}")
                return 0
            if not args.target:
                print(f"error: `pdmesh batch {args.action}` needs a job id", file=sys.stderr)
                return 2
            get = batch_pb2.GetBatchJobRequest(tenant_id=tenant, job_id=args.target)
            if args.action == "status":
                print(json.dumps(job_to_json(stub.GetBatchJob(get, timeout=30, metadata=auth).job), indent=2))
                return 0
            if args.action == "cancel":
                job = stub.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant_id=tenant, job_id=args.target),
                                          timeout=60, metadata=auth).job
                print(json.dumps(job_to_json(job)))
                return 0
            job = stub.GetBatchJob(get, timeout=30, metadata=auth).job  # results
            if args.wait:
                return _follow(stub, tenant, job, args.out, args.quiet, auth)
            results, token = [], ""
            while True:
                page = stub.ListBatchResults(batch_pb2.ListBatchResultsRequest(
                    tenant_id=tenant, job_id=args.target, page_size=1000, page_token=token), timeout=60, metadata=auth)
                results += page.results
                token = page.next_page_token
                if not token or not page.results:
                    break
            if args.out:
                _write_results(args.out, results)
                print(f"{len(results)} of {job.total_items} results written to {args.out}", file=sys.stderr)
            else:
                for result in sorted(results, key=lambda r: r.item_index):
                    print(json.dumps(result_to_json(result)))
            return 0
    except InputError as exc:
        print(f"error: {args.target}: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2


def add_batch_parser(sub, default_router: str) -> None:
    batch = sub.add_parser("batch", help="durable batch jobs: submit a JSONL file, follow, collect results",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    batch.add_argument("action", choices=["submit", "status", "results", "cancel", "list"])
    batch.add_argument("target", nargs="?", default="", help="submit: the JSONL file; status/results/cancel: job id")
    batch.add_argument("--tenant", default=os.environ.get("PDMESH_TENANT", ""), help="tenant (env PDMESH_TENANT)")
    batch.add_argument("--wait", action="store_true", help="submit/results: follow the job with a progress bar")
    batch.add_argument("--out", default="", help="submit/results: write the results here (JSONL, input order)")
    batch.add_argument("--limit", type=int, default=50, help="list: jobs to show")
    batch.add_argument("--quiet", action="store_true", help="no progress bar")
    batch.add_argument("--idempotency-key", default="",
                       help="submit: running the same submit again (same key, file and tenant) returns the first job")
    batch.add_argument("--router", default=default_router)
    batch.add_argument("--api-key", default=os.environ.get("PDMESH_API_KEY", ""),
                       help="sent as `authorization: Bearer KEY` (env PDMESH_API_KEY)")
    from services.common.tls import add_tls_flags
    add_tls_flags(batch)
    batch.set_defaults(func=cmd_batch)
