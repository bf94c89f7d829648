"""The training objective on a batch: eq. 7, ``L = L_CE + w_NAL * L_NAL`` (paper §3.3).

:class:`Targets` holds what the loss reads besides the model inputs. The positives of the Next
Action Loss come from the model inputs themselves: p(t+1) is the S_all token after slot t of the
S_RT[:r] segment (``losses.next_slot``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int8_codec import dequantize_int8
from transact_jax.data.schema import TrainingExamples
from transact_jax.model.inputs import ModelInputs
from transact_jax.model.losses import in_batch_negatives, multi_head_bce, nal_loss, next_slot
from transact_jax.model.ranking import ModelOutput
from transact_jax.run.config import ExperimentConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Targets:
    """Labels (N, H) float32, NAL targets/negatives, 32-bit user ids and per-example weights (N,)
    (0 for rows that pad a batch)."""

    labels: jax.Array
    nal_target_mask: jax.Array
    nal_negatives: jax.Array
    nal_negative_mask: jax.Array
    user_id: jax.Array
    example_weight: jax.Array

    @classmethod
    def from_examples(cls, ex: TrainingExamples, example_weight=None) -> "Targets":
        n = len(ex)
        w = np.ones(n, np.float32) if example_weight is None else np.asarray(example_weight, np.float32)
        # 32-bit ids (x64 is off on device): a collision only masks an extra in-batch negative
        uid = (ex.user_id % np.int64(2**31 - 1)).astype(np.int32)
        return cls(labels=ex.labels.astype(np.float32), nal_target_mask=ex.nal_target_mask,
                   nal_negatives=ex.nal_negatives, nal_negative_mask=ex.nal_negative_mask,
                   user_id=uid, example_weight=w)


def objective(out: ModelOutput, inputs: ModelInputs, targets: Targets, cfg: ExperimentConfig,
              key: jax.Array) -> Tuple[jax.Array, Dict[str, jax.Array]]:
    """Total loss and its parts for one batch."""
    tc, scale = cfg.train, cfg.feature.quant_scale
    ce = multi_head_bce(out.logits, targets.labels, jnp.asarray(tc.head_loss_weights, jnp.float32),
                        example_weight=targets.example_weight)
    metrics = {"loss_ce": ce}
    loss = ce
    if tc.uses_nal:
        seg = cfg.selection.segment("rt_recent")
        pos_codes = next_slot(inputs.embeddings, seg)
        target = targets.nal_target_mask & (targets.example_weight > 0)[:, None]
        if tc.nal_negatives == "impression":
            neg_codes, neg_mask = targets.nal_negatives, targets.nal_negative_mask
        else:
            rt_codes = inputs.embeddings[:, seg]
            _, neg_mask, neg_codes = in_batch_negatives(
                rt_codes, inputs.mask[:, seg] & (targets.example_weight > 0)[:, None],
                targets.user_id, key, tc.num_in_batch_negatives, codes=rt_codes)
        nal, aux = nal_loss(out.nal_user, dequantize_int8(pos_codes, scale, jnp.float32), target,
                            dequantize_int8(neg_codes, scale, jnp.float32), neg_mask,
                            pos_codes=pos_codes, neg_codes=neg_codes, kind=tc.nal_kind)
        loss = ce + tc.w_nal * nal
        metrics.update(loss_nal=nal, nal_accuracy=aux["accuracy"], nal_pairs=aux["num_pairs"])
    if out.aux_loss is not None:          # e.g. VISTA's reconstruction loss, already weighted
        loss = loss + out.aux_loss
        metrics["loss_aux"] = out.aux_loss
    metrics["loss"] = loss
    return loss, metrics
