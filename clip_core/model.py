"""CLIP image and text encoders (Radford et al. 2021, Section 2.4).

Image encoder: a ModifiedResNet (three-conv stem, anti-aliased strided convolutions, an
attention pool) or a ViT with an extra LayerNorm before the transformer. Text encoder: a
causal Transformer read out at the end-of-text token. Both are projected linearly into the
joint space. Parameter names and shapes are OpenAI's, so their released state_dicts load
with strict=True (and ours into theirs); attention is computed with scaled_dot_product_attention.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from clip_core.config import CLIPConfig, available_models, load_preset

__all__ = ["CLIP", "available_models", "create_model"]


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (for fp16 weights)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return y.to(x.dtype)


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the GELU approximation OpenAI's weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


# ----- ModifiedResNet -----

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        # anti-aliasing: every conv has stride 1; an average pool does the striding
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),  # "-1" keeps the conv/bn at OpenAI's keys 0 and 1
                ("0", nn.Conv2d(inplanes, out, 1, bias=False)),
                ("1", nn.BatchNorm2d(out)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        return self.relu3(out + identity)


class AttentionPool2d(nn.Module):
    """One attention layer whose query is the mean-pooled feature, in place of global average pooling."""

    def __init__(self, spatial_dim: int, embed_dim: int, heads: int, output_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(spatial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.c_proj = nn.Linear(embed_dim, output_dim)
        self.heads = heads

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        return x.view(B, L, self.heads, C // self.heads).transpose(1, 2)  # (B, H, L, C/H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # (B, HW+1, C)
        x = x + self.positional_embedding.to(x.dtype)
        q = self._split(self.q_proj(x[:, :1]))  # only the mean token's output is kept: (B, H, 1, C/H)
        y = F.scaled_dot_product_attention(q, self._split(self.k_proj(x)), self._split(self.v_proj(x)))
        return self.c_proj(y.transpose(1, 2).flatten(1))  # (B, output_dim)


class ModifiedResNet(nn.Module):
    """ResNet-D with a three-conv stem, anti-aliased downsampling and an attention pool."""

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int, width: int):
        super().__init__()
        self.image_size = image_size
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        stages, inplanes = [], width
        for i, depth in enumerate(layers):
            planes = width * 2 ** i
            blocks = [Bottleneck(inplanes, planes, stride=1 if i == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            inplanes = planes * 4
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))  # (B, W/2, S/2, S/2)
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))  # (B, W, S/4, S/4)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 32W, S/32, S/32)
        return self.attnpool(x)  # (B, output_dim)


# ----- Transformer -----

class SelfAttention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names, computed by SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3D)
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, L, D/H) each
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, D/H)
        return self.out_proj(y.transpose(1, 2).reshape(B, L, D))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, causal: bool = False):
        super().__init__()
        self.causal = causal
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        x = x + self.attn(self.ln_1(x), causal=self.causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, causal: bool = False):
        super().__init__()
        self.width, self.layers = width, layers
        self.grad_checkpointing = False
        self.resblocks = nn.Sequential(*[ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, D)
        for block in self.resblocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.image_size = image_size
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, D)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, D)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N+1, D)
        x = self.transformer(self.ln_pre(x))
        return self.ln_post(x[:, 0]) @ self.proj  # (B, output_dim)


# ----- CLIP -----

class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig):
        super().__init__()
        self.config = config
        v, t = config.vision, config.text
        self.context_length, self.vocab_size = t.context_length, t.vocab_size
        if v.is_resnet:
            self.visual = ModifiedResNet(v.layers, config.embed_dim, v.heads, v.image_size, v.width)
        else:
            self.visual = VisionTransformer(v.image_size, v.patch_size, v.width, v.layers, v.heads, config.embed_dim)
        self.transformer = Transformer(t.width, t.layers, t.heads, causal=True)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # temperature 0.07 (Section 2.5)
        self.initialize_parameters()

    def initialize_parameters(self) -> None:
        """OpenAI's initialisation: scaled normals for the text tower, zero-init bn3 in ResNet blocks."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        if isinstance(self.visual, ModifiedResNet):
            pool = self.visual.attnpool
            for proj in (pool.q_proj, pool.k_proj, pool.v_proj, pool.c_proj):
                nn.init.normal_(proj.weight, std=pool.c_proj.in_features ** -0.5)
            for name, param in self.visual.named_parameters():
                if name.startswith("layer") and name.endswith("bn3.weight"):
                    nn.init.zeros_(param)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std, attn_std, fc_std = width ** -0.5 * (2 * layers) ** -0.5, width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute transformer blocks in the backward pass to save activation memory."""
        self.transformer.grad_checkpointing = enable
        if isinstance(self.visual, VisionTransformer):
            self.visual.transformer.grad_checkpointing = enable

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, 3, S, S) images -> (B, embed_dim) image features."""
        size = self.config.vision.image_size
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expects images of shape (B, 3, {size}, {size}), got {tuple(image.shape)}")
        if tuple(image.shape[-2:]) != (size, size):
            raise ValueError(f"model expects {size}x{size} images, got {image.shape[-2]}x{image.shape[-1]}")
        x = self.visual(image.to(self.dtype))
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, L) token ids, end-of-text the largest id in each row -> (B, embed_dim) text features."""
        if text.ndim != 2 or text.shape[1] > self.context_length:
            raise ValueError(f"expects token ids of shape (B, L) with L <= context_length "
                             f"{self.context_length}, got {tuple(text.shape)}")
        B, L = text.shape
        x = self.token_embedding(text).to(self.dtype) + self.positional_embedding[:L].to(self.dtype)  # (B, L, D)
        x = self.ln_final(self.transformer(x))  # (B, L, D)
        x = x[torch.arange(B, device=x.device), text.argmax(dim=-1)] @ self.text_projection  # (B, embed_dim)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """L2-normalised image and text features, and the logit scale exp(t)."""
        image_features = self.encode_image(image, normalize=True)
        text_features = self.encode_text(text, normalize=True)
        return image_features, text_features, self.logit_scale.exp()


# ----- building -----

def create_model(name_or_config: str | CLIPConfig | dict, **overrides) -> CLIP:
    """A randomly initialised fp32 CLIP from a preset name, config or config dict."""
    if isinstance(name_or_config, str):
        config = load_preset(name_or_config)
    elif isinstance(name_or_config, dict):
        config = CLIPConfig.from_dict(name_or_config)
    else:
        config = name_or_config
    return CLIP(config.replace(**overrides) if overrides else config)
