"""Pure-torch reference of the row statistics and the shared gradient (``SPEC.md``).

Plain, readable torch that follows the SPEC line by line. It computes in float32
(float64 for float64 logits) and processes rows in chunks of at most
``CHUNK_ELEMENTS`` logits, so its peak extra memory is a small multiple of one chunk:
it doubles as the CPU fallback of every public function. It imports nothing from the
public package; ``stats`` holds the schema of the statistics pass and the types that the
kernels' launchers and the package share.
"""

from .rows import CHUNK_ELEMENTS, row_chunks
from .row_stats import (compute_dtype, finish_row_stats, partial_row_stats, rescale_accumulators, row_stats,
                        target_logit)
from .row_grad import row_grad
from .stats import (ACCUMULATORS, OPTIONAL_STATS, ROW_STATS, STAT_NAMES, GradCoefs, RowStats, Transform,
                    accumulators_for, check_stat_names, kind_dtype, stat_dtype, stat_names)
from .topk_entropy import entropy_of_values, top_values, topk_entropy

__all__ = ["CHUNK_ELEMENTS", "GradCoefs", "RowStats", "Transform", "compute_dtype", "row_chunks",
           "row_stats", "row_grad", "topk_entropy", "partial_row_stats", "finish_row_stats", "top_values",
           "entropy_of_values", "target_logit", "rescale_accumulators", "ROW_STATS", "STAT_NAMES", "OPTIONAL_STATS", "ACCUMULATORS",
           "accumulators_for", "check_stat_names", "kind_dtype", "stat_dtype", "stat_names"]
