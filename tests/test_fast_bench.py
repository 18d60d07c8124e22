"""`llama3 bench` on the default model, tiny sizes: a new user's first run prints a complete table."""

import mmap
import time

import pytest

from llama3.bench import PeakMemory, Run, format_table, Result


def test_table_formats_every_figure():
    runs = [Run(prompt_tokens=100, new_tokens=11, ttft_s=0.5, decode_s=0.25, tokens=list(range(11)))]
    table = format_table([Result("llama3 int8", 0.4, 150.0, 135.0, runs, 900.0, compile_s=20.0, note="x")])
    header, rule, row = table.splitlines()
    assert "prefill tok/s" in header and "decode tok/s" in header and "TTFT ms" in header and set(rule) == {"-"}
    assert "llama3 int8 [x]" in row and "0.40 (+20 compile)" in row and "150 (1.11x of 135)" in row
    assert " 200 " in row and " 500 " in row and "40.0" in row and row.endswith("900")


def test_peak_memory_sees_a_temporary_allocation():
    # A fresh anonymous mapping, written page by page: new resident memory whatever the allocator keeps around
    # (a malloc'd block can reuse pages an earlier test freed, and then RSS does not move).
    size, chunk = 64 << 20, b"\1" * (1 << 20)
    with PeakMemory(interval=0.001) as mem:
        block = mmap.mmap(-1, size)
        for offset in range(0, size, len(chunk)):
            block[offset:offset + len(chunk)] = chunk
        time.sleep(0.2)  # a sampler tick or more, even on a busy machine
        block.close()
    assert mem.grown >= 60e6


@pytest.mark.slow
def test_bench_prints_a_row_per_configuration(default_gguf_path, capsys):
    from llama3.bench import bench
    bench(model=str(default_gguf_path), prompt_tokens=16, new_tokens=4, rounds=1, quantize=["int8"], threads=1)
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("llama3 ")]
    assert len(rows) == 2 and "float32 oneDNN" in rows[0] and rows[1].startswith("llama3 int8")
    assert "prompt 16 tokens, 4 new tokens, 1 threads" in out
