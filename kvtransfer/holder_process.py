"""A KV holder in its own process, for integration tests and benchmarks.

`python -m kvtransfer.holder_process --num-blocks N ...` fills a pool with seeded random data,
serves KvTransferService on a grpc.aio server (port 0), and takes JSON commands on stdin, one per
line, answering each with one line `KVCTL {json}` on stdout:
  {"op": "lend", "block_ids": [...], "num_tokens": n, "corrupt": false}
      -> {"handle": base64 KvHandle proto, "lend_ms": ...}; corrupt flips one byte of the middle
         block *after* its checksum was taken (a real failure the puller must catch).
  {"op": "freed"} -> {"freed": [lease ids passed to on_free so far]}
  {"op": "quit"}
HolderProcess drives it from the parent.
"""

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time

import grpc
import torch

from pdmesh.v1 import common_pb2, kv_transfer_pb2_grpc

from kvtransfer.handle import KvHandle
from kvtransfer.layout import KvLayout

_PREFIX = "KVCTL "


def seeded_pool(layout: KvLayout, num_blocks: int, seed: int) -> torch.Tensor:
    """The pool a holder started with `seed` holds (recomputable by a test to check bytes)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand((num_blocks, *layout.block_shape), generator=generator, dtype=torch.float32)


def _reply(payload: dict) -> None:
    sys.stdout.write(_PREFIX + json.dumps(payload) + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace) -> None:
    from kvtransfer.source import KvSource, KvTransferServicer, add_kv_transfer_service

    layout = KvLayout(args.model_id, "float32", args.block_size, args.num_layers, args.num_kv_heads, args.head_dim)
    pool = seeded_pool(layout, args.num_blocks, args.seed)
    freed: list[str] = []
    server = grpc.aio.server(options=[("grpc.max_send_message_length", 64 << 20)])
    port = server.add_insecure_port("127.0.0.1:0")
    source = KvSource(pool, layout, "holder-test", f"127.0.0.1:{port}", lease_ttl_s=args.lease_ttl_s,
                      on_free=lambda lease: freed.append(lease.lease_id), enable_nixl=not args.no_nixl)
    if args.generated_registration:
        kv_transfer_pb2_grpc.add_KvTransferServiceServicer_to_server(KvTransferServicer(source), server)
    else:
        add_kv_transfer_service(KvTransferServicer(source), server)
    await server.start()
    source.start(interval_s=0.05)
    _reply({"address": f"127.0.0.1:{port}", "transports": list(source.transports), "pid": os.getpid()})
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        command = json.loads(line)
        if command["op"] == "lend":
            start = time.perf_counter()
            handle = source.lend("req", command["block_ids"], command["num_tokens"])
            lend_ms = (time.perf_counter() - start) * 1000
            if command.get("corrupt"):
                victim = handle.block_ids[len(handle.block_ids) // 2]
                pool[victim].view(-1)[7] += 1.0
            _reply({"handle": base64.b64encode(handle.to_proto().SerializeToString()).decode(), "lend_ms": lend_ms})
        elif command["op"] == "freed":
            _reply({"freed": freed})
        elif command["op"] == "quit":
            break
    await server.stop(0.5)
    await source.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-blocks", type=int, default=64)
    parser.add_argument("--model-id", default="test-model")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-layers", type=int, default=18)
    parser.add_argument("--num-kv-heads", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lease-ttl-s", type=float, default=30.0)
    parser.add_argument("--no-nixl", action="store_true")
    parser.add_argument("--generated-registration", action="store_true",
                        help="register with the generated add_KvTransferServiceServicer_to_server")
    asyncio.run(_serve(parser.parse_args(argv)))


class HolderProcess:
    """Parent-side driver of a holder subprocess. `env` extends os.environ (e.g. UCX_TLS)."""

    def __init__(self, env: dict[str, str] | None = None, **options) -> None:
        argv = [sys.executable, "-m", "kvtransfer.holder_process"]
        for key, value in options.items():
            flag = "--" + key.replace("_", "-")
            argv += [flag] if value is True else [] if value is False else [flag, str(value)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, cwd=os.path.dirname(os.path.dirname(__file__)))
        ready = self._read()
        self.address: str = ready["address"]
        self.transports: list[str] = ready["transports"]

    def lend(self, block_ids: list[int], num_tokens: int | None = None, corrupt: bool = False) -> tuple[KvHandle, float]:
        """Lend blocks in the holder; returns the handle and the holder's lend() time in ms."""
        num_tokens = len(block_ids) * 16 if num_tokens is None else num_tokens
        reply = self._ask({"op": "lend", "block_ids": list(block_ids), "num_tokens": num_tokens, "corrupt": corrupt})
        msg = common_pb2.KvHandle.FromString(base64.b64decode(reply["handle"]))
        return KvHandle.from_proto(msg), reply["lend_ms"]

    def freed(self) -> list[str]:
        return self._ask({"op": "freed"})["freed"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()

    def _ask(self, command: dict) -> dict:
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _read(self) -> dict:
        while line := self.proc.stdout.readline():
            if line.startswith(_PREFIX):
                return json.loads(line[len(_PREFIX):])
        raise RuntimeError(f"holder process exited with {self.proc.wait()}")


if __name__ == "__main__":
    main()
