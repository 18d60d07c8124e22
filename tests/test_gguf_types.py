"""Every GGUF tensor type: values equal to the gguf package's own reader + dequantizer, llama.cpp-quantized files of
the Llama 3 vocabulary that load and generate as exact fp32 math on their weights, Q4_K kept as int4 codes."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize as gguf_dequantize

from llama3.weights import WeightsError, read_checkpoint
from llama3.weights.gguf import GGUFFile, read_tensor, supported_types

from conftest import random_model, tiny_args
from test_weights import write_gguf

BLOCK_TYPES = [t for t in supported_types() if t not in ("F32", "F16", "BF16")]


def test_the_types_people_download_are_supported():
    assert {"Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "Q8_0", "Q4_0",
            "Q4_1"} <= set(BLOCK_TYPES)


def test_every_type_equals_the_gguf_packages_own_reading(tmp_path):
    """One tensor of random blocks per type (so every bit pattern of codes and scales occurs), read by us and by the
    gguf package's GGUFReader + gguf.quants.dequantize."""
    rng = np.random.default_rng(0)
    writer = GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for kind in BLOCK_TYPES:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
        raw = rng.integers(0, 256, (3, 512 // block_size * block_bytes), dtype=np.uint8)
        writer.add_tensor(kind, raw, raw_shape=raw.shape, raw_dtype=GGMLQuantizationType[kind])
    bf16 = rng.integers(0, 256, (3, 128), dtype=np.uint8)
    writer.add_tensor("BF16", bf16, raw_shape=bf16.shape, raw_dtype=GGMLQuantizationType.BF16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    ours = GGUFFile(tmp_path / "types.gguf").tensors
    with np.errstate(all="ignore"):  # random scales include inf and nan: they must match too
        for t in GGUFReader(tmp_path / "types.gguf").tensors:
            expected = gguf_dequantize(t.data, t.tensor_type)
            got = read_tensor(ours[t.name])
            assert ours[t.name].kind == t.tensor_type.name and tuple(got.shape) == expected.shape, t.name
            np.testing.assert_array_equal(got.float().numpy(), expected, err_msg=t.name)


def test_a_type_we_cannot_read_is_named(tmp_path):
    args = tiny_args()
    write_gguf(tmp_path / "m.gguf", args, random_model(args).state_dict(), GGMLQuantizationType.Q8_0)
    data = (tmp_path / "m.gguf").read_bytes()
    # Retype the first Q8_0 tensor as Q8_1 (ggml type 9): llama.cpp has it, the gguf package cannot dequantize it.
    reader = GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q8_0)
    type_field = t.field.parts[-2]  # the tensor info's uint32 type
    offset = int(type_field.ctypes.data - reader.data.ctypes.data)
    patched = bytearray(data)
    patched[offset:offset + 4] = int(GGMLQuantizationType.Q8_1).to_bytes(4, "little")
    (tmp_path / "m.gguf").write_bytes(bytes(patched))
    with pytest.raises(WeightsError, match=rf"{t.name} has type Q8_1, which cannot be read; supported: .*Q6_K"):
        read_checkpoint(tmp_path / "m.gguf")
