"""Paged KV cache with prefix caching: keys and values in fixed-size blocks, lent to sequences as they grow.

The pool holds `num_blocks` blocks of `block_size` positions for every layer: (n_layers, num_blocks, block_size,
n_kv_heads, head_dim). A sequence owns a list of block ids (its block table); position p of the sequence lives at
offset p % block_size of block table[p // block_size]. Memory is thus held by the tokens actually in flight, not by
a batch size times the longest context (vLLM's PagedAttention idea, here with plain tensor indexing).

Prefix caching: a block once full is keyed by a digest of every token up to its end, so a later sequence with the
same prefix (the next turn of a chat, a shared system prompt) takes the computed block instead of recomputing it.
Blocks are reference-counted; a block nobody uses but that holds a cached prefix stays readable, in least-recently
used order, until its memory is needed. Only full blocks are shared, and a sequence only ever writes into its own
last, partial block, so sharing needs no copy-on-write.

`PagedBatch` is what the model's attention sees for one forward pass: it has the `update(layer, k, v, positions,
kv_len)` of the model's static `KVCache`, storing the new keys/values through the block tables and returning each
row's first kv_len positions gathered into one (B, kv_len, n_kv_heads, head_dim) tensor.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch
from torch import Tensor

from ..args import ModelArgs


class BlockPool:
    """The blocks, who holds them, and which cached prefixes they contain (engine thread only)."""

    SCRATCH = 0  # block 0 is never lent: padding positions of a batch write there and padded tables read it

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int = 16, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, prefix_caching: bool = True):
        if num_blocks < 2 or block_size < 1:
            raise ValueError(f"need at least 2 blocks of at least 1 position; got {num_blocks} of {block_size}")
        self.block_size, self.num_blocks, self.prefix_caching = block_size, num_blocks, prefix_caching
        shape = (args.n_layers, num_blocks, block_size, args.n_kv_heads, args.head_dim)
        # Zero-initialised: positions a mask hides are still read, and must never hold NaNs.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.refs = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # never used or evicted: popped from the end
        self.cached: OrderedDict[int, None] = OrderedDict()  # unreferenced blocks holding a prefix, oldest first
        self.by_digest: dict[bytes, int] = {}
        self.digest_of: dict[int, bytes] = {}

    @property
    def capacity(self) -> int:
        """Positions one sequence may hold at most."""
        return (self.num_blocks - 1) * self.block_size

    @property
    def num_available(self) -> int:
        """Blocks that can be lent now: free ones and unreferenced cached ones."""
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - self.num_available

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    def allocate(self) -> int | None:
        """A block for a sequence to write into, or None when the pool is exhausted."""
        if self.free:
            block = self.free.pop()
        elif self.cached:
            block, _ = self.cached.popitem(last=False)  # the least recently used cached prefix gives way
            del self.by_digest[self.digest_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        """A sequence is done with these blocks (finished, cancelled or preempted)."""
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self.digest_of:
                    self.cached[block] = None  # most recently used at the end
                else:
                    self.free.append(block)

    # ---- prefix caching ---------------------------------------------------------------------------------------------

    def digests(self, tokens: list[int], parent: bytes = b"") -> list[bytes]:
        """One digest per full block of `tokens`, each covering every token from the start to the block's end."""
        out, bs = [], self.block_size
        for i in range(len(tokens) // bs):
            parent = hashlib.sha256(parent + array("q", tokens[i * bs:(i + 1) * bs]).tobytes()).digest()
            out.append(parent)
        return out

    def lookup(self, tokens: list[int]) -> list[int]:
        """Take the cached blocks holding the longest cached prefix of `tokens` (a reference to each), leaving at
        least the last token to compute: its logits give the next token."""
        blocks = []
        if self.prefix_caching:
            for digest in self.digests(tokens[:len(tokens) - 1]):
                block = self.by_digest.get(digest)
                if block is None:
                    break
                self.cached.pop(block, None)
                self.refs[block] += 1
                blocks.append(block)
        return blocks

    def register(self, block: int, digest: bytes) -> None:
        """A sequence filled `block` with the prefix `digest` names: later sequences may share it."""
        if self.prefix_caching and digest not in self.by_digest and block not in self.digest_of:
            self.by_digest[digest] = block
            self.digest_of[block] = digest


class PagedBatch:
    """One forward pass's view of the pool: row b of the batch reads and writes through block table b.

    tables (B, n) block ids, padded with the scratch block; slots (B, T) the flat pool position of each token of the
    pass (scratch positions for padding tokens)."""

    def __init__(self, pool: BlockPool, tables: Tensor, slots: Tensor):
        self.pool, self.tables, self.slots = pool, tables, slots
        self.max_seq_len = tables.shape[1] * pool.block_size

    def update(self, layer: int, xk: Tensor, xv: Tensor, positions: Tensor, kv_len: int) -> tuple[Tensor, Tensor]:
        """Store this pass's keys/values (B, T, n_kv_heads, head_dim); return each row's first kv_len positions."""
        pool = self.pool
        n = pool.blocks_for(kv_len)
        # One index_put_ on the whole pool (not on a per-layer view): torch.compile then updates it in place
        # instead of copying the pool for every layer.
        index = (torch.full_like(self.slots, layer), self.slots // pool.block_size, self.slots % pool.block_size)
        out = []
        for cache, x in ((pool.k, xk), (pool.v, xv)):
            cache.index_put_(index, x.to(cache.dtype))
            out.append(cache[layer][self.tables[:, :n]].flatten(1, 2)[:, :kv_len])  # (B, kv_len, n_kv_heads, hd)
        return out[0], out[1]


def paged_batch(pool: BlockPool, tables: list[list[int]], positions: list[list[int]]) -> PagedBatch:
    """The view for rows with these block tables, writing the tokens at these positions (-1: a padding token, whose
    keys/values go to the scratch block)."""
    width = max(max(map(len, tables)), pool.blocks_for(max(max(row) for row in positions) + 1))
    table = torch.full((len(tables), width), BlockPool.SCRATCH, dtype=torch.long)
    for i, t in enumerate(tables):
        table[i, :len(t)] = torch.tensor(t, dtype=torch.long)
    bs = pool.block_size
    slots = [[t[p // bs] * bs + p % bs if p >= 0 else BlockPool.SCRATCH * bs for p in row]
             for t, row in zip(tables, positions)]
    device = pool.k.device
    return PagedBatch(pool, table.to(device), torch.tensor(slots, dtype=torch.long, device=device))
