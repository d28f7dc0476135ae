"""Learned sharing: strategies that find the groups from a short pre-training on data.

* ``"ssn"`` (:mod:`.ssn`): Shapeshifter Networks — k-means on softmax template coefficients.
* ``"swn"`` (:mod:`.swn`): SuperWeight Networks — gradient-similarity grouping of SuperWeights,
  then hard -> soft refinement of the coefficients.

Both run as analysis passes inside :func:`npas_fx.compile` (``strategy="ssn"`` / ``"swn"`` with
``data=``, ``loss_fn=`` and ``search_steps=``; the batch convention is in :mod:`.pretrain`); the
plan records what they found, and ``compile(model, plan=plan)`` re-applies it without searching.
Importing this package registers them (``import npas_fx`` does).
"""

from . import ssn, swn
from .pretrain import batch_loss, pretrain
from .similarity import cropped_cosine_similarity, threshold_groups

__all__ = ["ssn", "swn", "batch_loss", "pretrain", "cropped_cosine_similarity", "threshold_groups"]
