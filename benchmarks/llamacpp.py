"""llama.cpp's own server as the serving benchmark's peer: what Ollama and LM Studio run.

    python -m benchmarks.llamacpp     # build the server once into the shared cache
    peer = prepare_peer(model, tokenizer, work_dir=..., threads=2, say=print)
    peer_sweep(peer, prompts, [1, 4, 8, 16], 64, say=print)

The server is built from the llama.cpp tree that the sdist of llama-cpp-python 0.3.36
vendors (CPU only, tuned to this machine; about 15 CPU-minutes, once). The benchmark's own
model is converted to a GGUF in its own dtype (or bf16, where a float32 model's weights are
bfloat16 values, which our kernel reads as such: `gguf_type_of`), so both sides serve the
same weights at the same precision. For each N one server runs with N slots (one per
request, each with room for the longest prompt and its answer), and all N streamed requests
are sent at once. The build, its sources and the GGUFs stay in `work_dir` between runs; a
GGUF is named by a hash of the weights and the vocabulary it holds.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.machine import cpu_flags
from benchmarks.workload import percentile

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}"
HOST = "127.0.0.1"
# A CPU build of the server alone: no tests or examples, no web UI (whose prebuilt assets
# would be downloaded from Hugging Face), no TLS.
CMAKE_OPTIONS = [
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
]
# Held to AVX2, as ours is by ONEDNN_MAX_CPU_ISA=AVX2 (`make bench` on a newer CPU standing
# for an AVX2-only one): not this machine's instructions but ggml's generic x86 build, whose
# defaults are AVX2's (with FMA, F16C, BMI2; AVX512's and AMX's are off).
AVX2_ONLY = ["-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_AVX512=OFF", "-DGGML_AMX_TILE=OFF"]
GGUF_TYPES = {"torch.float32": "f32", "torch.bfloat16": "bf16", "torch.float16": "f16"}
BUILD_SECONDS = 3 * 3600  # a build on 2 busy cores takes tens of minutes
DOWNLOAD_SECONDS = 1200
CONVERT_SECONDS = 1800
START_SECONDS = 300  # loading the GGUF and warming up
REQUEST_SECONDS = 1800  # the longest wait for one read of a stream


class PeerUnavailable(Exception):
    """llama.cpp could not be built or run here; the message says why."""


@dataclass
class Timing:
    """One request, in seconds from when all were sent."""

    first_token: float
    done: float
    tokens: int


def held_to_avx2() -> bool:
    """Whether this run stands for an AVX2-only machine (`ONEDNN_MAX_CPU_ISA=AVX2`)."""
    return os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper() == "AVX2"


def default_work_dir() -> Path:
    """The per-user cache that `make bench` and the tests share: one build for both (and
    one apart, held to AVX2, for a run that is: `held_to_avx2`)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache, "threadbot", f"llama.cpp-{VERSION}" + ("-avx2" if held_to_avx2() else ""))


def server_path(work_dir: Path) -> Path:
    """Where the built server lies (present only once a build has finished)."""
    return work_dir / "llama-server"


@dataclass
class Peer:
    """A built llama-server and the benchmark's model as its GGUF, ready to serve."""

    server: Path
    weights: Path
    work_dir: Path
    threads: int

    def run(self, prompts: list[list[int]], new_tokens: int) -> list[Timing]:
        """All `prompts` sent at once to a server started for them, with a slot each (room
        for the longest prompt and its answer); their timings. The server stops after."""
        context = len(prompts) * (max(map(len, prompts)) + new_tokens)
        options = server_options(self.weights, slots=len(prompts), context=context,
                                 threads=self.threads)  # fmt: skip
        log = self.work_dir / "logs" / f"server-{len(prompts)}.log"
        with running_server(self.server, options, log=log) as port:
            timings = send_all(port, prompts, new_tokens)
        if short := [timing.tokens for timing in timings if timing.tokens < new_tokens]:
            raise PeerUnavailable(f"llama-server stopped answers at {short} of {new_tokens} tokens")
        return timings


def prepare_peer(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    *,
    work_dir: Path,
    threads: int,
    say: Callable[[str], None],
) -> Peer:
    """The server built (once) and `model` converted (once per weights), in `work_dir`."""
    server = build_server(work_dir, say)
    return Peer(server, convert(model, tokenizer, work_dir, say), work_dir, threads)


def peer_sweep(
    peer: Peer,
    prompts: list[list[int]],
    concurrency: list[int],
    new_tokens: int,
    say: Callable[[str], None],
) -> list[dict]:
    """One dict per N: {"n", "tok_s", "ttft_p50", "ttft_p95"}; the N-run uses the first N
    prompts, all sent at once to a server with N slots."""
    if max(concurrency) > len(prompts):
        raise ValueError(f"{max(concurrency)} requests at once need as many prompts")
    rows = []
    for n in concurrency:
        say(f"llama.cpp: {n} at once, a slot each ...")
        rows.append({"n": n, **summary(peer.run(prompts[:n], new_tokens))})
        say(f"llama.cpp: {n} at once: {rows[-1]['tok_s']:.1f} tok/s")
    return rows


# --- The build -----------------------------------------------------------------------------


def build_server(work_dir: Path, say: Callable[[str], None]) -> Path:
    """The llama-server binary, built once into `work_dir`."""
    binary = server_path(work_dir)
    if binary.is_file():
        return binary
    source = vendored_tree(work_dir, say)
    build = work_dir / "build"
    log = work_dir / "logs" / "build.log"
    say(f"llama.cpp: building llama-server {VERSION} (CPU; about 10 minutes on 2 idle cores) ...")
    started = time.monotonic()
    run_logged(
        [tool("cmake"), "-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}",
         "-S", str(source), "-B", str(build), *CMAKE_OPTIONS, *instruction_options()],
        log=log, what="configuring llama.cpp",
    )  # fmt: skip
    run_logged(
        [tool("ninja"), "-C", str(build), "llama-server"],
        log=log,
        what="building llama-server",
        progress=BuildProgress(say, started),
    )
    staged = binary.with_suffix(".partial")
    shutil.copy2(build / "bin" / "llama-server", staged)
    staged.replace(binary)
    say(f"llama.cpp: built {binary} in {time.monotonic() - started:.0f} s")
    return binary


def instruction_options() -> list[str]:
    """The CPU instructions llama.cpp is built for: this machine's, or AVX2's alone."""
    return AVX2_ONLY if held_to_avx2() else ["-DGGML_NATIVE=ON"]


def vendored_tree(work_dir: Path, say: Callable[[str], None]) -> Path:
    """llama.cpp's sources as the sdist of llama-cpp-python vendors them (fetched once)."""
    tree = work_dir / SDIST / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    say(f"llama.cpp: downloading the sdist of llama-cpp-python {VERSION} (75 MB) ...")
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work_dir) as staging:
        run_logged(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             f"llama-cpp-python=={VERSION}", "--dest", staging],
            log=work_dir / "logs" / "download.log", what="downloading llama-cpp-python",
            seconds=DOWNLOAD_SECONDS,
        )  # fmt: skip
        with tarfile.open(Path(staging, f"{SDIST}.tar.gz")) as sdist:
            sdist.extractall(staging, filter="data")
        Path(staging, SDIST).replace(work_dir / SDIST)
    return tree


def tool(name: str) -> str:
    """A build tool from the PATH, or else from this environment's bin (pip's ninja)."""
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    found = shutil.which(name, path=search)
    if found is None:
        raise PeerUnavailable(f"building llama.cpp needs {name} (pip install {name})")
    return found


class BuildProgress:
    """Turns ninja's `[done/total]` lines into a progress line every tenth of the build."""

    STEP = re.compile(r"^\[(\d+)/(\d+)\]")

    def __init__(self, say: Callable[[str], None], started: float) -> None:
        self.say, self.started, self.shown = say, started, 0

    def __call__(self, line: str) -> None:
        step = self.STEP.match(line)
        if step is None:
            return
        done, total = int(step[1]), int(step[2])
        tenth = 10 * done // total
        if tenth > self.shown:
            self.shown = tenth
            elapsed = time.monotonic() - self.started
            self.say(f"llama.cpp: build {done}/{total} steps after {elapsed:.0f} s")


def run_logged(
    command: list[str],
    *,
    log: Path,
    what: str,
    seconds: float = BUILD_SECONDS,
    progress: Callable[[str], None] = lambda line: None,
    env: dict[str, str] | None = None,
) -> None:
    """Runs a command to its end, its output appended to `log` and shown to `progress`
    line by line; killed after `seconds`. A failure raises PeerUnavailable with the log's end."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        watchdog = threading.Timer(seconds, process.kill)
        watchdog.start()
        try:
            for line in process.stdout:  # ends when the process does (or is killed)
                out.write(line)
                progress(line)
        finally:
            watchdog.cancel()
            process.kill()
            status = process.wait()
    if status != 0:
        raise PeerUnavailable(f"{what} failed (exit {status}); the end of {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 15) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- The weights ---------------------------------------------------------------------------


def convert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    work_dir: Path,
    say: Callable[[str], None],
) -> Path:
    """The model as a GGUF of the `gguf_type` that holds its weights, converted by
    llama.cpp's own script (once)."""
    gguf_type = gguf_type_of(model)
    if gguf_type is None:
        raise PeerUnavailable(f"no GGUF type for a {model.dtype} model")
    path = work_dir / "gguf" / f"{weights_key(model, tokenizer)}-{gguf_type}.gguf"
    if path.is_file():
        return path
    tree = vendored_tree(work_dir, say)
    say(f"llama.cpp: converting the model to a {gguf_type} GGUF ...")
    started = time.monotonic()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_suffix(".partial")
    with tempfile.TemporaryDirectory(dir=work_dir) as checkpoint:
        model.save_pretrained(checkpoint)
        tokenizer.save_pretrained(checkpoint)
        run_logged(
            [sys.executable, str(tree / "convert_hf_to_gguf.py"), checkpoint,
             "--outtype", gguf_type, "--outfile", str(staged)],
            log=work_dir / "logs" / "convert.log", what="converting the model to GGUF",
            seconds=CONVERT_SECONDS,
            env={**os.environ, "PYTHONPATH": str(tree / "gguf-py")},  # the script's own gguf
        )  # fmt: skip
    staged.replace(path)
    say(f"llama.cpp: converted in {time.monotonic() - started:.0f} s")
    return path


def gguf_type_of(model: PreTrainedModel) -> str | None:
    """The GGUF type of the model's dtype; but bf16 for a float32 model whose every weight
    is a bfloat16 value (a bfloat16 checkpoint loaded in float32), which our decode kernel
    reads from bfloat16 copies: then both sides read the same values in 2 bytes each."""
    from bot.decode_kernel import exactly_bfloat16

    if all(exactly_bfloat16(weight) is not None for weight in model.parameters()):
        return "bf16"
    return GGUF_TYPES.get(str(model.dtype))


def weights_key(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what the GGUF holds: the configuration, every weight, the vocabulary."""
    import torch

    digest = hashlib.sha256(model.config.to_json_string().encode())
    for name, parameter in model.named_parameters():
        digest.update(name.encode())
        digest.update(parameter.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    digest.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    return digest.hexdigest()[:16]


# --- The server ----------------------------------------------------------------------------


def server_options(weights: Path, *, slots: int, context: int, threads: int) -> list[str]:
    """One slot per request; the context is split evenly among the slots."""
    return [
        "--model", str(weights),
        "--parallel", str(slots),
        "--ctx-size", str(context),
        "--threads", str(threads),
        "--threads-batch", str(threads),
        "--batch-size", "512",  # a step takes prompts in chunks of 512 (as its physical batch)
        "--no-webui",
        # On a CPU with AMX, llama.cpp 0.3.36 moves quantized weights to its AMX kernels,
        # which crash while it warms up (SIGSEGV in `ggml_backend_amx_mul_mat`,
        # ggml-org/llama.cpp#20824) and are known to miscompute Q4_0 and Q4_1 (#16315):
        # there its weights stay as they are, for its ordinary CPU kernels.
        *(["--no-repack"] if "amx_tile" in cpu_flags() else []),
    ]  # fmt: skip


@contextmanager
def running_server(binary: Path, options: list[str], *, log: Path) -> Iterator[int]:
    """A llama-server on 127.0.0.1, healthy, for the block; its port. Stopped after, always."""
    port = free_port()
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        process = subprocess.Popen(
            [str(binary), *options, "--host", HOST, "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_until_healthy(process, port, log)
            yield port
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def wait_until_healthy(process: subprocess.Popen, port: int, log: Path) -> None:
    """Polls /health until the model is loaded (503 until then)."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PeerUnavailable(f"llama-server exited ({process.returncode}):\n{tail(log)}")
        connection = http.client.HTTPConnection(HOST, port, timeout=5)
        try:
            connection.request("GET", "/health")
            if connection.getresponse().status == 200:
                return
        except OSError:
            pass  # not listening yet
        finally:
            connection.close()
        time.sleep(0.2)
    raise PeerUnavailable(f"llama-server was not healthy after {START_SECONDS} s:\n{tail(log)}")


# --- The requests --------------------------------------------------------------------------


def send_all(port: int, prompts: list[list[int]], new_tokens: int) -> list[Timing]:
    """Every prompt sent at once, each on its own connection; their timings."""
    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        start = time.perf_counter()
        futures = [pool.submit(complete, port, p, new_tokens, start) for p in prompts]
        return [future.result() for future in futures]


def completion_request(prompt: list[int], new_tokens: int) -> dict:
    """Greedy, exactly `new_tokens` long, the prompt computed afresh, streamed."""
    return {
        "prompt": prompt,
        "n_predict": new_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "top_k": 1,
        "repeat_penalty": 1.0,  # ours applies none
        "cache_prompt": False,
        "stream": True,
    }


def complete(port: int, prompt: list[int], new_tokens: int, start: float) -> Timing:
    """One streamed completion, timed from `start`."""
    connection = http.client.HTTPConnection(HOST, port, timeout=REQUEST_SECONDS)
    try:
        body = json.dumps(completion_request(prompt, new_tokens))
        connection.request("POST", "/completion", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            raise PeerUnavailable(f"llama-server answered {response.status}: {response.read()}")
        first = None
        for event in server_sent_events(line.decode() for line in response):
            now = time.perf_counter() - start
            if first is None and event.get("tokens_predicted", 0) > 0:
                first = now
            if event.get("stop"):
                return Timing(first or now, now, event["tokens_predicted"])
        raise PeerUnavailable("llama-server ended a stream without its final event")
    finally:
        connection.close()


def server_sent_events(lines: Iterable[str]) -> Iterator[dict]:
    """The JSON events of a server-sent-event stream; comments (pings), blank lines and the
    OpenAI-style `[DONE]` skipped. An event that reports an error raises PeerUnavailable."""
    for line in lines:
        field, _, value = line.rstrip("\r\n").partition(":")
        if field != "data" or value.strip() == "[DONE]":
            continue
        event = json.loads(value)
        if "error" in event:
            raise PeerUnavailable(f"llama-server: {event['error']}")
        yield event


def summary(timings: list[Timing]) -> dict:
    """Throughput over the whole run (generated tokens / the last finish) and TTFT spread."""
    first = [timing.first_token for timing in timings]
    return {
        "tok_s": sum(timing.tokens for timing in timings) / max(t.done for t in timings),
        "ttft_p50": percentile(first, 0.5),
        "ttft_p95": percentile(first, 0.95),
    }


def main() -> int:
    """Builds llama-server into the shared cache, where the bench and the tests find it."""
    try:
        print(build_server(default_work_dir(), lambda line: print(line, file=sys.stderr)))
    except PeerUnavailable as error:
        print(error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
