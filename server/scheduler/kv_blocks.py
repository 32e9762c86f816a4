"""The paged KV block pool: an O(1) free list, per-block ref counts and a prefix cache.

Plain Python on ints (no torch): the runner owns the KV tensors, this pool only decides which
block ids hold which tokens. Every block id in ``range(num_blocks)`` is usable; none is reserved.

Prefix caching: the hash of full block ``i`` of a request is ``hash((parent, tokens_of_block_i))``
with ``parent`` the hash of block ``i - 1`` (``ROOT_HASH`` for block 0, or ``ROOT_HASH`` mixed with
the request's ``cache_salt``), so a hit on block ``i`` means the whole prefix up to and including it
matches, and requests with different salts never share a block. The pool maps ``hash -> block id`` and keeps
the key tuple of each cached block to verify a hit. Only full blocks whose tokens were all computed
are cached. An unreferenced cached block sits in the free list and stays findable until it is
taken for new tokens (then its hash is evicted).

Free list order: blocks are taken from the head. A freed block that holds a cached hash goes to the
tail (least recently used cached blocks are evicted first); a freed block without one goes to the
head, since it holds nothing worth keeping. A request frees its blocks last-to-first, so the end of
a cached prefix is evicted before its start.
"""

from __future__ import annotations

from collections import OrderedDict

from server.request import Request

ROOT_HASH = 0x5EED_B10C  # the parent hash of a request's first block


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 0 or block_size < 1:
            raise ValueError(f"bad block pool shape: num_blocks={num_blocks}, block_size={block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # head: next taken
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._block_hash: list[int | None] = [None] * num_blocks
        self._block_key: list[tuple | None] = [None] * num_blocks  # (parent hash, tokens) to verify hits
        self._num_registered: dict[str, int] = {}  # request id -> leading blocks already in the cache
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    # ---- state -------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks with no reference, cached ones included (they are reused on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request, 0.0 to 1.0."""
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0

    def is_cached(self, block_id: int) -> bool:
        return self._block_hash[block_id] is not None

    # ---- hashing -----------------------------------------------------------------------------

    def _key(self, request: Request, i: int) -> tuple:
        if i:
            parent = request.block_hashes[i - 1]
        else:
            salt = request.params.cache_salt
            parent = ROOT_HASH if salt is None else hash((ROOT_HASH, salt))
        bs = self.block_size
        return (parent, tuple(request.all_token_ids[i * bs : (i + 1) * bs]))

    def _hash_blocks(self, request: Request, num_blocks: int) -> list[int]:
        """Extend ``request.block_hashes`` to its first ``num_blocks`` full blocks.

        The hashes depend only on the tokens, which never change, so they stay valid across
        preemption and are computed once per block.
        """
        hashes = request.block_hashes
        while len(hashes) < num_blocks:
            hashes.append(hash(self._key(request, len(hashes))))
        return hashes

    # ---- operations --------------------------------------------------------------------------

    def _uses_cache(self, request: Request) -> bool:
        return self.enable_prefix_caching and request.params.prompt_logprobs is None

    def get_computed_blocks(self, request: Request, record_stats: bool = True) -> tuple[list[int], int]:
        """The longest cached prefix of the request in full blocks: (block ids, tokens covered).

        Never covers the last token, which must be computed again to get logits. Empty when
        prefix caching is off or the request wants prompt logprobs (every position must be run).
        The blocks are not referenced yet: pass them to ``allocate``. With ``record_stats=False``
        the caller records the lookup itself (``record_prefix_query``) once it is used, so a
        request looked up again while it waits for memory is not counted twice.
        """
        if not self._uses_cache(request):
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hash_blocks(request, max_blocks)
        blocks: list[int] = []
        for i in range(max_blocks):
            block_id = self._cached.get(hashes[i])
            if block_id is None or self._block_key[block_id] != self._key(request, i):
                break
            blocks.append(block_id)
        num_tokens = len(blocks) * self.block_size
        if record_stats:
            self.record_prefix_query(request, num_tokens)
        return blocks, num_tokens

    def next_uncached_hash(self, request: Request, num_cached: int) -> int | None:
        """The hash of the block after the ``num_cached`` tokens ``get_computed_blocks`` found, or
        None when there is none to share (that would be the block holding the last token, or the
        request does not use the prefix cache)."""
        if not self._uses_cache(request):
            return None
        i = num_cached // self.block_size
        if i >= (request.num_tokens - 1) // self.block_size:
            return None
        return self._hash_blocks(request, i + 1)[i]

    def pending_block_hashes(self, request: Request) -> list[int]:
        """Hashes of the request's full blocks of known tokens that it has not computed yet.

        While it runs, each is cached by ``cache_full_blocks`` once computed (unless another block
        already holds that hash). Empty when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return []
        first = request.num_computed_tokens // self.block_size
        last = request.num_tokens // self.block_size
        if last <= first:
            return []
        return self._hash_blocks(request, last)[first:last]

    def record_prefix_query(self, request: Request, num_hit_tokens: int) -> None:
        """Count one lookup: ``prefix_queries`` += the request's tokens, ``prefix_hits`` += those found."""
        if self._uses_cache(request):
            self.prefix_queries += request.num_tokens
            self.prefix_hits += num_hit_tokens

    def allocate(self, request: Request, num_total_tokens: int, computed_blocks: list[int] | tuple = ()) -> bool:
        """Make ``request.block_ids`` cover ``num_total_tokens`` tokens.

        ``computed_blocks`` (from ``get_computed_blocks``, only for a request holding no blocks)
        are attached first; new blocks come from the free list head. Returns False and changes
        nothing when there are not enough free blocks.
        """
        if computed_blocks and request.block_ids:
            raise ValueError(f"{request.request_id}: computed blocks can only start an empty block table")
        num_new = max(0, cdiv(num_total_tokens, self.block_size) - len(request.block_ids) - len(computed_blocks))
        num_touched = sum(1 for b in computed_blocks if self.ref_counts[b] == 0)  # leave the free list
        if num_new > len(self._free) - num_touched:
            return False
        if not request.block_ids:
            self._num_registered[request.request_id] = len(computed_blocks)
        for block_id in computed_blocks:
            if self.ref_counts[block_id] == 0:
                del self._free[block_id]
            self.ref_counts[block_id] += 1
            request.block_ids.append(block_id)
        for _ in range(num_new):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self.ref_counts[block_id] = 1
            request.block_ids.append(block_id)
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's blocks that became full of computed tokens since the last call.

        When another block already holds the same hash the existing mapping is kept, and this
        block stays uncached (it is freed like any other).
        """
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_registered.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hash_blocks(request, num_full)
        for i in range(start, num_full):
            block_id = request.block_ids[i]
            if hashes[i] in self._cached or self._block_hash[block_id] is not None:
                continue
            self._cached[hashes[i]] = block_id
            self._block_hash[block_id] = hashes[i]
            self._block_key[block_id] = self._key(request, i)
        self._num_registered[request.request_id] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references, last block first; its cached blocks stay findable."""
        for block_id in reversed(request.block_ids):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] == 0:
                self._free[block_id] = None
                if self._block_hash[block_id] is None:
                    self._free.move_to_end(block_id, last=False)  # holds nothing: reuse it first
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def _evict(self, block_id: int) -> None:
        block_hash = self._block_hash[block_id]
        if block_hash is not None:
            if self._cached.get(block_hash) == block_id:
                del self._cached[block_hash]
            self._block_hash[block_id] = None
            self._block_key[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash; blocks in use stay allocated but are no longer shareable."""
        self._cached.clear()
        self._block_hash = [None] * self.num_blocks
        self._block_key = [None] * self.num_blocks
