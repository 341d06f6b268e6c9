"""Classification heads: ICHPro's 1D DenseNet header and the masked-language-model head."""

from __future__ import annotations

import torch
from monai.networks.nets import DenseNet
from torch import nn

from ichpro.errors import IchproError
from ichpro.models.fusion import multi_head_attention
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
        self.project = nn.Linear(dim, dim)
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
        self.to_dim = nn.Linear(hidden, dim)
        self.q, self.kv = nn.Linear(dim, dim), nn.Linear(dim, 2 * dim)
        self.norm = nn.LayerNorm(dim)
        self.transform = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.LayerNorm(hidden))
        self.word_embeddings = word_embeddings
        self.bias = nn.Parameter(torch.zeros(word_embeddings.num_embeddings))
        self.register_buffer("vocabulary", None, persistent=False)

    def restrict_vocabulary(self, token_ids: torch.Tensor | None) -> None:
        """Decode over these token ids only (None: the whole vocabulary again)."""
        self.vocabulary = None if token_ids is None else torch.unique(token_ids.to(self.bias.device))

    def forward(self, masked_states: torch.Tensor, vision_tokens: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (N, V) at the N masked positions (``labels`` (B, L) not ``IGNORE_INDEX``) and their
        targets (N,), as indices into the decoded vocabulary (the restricted one, if set)."""
        positions = labels != IGNORE_INDEX
        x = self.to_dim(masked_states)
        k, v = self.kv(vision_tokens).chunk(2, dim=-1)
        attended, _ = multi_head_attention(self.q(x), k, v, self.heads)
        h = self.transform(self.norm(x + attended)[positions])
        targets = labels[positions]
        if self.vocabulary is None:
            return h @ self.word_embeddings.weight.T + self.bias, targets
        index = torch.searchsorted(self.vocabulary, targets).clamp(max=len(self.vocabulary) - 1)
        if not torch.equal(self.vocabulary[index], targets):
            raise IchproError("a masked token is not in the MLM head's restricted vocabulary: restrict it "
                              "to the token ids of the reports the model trains on")
        weight = self.word_embeddings.weight[self.vocabulary]
        return h @ weight.T + self.bias[self.vocabulary], index
