"""Sissi: training-free style-guided synthesis as in-context inpainting on FLUX.1-Fill, with DSSI.

The style image is the left panel of a diptych, the right panel is fully masked and FluxFill paints it from
the prompt; DSSI (Dynamic Semantic-Style Integration) re-weights, for the target-panel queries only, the
attention between the text branch and the style-image branch (docs/research/sissi.md §3-4). One module per
concern, each readable in one sitting:

- :mod:`~operators.sissi.params`: the params, their defaults and checks (``parse_params``), ``MODES`` and co.;
- :mod:`~operators.sissi.kernels`: attention with log-sum-exp on torch's fused kernels, with the math fallback;
- :mod:`~operators.sissi.modes`: lambda for each ``dssi.mode`` (the readings of the paper's gamma);
- :mod:`~operators.sissi.dssi`: DSSI attention on plain tensors (branches, ``dssi.compose``), the diptych layout;
- :mod:`~operators.sissi.processor`: the FLUX attention processor, layer selection, the step gate;
- :mod:`~operators.sissi.operator`: ``SissiOperator``, the registry operator (diptych in, target panel out).

Everything that is a reading of the paper rather than the paper itself is a switch: ``dssi.mode`` (how
gamma, hence lambda, is obtained), ``dssi.compose`` (what happens to the target's own keys),
``dssi.layers`` and ``dssi.steps`` (where DSSI applies). Params and readings: docs/sissi.md.
"""

from operators.sissi.dssi import diptych_layout, dssi_attention
from operators.sissi.kernels import attention_with_lse
from operators.sissi.modes import dssi_lambda, dssi_objective
from operators.sissi.operator import SissiOperator
from operators.sissi.params import (
    CACHES,
    COMPOSES,
    DEFAULT_MODEL,
    MODES,
    PROMPT_TEMPLATES,
    TEXT_TOKENS,
    DSSIConfig,
    SissiParams,
    parse_params,
)
from operators.sissi.processor import DSSIState, install_dssi, make_dssi_processor, select_layers

__all__ = [
    "CACHES", "COMPOSES", "DEFAULT_MODEL", "MODES", "PROMPT_TEMPLATES", "TEXT_TOKENS", "DSSIConfig", "DSSIState",
    "SissiOperator", "SissiParams", "attention_with_lse", "diptych_layout", "dssi_attention", "dssi_lambda",
    "dssi_objective", "install_dssi", "make_dssi_processor", "parse_params", "select_layers",
]
