"""llama.cpp's server as the benchmark's peer (benchmarks/llamacpp.py).

The fast tests cover the parts that need no build. The slow ones run the real llama-server
on the tiny model where one is built in the shared cache (`python -m benchmarks.llamacpp`
builds it: about 10 minutes on 2 cores), and skip with that advice elsewhere.
"""

from __future__ import annotations

import http.client
import json
import sys
from pathlib import Path

import pytest
from conftest import tiny_qwen2

from benchmarks import llamacpp
from benchmarks.llamacpp import PeerUnavailable, Timing

# --- Without a build -----------------------------------------------------------------------


def test_server_sent_events_are_the_data_lines_as_json():
    stream = [
        'data: {"content": "Hi", "tokens_predicted": 1, "stop": false}\n',
        "\n",
        ": ping\n",  # a comment: the server's keep-alive
        'data: {"content": "", "tokens_predicted": 2, "stop": true}\r\n',
        "\n",
        "data: [DONE]\n",
    ]
    events = list(llamacpp.server_sent_events(stream))
    assert [event["tokens_predicted"] for event in events] == [1, 2]
    assert events[-1]["stop"] is True


def test_an_error_event_stops_the_stream_with_its_message():
    stream = ['data: {"error": {"code": 400, "message": "the request exceeds the context"}}\n']
    with pytest.raises(PeerUnavailable, match="exceeds the context"):
        list(llamacpp.server_sent_events(stream))


def test_throughput_counts_every_generated_token_over_the_last_finish():
    timings = [Timing(first_token=0.5, done=2.0, tokens=64), Timing(0.7, 4.0, 65)]
    row = llamacpp.summary(timings)
    assert row["tok_s"] == pytest.approx(129 / 4.0)
    assert (row["ttft_p50"], row["ttft_p95"]) == (0.5, 0.7)


def test_percentiles_are_nearest_rank():
    from benchmarks.workload import percentile

    values = [float(v) for v in range(1, 17)]
    assert percentile(values, 0.5) == 9.0
    assert percentile(values, 0.95) == 15.0
    assert percentile([3.0], 0.95) == 3.0


def test_every_request_is_greedy_exactly_as_long_and_computed_afresh():
    request = llamacpp.completion_request([1, 2, 3], 64)
    assert request["prompt"] == [1, 2, 3]
    assert (request["n_predict"], request["ignore_eos"]) == (64, True)
    assert (request["temperature"], request["top_k"], request["cache_prompt"]) == (0, 1, False)
    assert request["stream"] is True


def test_the_server_gets_one_slot_per_request_and_the_whole_context():
    options = llamacpp.server_options(Path("m.gguf"), slots=4, context=1056, threads=2)
    flags = dict(zip(options[::2], options[1::2], strict=False))
    assert flags["--parallel"] == "4"
    assert flags["--ctx-size"] == "1056"
    assert flags["--threads"] == flags["--threads-batch"] == "2"


@pytest.mark.parametrize(("flags", "repacks"), [({"avx2", "amx_tile"}, False), ({"avx2"}, True)])
def test_the_server_keeps_its_weights_off_the_amx_kernels_that_crash(monkeypatch, flags, repacks):
    monkeypatch.setattr(llamacpp, "cpu_flags", lambda: flags)
    options = llamacpp.server_options(Path("m.gguf"), slots=1, context=256, threads=2)
    assert ("--no-repack" not in options) == repacks


@pytest.mark.parametrize("isa", ["AVX2", ""])
def test_a_run_held_to_avx2_builds_llama_cpp_held_to_it_apart(monkeypatch, isa):
    """`ONEDNN_MAX_CPU_ISA=AVX2` stands for an AVX2-only machine: llama.cpp, built for this
    one, computed with AVX512's or AMX's instructions all the same."""
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
    options, work_dir = llamacpp.instruction_options(), llamacpp.default_work_dir()
    if isa:
        assert "-DGGML_NATIVE=OFF" in options and "-DGGML_AVX512=OFF" in options
        assert work_dir.name == f"llama.cpp-{llamacpp.VERSION}-avx2"
    else:
        assert options == ["-DGGML_NATIVE=ON"]
        assert work_dir.name == f"llama.cpp-{llamacpp.VERSION}"


def test_build_progress_is_shown_once_a_tenth():
    shown = []
    progress = llamacpp.BuildProgress(shown.append, started=0.0)
    for step in range(1, 207):
        progress(f"[{step}/206] Building CXX object ggml/src/x{step}.o\n")
    progress("FAILED: not a progress line\n")
    assert len(shown) == 10
    assert shown[0].startswith("llama.cpp: build 21/206 steps")


def test_the_weights_key_follows_the_weights_and_their_dtype(tiny_model, qwen_tokenizer):
    import copy

    import torch

    key = llamacpp.weights_key(tiny_model, qwen_tokenizer)
    assert llamacpp.weights_key(tiny_model, qwen_tokenizer) == key
    changed = copy.deepcopy(tiny_model)
    with torch.no_grad():
        changed.model.norm.weight[0] += 1
    assert llamacpp.weights_key(changed, qwen_tokenizer) != key
    assert llamacpp.weights_key(changed.to(torch.bfloat16), qwen_tokenizer) != key


def test_the_gguf_holds_the_weights_in_their_dtype_or_in_bfloat16_where_they_are_its(
    tiny_model,
):
    """A float32 model of bfloat16 values (a bfloat16 checkpoint loaded in float32, read
    from bfloat16 copies by our kernel) is served in bf16 by llama.cpp too."""
    import copy

    import torch

    assert llamacpp.gguf_type_of(tiny_model) == "f32"  # random float32 values
    for dtype, expected in ((torch.bfloat16, "bf16"), (torch.float16, "f16")):
        assert llamacpp.gguf_type_of(copy.deepcopy(tiny_model).to(dtype)) == expected
    narrowed = copy.deepcopy(tiny_model).to(torch.bfloat16).float()
    assert llamacpp.gguf_type_of(narrowed) == "bf16"
    with torch.no_grad():
        narrowed.model.norm.weight[0] = 1 / 3  # no bfloat16 value
    assert llamacpp.gguf_type_of(narrowed) == "f32"


def test_a_failed_step_is_reported_with_the_end_of_its_log(tmp_path):
    log = tmp_path / "build.log"
    command = [sys.executable, "-c", "print('cc1plus: out of memory'); raise SystemExit(3)"]
    with pytest.raises(PeerUnavailable, match=r"(?s)building llama-server failed \(exit 3\).*"
                       r"out of memory"):  # fmt: skip
        llamacpp.run_logged(command, log=log, what="building llama-server")
    assert "out of memory" in log.read_text()


def test_a_missing_build_tool_is_named():
    with pytest.raises(PeerUnavailable, match="needs no-such-build-tool"):
        llamacpp.tool("no-such-build-tool")


def test_a_server_that_dies_at_start_is_reported_with_its_log(tmp_path):
    script = tmp_path / "llama-server"
    script.write_text("#!/bin/sh\necho 'error: unknown argument'\nexit 1\n")
    script.chmod(0o755)
    with (
        pytest.raises(PeerUnavailable, match=r"(?s)exited \(1\).*unknown argument"),
        llamacpp.running_server(script, [], log=tmp_path / "server.log"),
    ):
        pass


# --- With the real server ------------------------------------------------------------------

BUILT = llamacpp.server_path(llamacpp.default_work_dir())
needs_server = pytest.mark.skipif(
    not BUILT.is_file(),
    reason=f"no llama-server in {BUILT.parent}: build it once (about 10 minutes on 2 cores) "
    f"with `.venv/bin/python -m benchmarks.llamacpp` or `make bench PEER=llamacpp`",
)


def prompts(tokenizer, count: int) -> list[list[int]]:
    """Chat prompts of different lengths, as the benchmark sends them."""
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "word " * (5 + 7 * i)}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
        )
        for i in range(count)
    ]


@pytest.mark.slow
@needs_server
def test_the_peer_serves_every_request_at_once_and_reports_each_n(tiny_model, qwen_tokenizer):
    said = []
    peer = llamacpp.prepare_peer(
        tiny_model,
        qwen_tokenizer,
        work_dir=llamacpp.default_work_dir(),
        threads=2,
        say=said.append,
    )
    rows = llamacpp.peer_sweep(peer, prompts(qwen_tokenizer, 3), [1, 3], 8, say=said.append)
    assert [row["n"] for row in rows] == [1, 3]
    for row in rows:
        assert row["tok_s"] > 0
        assert 0 < row["ttft_p50"] <= row["ttft_p95"]
    assert any("3 at once, a slot each" in line for line in said)


@pytest.mark.slow
@needs_server
def test_the_peer_answers_as_our_model_does_greedily(qwen_tokenizer):
    """The GGUF is the same model: llama.cpp's greedy tokens are transformers' greedy ones."""
    import torch

    # Larger random weights than the fixture's, whose answer is one token repeated (which
    # any model that repeats a token would match); these give a different token each step.
    model = tiny_qwen2(qwen_tokenizer, initializer_range=0.2)
    work_dir = llamacpp.default_work_dir()
    weights = llamacpp.convert(model, qwen_tokenizer, work_dir, say=lambda line: None)
    prompt = prompts(qwen_tokenizer, 1)[0]
    options = llamacpp.server_options(weights, slots=1, context=256, threads=2)
    with llamacpp.running_server(BUILT, options, log=work_dir / "logs" / "test.log") as port:
        timing = llamacpp.complete(port, prompt, 8, start=0.0)
        served = completion_tokens(port, prompt, 8)
    assert timing.tokens == 8
    with torch.no_grad():
        ours = model.generate(
            torch.tensor([prompt]), max_new_tokens=8, min_new_tokens=8, do_sample=False,
            suppress_tokens=None,  # the fixture's generation config hides whitespace tokens
        )[0, len(prompt):].tolist()  # fmt: skip
    assert len(set(ours)) > 4
    assert served[:8] == ours


def completion_tokens(port: int, prompt: list[int], new_tokens: int) -> list[int]:
    """The answer's token ids (a stream leaves out the parts of a split UTF-8 character)."""
    request = llamacpp.completion_request(prompt, new_tokens) | {
        "stream": False,
        "return_tokens": True,
    }
    connection = http.client.HTTPConnection(llamacpp.HOST, port, timeout=60)
    try:
        connection.request("POST", "/completion", json.dumps(request))
        return json.loads(connection.getresponse().read())["tokens"]
    finally:
        connection.close()
