"""Row chunking shared by the reference functions."""

import torch

#: Logits per chunk (rows x vocabulary) that the reference holds in float32 at once.
CHUNK_ELEMENTS = 1 << 21


def row_chunks(logits: torch.Tensor, chunk_elements: int | None = None):
    """Yield ``(start, stop, view)`` over the rows of ``[B, T, V]`` logits.

    ``view`` is a ``[stop - start, V]`` view (no copy) of rows ``start:stop`` of the
    flattened ``[B*T, V]`` row space; chunks never cross a sequence boundary.
    """
    b_size, t_size, v_size = logits.shape
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // max(v_size, 1))
    for b in range(b_size):
        for t0 in range(0, t_size, rows):
            t1 = min(t_size, t0 + rows)
            yield b * t_size + t0, b * t_size + t1, logits[b, t0:t1]
