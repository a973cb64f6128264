"""The `pdmesh` command: `pdmesh up` runs a local mesh; `pdmesh generate PROMPT` streams a completion;
`pdmesh traces` collects OTLP traces locally, draws one request's waterfall and reports per-phase latency;
`pdmesh certs` makes a local CA and certificates for mutual TLS."""

import argparse
import asyncio
import os
import signal
import sys
import time

DEFAULT_ROUTER = "127.0.0.1:50051"


def _engines(engine: str) -> dict:
    """MeshSpec fields that put both pools on `engine`."""
    if engine == "builtin":
        return {}
    from pdmesh.launcher import vllm_python
    python = vllm_python()
    return dict(prefill_engine=engine, prefill_python=python, decode_engine=engine, decode_python=python,
                startup_timeout_s=600)


def cmd_up(args: argparse.Namespace) -> int:
    from engine.weights import prepare
    from pdmesh.launcher import MeshSpec, start_mesh

    if args.model != "tiny":
        prepare()  # the slow one-time work (GGUF -> safetensors, tokenizer.json) happens here, once
    receiver = None
    endpoint = args.otlp_endpoint
    if args.traces:
        from pdmesh.traces.receiver import OtlpReceiver
        receiver = OtlpReceiver(jsonl_path=args.traces)
        endpoint = receiver.endpoint
        print(f"collecting traces into {args.traces} (OTLP/gRPC receiver at {endpoint})", flush=True)
    tls_dir = _tls_dir_for_up(args)
    spec = MeshSpec(num_prefill=args.prefill, num_decode=args.decode, router_port=args.port,
                    http_port=None if args.http_port in ("off", "-1") else int(args.http_port), model=args.model,
                    kv_transports=args.kv_transports, profile=args.profile, num_blocks=args.num_blocks,
                    torch_threads=args.torch_threads, otlp_endpoint=endpoint, tls_dir=tls_dir,
                    api_keys_file=args.api_keys_file, batch_db=args.batch_db, **_engines(args.engine))
    print(f"starting {spec.num_prefill} prefill + {spec.num_decode} decode worker(s) and a router ...", flush=True)
    mesh = start_mesh(spec, args.run_dir)
    for p in mesh.processes:
        if p.info.get("metrics_address"):
            print(f"  {p.name:<10} metrics at http://{p.info['metrics_address']}/metrics", flush=True)
    if endpoint:
        print(f"traces exported to {endpoint}" + (f"; view one: .venv/bin/pdmesh traces show {args.traces}"
                                                   if args.traces else ""), flush=True)
    http = f"OpenAI-compatible HTTP at {mesh.http_address}/v1\n" if mesh.http_address else ""
    tls_flags = (f" --tls-cert {tls_dir}/client.pem --tls-key {tls_dir}/client.key --tls-ca {tls_dir}/ca.pem"
                 if tls_dir else "")
    print(f"router listening on {mesh.router_address}\n{http}"
          f"logs in {mesh.run_dir}\n"
          f"try:  .venv/bin/pdmesh generate \"The capital of France is\" --max-tokens 30 --router {mesh.router_address}"
          f"{tls_flags}\n"
          "Ctrl-C stops the mesh.", flush=True)
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    try:
        while not stopped:
            dead = [p for p in mesh.processes if p.popen.poll() is not None]
            if dead:
                print(f"{dead[0].name} exited (code {dead[0].popen.returncode}); see {dead[0].log_file}", flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the mesh (draining streams) ...", flush=True)
        mesh.stop()
        if receiver is not None:
            receiver.stop()
    return 0


def _tls_dir_for_up(args: argparse.Namespace) -> str:
    """`--tls DIR` uses the certificates in DIR; a bare `--tls` makes them under the run directory."""
    if not args.tls:
        return ""
    if args.tls != "auto":
        return args.tls
    import tempfile

    from pdmesh.certs import make_certs
    if args.run_dir is None:
        args.run_dir = tempfile.mkdtemp(prefix="pdmesh-run-")
    out = os.path.join(args.run_dir, "certs")
    make_certs(out)
    print(f"mutual TLS: certificates made in {out}", flush=True)
    return out


def cmd_certs(args: argparse.Namespace) -> int:
    from pdmesh.certs import make_certs

    paths = make_certs(args.out, tuple(args.name), args.days)
    print(f"CA and certificates written to {args.out}:\n" + "\n".join(f"  {p}" for p in paths.values()) +
          f"\nservices: --tls-cert {paths['mesh.pem']} --tls-key {paths['mesh.key']} --tls-ca {paths['ca.pem']}"
          f"\nclients:  --tls-cert {paths['client.pem']} --tls-key {paths['client.key']} --tls-ca {paths['ca.pem']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    return asyncio.run(_generate(args))


async def _generate(args: argparse.Namespace) -> int:
    import grpc

    from pdmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

    sampling = common_pb2.SamplingParams(temperature=args.temperature, top_p=args.top_p)
    if args.seed is not None:
        sampling.seed = args.seed
    priority = {"interactive": common_pb2.PRIORITY_CLASS_INTERACTIVE, "batch": common_pb2.PRIORITY_CLASS_BATCH}
    request = router_pb2.GenerateRequest(text=args.prompt, sampling=sampling, max_tokens=args.max_tokens,
                                         priority=priority[args.priority], tenant_id=args.tenant,
                                         ignore_eos=args.ignore_eos)
    from services.common.tls import aio_channel, tls_from_args

    metadata = (("authorization", f"Bearer {args.api_key}"),) if args.api_key else ()
    async with aio_channel(args.router, tls_from_args(args, warn_plaintext=False)) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        try:
            if not args.quiet:
                sys.stdout.write(args.prompt)
            call = stub.Generate(request, timeout=args.timeout, metadata=metadata)
            async for message in call:
                sys.stdout.write(message.text_delta)
                sys.stdout.flush()
                if message.finish_reason:
                    last = message
        except grpc.aio.AioRpcError as exc:
            print(f"\nerror: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 2
    t, u, p = last.timings, last.usage, last.placement
    finish = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    print(f"\n\n[{u.completion_tokens} tokens, finish={finish}, TTFT {t.time_to_first_token_ms:.0f} ms, "
          f"total {t.total_ms:.0f} ms, prefill on {p.prefill_worker_id or '(local)'} -> decode on "
          f"{p.decode_worker_id}, KV via {p.kv_transport or '-'} in {t.kv_transfer_ms:.1f} ms]", file=sys.stderr)
    trace_id = dict(await call.initial_metadata() or ()).get("x-pdmesh-trace-id")
    if trace_id:
        print(f"[trace {trace_id}]", file=sys.stderr)
    return 0


def cmd_traces(args: argparse.Namespace) -> int:
    from pdmesh.traces import waterfall
    from pdmesh.traces.receiver import OtlpReceiver, load_jsonl

    if args.action == "collect":
        host, _, port = args.listen.rpartition(":")
        receiver = OtlpReceiver(host or "127.0.0.1", int(port), jsonl_path=args.file)
        print(f"OTLP/gRPC receiver at {receiver.endpoint}, appending spans to {args.file}; Ctrl-C stops", flush=True)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            receiver.stop()
        return 0
    traces = waterfall.by_trace(load_jsonl(args.file))
    if not traces:
        print(f"no spans in {args.file}", file=sys.stderr)
        return 1
    if args.action == "report":
        spans = [s for t in traces.values() for s in t]
        print(waterfall.format_report(waterfall.phase_report(spans), len(traces)))
        return 0
    trace_id = args.trace_id or max(traces, key=lambda t: min(s["start_ns"] for s in traces[t]))  # the latest
    if trace_id not in traces:
        print(f"trace {trace_id} not in {args.file} ({len(traces)} traces)", file=sys.stderr)
        return 1
    print(f"trace {trace_id}\n{waterfall.text_waterfall(traces[trace_id])}")
    png = args.png or f"trace-{trace_id[:12]}.png"
    waterfall.render_png(traces[trace_id], png)
    print(f"waterfall written to {png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from services.router.config import DEFAULT_BATCH_DB
    parser = argparse.ArgumentParser(prog="pdmesh", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start router + prefill + decode workers locally")
    up.add_argument("--prefill", type=int, default=1, help="prefill workers (default 1)")
    up.add_argument("--decode", type=int, default=1, help="decode workers (default 1)")
    up.add_argument("--port", type=int, default=50051, help="router port (default 50051)")
    up.add_argument("--http-port", default="8000",
                    help="router's OpenAI-compatible HTTP port (default 8000; 0 = any free port; off = none)")
    up.add_argument("--model", choices=["gemma-3-270m", "tiny"], default="gemma-3-270m")
    up.add_argument("--kv-transports", default="nixl,grpc", help="best first: nixl,grpc")
    up.add_argument("--profile", default="prefix_aware", help="placement profile")
    up.add_argument("--num-blocks", type=int, default=1024, help="KV blocks per worker")
    up.add_argument("--torch-threads", type=int, default=2)
    up.add_argument("--run-dir", default=None, help="where logs go (default: a temp dir)")
    up.add_argument("--otlp-endpoint", default="", help="export traces to this OTLP/gRPC endpoint (Jaeger, Phoenix, "
                                                        "a collector), e.g. http://127.0.0.1:4317")
    up.add_argument("--traces", default="", metavar="FILE",
                    help="collect traces locally: run a receiver and append spans to FILE (JSONL)")
    up.add_argument("--tls", nargs="?", const="auto", default="", metavar="DIR",
                    help="mutual TLS between all processes with the certificates in DIR (from `pdmesh certs`); "
                         "without DIR, make them in the run directory. Default: plaintext")
    up.add_argument("--api-keys-file", default="", help="router API keys: YAML/JSON mapping key -> tenant")
    up.add_argument("--batch-db", default=os.environ.get("PDMESH_BATCH_DB", DEFAULT_BATCH_DB),
                    help=f"SQLite file of batch jobs (env PDMESH_BATCH_DB; default {DEFAULT_BATCH_DB})")
    up.add_argument("--engine", choices=["builtin", "vllm"], default="builtin",
                    help="engine of every worker; vllm runs them in .venv-vllm (make setup-vllm), KV over "
                         "vLLM's NixlConnector (env PDMESH_VLLM_PYTHON picks another interpreter)")
    up.set_defaults(func=cmd_up)
    gen = sub.add_parser("generate", help="stream a completion through the router")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--priority", choices=["interactive", "batch"], default="interactive")
    gen.add_argument("--tenant", default="")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--router", default=DEFAULT_ROUTER)
    gen.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds")
    gen.add_argument("--quiet", action="store_true", help="do not echo the prompt")
    gen.add_argument("--api-key", default=os.environ.get("PDMESH_API_KEY", ""),
                     help="sent as `authorization: Bearer KEY` (env PDMESH_API_KEY)")
    from services.common.tls import add_tls_flags
    add_tls_flags(gen)
    gen.set_defaults(func=cmd_generate)
    traces = sub.add_parser("traces", help="collect traces, draw one request's waterfall, report per-phase latency")
    traces.add_argument("action", choices=["collect", "show", "report"],
                        help="collect: run an OTLP receiver into FILE; show: waterfall of one trace; "
                             "report: p50/p99 per phase over all traces in FILE")
    traces.add_argument("file", help="spans as JSONL (written by `collect` or `pdmesh up --traces`)")
    traces.add_argument("--trace-id", default="", help="show: which trace (default: the latest)")
    traces.add_argument("--png", default="", help="show: where to write the waterfall PNG")
    traces.add_argument("--listen", default="127.0.0.1:4317", help="collect: host:port to listen on")
    traces.set_defaults(func=cmd_traces)
    certs = sub.add_parser("certs", help="make a local CA and certificates for mutual TLS (openssl)")
    certs.add_argument("--out", required=True, help="directory to write ca.pem, mesh.pem/key, client.pem/key into")
    certs.add_argument("--name", action="append", default=[],
                       help="extra DNS name or IP for the mesh certificate (repeatable; localhost and 127.0.0.1 "
                            "are always in)")
    certs.add_argument("--days", type=int, default=365)
    certs.set_defaults(func=cmd_certs)
    from pdmesh.batch_cli import add_batch_parser
    add_batch_parser(sub, DEFAULT_ROUTER)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
