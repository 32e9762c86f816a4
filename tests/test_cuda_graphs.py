"""CUDA graphs of decode steps (`server/runner/cuda_graphs.py`) and the inputs of a step (`step_inputs.py`).

On CPU the graph runner's plumbing (size choice, padding, static buffers, the captured metadata) runs
end to end with an eager stand-in for capture and replay: the "graph" calls the forward on the static
buffers with the metadata it was captured with, as a replay would. The Triton kernels run under
Triton's interpreter there (conftest.py). Real capture and the sync-free step need CUDA and skip without it.
"""

from __future__ import annotations

import warnings
from collections import Counter

import pytest
import torch

from kernels import reference
from server import LLM, SamplingParams
from server.cli import build_parser, split_args
from server.config import EngineArgs, cuda_graph_sizes
from server.demo import make_tiny_model
from server.engine.messages import GenerateRequest
from server.errors import ConfigError
from server.runner.cuda_graphs import DecodeBuffers, DecodeGraphs, padded_size
from server.runner.step_inputs import HostStep, block_table

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="CUDA graphs need a CUDA device")


# ---- sizes ------------------------------------------------------------------------------------


def test_default_sizes_follow_vllm_up_to_max_num_seqs():
    assert cuda_graph_sizes(None, 128) == (1, 2, 4, *range(8, 129, 8))
    assert cuda_graph_sizes(None, 20) == (1, 2, 4, 8, 16, 20)  # the bound itself: a full batch replays
    assert cuda_graph_sizes(None, 3) == (1, 2, 3)
    assert cuda_graph_sizes(None, 1) == (1,)
    assert cuda_graph_sizes(None, 1024)[-3:] == (496, 504, 512)


def test_given_sizes_are_sorted_deduplicated_and_capped():
    assert cuda_graph_sizes([8, 1, 4, 4], 128) == (1, 4, 8)
    assert cuda_graph_sizes([1, 64, 256], 100) == (1, 64, 100)
    assert cuda_graph_sizes([0], 128) == ()


def test_sizes_flag_is_validated_once_and_resolved_per_device():
    parser = build_parser()
    engine, _ = split_args(parser.parse_args(["serve", "--cuda-graph-sizes", "16", "2", "--max-num-seqs", "8"]))
    assert engine.cuda_graph_sizes == [16, 2]
    assert engine.model_config("m", "p", 256, "cuda").cuda_graph_sizes == (2, 8)
    assert engine.model_config("m", "p", 256, "cpu").cuda_graph_sizes == ()
    eager, _ = split_args(parser.parse_args(["serve", "--enforce-eager"]))
    assert eager.model_config("m", "p", 256, "cuda").cuda_graph_sizes == ()
    off, _ = split_args(parser.parse_args(["serve", "--cuda-graph-sizes", "0"]))
    assert off.model_config("m", "p", 256, "cuda").cuda_graph_sizes == ()
    assert EngineArgs(cuda_graph_sizes=4).cuda_graph_sizes == [4]
    for bad in ([0, 4], [-1], [], [2.5], [True]):
        with pytest.raises(ConfigError, match="--cuda-graph-sizes"):
            EngineArgs(cuda_graph_sizes=bad).validate()


def test_padded_size_is_the_next_captured_size():
    sizes = (1, 2, 4, 8)
    assert [padded_size(n, sizes) for n in range(1, 10)] == [1, 2, 4, 4, 8, 8, 8, 8, None]


# ---- host inputs and static buffers -----------------------------------------------------------


def test_block_table_pads_columns_and_rows_with_zero():
    table = block_table([[5, 6, 7], [9], [3, 4]], num_rows=5, width=4, pin=False)
    assert table.dtype == torch.int32
    assert table.tolist() == [[5, 6, 7, 0], [9, 0, 0, 0], [3, 4, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]


def _decode_step(seq_lens: list[int], block_size: int = 4, first_block: int = 1) -> HostStep:
    """A decode step of sequences with these context lengths, on consecutive blocks from `first_block`."""
    step = HostStep()
    block = first_block
    for i, seq_len in enumerate(seq_lens):
        blocks = list(range(block, block + -(-seq_len // block_size)))
        block += len(blocks)
        pos = seq_len - 1
        step.input_ids.append(100 + i)
        step.positions.append(pos)
        step.slot_mapping.append(blocks[pos // block_size] * block_size + pos % block_size)
        step.query_lens.append(1)
        step.seq_lens.append(seq_len)
        step.block_tables.append(blocks)
        step.sample_rows.append(i)
    return step


def test_buffers_take_a_step_into_their_first_rows_and_pad_the_rest():
    buffers = DecodeBuffers(8, max_blocks_per_seq=6, hidden_size=3, dtype=torch.float32, device=torch.device("cpu"))
    buffers.block_tables.fill_(77)  # stale entries of an earlier, wider step
    step = _decode_step([5, 13, 1])
    buffers.load(step, 4)
    assert buffers.input_ids[:4].tolist() == [100, 101, 102, 0]
    assert buffers.positions[:4].tolist() == [4, 12, 0, 0]
    assert buffers.slot_mapping[:4].tolist() == step.slot_mapping + [-1]  # the padded row writes nothing
    assert buffers.seq_lens[:4].tolist() == [5, 13, 1, 1]  # and attends to one token
    assert buffers.block_tables[:4, :4].tolist() == [[1, 2, 0, 0], [3, 4, 5, 6], [7, 0, 0, 0], [0, 0, 0, 0]]
    assert buffers.block_tables[:4, 4:].eq(77).all()  # past the widest table: never read
    assert buffers.input_ids[4:].tolist() == [0] * 4  # rows past the size are untouched

    meta = buffers.metadata(4, block_size=4, max_model_len=24)
    assert meta.slot_mapping.data_ptr() == buffers.slot_mapping.data_ptr()
    assert meta.block_tables.shape == (4, 6)
    assert meta.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert meta.query_lens_cpu == [1] * 4 and meta.max_seq_len == 24  # the bounds of every replay


def _recorded_graphs(sizes=(1, 2, 4)):
    calls = []

    def forward(input_ids, positions, meta):
        calls.append((input_ids.shape[0], meta.num_seqs))
        return (input_ids + positions).float().unsqueeze(1).expand(-1, 2) * 1.0

    buffers = DecodeBuffers(max(sizes), 4, 2, torch.float32, torch.device("cpu"))
    return DecodeGraphs(forward, sizes, buffers, block_size=4, max_model_len=16), calls


def test_graph_choice_falls_back_to_eager_for_mixed_large_or_wide_steps():
    graphs, _ = _recorded_graphs()
    assert graphs.size_for(_decode_step([3, 5, 9])) == 4
    assert graphs.size_for(_decode_step([3])) == 1
    assert graphs.size_for(_decode_step([3] * 5)) is None  # more sequences than the largest graph
    assert graphs.size_for(_decode_step([17])) is None  # a table wider than the buffer's
    mixed = _decode_step([3, 5])
    mixed.query_lens[1] = 2
    assert graphs.size_for(mixed) is None
    assert graphs.size_for(HostStep()) is None


def test_stand_in_replay_reads_the_static_buffers_and_returns_the_real_rows():
    """Captured largest first; a replay sees only the buffers, and the output is sliced back to the step."""
    graphs, calls = _recorded_graphs()

    def eager_stand_in(step):  # stands in for a CUDA graph: "capture" runs the step once, replay calls it again
        step()
        return step

    graphs.capture(eager_stand_in)
    assert calls == [(4, 4), (2, 2), (1, 1)]
    calls.clear()
    hidden = graphs.run(_decode_step([3, 5, 9]), 4)
    assert calls == [(4, 4)]
    assert hidden.shape == (3, 2)
    assert hidden[:, 0].tolist() == [100 + 2, 101 + 4, 102 + 8]


# ---- the Triton decode kernel under a graph's metadata ----------------------------------------


def test_triton_decode_over_graph_metadata_matches_reference_on_the_real_rows():
    """Padded rows, a split count sized for max_model_len and stale table columns change no real row."""
    pytest.importorskip("triton", reason="triton is a test dependency: pip install -e '.[test]'")
    from kernels.triton.paged_attention import paged_attention

    device = torch.device("cuda" if CUDA else "cpu")
    gen = torch.Generator().manual_seed(0)
    block_size, num_blocks, num_kv, num_q, head_dim = 4, 40, 2, 4, 32
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(device)
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim, generator=gen).to(device)
    step = _decode_step([1, 6, 23], block_size)
    buffers = DecodeBuffers(8, max_blocks_per_seq=16, hidden_size=1, dtype=torch.float32, device=device)
    buffers.block_tables.fill_(num_blocks - 1)
    buffers.load(step, 4)
    meta = buffers.metadata(4, block_size, max_model_len=64)
    q = torch.randn(4, num_q, head_dim, generator=gen).to(device)

    got = paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    real = block_table(step.block_tables, 3, step.table_width, pin=False)
    want_meta = buffers.metadata(3, block_size, max_model_len=64)
    want_meta.block_tables, want_meta.seq_lens_cpu = real.to(device), step.seq_lens
    want = reference.paged_attention(q[:3], k_cache, v_cache, want_meta, head_dim**-0.5)
    torch.testing.assert_close(got[:3].cpu(), want.cpu(), atol=2e-5, rtol=2e-5)
    assert torch.isfinite(got[3]).all()  # the padded row attends to one cached token


# ---- end to end with the eager stand-in -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    # one layer, one KV head: the interpreted Triton kernels cost time per program
    return make_tiny_model(tmp_path_factory.mktemp("graphs"), "qwen3-gqa", num_hidden_layers=1, num_key_value_heads=1)


def _llm(path) -> LLM:
    return LLM(
        str(path), dtype="float32", max_model_len=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=24,
        attention_backend="triton", kv_cache_memory=0.01,
    )


def _prompts_and_params(vocab_size: int):
    gen = torch.Generator().manual_seed(1)
    lengths = (1, 3, 7, 12, 5, 20)  # the 20-token prompt is prefilled in chunks beside decodes
    prompts = [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 4, 5, 5, 6, 7)]
    return prompts, params


def _generate(llm: LLM, prompts, params) -> tuple[list[list[int]], int]:
    """Greedy outputs, all requests added at once, and the number of engine steps that ran."""
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(GenerateRequest(f"r{i}", prompt, p, 0.0))
    got: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished():
        outputs, _ = engine.step()
        steps += 1
        for out in outputs:
            got.setdefault(out.request_id, []).extend(out.token_ids)
    return [got[f"r{i}"] for i in range(len(prompts))], steps


def test_greedy_output_through_a_stand_in_for_the_cuda_graph_equals_the_eager_path(tiny_model):
    """Decode batches of 6 down to 1 sequences replay graphs of sizes 8, 4, 2 and 1; steps that prefill
    (alone or beside decodes) run eagerly; every token equals the plain path's."""
    pytest.importorskip("triton", reason="triton is a test dependency: pip install -e '.[test]'")
    eager = _llm(tiny_model)
    prompts, params = _prompts_and_params(eager.engine.hf_config.vocab_size)
    want, _ = _generate(eager, prompts, params)

    graphed = _llm(tiny_model)
    sizes = (1, 2, 4, 8)
    captured = iter(reversed(sizes))  # DecodeGraphs captures the largest size first
    replays: Counter[int] = Counter()

    def eager_stand_in(step):
        """Stands in for a CUDA graph: "capture" keeps the step, "replay" calls it again on the buffers."""
        size = next(captured)

        def replay():
            replays[size] += 1
            step()

        return replay

    graphed.engine.runner.capture_decode_graphs(eager_stand_in, sizes)
    got, steps = _generate(graphed, prompts, params)
    assert got == want
    assert set(replays) == set(sizes), replays
    assert steps - sum(replays.values()) >= 3  # the prefill steps, mixed ones included, ran eagerly
    assert graphed.engine.block_pool.usage == 0.0


# ---- CUDA only --------------------------------------------------------------------------------


def _cuda_llm(path, **kwargs) -> LLM:
    return LLM(str(path), dtype="float32", max_model_len=64, block_size=16, max_num_seqs=8, max_num_batched_tokens=24,
               device="cuda", num_gpu_blocks_override=64, **kwargs)  # not 90% of the GPU per engine


@needs_cuda
def test_captured_cuda_graphs_give_the_eager_greedy_output(tiny_model):
    eager = _cuda_llm(tiny_model, enforce_eager=True)
    assert eager.engine.runner.graphs is None
    prompts, params = _prompts_and_params(eager.engine.hf_config.vocab_size)
    want, _ = _generate(eager, prompts, params)
    graphed = _cuda_llm(tiny_model, cuda_graph_sizes=[1, 2, 4, 8])
    assert graphed.engine.runner.graphs.sizes == (1, 2, 4, 8)
    assert graphed.engine.startup_phases()["cuda_graphs"] > 0
    got, _ = _generate(graphed, prompts, params)
    assert got == want


@needs_cuda
@pytest.mark.parametrize("engine_args", [{"enforce_eager": True}, {"cuda_graph_sizes": [1, 2, 4, 8]}], ids=["eager", "graphs"])
def test_a_cuda_step_syncs_only_to_read_the_sampled_tokens(tiny_model, engine_args):
    """torch's sync debug mode warns at every device-to-host sync it makes: one per step that samples."""
    llm = _cuda_llm(tiny_model, **engine_args)
    prompts, params = _prompts_and_params(llm.engine.hf_config.vocab_size)
    engine = llm.engine
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(GenerateRequest(f"r{i}", prompt, p, 0.0))
    torch.cuda.synchronize()
    per_step = []
    torch.cuda.set_sync_debug_mode("warn")
    try:
        while engine.has_unfinished():
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outputs, _ = engine.step()
            syncs = [w for w in caught if "synchronizing" in str(w.message)]
            per_step.append((len(syncs), any(out.token_ids for out in outputs)))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert per_step and all(count == int(sampled) for count, sampled in per_step), per_step
