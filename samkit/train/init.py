"""A mask-decoder initialisation that localises prompts from step 0.

SAM's decoder finds *where* a prompt is by attention between tokens and image tokens whose
queries and keys both carry the same random Fourier positional encoding (PE): the PE of a
point and the PE of an image position have a dot product that is a Gaussian kernel of their
distance. Behind two independently initialised projections, though, ``q . k = PE_i^T Wq^T Wk
PE_j`` has no preference for matching positions, and the decoder must first learn one; until
it has, the best it can output is one constant map per prompt kind (empty masks under the
focal loss). That is the "empty-mask plateau" of from-scratch runs (docs/samkit-tiny-runs.md).

:func:`localising_init` starts every attention between tokens and image with ``Wk = Wq``
(so ``Wq^T Wq`` is positive semi-definite and close to a multiple of the identity: the scores
*are* the PE kernel, plus content terms), scaled by ``gain`` so that a head's score at the
prompt's own position stands a few units above the far field. Image tokens near a point
then receive that point token's values, so the decoder's mask readout is a linear function
of "near the prompt" from the first step. Only initial values change; the architecture and
the checkpoint layout stay SAM's.
"""

from __future__ import annotations

import torch

from samkit.modeling.mask_decoder import MaskDecoder
from samkit.modeling.transformer import Attention

DEFAULT_GAIN = 2.5  # per-head score at the matching position ~4 (256-d PE, 8 heads of 16)


def cross_attentions(decoder: MaskDecoder) -> list[Attention]:
    """The attentions between prompt/output tokens and image tokens, in every layer and the
    final one."""
    transformer = decoder.transformer
    found = [transformer.final_attn_token_to_image]
    for layer in transformer.layers:
        found += [layer.cross_attn_token_to_image, layer.cross_attn_image_to_token]
    return found


@torch.no_grad()
def localising_init(decoder: MaskDecoder, gain: float = DEFAULT_GAIN) -> None:
    """Tie each cross-attention's key projection to its query projection (``Wk = Wq``,
    zero biases) and scale both by ``gain``."""
    for attn in cross_attentions(decoder):
        attn.q_proj.weight.mul_(gain)
        attn.k_proj.weight.copy_(attn.q_proj.weight)
        attn.q_proj.bias.zero_()
        attn.k_proj.bias.zero_()
