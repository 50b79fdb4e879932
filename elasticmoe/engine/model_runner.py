"""Turn a scheduler decision into model inputs and run one forward pass.

Step metadata (positions, slot mapping, block tables, query padding) is built in bulk with
numpy from a handful of per-request numbers, then moved to the device once per step; nothing
loops over tokens in Python.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import torch

from elasticmoe.engine.scheduler import SchedulerOutput
from elasticmoe.kv.manager import KVCacheManager
from elasticmoe.model.attention import AttentionGroup, AttentionMetadata, PagedKVCache
from elasticmoe.model.model import LoadHook, MoEForCausalLM


def _group(
    rows: np.ndarray,
    cu_start: np.ndarray,
    starts: np.ndarray,
    num_new: np.ndarray,
    tables: np.ndarray,
    num_blocks: np.ndarray,
    device: torch.device,
) -> AttentionGroup:
    """Pad the sequences ``rows`` (indices into the step's requests) into one group."""
    lens = num_new[rows]
    max_q = int(lens.max())
    max_blocks = int(num_blocks[rows].max())
    j = np.arange(max_q)
    valid = j[None, :] < lens[:, None]  # [B, max_q]
    token_idx = np.where(valid, cu_start[rows, None] + j[None, :], 0)
    positions = np.where(valid, starts[rows, None] + j[None, :], 0)
    q_valid = valid_rows = valid_token_idx = None
    if max_q > 1:
        q_valid = torch.from_numpy(valid).to(device)
        valid_rows = torch.from_numpy(np.flatnonzero(valid)).to(device)
        valid_token_idx = torch.from_numpy(token_idx[valid]).to(device)
    return AttentionGroup(
        token_idx=torch.from_numpy(token_idx).to(device),
        positions=torch.from_numpy(positions).to(device),
        block_tables=torch.from_numpy(np.ascontiguousarray(tables[rows, :max_blocks])).to(device),
        q_valid=q_valid,
        valid_rows=valid_rows,
        valid_token_idx=valid_token_idx,
    )


class ModelRunner:
    """Owns the model and its paged KV tensors; runs scheduled steps."""

    def __init__(
        self,
        model: MoEForCausalLM,
        kv_cache: PagedKVCache,
        kv_manager: KVCacheManager,
        device: torch.device,
        decode_buckets: list[int] | None = None,
        micro_batches: int = 1,
        micro_batch_min_seqs: int = 8,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv_manager = kv_manager
        self.device = device
        # (request, first position, number of rows) of the prompt-logprob rows that follow
        # the sampling rows in the last ``execute``'s logits
        self.prompt_logit_rows: list[tuple[object, int, int]] = []
        self.decode_buckets = sorted(decode_buckets) if decode_buckets else None
        self.micro_batches = micro_batches
        self.micro_batch_min_seqs = micro_batch_min_seqs

    def _bucket(self, num_seqs: int) -> int | None:
        """The padded batch size of a decode-only step of ``num_seqs`` (None: no padding)."""
        if self.decode_buckets is None:
            return None
        return next((b for b in self.decode_buckets if b >= num_seqs), None)

    def _split(self, num_new: np.ndarray, num_real: int) -> list[int]:
        """Sequence boundaries [0, s, B] of the step's micro-batches ([0, B]: one batch).

        Two micro-batches only when the expert backend is asynchronous (it has ``submit``:
        only then can one micro-batch's experts run while the other's attention does) and
        each half gets at least ``micro_batch_min_seqs`` real sequences. The split point
        balances tokens (a long prefill chunk would otherwise make one half all the work);
        padding rows stay at the end of the last micro-batch.
        """
        num_seqs = len(num_new)
        min_seqs = self.micro_batch_min_seqs
        asynchronous = getattr(self.model.experts, "submit", None) is not None
        if self.micro_batches < 2 or not asynchronous or num_real < 2 * min_seqs:
            return [0, num_seqs]
        cu_end = np.cumsum(num_new[:num_real])
        # first s whose first s sequences hold at least half the tokens
        s = int(np.searchsorted(cu_end, cu_end[-1] / 2)) + 1
        return [0, min(max(s, min_seqs), num_real - min_seqs), num_seqs]

    def execute(self, step: SchedulerOutput, load_hook: LoadHook | None = None) -> torch.Tensor:
        """Run the step; return logits [num_completing, V] for the requests that
        reach the end of their known tokens, in ``step.scheduled`` order; requests
        that ask for prompt logprobs add rows for their prompt positions after
        those (see ``prompt_logit_rows``)."""
        bs = self.kv_cache.block_size
        num_seqs = len(step.scheduled)
        starts = np.empty(num_seqs, dtype=np.int64)
        num_new = np.empty(num_seqs, dtype=np.int64)
        completes = np.empty(num_seqs, dtype=bool)
        input_ids: list[int] = []
        block_lists: list[list[int]] = []
        prompt_indices: list[int] = []
        self.prompt_logit_rows = []
        offset = 0  # flat index of this request's first new token
        for i, sched in enumerate(step.scheduled):
            request = sched.request
            start = request.num_computed_tokens
            starts[i] = start
            num_new[i] = sched.num_new_tokens
            completes[i] = start + sched.num_new_tokens == request.num_tokens
            input_ids.extend(request.token_ids(start, start + sched.num_new_tokens))
            block_lists.append(self.kv_manager.block_ids(request.request_id))
            last_prompt_pos = len(request.prompt_token_ids) - 1
            if request.params.prompt_logprobs is not None and start < last_prompt_pos:
                num = min(start + sched.num_new_tokens, last_prompt_pos) - start
                prompt_indices.extend(range(offset, offset + num))
                self.prompt_logit_rows.append((request, start, num))
            offset += sched.num_new_tokens
        num_padding = 0
        num_real = num_seqs
        bucket = self._bucket(num_seqs) if bool((num_new == 1).all()) else None
        if bucket is not None and bucket > num_seqs:
            # Dummy decode rows: token 0 at position 0, K/V into the scratch block.
            num_padding = bucket - num_seqs
            starts = np.concatenate([starts, np.zeros(num_padding, np.int64)])
            num_new = np.concatenate([num_new, np.ones(num_padding, np.int64)])
            completes = np.concatenate([completes, np.zeros(num_padding, bool)])
            input_ids.extend([0] * num_padding)
            block_lists.extend([[self.kv_cache.scratch_block]] * num_padding)
            num_seqs = bucket
        num_blocks = np.fromiter((len(b) for b in block_lists), np.int64, num_seqs)
        width = int(num_blocks.max())
        if bucket is not None:
            width = 1 << (width - 1).bit_length()  # a few static table widths
            num_blocks = np.full(num_seqs, width, np.int64)
        tables = np.zeros((num_seqs, width), dtype=np.int64)
        for i, blocks in enumerate(block_lists):
            tables[i, : len(blocks)] = blocks

        cu_end = np.cumsum(num_new)
        cu_start = cu_end - num_new
        num_tokens = int(cu_end[-1])
        seq_of_token = np.repeat(np.arange(num_seqs), num_new)  # [T]
        positions = np.arange(num_tokens) + np.repeat(starts - cu_start, num_new)
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        logits_indices = (cu_end - 1)[completes]

        dev = self.device
        bounds = self._split(num_new, num_real)
        metas = []
        for lo, hi in pairwise(bounds):
            rows = np.arange(lo, hi)
            first_token = int(cu_start[lo])
            groups = [
                # token rows relative to the micro-batch's first token
                _group(r, cu_start - first_token, starts, num_new, tables, num_blocks, dev)
                for r in (rows[num_new[rows] == 1], rows[num_new[rows] > 1])
                if r.size
            ]
            slot_rows = slots[first_token : int(cu_end[hi - 1])]
            padding = num_padding if hi == num_seqs else 0
            metas.append(AttentionMetadata(torch.from_numpy(slot_rows).to(dev), groups, padding))
        return self.model(
            torch.tensor(input_ids, device=dev),
            torch.from_numpy(positions).to(dev),
            metas[0] if len(metas) == 1 else metas,
            self.kv_cache,
            torch.from_numpy(
                np.concatenate([logits_indices, np.asarray(prompt_indices, np.int64)])
            ).to(dev),
            load_hook,
        )
