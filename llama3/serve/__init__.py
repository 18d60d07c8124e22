"""An OpenAI-compatible server with continuous batching, and a web chat page (`llama3 serve`).

engine.py runs the model on one thread for all requests at once; app.py is the HTTP API and page; protocol.py the
OpenAI request/response shapes; metrics.py the Prometheus text. This file holds only the CLI verb, so that
`llama3 --help` does not import the web stack.
"""

from __future__ import annotations

import os
import sys

from ..hub import DEFAULT_MODEL


def serve(*, model: str = DEFAULT_MODEL, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_batch: int = 64, max_context: int | None = None, max_queue: int = 64, prefill_chunk: int = 256,
          kv_cache_tokens: int | None = None, prefix_caching: bool = True,
          max_body_bytes: int = 1 << 20, timeout: float = 600.0, dtype: str | None = None,
          threads: int | None = None, header_timeout: float = 10.0, keep_alive_timeout: float = 5.0,
          max_connections: int = 1024, max_client_connections: int = 128) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/chat/completions, /v1/completions, /v1/models) with
    a chat page at /, /health and Prometheus /metrics. Concurrent requests are decoded together (continuous
    batching).

    Args:
        model: known model name, .gguf file, or Meta / Hugging Face checkpoint directory
        host: address to bind; the default accepts connections from this machine only
        port: TCP port
        api_key: require 'Authorization: Bearer KEY' except on /health and the page; None reads $LLAMA3_API_KEY
        max_batch: most requests decoded together (as many as the KV cache holds, up to this)
        max_context: most tokens per request, prompt and completion together; None means the model's context
        max_queue: most requests waiting for a free slot; more get HTTP 429
        prefill_chunk: prompt tokens prefilled per engine step (smaller keeps running streams smoother)
        kv_cache_tokens: positions the paged KV cache holds for all requests together; None: 4 x max_context
        prefix_caching: reuse the keys/values of prompt prefixes seen before (chat history, system prompts)
        max_body_bytes: largest request body accepted (HTTP 413 past it)
        timeout: seconds a request may take from arrival to its last token
        dtype: float32, bfloat16 or float16 (default: the checkpoint's; GGUF is dequantized to float32)
        threads: CPU threads for the model; None keeps torch's default (one per core); fewer helps on a busy machine
        header_timeout: seconds a connection has to send complete request headers, after connecting or a reply
        keep_alive_timeout: seconds an idle keep-alive connection stays open
        max_connections: open connections in all; past it the oldest idle one closes, or the newcomer gets 503
        max_client_connections: open connections per client address, enforced the same way
    """
    import torch
    import uvicorn

    from ..llama import load
    from .app import ServeConfig, create_app, uvicorn_config

    api_key = api_key or os.environ.get("LLAMA3_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"warning: serving on {host} without an API key: anyone who can reach this port can use it",
              file=sys.stderr)
    if threads is not None:
        torch.set_num_threads(threads)
    llm = load(model, dtype=dtype, prepack=True)  # fp32 on CPU: oneDNN linears, as fast for 8 rows as for 1
    config = ServeConfig(api_key=api_key, max_batch=max_batch, max_context=max_context, max_queue=max_queue,
                         prefill_chunk=prefill_chunk, kv_cache_tokens=kv_cache_tokens, prefix_caching=prefix_caching,
                         max_body_bytes=max_body_bytes, request_timeout=timeout,
                         header_timeout=header_timeout, keep_alive_timeout=keep_alive_timeout,
                         max_connections=max_connections, max_client_connections=max_client_connections)
    app = create_app(llm, config)
    print(f"Serving {llm.name} at http://{host}:{port} (chat page at /, API at /v1)", file=sys.stderr)
    # Generation requests are bounded by the engine's queue (429); connections by the guard (connections.py).
    uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level="info")).run()


__all__ = ["serve"]
