"""Turn a scheduler decision into model inputs and run one forward pass."""

from __future__ import annotations

import torch

from elasticmoe.engine.scheduler import SchedulerOutput
from elasticmoe.kv.manager import KVCacheManager
from elasticmoe.model.attention import AttentionGroup, AttentionMetadata, PagedKVCache
from elasticmoe.model.model import LoadHook, MoEForCausalLM


def _group(
    rows: list[tuple[list[int], list[int], list[int]]], device: torch.device
) -> AttentionGroup:
    """Pad (token rows, positions, block table) of several sequences into one group."""
    max_q = max(len(t) for t, _, _ in rows)
    max_blocks = max(len(b) for _, _, b in rows)
    token_idx = [t + [0] * (max_q - len(t)) for t, _, _ in rows]
    positions = [p + [0] * (max_q - len(p)) for _, p, _ in rows]
    tables = [b + [0] * (max_blocks - len(b)) for _, _, b in rows]
    q_valid = None
    if max_q > 1:
        q_valid = torch.tensor(
            [[j < len(t) for j in range(max_q)] for t, _, _ in rows], device=device
        )
    return AttentionGroup(
        token_idx=torch.tensor(token_idx, device=device),
        positions=torch.tensor(positions, device=device),
        block_tables=torch.tensor(tables, device=device),
        q_valid=q_valid,
    )


class ModelRunner:
    """Owns the model and its paged KV tensors; runs scheduled steps."""

    def __init__(
        self,
        model: MoEForCausalLM,
        kv_cache: PagedKVCache,
        kv_manager: KVCacheManager,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.kv_manager = kv_manager
        self.device = device
        # (request, first position, number of rows) of the prompt-logprob rows that follow
        # the sampling rows in the last ``execute``'s logits
        self.prompt_logit_rows: list[tuple[object, int, int]] = []

    def execute(self, step: SchedulerOutput, load_hook: LoadHook | None = None) -> torch.Tensor:
        """Run the step; return logits [num_completing, V] for the requests that
        reach the end of their known tokens, in ``step.scheduled`` order; requests
        that ask for prompt logprobs add rows for their prompt positions after
        those (see ``prompt_logit_rows``)."""
        bs = self.kv_cache.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        logits_indices: list[int] = []
        decode_rows, prefill_rows = [], []
        prompt_indices: list[int] = []
        self.prompt_logit_rows = []
        for sched in step.scheduled:
            request = sched.request
            start = request.num_computed_tokens
            end = start + sched.num_new_tokens
            table = self.kv_manager.block_ids(request.request_id)
            flat = list(range(len(input_ids), len(input_ids) + sched.num_new_tokens))
            pos = list(range(start, end))
            input_ids.extend(request.all_token_ids[start:end])
            positions.extend(pos)
            slots.extend(table[p // bs] * bs + p % bs for p in pos)
            if sched.completes_sequence:
                logits_indices.append(flat[-1])
            last_prompt_pos = len(request.prompt_token_ids) - 1
            if request.params.prompt_logprobs is not None and start < last_prompt_pos:
                num = min(end, last_prompt_pos) - start
                prompt_indices.extend(flat[:num])
                self.prompt_logit_rows.append((request, start, num))
            (decode_rows if len(flat) == 1 else prefill_rows).append((flat, pos, table))
        dev = self.device
        groups = [_group(rows, dev) for rows in (decode_rows, prefill_rows) if rows]
        meta = AttentionMetadata(torch.tensor(slots, device=dev), groups)
        return self.model(
            torch.tensor(input_ids, device=dev),
            torch.tensor(positions, device=dev),
            meta,
            self.kv_cache,
            torch.tensor(logits_indices + prompt_indices, device=dev, dtype=torch.long),
            load_hook,
        )
