"""Serve the tiny Llama with real vLLM (CPU) and check it against ``transformers``.

Builds (or finds) the model of ``pdfabric.testing.tinymodel``, starts
``vllm.entrypoints.openai.api_server`` on 127.0.0.1, waits for ``/health``, then sends greedy
(temperature 0) ``/v1/completions`` for three prompts and one ``/v1/chat/completions``, all
with ``"return_token_ids": true``, and compares the token ids with ``transformers``
``generate`` (greedy, bfloat16) on the same prompt ids.

A random model has logit near-ties, and vLLM's CPU kernels round bfloat16 differently from
``transformers``, so an exact mismatch is judged by teacher forcing: ``transformers`` scores
vLLM's tokens and each must be within ``--tie-tolerance`` (in logits) of its own argmax.
Exit status 0 when outputs are non-empty, differ between prompts and pass that check.

The server is stopped in a ``finally`` block, by its PID (SIGTERM, then SIGKILL after a
grace period) together with the child processes it had (also by PID); every wait has a
timeout. Usage: ``.venv/bin/python scripts/check_tinymodel_vllm.py [--model DIR] [--port N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

PROMPTS = ("The prefill server sends the cache", "Hello, my name is", "In the beginning there was a block of memory")
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where does the decode server get its cache?"},
]


def http(method: str, url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        text = resp.read().decode()
    return json.loads(text) if text.strip() else None


def descendants(pid: int) -> list[int]:
    """Child PIDs of ``pid``, recursively (Linux /proc)."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *descendants(child)]
    return found


def stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the server by PID, SIGKILL it after ``grace`` s, then SIGKILL leftover children by PID."""
    children = descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    deadline = time.monotonic() + 10
    for pid in children:
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def start_server(model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    with socket.socket() as probe:  # an old server on the port would answer our health checks
        if probe.connect_ex(("127.0.0.1", port)) == 0:
            raise RuntimeError(f"port {port} is already in use; pass --port")
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_HOST_IP="127.0.0.1")
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
        "--port", str(port), "--host", "127.0.0.1", "--block-size", "32",
        "--max-model-len", "4096", "--dtype", "bfloat16",
    ]
    print("starting:", " ".join(cmd), f"(log: {log})", flush=True)
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_healthy(proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            urllib.request.urlopen(f"{base}/health", timeout=5).close()
            return
        except (urllib.error.URLError, OSError):
            time.sleep(2)
    raise TimeoutError(f"vLLM not healthy after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


def hf_greedy(model: Any, prompt_ids: list[int], max_tokens: int) -> list[int]:
    import torch

    ids = torch.tensor([prompt_ids])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def tie_gaps(model: Any, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """Per step: HF's top logit minus HF's logit for the token vLLM chose (0 where they agree)."""
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + tokens])).logits[0].float()
    steps = logits[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(tokens)]
    return [float(row.max() - row[tok]) for row, tok in zip(steps, tokens)]


def compare(name: str, model: Any, prompt_ids: list[int], vllm_ids: list[int], text: str, tol: float) -> bool:
    hf_ids = hf_greedy(model, prompt_ids, len(vllm_ids) or 1)
    gaps = tie_gaps(model, prompt_ids, vllm_ids)
    exact = hf_ids == vllm_ids
    within = all(g <= tol for g in gaps)
    print(f"[{name}] vLLM text: {text!r}")
    print(f"    vLLM ids: {vllm_ids}")
    print(f"    HF   ids: {hf_ids}")
    if exact:
        print("    exact token-for-token match")
    else:
        pairs = enumerate(zip(hf_ids, vllm_ids))
        first = next((i for i, (a, b) in pairs if a != b), min(len(hf_ids), len(vllm_ids)))
        print(f"    first difference at step {first}; HF logit gaps of vLLM's tokens: {[round(g, 4) for g in gaps]}")
        print(f"    {'near-tie, accepted' if within else 'NOT a near-tie'} (tolerance {tol})")
    return bool(vllm_ids) and text != "" and within


def same_prompt(vllm_ids: list[int] | None, hf_ids: list[int]) -> bool:
    """vLLM's prompt token ids (when it returned them) must be the ones transformers made."""
    if vllm_ids is None:
        print("prompt ids: not returned by vLLM")
        return True
    print(f"prompt ids: {'same' if vllm_ids == hf_ids else 'DIFFERENT'} ({len(hf_ids)} tokens, vLLM {vllm_ids})")
    return vllm_ids == hf_ids


def run_checks(base: str, model_dir: Path, max_tokens: int, tol: float) -> bool:
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    served = http("GET", f"{base}/v1/models")["data"][0]["id"]
    ok, outputs = True, []
    for prompt in PROMPTS:
        body = {"model": served, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
        choice = http("POST", f"{base}/v1/completions", body)["choices"][0]
        prompt_ids = tok(prompt).input_ids
        ok &= same_prompt(choice.get("prompt_token_ids"), prompt_ids)
        ok &= compare(f"completion {prompt!r}", model, prompt_ids, choice["token_ids"], choice["text"], tol)
        outputs.append(tuple(choice["token_ids"]))
    if len(set(outputs)) != len(outputs):
        print("FAIL: two prompts gave the same continuation")
        ok = False
    body = {"model": served, "messages": CHAT, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    reply = http("POST", f"{base}/v1/chat/completions", body)
    choice = reply["choices"][0]
    chat_ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, return_dict=False)
    ok &= same_prompt(reply.get("prompt_token_ids"), chat_ids)
    ok &= compare("chat", model, chat_ids, choice["token_ids"], choice["message"]["content"] or "", tol)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="model directory (default: build_tiny_llama())")
    parser.add_argument("--port", type=int, default=8391)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--tie-tolerance", type=float, default=0.25, help="logits; logit std is about 4")
    args = parser.parse_args()

    from pdfabric.testing.tinymodel import build_tiny_llama

    t0 = time.monotonic()
    model_dir = args.model or build_tiny_llama()
    print(f"model: {model_dir} ({time.monotonic() - t0:.1f} s)", flush=True)
    log = Path(tempfile.mkdtemp(prefix="tinymodel-vllm-")) / "server.log"
    base = f"http://127.0.0.1:{args.port}"
    proc = start_server(model_dir, args.port, log)
    print(f"vLLM server PID {proc.pid}", flush=True)
    try:
        t0 = time.monotonic()
        wait_healthy(proc, base, log, args.startup_timeout)
        print(f"healthy after {time.monotonic() - t0:.0f} s", flush=True)
        ok = run_checks(base, model_dir, args.max_tokens, args.tie_tolerance)
    finally:
        stop(proc)
        warnings = [line for line in log.read_text(errors="replace").splitlines() if "WARNING" in line]
        print(f"server stopped (exit {proc.returncode}); {len(warnings)} WARNING lines in {log}:")
        for line in warnings:
            print("   ", line[:300])
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
