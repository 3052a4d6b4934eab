"""The predictors of a layer's experts, named once."""

from __future__ import annotations

import enum

from .layout import GraphIO as IO

# Predictors of a layer's experts, measured side by side:
#   cross_layer       the next layer's router applied to this layer's router input (the paper's)
#   cross_layer_norm  the same after the next layer's own norm weights
#   eap               expert-activation-path: transition counts from the previous MoE layer's experts
#   previous_token    the experts this layer's router ranked highest for the previous token
#   none              no prediction: load on demand
class Predictor(str, enum.Enum):
    """A predictor's name, as profiles and policies write it (a str: equal to that text)."""

    CROSS_LAYER = "cross_layer"
    CROSS_LAYER_NORM = "cross_layer_norm"
    EAP = "eap"
    PREVIOUS_TOKEN = "previous_token"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


PREDICTORS = tuple(p.value for p in Predictor if p is not Predictor.NONE)  # measured by calibration
GRAPH_PREDICTORS = (Predictor.CROSS_LAYER.value, Predictor.CROSS_LAYER_NORM.value)  # inside the layer graphs
RUNTIME_PREDICTORS = (*GRAPH_PREDICTORS, Predictor.EAP.value)  # what a layer's policy may name (or none)
# The graph output that carries each graph predictor's scores of the following layer's experts (a layer graph's
# with predicts_next, the embedding graph's with embed_predicts_next), in the order graphs and steps write them.
GRAPH_OUTPUT_OF = {Predictor.CROSS_LAYER: IO.NEXT_ROUTER_LOGITS, Predictor.CROSS_LAYER_NORM: IO.NEXT_ROUTER_LOGITS_NORM}
PREDICTION_OUTPUTS = tuple(GRAPH_OUTPUT_OF.values())
