"""The two encoders: a MONAI 3D ResNet for the CT and a BERT for the report."""

from __future__ import annotations

from pathlib import Path

import torch
from monai.networks.nets import ResNet
from safetensors.torch import load_file
from torch import nn

from ichpro.errors import IchproError

#: depth -> (block, layers) of the 3D ResNets of Chen et al. (MedicalNet), as in MONAI.
RESNET_LAYERS = {10: ("basic", [1, 1, 1, 1]), 18: ("basic", [2, 2, 2, 2]),
                 34: ("basic", [3, 4, 6, 3]), 50: ("bottleneck", [3, 4, 6, 3])}


class VisionEncoder(nn.Module):
    """MONAI 3D ResNet returning its last feature map f_v (B, C_v, d, h, w) (``layer4``'s output).

    ``no_max_pool`` drops the stem's max-pooling, so a small 64 × 64 input still yields an 8 × 8
    in-plane feature map; the paper's 512 × 512 input keeps it.
    """

    def __init__(self, depth: int, widths: tuple[int, int, int, int], no_max_pool: bool = False):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise IchproError(f"vision_depth {depth} is not one of {sorted(RESNET_LAYERS)}")
        block, layers = RESNET_LAYERS[depth]
        # MedicalNet's layout: one input channel, shortcut B, no bias in the down-sampling convs
        self.resnet = ResNet(block, layers, list(widths), spatial_dims=3, n_input_channels=1,
                             no_max_pool=no_max_pool, shortcut_type="B", feed_forward=False,
                             bias_downsample=False)
        self.out_channels = widths[3] * (4 if block == "bottleneck" else 1)

    def forward(self, ct: torch.Tensor) -> torch.Tensor:
        r = self.resnet
        x = r.act(r.bn1(r.conv1(ct)))
        if not r.no_max_pool:
            x = r.maxpool(x)
        return r.layer4(r.layer3(r.layer2(r.layer1(x))))

    def load_weights(self, path: str | Path) -> None:
        """Load a local state dict (safetensors or torch; MedicalNet's ``module.``-wrapped keys too)."""
        path = Path(path)
        if not path.is_file():
            raise IchproError(f"vision weights {path} not found; give a local .safetensors or .pth file")
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state)
        state = {k.removeprefix("module.").removeprefix("resnet."): v for k, v in state.items()}
        own = self.resnet.state_dict()
        matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not matched:
            raise IchproError(f"{path} holds no weight matching this {len(own)}-tensor 3D ResNet; "
                              "check vision_depth and vision_widths")
        self.resnet.load_state_dict(matched, strict=False)


class TextEncoder(nn.Module):
    """A BERT returning the token states f_t (B, L, H) of the report after its first ``layers``
    transformer layers (all when None); the layers above are dropped, not computed."""

    def __init__(self, bert: nn.Module, layers: int | None = None):
        super().__init__()
        bert.pooler = None  # ICHPro uses the token states, not BERT's [CLS] pooler
        available = len(bert.encoder.layer)
        if layers is not None:
            if not 1 <= layers <= available:
                raise IchproError(f"text_layers {layers} is not between 1 and the encoder's "
                                  f"{available} layers")
            bert.encoder.layer = bert.encoder.layer[:layers]
            bert.config.num_hidden_layers = layers
        self.bert = bert
        self.hidden_size = bert.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    @property
    def word_embeddings(self) -> nn.Embedding:
        """The token embedding matrix (tied to the MLM decoder)."""
        return self.bert.get_input_embeddings()


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean of token states (B, L, H) over the positions ``attention_mask`` (B, L) keeps: (B, H)."""
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(1) / mask.sum(1).clamp_min(1)


def freeze(module: nn.Module) -> None:
    """Stop gradients into ``module`` (the model keeps frozen encoders in eval mode)."""
    for p in module.parameters():
        p.requires_grad_(False)
