"""Classification heads: ICHPro's 1D DenseNet header and the masked-language-model head."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet
from torch import nn

from ichpro.errors import IchproError
from ichpro.models.fusion import FlatLinear, multi_head_attention
from ichpro.text import IGNORE_INDEX


class SequenceHeader(nn.Module):
    """Linear projection of f_tbv to a 1D sequence, then MONAI ``DenseNet(spatial_dims=1)`` -> 2 logits.

    f_tbv's grid positions, in (d, h, w) order, become the sequence; a linear map C -> C on every
    position projects the features, which enter the DenseNet as C input channels. (Collapsing each
    position to a single value loses most of the signal, and a dense map from all C·|grid| features
    costs far more parameters: ``ichpro.views.fusion.parameter_counts`` counts it and this header
    at every profile's size.) With blocks (6, 12, 24, 16) and growth 32 the header is DenseNet-121;
    its logits go to cross-entropy directly.
    """

    def __init__(self, dim: int, blocks: tuple[int, ...], growth: int):
        super().__init__()
        self.project = FlatLinear(dim, dim)
        self.densenet = DenseNet(spatial_dims=1, in_channels=dim, out_channels=2,
                                 init_features=2 * growth, growth_rate=growth, block_config=blocks)

    def forward(self, fused: torch.Tensor) -> torch.Tensor:
        sequence = self.project(fused.flatten(2).transpose(1, 2)).transpose(1, 2)  # (B, C, |grid|)
        return self.densenet(sequence)


class MLMHead(nn.Module):
    """Cross-modal masked language modelling (IRRA's implicit relation reasoning, simplified).

    The masked report's token states attend to the vision grid tokens (one cross-attention layer
    with residual and LayerNorm), then a BERT-style transform predicts the masked tokens through the
    text encoder's vocabulary (decoder tied to its word embeddings). Only the masked positions are
    decoded: the vocabulary projection is the head's largest cost (30k words at every position).

    :meth:`restrict_vocabulary` makes the softmax run over a given set of token ids (the words of
    the training reports, ``LossConfig.mlm_vocabulary="reports"``) instead of the whole vocabulary:
    a word no report contains is never a target, and a report corpus uses a few hundred to a few
    thousand of BERT's 30,522 words, so the decoder costs that much less. The parameters keep the
    full vocabulary's shape; the restriction is a training-time setting, not saved with the weights.
    """

    def __init__(self, hidden: int, dim: int, heads: int, word_embeddings: nn.Embedding):
        super().__init__()
        self.heads = heads
        self.to_dim = FlatLinear(hidden, dim)
        self.q, self.kv = FlatLinear(dim, dim), FlatLinear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self.register_buffer("vocabulary", None, persistent=False)  # (U,) sorted token ids decoded over
        self.register_buffer("allowed", None, persistent=False)  # (U,) which of them may be predicted

    def restrict_vocabulary(self, token_ids: torch.Tensor | None,
                            decoded: torch.Tensor | None = None) -> None:
        """Predict only these token ids (None: the whole vocabulary again).

        ``decoded``, a superset of them, is the set the softmax runs over, its other ids masked out
        (probability 0): a batched fit gives every member the union of the members' words, so that
        their heads have one shape and each still predicts its own training reports' words only.
        """
        if token_ids is None:
            self.vocabulary = self.allowed = None
            return
        own = torch.unique(token_ids.to(self.bias.device))
        decoded = own if decoded is None else torch.unique(decoded.to(self.bias.device))
        if not torch.isin(own, decoded).all():
            raise IchproError("the decoded vocabulary must hold every word the head may predict")
        self.vocabulary, self.allowed = decoded, torch.isin(decoded, own)

    def forward(self, masked_states: torch.Tensor, vision_tokens: torch.Tensor, labels: torch.Tensor,
                n_decoded: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) at N positions and their targets (N,), as indices into the decoded vocabulary
        (the restricted one, if set). The positions are the masked ones (``labels`` (B, L) not
        ``IGNORE_INDEX``), N = their number; a batched fit gives every member the same ``n_decoded``
        (at least its number of masked positions), and the positions beyond the masked ones get the
        target ``IGNORE_INDEX``. Without ``n_decoded`` the targets are checked against the restricted
        vocabulary; with it that is the caller's job (a fold's masked words come from its training
        reports, which are the vocabulary)."""
        masked = (labels != IGNORE_INDEX).flatten()
        checked = n_decoded is None
        if checked:
            n_decoded = int(masked.sum())
        order = torch.sort(masked.to(torch.uint8), descending=True, stable=True).indices[:n_decoded]
        x = self.to_dim(masked_states)
        k, v = self.kv(vision_tokens).chunk(2, dim=-1)
        attended, _ = multi_head_attention(self.q(x), k, v, self.heads)
        h = self.transform(self.norm(x + attended).flatten(0, 1)[order])
        targets = labels.flatten()[order]
        if self.vocabulary is None:
            return h @ self.word_embeddings.weight.T + self.bias, targets
        index = torch.searchsorted(self.vocabulary, targets).clamp(max=len(self.vocabulary) - 1)
        ignored = targets == IGNORE_INDEX
        if checked and not (ignored | ((self.vocabulary[index] == targets) & self.allowed[index])).all():
            raise IchproError("a masked token is not in the MLM head's restricted vocabulary: restrict it "
                              "to the token ids of the reports the model trains on")
        weight = self.word_embeddings.weight[self.vocabulary]
        logits = (h @ weight.T + self.bias[self.vocabulary]).masked_fill(~self.allowed, float("-inf"))
        return logits, index.masked_fill(ignored, IGNORE_INDEX)
