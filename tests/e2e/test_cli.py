"""The user's commands: `pdmesh up` starts the mesh and says where the router listens;
`pdmesh generate` streams a completion through it; SIGTERM stops everything cleanly."""

import re
import signal
import subprocess
import sys

import httpx


def test_up_then_generate_then_stop(tmp_path):
    up = subprocess.Popen([sys.executable, "-m", "pdmesh", "up", "--model", "tiny", "--port", "0", "--http-port", "0",
                           "--num-blocks", "128", "--torch-threads", "1", "--run-dir", str(tmp_path)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = http = None
        for line in up.stdout:
            match = re.search(r"router listening on (\S+)", line)
            address = match.group(1) if match else address
            match = re.search(r"OpenAI-compatible HTTP at (http://\S+/v1)", line)
            if match:
                http = match.group(1)
                break
        assert address, "pdmesh up never said where the router listens"
        assert http, "pdmesh up never said where the OpenAI-compatible HTTP front listens"
        models = httpx.get(f"{http}/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["tiny"]
        gen = subprocess.run([sys.executable, "-m", "pdmesh", "generate", "Hello there", "--max-tokens", "5",
                              "--ignore-eos", "--router", address], capture_output=True, text=True, timeout=120)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.startswith("Hello there")
        # The default profile prefills a short prompt on the decode worker (conditional disaggregation).
        assert "5 tokens, finish=length" in gen.stderr and "prefill on (local) -> decode on decode-0" in gen.stderr
        bad = subprocess.run([sys.executable, "-m", "pdmesh", "generate", "x", "--max-tokens", "0", "--router",
                              address], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and "INVALID_ARGUMENT" in bad.stderr and "max_tokens" in bad.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
