"""QLoRA's 4-bit base (Dettmers et al. 2023, "QLoRA", sec. 3): NormalFloat-4, blockwise, double-quantised.

QLoRA fine-tunes a model whose frozen weights are stored in 4 bits and dequantised only inside the forward
pass; the LoRA beside them (lora.py) is trained in full precision. Three ideas make 4 bits enough:

1. NF4, a code book of 16 levels placed where a normal distribution puts its mass. Pretrained weights are
   roughly normal, so levels at the normal's quantiles are used about equally often (each of 16 bins holds
   about 1/16 of the weights), which spends the 4 bits well. Asymmetric halves give an exact zero:

       positive levels  Phi^-1(p_i) for 8 p_i evenly spaced from 1/2 (excluded) up to `offset`
       negative levels -Phi^-1(p_i) for 7 p_i evenly spaced from 1/2 (excluded) up to `offset`
       code book        those 15, and 0, divided by Phi^-1(offset):  -1 = q_0 < ... < q_7 = 0 < ... < q_15 = 1

   `offset` < 1 since Phi^-1(1) is infinite: halfway between 1 - 1/(2*15) and 1 - 1/(2*16), the centres of the
   last of 15 and of 16 equal-probability bins (the value bitsandbytes uses, 0.9677).

2. Blockwise absmax (eq. 1): the weight, flattened, is cut into blocks of `block` (64) numbers; each block keeps
   its absmax c = max |w| and every number becomes the index of the level nearest w / c:

       code = argmin_i |w / c - q_i|        w_hat = q_code * c        |w - w_hat| <= c * (largest gap) / 2

   A block of its own per 64 weights keeps one large weight from flattening the resolution of all the rest.
   Two 4-bit codes are packed in each byte.

3. Double quantisation (sec. 3, "Double Quantization"): the constants c, one fp32 per 64 weights, cost 32/64 =
   0.5 bits a weight. Quantising them too -- mean removed, then 8-bit absmax in blocks of 256 -- costs
   8/64 + 32/(64*256) = 0.127 bits, saving 0.373 bits a weight. (The paper stores them as 8-bit floats; here
   they are 8-bit integers, the same blockwise absmax again, with the same cost.)

`Linear4bit` and `Conv2d4bit` keep only the packed codes and the constants (no full-precision copy of W) and
dequantise W in every forward. Their `weight` is that dequantised tensor, so a LoRA wraps them like any layer
(adapters.py); merging an adapter into them means quantising W + dW again (`merge_requantized`), which is lossy.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lora import Adapter, bottom

BLOCK, CONSTANT_BLOCK = 64, 256  # weights per absmax; absmax constants per second-level scale
NF4_OFFSET = (1 - 1 / (2 * 15) + 1 - 1 / (2 * 16)) / 2


def nf4_code_book():
    """The 16 NF4 levels, ascending, from -1 to 1, with q_7 = 0 exactly: [16] float32."""
    quantile = lambda n: torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, n, dtype=torch.float64)[:-1])
    levels = torch.cat([quantile(9), torch.zeros(1, dtype=torch.float64), -quantile(8)])  # 8 + 1 + 7
    return (levels / levels.max()).sort().values.float()


CODE_BOOK = nf4_code_book()


def pack(codes):
    """[n] integers in 0..15, n even -> [n / 2] uint8: the first of each pair in the high 4 bits."""
    pairs = codes.to(torch.uint8).view(-1, 2)
    return pairs[:, 0] << 4 | pairs[:, 1]


def unpack(packed):
    """[n / 2] uint8 -> [n] int64 codes in 0..15."""
    return torch.stack([packed >> 4, packed & 15], dim=1).flatten().long()


def quantize_blockwise(w, block=BLOCK):
    """Any tensor -> (packed codes [ceil(n / block) * block / 2] uint8, absmax c [blocks] fp32). The last block
    is padded with zeros, which NF4 stores exactly."""
    flat = w.detach().float().flatten()
    blocks = F.pad(flat, (0, -len(flat) % block)).view(-1, block)  # [blocks, block]
    absmax = blocks.abs().amax(dim=1)                                # c, one per block
    x = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]; an all-zero block stays 0
    book = CODE_BOOK.to(w.device)
    codes = torch.bucketize(x, (book[1:] + book[:-1]) / 2)           # the nearest level: 0..15
    return pack(codes.flatten()), absmax


def dequantize_blockwise(packed, absmax, shape):
    """(packed codes, absmax [blocks]) -> w_hat = q_code * c, shaped `shape` (the padding cut off)."""
    levels = CODE_BOOK.to(absmax.device)[unpack(packed)].view(len(absmax), -1)  # [blocks, block]
    return (levels * absmax[:, None]).flatten()[:math.prod(shape)].view(shape)


def quantize_constants(absmax, block=CONSTANT_BLOCK):
    """Double quantisation: c [blocks] fp32 -> (int8 codes [blocks], one fp32 scale per `block` constants, mean)."""
    mean = absmax.mean()
    centred = F.pad(absmax - mean, (0, -len(absmax) % block)).view(-1, block)  # c is positive: centre it first
    scale = centred.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = (centred / scale[:, None]).round().to(torch.int8).flatten()[:len(absmax)]
    return codes, scale, mean


def dequantize_constants(codes, scale, mean, block=CONSTANT_BLOCK):
    """(int8 codes [blocks], scales, mean) -> c_hat [blocks] fp32."""
    n = len(codes)
    padded = F.pad(codes.float(), (0, len(scale) * block - n)).view(len(scale), block)
    return (padded * scale[:, None]).flatten()[:n] + mean


class NF4Weight(nn.Module):
    """A frozen weight in NF4: the packed codes and the block constants (double-quantised or fp32), as buffers."""

    def __init__(self, weight, block=BLOCK, double_quant=True):
        super().__init__()
        if block < 2 or block % 2:
            raise ValueError(f"the NF4 block size must be an even number of weights, got {block}")
        self.shape, self.block, self.double_quant = tuple(weight.shape), block, double_quant
        codes, absmax = quantize_blockwise(weight, block)
        self.register_buffer("codes", codes)
        if double_quant:
            for name, t in zip(("absmax_codes", "absmax_scale", "absmax_mean"), quantize_constants(absmax)):
                self.register_buffer(name, t)
        else:
            self.register_buffer("absmax", absmax)

    def constants(self):
        """c_hat [blocks]: the absmax of every block, as stored."""
        if self.double_quant:
            return dequantize_constants(self.absmax_codes, self.absmax_scale, self.absmax_mean)
        return self.absmax

    def forward(self):
        return dequantize_blockwise(self.codes, self.constants(), self.shape)

    def extra_repr(self):
        return f"shape={self.shape}, block={self.block}" + (", double-quantised" if self.double_quant else "")


class Linear4bit(nn.Module):
    """A frozen nn.Linear whose weight is stored in NF4: y = x deq(W)^T + b (b kept in fp32)."""
    stores = nn.Linear  # what it stands for: adapters.py wraps it in the adapter of an nn.Linear

    def __init__(self, linear, block=BLOCK, double_quant=True):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight_4bit = NF4Weight(linear.weight, block, double_quant)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    @property
    def weight(self):
        return self.weight_4bit()  # dequantised afresh: [out, in] fp32

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class Conv2d4bit(nn.Module):
    """A frozen nn.Conv2d whose kernel is stored in NF4."""
    stores = nn.Conv2d

    def __init__(self, conv, block=BLOCK, double_quant=True):
        super().__init__()
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
            raise ValueError("Conv2d4bit takes plain convolutions (one group, no dilation, zero padding)")
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.stride, self.padding = conv.stride, conv.padding
        self.weight_4bit = NF4Weight(conv.weight, block, double_quant)
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().float().clone())

    @property
    def weight(self):
        return self.weight_4bit()  # [out, in, k, k] fp32

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding)


FOUR_BIT = {nn.Linear: Linear4bit, nn.Conv2d: Conv2d4bit}


def matches(path, names):
    """Whether the layer at `path` ('down.0.res.conv1') is named by any of `names`: its attribute name
    ('conv1'), its path, or a module above it ('down.0', 'time_mlp')."""
    return any(path == n or path.startswith(n + ".") or path.rsplit(".", 1)[-1] == n for n in names)


def quantize_model(model, block=BLOCK, double_quant=True, keep=()):
    """Replace every nn.Linear and nn.Conv2d of `model` by its 4-bit layer, except those `keep` names
    (see `matches`), which stay as they are; embeddings and norms are never quantised. Returns
    {path: 4-bit layer}. A `keep` name that matches no layer is refused."""
    layers, kept = {}, set()
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            full = f"{path}.{name}" if path else name
            if type(child) not in FOUR_BIT:
                continue
            hit = [n for n in keep if matches(full, [n])]
            if hit:
                kept.update(hit)
                continue
            layer = FOUR_BIT[type(child)](child, block, double_quant)
            setattr(module, name, layer)
            layers[full] = layer
    unknown = [n for n in keep if n not in kept]
    if unknown:
        raise ValueError(f"--keep names no linear or conv layer: {', '.join(unknown)} (give names such as stem, "
                         "out, time_mlp or attn)")
    return model.requires_grad_(False), layers


def four_bit_layers(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, (Linear4bit, Conv2d4bit))}


@torch.no_grad()
def merge_requantized(model):
    """Fold every adapter that sits on a 4-bit layer into it: W <- Q(deq(W0) + dW), one 4-bit layer again.
    One-way and lossy: the sum is rounded to the code book, and dW is often smaller than the rounding."""
    for path, module in list(model.named_modules()):
        for name, stack in list(module.named_children()):
            if not isinstance(stack, Adapter) or not isinstance(bottom(stack), (Linear4bit, Conv2d4bit)):
                continue
            four_bit, plain = bottom(stack), dequantized_layer(bottom(stack))
            inner = stack
            while isinstance(inner.base, Adapter):
                inner = inner.base
            inner.base = plain  # W0 as a full-precision layer, so that the adapters merge into it exactly
            layer = stack
            while isinstance(layer, Adapter):
                layer.merge()
                layer = layer.base
            w = four_bit.weight_4bit
            setattr(module, name, type(four_bit)(plain, w.block, w.double_quant))


def dequantized_layer(layer):
    """The full-precision nn.Linear / nn.Conv2d holding deq(W) of a 4-bit layer (and its bias)."""
    if isinstance(layer, Linear4bit):
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    else:
        k = layer.weight_4bit.shape[2:]
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, k, layer.stride, layer.padding, bias=layer.bias is not None)
    plain = plain.to(layer.weight_4bit.codes.device)
    plain.weight.data.copy_(layer.weight)
    if layer.bias is not None:
        plain.bias.data.copy_(layer.bias)
    return plain.requires_grad_(False)


def storage_bytes(layer):
    """Bytes a 4-bit layer's weight takes: the packed codes and the constants (the bias aside)."""
    return sum(b.numel() * b.element_size() for b in layer.weight_4bit.buffers())
