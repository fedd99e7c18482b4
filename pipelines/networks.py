"""Generator architectures, by name.

A new architecture is one ``nn.Module`` class and one line in :data:`GENERATORS`; its
``receptive_field()`` (a :class:`ReceptiveField`) lets the runtime tile it without seams.
Every generator maps a normalised image batch (N, C, H, W) or (N, C, D, H, W) to the
same shape, so the runtime can tile, batch and blend without knowing which it runs; a style
generator (``styled``: :class:`StyleUNet`) does so once fixed to a domain
(:meth:`StyleUNet.for_domain`).
No generator uses batch or instance normalisation: their statistics would depend on the
tile or batch the runtime happens to feed, and tiles would no longer blend seamlessly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ReceptiveField:
    """How far a generator looks, which is what seam-free tiling needs (:mod:`pipelines.tiling`).

    ``radius``: input pixels on each side that one output pixel can depend on, a bound from
    the architecture (kernel sizes, pooling, upsampling). ``align``: tiles must start on
    multiples of this, or pooling sees another grid than on the whole image. ``exact``:
    False when global pooling (CBAM's channel attention) lets every output depend on the
    whole input, so no overlap makes tiles identical to the whole image; ``radius`` then
    covers the local path only.
    """

    radius: int
    align: int = 1
    exact: bool = True


def receptive_field(generator: nn.Module) -> ReceptiveField | None:
    """The generator's own :class:`ReceptiveField`, or None where it declares none."""
    method = getattr(generator, "receptive_field", None)
    return method() if callable(method) else None


def conv(dims: int, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Module:
    """A 'same'-padded 2D or 3D convolution; reflection padding avoids border artefacts."""
    cls = nn.Conv2d if dims == 2 else nn.Conv3d
    mode = "reflect" if dims == 2 else "replicate"
    return cls(cin, cout, kernel, stride=stride, padding=kernel // 2, padding_mode=mode)


def _zero_last(layer: nn.Module) -> None:
    """Zero the output conv so an untrained residual generator is the identity."""
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)


class CBAM(nn.Module):
    """Convolutional Block Attention Module (Woo et al. 2018), as used by CVS-CT.

    Channel attention (shared MLP over average- and max-pooled features) followed by
    spatial attention (a 7x7 conv over channel-wise average and max); it lets a small
    convolutional generator weigh scanner-wide properties that local filters miss.
    """

    def __init__(self, features: int, dims: int = 2, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(features // reduction, 4)
        self.mlp = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, features))
        # zero padding: reflection cannot pad a 7x7 kernel on the U-Net's smallest maps
        self.spatial = (nn.Conv2d if dims == 2 else nn.Conv3d)(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)
        weights = self.mlp(flat.mean(-1)) + self.mlp(flat.amax(-1))
        x = x * torch.sigmoid(weights).view(*weights.shape, *([1] * (x.dim() - 2)))
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.spatial(pooled))


class PlainResidualCNN(nn.Module):
    """CHAIMELEON's "plain CNN": stacked 3x3 convs, LeakyReLU(0.1), no BN, global residual.

    The network predicts the difference between the input and the target kernel's image,
    so an untrained network is the identity, which is the safe starting point for CT.
    ``cbam`` > 0 inserts that many CBAM blocks evenly among the hidden layers (CVS-CT).
    """

    def __init__(self, channels: int = 1, features: int = 64, blocks: int = 12,
                 dims: int = 2, cbam: int = 0) -> None:
        super().__init__()
        hidden = blocks - 2
        if not 0 <= cbam <= hidden:
            raise ValueError(f"cbam must be between 0 and blocks - 2 ({hidden}), got {cbam}")
        after = {round((i + 1) * hidden / (cbam + 1)) for i in range(cbam)} if cbam else set()
        layers: list[nn.Module] = [conv(dims, channels, features), nn.LeakyReLU(0.1)]
        for i in range(1, hidden + 1):
            layers += [conv(dims, features, features), nn.LeakyReLU(0.1)]
            if i in after:
                layers.append(CBAM(features, dims))
        layers.append(conv(dims, features, channels))
        self.body = nn.Sequential(*layers)
        self.cbam = cbam
        _zero_last(self.body[-1])

    def receptive_field(self) -> ReceptiveField:
        """One pixel per 3x3 conv, three per CBAM's 7x7 spatial attention."""
        convs = sum(isinstance(m, nn.Conv2d | nn.Conv3d) for m in self.body)
        return ReceptiveField(radius=convs + 3 * self.cbam, exact=self.cbam == 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class _DoubleConv(nn.Sequential):
    def __init__(self, dims: int, cin: int, cout: int, attention: bool) -> None:
        layers = [conv(dims, cin, cout), nn.LeakyReLU(0.1), conv(dims, cout, cout),
                  nn.LeakyReLU(0.1)]
        super().__init__(*layers, *([CBAM(cout, dims)] if attention else []))


class ResidualUNet(nn.Module):
    """U-Net with a global residual: average-pool down, resize + conv up.

    Upsampling is interpolation followed by a convolution, never a transposed
    convolution, whose uneven kernel overlap paints checkerboards into flat tissue.
    The wider receptive field suits MR (smooth bias fields, contrast changes) where the
    plain CNN's 25-pixel view is too local. Inputs of any size are padded to a multiple
    of ``2**levels`` and cropped back.
    """

    def __init__(self, channels: int = 1, features: int = 32, levels: int = 3,
                 dims: int = 2, cbam: bool = False) -> None:
        super().__init__()
        self.dims, self.levels, self.cbam = dims, levels, cbam
        unet_layers(self, dims, channels, features, levels, lambda cin, cout, depth, role:
                    _DoubleConv(dims, cin, cout, cbam and (role == "merge" or 0 < depth == levels)))

    def receptive_field(self) -> ReceptiveField:
        return unet_receptive_field(self.levels, self.cbam)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unet_forward(self, x, lambda block, h: block(h))


def unet_layers(net: nn.Module, dims: int, channels: int, features: int, levels: int,
                block: Callable[[int, int, int, str], nn.Module]) -> None:
    """Give ``net`` a U-Net's layers (``down``, ``up_conv``, ``merge``, ``out``), each double
    conv made by ``block(cin, cout, depth, role)``: ``role`` "down" (depth 0 at full
    resolution to ``levels``, the bottleneck) or "merge"; widths double per level up to 8x.
    The output conv is zero-initialised: with the global residual, the identity."""
    widths = [features * 2 ** min(i, 3) for i in range(levels + 1)]
    net.down = nn.ModuleList(block(channels if i == 0 else widths[i - 1], widths[i], i, "down")
                             for i in range(levels + 1))
    net.up_conv = nn.ModuleList(conv(dims, widths[i + 1], widths[i])
                                for i in reversed(range(levels)))
    net.merge = nn.ModuleList(block(2 * widths[i], widths[i], i, "merge")
                              for i in reversed(range(levels)))
    net.out = conv(dims, widths[0], channels, kernel=1)
    _zero_last(net.out)


def unet_receptive_field(levels: int, cbam: bool = False) -> ReceptiveField:
    """A U-Net's, along the deepest path, in full-resolution pixels, a level ``i`` pixel being
    ``2**i`` wide: two 3x3 convs per level down, each 2x2 average pool (+``2**(i-1)``),
    then per level up a bilinear upsampling (+``2**(i+1)``), a 3x3 conv and two in the
    merge; CBAM adds its 7x7 spatial conv where it sits. Tiles start on multiples of
    ``2**levels`` so every pooling sees the whole image's grid."""
    down = 2 + sum(2 ** (i - 1) + 2 * 2**i for i in range(1, levels + 1))
    up = sum(2 ** (i + 1) + 3 * 2**i for i in range(levels))
    attention = 3 * (2**levels + sum(2**i for i in range(levels))) if cbam else 0
    return ReceptiveField(radius=down + up + attention, align=2**levels, exact=not cbam)


def unet_forward(net: nn.Module, x: torch.Tensor,
                 decode: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The residual U-Net pass both U-Nets share (``net`` has ``dims``, ``levels``, ``down``,
    ``up_conv``, ``merge``, ``out``): pad to a multiple of ``2**levels``, encode, decode with
    ``decode(block, h)`` for the bottleneck and every merge block, crop, add the input."""
    size = x.shape[2:]
    step = 2 ** net.levels
    pad: list[int] = []
    for s in reversed(size):
        pad += [0, (-s) % step]
    h = F.pad(x, pad, mode="reflect" if net.dims == 2 else "replicate") if any(pad) else x
    pool = F.avg_pool2d if net.dims == 2 else F.avg_pool3d
    mode = "bilinear" if net.dims == 2 else "trilinear"
    skips = []
    for i, block in enumerate(net.down):
        h = h if i == 0 else pool(h, 2)
        h = decode(block, h) if i == len(net.down) - 1 else block(h)
        skips.append(h)
    for up, merge, skip in zip(net.up_conv, net.merge, reversed(skips[:-1]), strict=True):
        h = up(F.interpolate(h, size=skip.shape[2:], mode=mode, align_corners=False))
        h = decode(merge, torch.cat([h, skip], dim=1))
    h = net.out(h)
    crop = (slice(None), slice(None), *(slice(0, s) for s in size))
    return x + h[crop]


class _StyledDoubleConv(nn.Module):
    """Two 3x3 convs, the second's channels modulated by a style code: scale and shift from an
    affine map of the style (FiLM), zero at initialisation so every style starts the same.

    StarGAN v2 injects style by AdaIN, whose instance statistics are the tile's or batch's
    (the module doc); a style-driven scale and shift per channel carries the same
    information, and an output pixel still depends only on its receptive field.
    """

    def __init__(self, dims: int, cin: int, cout: int, style_dim: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = conv(dims, cin, cout), conv(dims, cout, cout)
        self.affine = nn.Linear(style_dim, 2 * cout)
        _zero_last(self.affine)

    def forward(self, h: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(h), 0.1)
        scale, shift = self.affine(style).to(h.dtype).view(
            h.shape[0], 2, -1, *([1] * (h.dim() - 2))).unbind(1)
        return F.leaky_relu(self.conv2(h) * (1 + scale) + shift, 0.1)


class StyleUNet(nn.Module):
    """StarGAN v2's generator ``G(x, s)`` (Choi et al. 2020): an image and a style code in, the
    image in that style out; one network for every scanner domain.

    The encoder is a plain U-Net's (content); the bottleneck and every decoder block are
    style-modulated (:class:`_StyledDoubleConv`); skips keep anatomy at full resolution and a
    zero-initialised output conv makes an untrained generator the identity, as the other
    residual generators here. ``styles`` (``domains`` x ``style_dim``, saved with the
    weights) holds each domain's reference style, the mean style code of its training series:
    the node harmonises to a domain with it (:meth:`for_domain`), deterministically and
    without a reference image.
    """

    styled = True  # model.json lists the domains whose styles this generator holds

    def __init__(self, channels: int = 1, features: int = 32, levels: int = 3,
                 style_dim: int = 16, domains: int = 2, dims: int = 2) -> None:
        super().__init__()
        if levels < 1 or domains < 2 or style_dim < 1:
            raise ValueError(f"need levels >= 1, domains >= 2 and style_dim >= 1, got"
                             f" {levels}, {domains} and {style_dim}")
        self.dims, self.levels = dims, levels
        unet_layers(self, dims, channels, features, levels, lambda cin, cout, depth, role:
                    _DoubleConv(dims, cin, cout, False) if role == "down" and depth < levels
                    else _StyledDoubleConv(dims, cin, cout, style_dim))
        self.register_buffer("styles", torch.zeros(domains, style_dim))

    def receptive_field(self) -> ReceptiveField:
        return unet_receptive_field(self.levels)

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        """``style``: (N, style_dim), or one (style_dim,) code for the whole batch."""
        if style.dim() == 1:
            style = style.expand(x.shape[0], -1)
        return unet_forward(self, x, lambda block, h: block(h, style))

    def for_domain(self, index: int) -> nn.Module:
        """This generator fixed to domain ``index``'s reference style."""
        return DomainGenerator(self, index)


class DomainGenerator(nn.Module):
    """A style generator fixed to one domain's reference style: one image in, one out, as the
    runtime runs every generator; shares the generator's weights."""

    def __init__(self, generator: StyleUNet, index: int) -> None:
        super().__init__()
        if not 0 <= index < generator.styles.shape[0]:
            raise ValueError(f"domain index {index} outside 0..{generator.styles.shape[0] - 1}")
        self.generator, self.index = generator, index

    def receptive_field(self) -> ReceptiveField:
        return self.generator.receptive_field()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.generator(x, self.generator.styles[self.index])


class ShuffleUNet(ResidualUNet):
    """:class:`ResidualUNet` on ``shuffle`` x ``shuffle`` pixel blocks, for the CPU: pixel-
    unshuffle in (each block becomes ``shuffle**2`` channels), the U-Net on the block grid,
    pixel-shuffle out, so every pixel keeps its own residual (Shi et al. 2016).

    A U-Net's cost sits at its finest level; on blocks of 2 x 2 the finest level has a
    quarter of the positions, so with the same ``features`` the network costs about a
    quarter of the FLOPs and sees twice as far in pixels. Convolutions pad with zeros, not
    by reflection: oneDNN pads inside the convolution, where reflection copies every
    activation once more. 2D only. Inputs of any size are reflect-padded to a multiple of
    ``shuffle * 2**levels`` and cropped back.
    """

    def __init__(self, channels: int = 1, features: int = 16, levels: int = 3,
                 shuffle: int = 2, dims: int = 2) -> None:
        if dims != 2 or shuffle < 1:
            raise ValueError(f"shuffle-unet is 2D (dims=2) with shuffle >= 1, got dims={dims},"
                             f" shuffle={shuffle}")
        super().__init__(channels * shuffle**2, features, levels, dims=2)
        self.shuffle = shuffle
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.padding_mode = "zeros"

    def receptive_field(self) -> ReceptiveField:
        """The U-Net's, in blocks, plus the block a pixel sits in; tiles start on blocks of
        the coarsest level's grid."""
        field = super().receptive_field()
        return ReceptiveField(radius=self.shuffle * (field.radius + 1),
                              align=self.shuffle * field.align)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, step = x.shape[2:], self.shuffle * 2**self.levels
        pad = [0, (-size[1]) % step, 0, (-size[0]) % step]
        h = F.pad(x, pad, mode="reflect") if any(pad) else x
        h = F.pixel_shuffle(super().forward(F.pixel_unshuffle(h, self.shuffle)), self.shuffle)
        return h[..., :size[0], :size[1]]


def fft_size(n: int) -> int:
    """The smallest 5-smooth length (2^a 3^b 5^c) >= ``n``: FFTs of other lengths (a large
    prime factor, e.g. 556 = 4 x 139) run several times slower."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def radial_frequency(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """|f| in cycles per pixel on the (h, w // 2 + 1) grid of ``torch.fft.rfft2``."""
    fy = torch.fft.fftfreq(h, device=device)[:, None]
    fx = torch.fft.rfftfreq(w, device=device)[None, :]
    return torch.sqrt(fx**2 + fy**2)


class SpectralFilter(nn.Module):
    """A learnable isotropic in-plane transfer function, applied by FFT.

    Two FBP reconstructions of the same scan differ by the ratio of their kernels'
    transfer functions, a linear shift-invariant filter that reshapes resolution and noise
    texture alike. That is this model's whole capacity: the gain at ``knots`` evenly spaced
    radial frequencies (cycles per pixel, 0 to the corner of the spectrum, linear in
    between; positive, the identity at the start), with the gain at frequency 0 fixed at 1
    as a kernel's is, so mean HU (water, air) stay as the scanner calibrated them. It
    cannot move an edge or invent a structure, only re-weight frequencies already in the
    image. Slices are reflect-padded by the filter's spatial reach before the FFT, so the
    periodic wrap does not mix opposite borders.
    """

    def __init__(self, channels: int = 1, knots: int = 16, dims: int = 2) -> None:
        super().__init__()
        if knots < 2:
            raise ValueError(f"knots must be at least 2, got {knots}")
        # dims is accepted as every generator's is: the filter acts in-plane either way
        self.log_gain = nn.Parameter(torch.zeros(knots - 1))  # knots 1..: knot 0 is 1
        # a hat function of half-width df in frequency reaches about 1/df pixels in space
        self.reach = math.ceil((knots - 1) / math.sqrt(0.5))

    def receptive_field(self) -> ReceptiveField:
        """Global in principle (an FFT), but the smooth gain curve makes the filter's
        spatial reach about ``reach`` pixels; tiles with that overlap come close."""
        return ReceptiveField(radius=self.reach, exact=False)

    def gain(self, f: torch.Tensor) -> torch.Tensor:
        """The transfer function at radial frequencies ``f`` (cycles per pixel)."""
        g = torch.cat([self.log_gain.new_ones(1), self.log_gain.exp()])
        pos = (f / math.sqrt(0.5) * (g.numel() - 1)).clamp(0, g.numel() - 1)
        low = pos.floor().long().clamp(max=g.numel() - 2)
        w = pos - low
        return g[low] * (1 - w) + g[low + 1] * w

    def padding(self, rows: int, cols: int) -> tuple[int, int, int, int]:
        """Reflection padding (left, right, top, bottom) of a ``rows`` x ``cols`` plane: the
        filter's reach on each side, the right and bottom ones grown to an FFT-friendly
        size (:func:`fft_size`) where the plane allows."""
        pad = min(self.reach, rows - 1, cols - 1)
        if pad <= 0:
            return 0, 0, 0, 0
        right = min(fft_size(cols + 2 * pad) - cols - pad, cols - 1)
        bottom = min(fft_size(rows + 2 * pad) - rows - pad, rows - 1)
        return pad, right, pad, bottom

    def transfer(self, h: int, w: int, device: torch.device) -> torch.Tensor:
        """:meth:`gain` on the (h, w) rfft2 grid; kept while the gains are unchanged and no
        gradient is wanted (inference recomputes it once per slice size, not per batch)."""
        if torch.is_grad_enabled() and self.log_gain.requires_grad:
            return self.gain(radial_frequency(h, w, device))
        key = (h, w, str(device))
        cached = getattr(self, "_transfer", None)
        if cached is None or cached[0] != key or not torch.equal(cached[1], self.log_gain):
            gains = self.log_gain.detach().clone()
            self._transfer = (key, gains, self.gain(radial_frequency(h, w, device)).detach())
        return self._transfer[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        planes = x.float().reshape(-1, 1, *shape[-2:])
        left, right, top, bottom = self.padding(*shape[-2:])
        padded = F.pad(planes, (left, right, top, bottom), mode="reflect") \
            if right or bottom else planes
        h, w = padded.shape[-2:]
        spectrum = torch.fft.rfft2(padded) * self.transfer(h, w, x.device)
        out = torch.fft.irfft2(spectrum, s=(h, w))[..., top:top + shape[-2],
                                                    left:left + shape[-1]]
        return out.reshape(shape).to(x.dtype)


GENERATORS: dict[str, Callable[..., nn.Module]] = {
    "plain": PlainResidualCNN,
    "unet": ResidualUNet,
    "spectral": SpectralFilter,
    "shuffle-unet": ShuffleUNet,
    "stargan": StyleUNet,
}


def build_generator(architecture: str, params: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate a registered generator; unknown names fail with the list of known ones."""
    try:
        factory = GENERATORS[architecture]
    except KeyError:
        raise ValueError(f"unknown generator architecture '{architecture}'"
                         f" (known: {', '.join(sorted(GENERATORS))})") from None
    try:
        return factory(**(params or {}))
    except TypeError as exc:
        raise ValueError(f"bad parameters for architecture '{architecture}': {exc}") from None


def is_styled(architecture: str) -> bool:
    """Whether the architecture is a style generator (``G(x, s)``, one model, many domains)."""
    return bool(getattr(GENERATORS.get(architecture), "styled", False))


def spatial_dims(params: dict[str, Any] | None) -> int:
    """2 or 3: how many spatial axes a generator built with ``params`` expects."""
    return int((params or {}).get("dims", 2))


def count_parameters(module: nn.Module) -> int:
    """Trainable parameters: what the model folder reports and the size budget limits."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
