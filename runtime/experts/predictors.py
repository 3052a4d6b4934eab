"""The predictors of a layer's experts, as the runtime runs them and the compiler's profiler
measures them (one implementation, so calibration measures what runs).

- cross-layer: the scores are the next layer's router logits computed by the previous layer's
  graph on its own router input (graph outputs; nothing to compute here);
- EAP (expert activation path): transition counts from the previous MoE layer's experts to this
  layer's, summed over the experts that actually ran there, with popularity breaking ties
  between experts no transition names.
Either way the prediction is the top-`width` of the scores, ties to the lower expert index.
"""

from __future__ import annotations

import numpy as np

POPULARITY_TIE_BREAK = 1e-6  # far below one transition count


def top_experts(scores: np.ndarray, width: int) -> np.ndarray:
    """[N, width]: each row's `width` highest-scoring experts, best first."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :width]


def eap_scores(transitions: np.ndarray, popularity: np.ndarray, previous_ids: np.ndarray) -> np.ndarray:
    """[N, E] scores of this layer's experts from the previous MoE layer's experts [N, k]:
    transitions [E_prev, E] counts, popularity [E] (any scale up to 1)."""
    return transitions[previous_ids].sum(axis=1) + np.asarray(popularity, np.float64) * POPULARITY_TIE_BREAK
