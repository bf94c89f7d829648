"""The models of the paper's Table 2 as configurations of one code path.

=========================  ==============================  ============================
preset                     sequence model / S_all segments  Next Action Loss
=========================  ==============================  ============================
``wide_deep``              none                             -
``bst``                    BST over S_RT                    -
``transact``               TransAct over S_RT               -
``transact_nal_inbatch``   TransAct over S_RT               NAL, in-batch negatives
``transact_nal_imp``       TransAct over S_RT               NAL, impression negatives
``transact_v2``            TransAct over S_LL+S_RT+S_imp    NAL, impression negatives
``hstu``                   HSTU over S_LL+S_RT+S_imp        -
=========================  ==============================  ============================

"S_RT" means the ``rt_recent`` and ``rt_nn`` segments of S_all; TransAct V2 reads all four
(``ll, rt_recent, rt_nn, imp``, eq. 2). Every preset shares the non-sequence features and the
DCN-v2 + MLP tower, so differences come from the sequence modelling alone.

``hstu`` is not in Table 2: it is the HSTU encoder of "Actions Speak Louder than Words" (Section 3)
reading the same four segments as TransAct V2, the candidate appended as a target token
(:mod:`transact_jax.model.sequence.hstu`); it produces no ``P u(t)``, so it trains without NAL.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

from transact_jax.model.config import ALL_SEGMENTS, ModelConfig
from transact_jax.run.config import ExperimentConfig

RT_SEGMENTS = ("rt_recent", "rt_nn")

_PRESETS: Dict[str, tuple] = {
    "wide_deep": (ModelConfig(sequence_model="none", segments=()), "none"),
    "bst": (ModelConfig(sequence_model="bst", segments=RT_SEGMENTS), "none"),
    "transact": (ModelConfig(sequence_model="transact", segments=RT_SEGMENTS), "none"),
    "transact_nal_inbatch": (ModelConfig(sequence_model="transact", segments=RT_SEGMENTS), "in_batch"),
    "transact_nal_imp": (ModelConfig(sequence_model="transact", segments=RT_SEGMENTS), "impression"),
    "transact_v2": (ModelConfig(sequence_model="transact", segments=ALL_SEGMENTS), "impression"),
    "hstu": (ModelConfig(sequence_model="hstu", segments=ALL_SEGMENTS), "none"),
    "vista": (ModelConfig(sequence_model="vista", segments=ALL_SEGMENTS), "none"),
}
PRESET_NAMES = tuple(_PRESETS)
PAPER_TABLE2 = {  # HIT@3 lift vs Wide&Deep, paper Table 2 (repin, hide)
    "bst": (6.04, -0.49), "transact": (7.74, -6.86), "transact_nal_inbatch": (8.41, -8.63),
    "transact_nal_imp": (8.92, -9.08), "transact_v2": (13.31, -11.25)}


def preset(name: str, base: ExperimentConfig = ExperimentConfig(), **train_overrides) -> ExperimentConfig:
    """The experiment ``name`` (one of :data:`PRESET_NAMES`), on top of ``base``'s data and training
    settings; ``train_overrides`` replace TrainConfig fields (``nal_negatives`` included, e.g. TransAct
    V2 with in-batch negatives for the negative-sampling comparison)."""
    if name not in _PRESETS:
        raise ValueError(f"preset: unknown {name!r}; choose from {PRESET_NAMES}")
    model, negatives = _PRESETS[name]
    model = dataclasses.replace(model, **{f.name: getattr(base.model, f.name)
                                          for f in dataclasses.fields(ModelConfig)
                                          if f.name not in ("sequence_model", "segments")})
    train = dataclasses.replace(base.train, **{"nal_negatives": negatives, **train_overrides})
    return dataclasses.replace(base, name=name, model=model, train=train)
