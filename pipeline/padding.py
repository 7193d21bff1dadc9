"""Examples of a split plan as the backbone's input: right-padded token ids and attention masks."""
from __future__ import annotations

import numpy as np
import torch

from cache_store.writer import SplitPlan


def pad_examples(plan: SplitPlan, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention mask for examples `index` of a plan, in that order: [B, L] each."""
    lengths = torch.from_numpy(plan.lengths[index])
    mask = torch.arange(int(lengths.max()))[None, :] < lengths[:, None]
    ids = torch.full(mask.shape, pad_id, dtype=torch.long)
    offsets = plan.offsets
    ids[mask] = torch.from_numpy(np.concatenate([plan.input_ids[offsets[j]:offsets[j + 1]] for j in index])).long()
    return ids, mask.long()


def pad_batch(plan: SplitPlan, start: int, stop: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input_ids and attention mask for examples [start, stop): [B, L] each."""
    return pad_examples(plan, np.arange(start, stop), pad_id)
