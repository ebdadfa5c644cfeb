"""The low-precision Conv2d: im2col (``F.unfold``) and the three GEMMs of `LowbitLinearFunction`.

A convolution with weight ``w`` (O x C x kh x kw) is the GEMM ``cols @ w.reshape(O, -1).T`` on the
unfolded input ``cols`` (N*L x C*kh*kw, L output positions), so its forward, input-gradient and
weight-gradient GEMMs are exactly a linear layer's, contracted over C*kh*kw, O and N*L. Gradients
flow back through ``F.unfold`` to the image.

A grouped convolution (``groups=G``) is G such GEMMs side by side: group g multiplies its
C/G*kh*kw columns of ``cols`` by its O/G rows of the weight (`_grouped_linear`). Each group is a
linear layer's three GEMMs of its own, so every operand is quantized along its own group's
contraction axis (C/G*kh*kw, O/G, N*L): no scale block straddles two groups. A tensorwise scale is
then one per group's operand (current scaling); delayed scaling's history records the largest amax
of the step over the groups, so from the first commit on every group scales with the layer's one
delayed amax. A depthwise convolution (G = C) is kept (`depthwise_kept_reason`).

A transposed convolution (`LowbitConvTranspose2d`) is the same GEMM read the other way: each input
pixel's C channels times the weight (C x O*kh*kw) give the O*kh*kw values it adds to the output,
which ``F.fold`` (col2im) sums into place. Its forward contracts over C (C/G per group), its input
gradient over O*kh*kw (the unfolded output gradient: a convolution's forward GEMM) and its weight
gradient over N*H*W, the three GEMMs of a linear layer again.

What the backward keeps of ``cols`` for the weight gradient is kept as an image (`_Unfolding`):
``cols`` holds every pixel kh*kw times, and so does what a GEMM makes of it value by value (its
cast, a tensorwise quantization), so the image holds the same values once, and the backward reads
``cols`` off it again, bit for bit: the image itself where ``cols`` is kept in high precision (no
copy: the layer before keeps it too, as nn.Conv2d's own backward does), else the kept tensor's
values gathered into one image of its dtype.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from lowbit.dynamo_marks import cache
from lowbit.nn.linear import (
    LowbitModule,
    _dual,
    _functorch_transforms_active,
    check_floating_input,
    full_precision,
    gemm_output_dtype,
    lowbit_linear,
    on_meta,
)
from lowbit.recipes.recipe import LayerSpec

# Why `convert` keeps a depthwise convolution. Measured with 96 channels, 28x28, batch 8,
# forward + backward on one CPU thread (docs/recipes.md): fp8-tensorwise 589 ms, mxfp8 697 ms,
# nn.Conv2d 9 and 12 ms.
DEPTHWISE_KEPT = (
    "depthwise convolution (groups = in_channels): its per-channel GEMMs are too small to gain "
    "from low precision, and emulated channel by channel ran ~60x slower than nn.Conv2d"
)


def depthwise_kept_reason(conv: torch.nn.Module) -> str | None:
    """`DEPTHWISE_KEPT` for a depthwise ``nn.Conv2d`` or ``nn.ConvTranspose2d`` (groups =
    in_channels > 1), None for any other layer. Converted, it ran a loop of 3*C GEMMs per step,
    each contracting over kh*kw values (9, zero-padded to a 32-wide MX block) or fewer, too small
    to gain from low precision. Convolutions of fewer groups are converted (`_grouped_linear`)."""
    convolution = isinstance(conv, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))
    if convolution and 1 < conv.groups == conv.in_channels:
        return DEPTHWISE_KEPT
    return None


def _padding_sides(conv: torch.nn.Conv2d) -> list[tuple[int, int]]:
    """The rows (columns) that nn.Conv2d pads before and after the image, per spatial dim.
    ``padding="same"`` pads a dilated kernel's extent less one, the odd one of an even kernel
    after the image (``F.conv2d``, and nn.Conv2d's ``_reversed_padding_repeated_twice``)."""
    if conv.padding == "valid":
        return [(0, 0), (0, 0)]
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation)]
        return [(total // 2, total - total // 2) for total in totals]
    return [(pad, pad) for pad in conv.padding]


def _channels_last_strides(tensor: torch.Tensor) -> bool:
    """Whether ATen reads a 4-D tensor's strides as channels-last: c10's
    ``is_channels_last_strides_2d``, which ``suggest_memory_format`` and so F.conv2d ask. The
    strides must grow in the order C, W, H, N, a size-1 dimension's stride counting too, and an
    N x 1 x 1 x 1 tensor reads as contiguous. (Here in a few integer comparisons, 1 us a call:
    ``torch._prims_common.suggest_memory_format`` takes 20 us, and disagrees with F.conv2d on
    tensors with a size-1 height or width.)"""
    sizes, strides = tensor.shape, tensor.stride()
    if strides[1] == 0:
        return False
    least = 0
    for dim in (1, 3, 2, 0):
        if sizes[dim] == 0 or strides[dim] < least or (dim == 0 and least == strides[1]):
            return False
        least = strides[dim] * sizes[dim] if sizes[dim] > 1 else strides[dim]
    return True


def _output_memory_format(x: torch.Tensor, weight: torch.Tensor) -> torch.memory_format:
    """The memory format of nn.Conv2d's output: channels-last where the input or the weight is
    (F.conv2d), contiguous otherwise. The GEMM's N x L x O result viewed as N x O x H x W has
    channels-last strides, and code after a convolution may ``.view`` its output (the PyTorch
    tutorial's ``x.view(-1, 16 * 5 * 5)``), which only contiguous strides allow.

    "Is channels-last" is ATen's reading of the strides (`_channels_last_strides`, which F.conv2d
    asks of both), not ``is_contiguous``: a one-channel image or a 1x1 kernel made channels-last
    (``model.to(memory_format=torch.channels_last)``) is contiguous in both formats, and F.conv2d
    still gives it a channels-last output."""
    for tensor in (x, weight):
        if _channels_last_strides(tensor):
            return torch.channels_last
    return torch.contiguous_format


def _check_image(x: torch.Tensor, weight, channels: int, op: str, given: str) -> None:
    """PyTorch's errors (``op``: F.conv2d's, F.conv_transpose2d's, ``given`` their first words)
    for an input that is not a floating-point N x C x H x W batch of ``channels`` channels."""
    check_floating_input(x, weight)
    if x.dim() != 4:
        raise RuntimeError(
            f"Expected 3D (unbatched) or 4D (batched) input to {op}, but got input of size: "
            f"{list(x.shape)}"
        )
    if x.shape[1] != channels:
        raise RuntimeError(
            f"Given {given}, weight of size {list(weight.shape)}, expected input{list(x.shape)} "
            f"to have {channels} channels, but got {x.shape[1]} channels instead"
        )


class _Unfold(torch.autograd.Function):
    """``F.unfold`` whose backward sums in fp32. The backward (``F.fold``) adds up each pixel's
    gradient over the kh*kw kernel positions that read it; a convolution accumulates that sum in
    fp32 and rounds it once (oneDNN's and cuDNN's bf16 kernels), where a fold in bf16 rounds after
    every addition: 7 dB more noise in a 5x5 convolution's input gradient (43.7 dB against
    fp64, nn.Conv2d 50.7 dB; bf16 model, 16 channels). In the form with ``setup_context`` that
    torch.func's transforms take (``torch.func.grad`` of a converted model), and mappable. No
    forward-mode rule: Dynamo refuses to trace an autograd function that has one, which broke a
    compiled model's graph at every converted convolution (`_UnfoldForwardMode` has it)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, kernel_size, dilation, padding, stride):
        return F.unfold(x, kernel_size, dilation, padding, stride)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, *options = inputs
        ctx.fold = (x.shape[-2:], *options)

    @staticmethod
    def backward(ctx, grad_cols):
        grad_x = F.fold(grad_cols.float(), *ctx.fold)
        return grad_x.to(grad_cols.dtype), None, None, None, None


class _UnfoldForwardMode(_Unfold):
    """`_Unfold` with a forward-mode rule, taken only under torch.func's transforms or for a dual
    tensor (`_unfold`), so that ``vmap``, ``jacfwd`` and ``jvp`` reach the GEMM's refusal in one
    line (`lowbit.nn.linear`) instead of failing here on a rule the unfold lacked."""

    @staticmethod
    def jvp(ctx, tangent_x, *_):
        return F.unfold(tangent_x, *ctx.fold[1:])  # unfolding is linear: its own derivative


def _unfold(x: torch.Tensor, *options) -> torch.Tensor:
    """``F.unfold(x, kernel_size, dilation, padding, stride)`` by `_Unfold`, or where a
    forward-mode derivative may be asked of it, `_UnfoldForwardMode`."""
    forward_mode = _functorch_transforms_active() or _dual(x)
    return (_UnfoldForwardMode if forward_mode else _Unfold).apply(x, *options)


@dataclasses.dataclass(frozen=True)
class _Unfolding:
    """How ``F.unfold`` (this kernel size, dilation, padding and stride) reads the rows of a
    convolution's GEMM input (N*L x C*kh*kw) off an N x C x H x W image, in both directions:
    `rows` reads them, `image` gathers a tensor of their shape back into an image. A tensor whose
    every value is a function of the one value of ``cols`` at its place, zero for zero (a cast, a
    tensorwise quantization), gathered and read again, is the same tensor bit for bit: each pixel's
    copies hold one value, the padding reads zeros. The linear layer's autograd function keeps what
    it saves of its input so (`lowbit.nn.linear`), kh*kw times fewer values than the rows."""

    kernel_size: tuple[int, int]
    dilation: tuple[int, int]
    padding: tuple[int, int]
    stride: tuple[int, int]

    def rows(self, image: torch.Tensor) -> torch.Tensor:
        """The rows F.unfold reads off ``image`` (N*L x C*kh*kw, contiguous as the forward's), of
        any dtype (F.unfold refuses an int8 or fp8 carrier): one strided copy per kernel tap into
        its column of every channel, where F.unfold's columns still had to be transposed."""
        n, channels, height, width = image.shape
        (pad_h, pad_w), (out_h, out_w) = self.padding, self._outputs(image.shape)
        padded = image
        if pad_h or pad_w:  # zeros around, as F.unfold reads them
            padded = image.new_zeros(n, channels, height + 2 * pad_h, width + 2 * pad_w)
            padded[:, :, pad_h : pad_h + height, pad_w : pad_w + width] = image
        kh, kw = self.kernel_size
        rows = image.new_empty(n, out_h, out_w, channels, kh, kw)
        for ky in range(kh):
            for kx in range(kw):
                starts = (ky * self.dilation[0], kx * self.dilation[1])
                tap = self._pixels(padded, starts, (out_h, out_w))
                rows[..., ky, kx] = tap.permute(0, 2, 3, 1)
        return rows.view(-1, channels * kh * kw)

    def image(self, rows: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """``rows`` (shaped as `rows` reads them off an image of ``shape``) as that image: each
        pixel one of the values that copy it, a pixel no kernel position reads zero. A few strided
        copies (`_segments`: one where a tap reads every pixel, as in a "same" convolution), no
        gather index."""
        n, channels, height, width = shape
        (out_h, out_w), (kh, kw) = self._outputs(shape), self.kernel_size
        per_row = rows.reshape(n, out_h, out_w, channels, kh, kw)
        image = rows.new_zeros(shape)
        padding, axes = self.padding, zip((height, width), (out_h, out_w), self.kernel_size)
        along = [
            _segments(length, out, k, d, s, pad)
            for (length, out, k), d, s, pad in zip(axes, self.dilation, self.stride, padding)
        ]
        for tap_y, first_y, count_y, pixel_y in along[0]:
            for tap_x, first_x, count_x, pixel_x in along[1]:
                read = per_row[:, first_y : first_y + count_y, first_x : first_x + count_x]
                where = self._pixels(image, (pixel_y, pixel_x), (count_y, count_x))
                where.copy_(read[..., tap_y, tap_x].permute(0, 3, 1, 2))
        return image

    def _outputs(self, shape) -> tuple[int, int]:
        """The output positions along each spatial axis of an image of ``shape``."""
        return tuple(
            (length + 2 * pad - d * (k - 1) - 1) // s + 1
            for length, pad, d, k, s in zip(
                shape[2:], self.padding, self.dilation, self.kernel_size, self.stride
            )
        )

    def _pixels(self, image, starts, counts) -> torch.Tensor:
        """The view of ``image``'s pixels that ``counts`` output positions in a row read at one
        kernel tap, from pixel ``starts`` on (a stride apart)."""
        return image[
            :,
            :,
            starts[0] : starts[0] + self.stride[0] * (counts[0] - 1) + 1 : self.stride[0],
            starts[1] : starts[1] + self.stride[1] * (counts[1] - 1) + 1 : self.stride[1],
        ]


@cache
def _segments(length: int, out: int, k: int, d: int, s: int, pad: int) -> tuple:
    """Along one axis of ``length`` pixels read at ``out`` output positions by ``k`` taps (dilation
    ``d``, stride ``s``, ``pad`` zeros before): (tap j, first output o, count, first pixel) of
    runs of output positions whose pixels ``o * s + j * d - pad`` no run before holds, together
    each pixel that some tap reads once. Taps reading the most pixels first (a "same"
    convolution's middle tap reads all: one run). What tap ``i`` reads at ``o + (j - i) * d / s``
    is what ``j`` reads at ``o``, so the taps before leave ``j`` one range of ``o``."""

    def readable(j: int) -> tuple[int, int]:  # the o whose pixel is in the image
        return max(0, -((j * d - pad) // s)), min(out, (length - 1 + pad - j * d) // s + 1)

    runs, done = [], []
    for j in sorted(range(k), key=lambda j: -(readable(j)[1] - readable(j)[0])):
        low, high = readable(j)
        for i in done:
            if (j - i) * d % s == 0:
                shift = (j - i) * d // s
                low, high = (max(low, out - shift), high) if shift > 0 else (low, min(high, -shift))
        done.append(j)
        if high > low:
            runs.append((j, low, high - low, low * s + j * d - pad))
    return tuple(runs)


def _grouped_linear(
    cols: torch.Tensor,
    weight: torch.Tensor,
    bias,
    state,
    groups: int,
    out_dtype=None,
    image: torch.Tensor | None = None,
    unfolding: _Unfolding | None = None,
):
    """``lowbit_linear`` of each group: the columns of ``cols`` (N x L x C*kh*kw) in ``groups``
    equal parts, each by its share of the rows of ``weight`` (O x C/groups*kh*kw) and of ``bias``;
    the outputs side by side (N x L x O), in ``out_dtype`` (None: `gemm_output_dtype`'s). One
    `LayerState` for all: each group's GEMMs quantize their own operands (see the module
    docstring). ``split`` hands the gradients back to ``cols`` and the weight in one
    concatenation, not one full-size sum per group. ``image``: what ``unfolding`` reads ``cols``
    off, each group's from its share of the channels (what the backward keeps, `_Unfolding`)."""
    if groups == 1:
        return lowbit_linear(cols, weight, bias, state, out_dtype, image, unfolding)
    biases = (None,) * groups if bias is None else bias.chunk(groups)
    images = (None,) * groups if image is None else image.chunk(groups, 1)
    return torch.cat(
        [
            lowbit_linear(part, rows, part_bias, state, out_dtype, part_image, unfolding)
            for part, rows, part_bias, part_image in zip(
                cols.chunk(groups, -1), weight.chunk(groups), biases, images, strict=True
            )
        ],
        -1,
    )


class LowbitConv2d(LowbitModule, torch.nn.Conv2d):
    """Drop-in `nn.Conv2d` (any ``groups``; `convert` keeps a depthwise one) whose GEMMs follow
    a `LayerSpec`."""

    def __init__(self, conv: torch.nn.Conv2d, spec: LayerSpec, seed: int = 0):
        super().__init__(conv, spec, seed)
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels
        self.kernel_size, self.stride = conv.kernel_size, conv.stride
        # what code that inspects an nn.Conv2d reads ("same" and "valid" included)
        self.padding, self.padding_mode = conv.padding, conv.padding_mode
        self.dilation = conv.dilation
        self.groups = conv.groups
        self.transposed, self.output_padding = False, (0, 0)  # nn.Conv2d's, for code reading them
        # The unfold pads with zeros, as much on both sides; other padding (another mode, an
        # even kernel's "same") is F.pad's first, in (left, right, top, bottom) order, as
        # nn.Conv2d pads for a mode other than zeros (None: the unfold's padding is all).
        sides = _padding_sides(conv)
        self._padded_by = [before + after for before, after in sides]  # rows, columns
        symmetric = all(before == after for before, after in sides)
        if conv.padding_mode == "zeros" and symmetric:
            self._unfold_padding, self._pad = tuple(before for before, _ in sides), None
        else:
            self._unfold_padding = (0, 0)
            self._pad = (*sides[1], *sides[0])
        self._pad_mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode

    def _init_parameters(self) -> None:
        torch.nn.Conv2d.reset_parameters(self)  # reads only weight, bias (and their shapes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.is_identity:
            padding = self.padding
            if self.padding_mode != "zeros":  # nn.Conv2d's own way
                x, padding = F.pad(x, self._pad, mode=self._pad_mode), 0
            return full_precision(
                F.conv2d,
                x,
                self.weight,
                self.bias,
                stride=self.stride,
                padding=padding,
                dilation=self.dilation,
                groups=self.groups,
            )
        if x.dim() == 3:  # one unbatched C x H x W image, as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        self._check_input(x)
        layout = x  # F.conv2d reads the output's layout off the image it is given
        if self._pad is not None:
            x = F.pad(x, self._pad, mode=self._pad_mode)
            if self.padding_mode != "zeros":  # nn.Conv2d hands F.conv2d the padded image
                layout = x
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        pad_h, pad_w = self._unfold_padding
        out_h = (h + 2 * pad_h - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
        out_w = (w + 2 * pad_w - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
        cols = _unfold(x, self.kernel_size, self.dilation, self._unfold_padding, self.stride)
        cols = cols.transpose(1, 2)  # N x L x C*kh*kw
        weight = self.weight.reshape(self.out_channels, -1)
        unfolding = _Unfolding(self.kernel_size, self.dilation, self._unfold_padding, self.stride)
        out = _grouped_linear(
            cols, weight, self.bias, self.lowbit_state, self.groups, None, x, unfolding
        )  # N x L x O
        out = out.transpose(1, 2).reshape(n, self.out_channels, out_h, out_w)
        return out.contiguous(memory_format=_output_memory_format(layout, self.weight))

    def _check_input(self, x: torch.Tensor) -> None:
        """F.conv2d's errors for an input it refuses; unfolded, a wrong channel count would
        surface as a mismatch of GEMM shapes that names neither channels nor image."""
        _check_image(x, self.weight, self.in_channels, "conv2d", f"groups={self.groups}")
        padded = [size + pad for size, pad in zip(x.shape[2:], self._padded_by)]
        kernel = [d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation)]  # dilated
        if any(size < k for size, k in zip(padded, kernel)):  # unfold's error names neither
            raise RuntimeError(
                f"Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
                f"Kernel size: ({' x '.join(map(str, kernel))}). Kernel size can't be greater "
                "than actual input size"
            )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            + (f"groups={self.groups}, " if self.groups != 1 else "")
            + (f"padding_mode={self.padding_mode}, " if self.padding_mode != "zeros" else "")
            + f"bias={self.bias is not None}, {self.spec.describe()}"
        )


class LowbitConvTranspose2d(LowbitModule, torch.nn.ConvTranspose2d):
    """Drop-in `nn.ConvTranspose2d` (any stride, padding, output_padding, dilation, groups) whose
    GEMMs follow a `LayerSpec`: ``x @ W`` per input pixel, then ``F.fold`` (module docstring).

    The GEMM returns fp32 and the fold adds the overlapping kernel positions (stride < kernel) in
    fp32, rounded once to the compute dtype with the bias, as a transposed-convolution kernel
    accumulates; where the kernel positions do not overlap (stride = kernel, a U-Net's 2x2
    up-sampling) the fold only moves values."""

    def __init__(self, conv: torch.nn.ConvTranspose2d, spec: LayerSpec, seed: int = 0):
        super().__init__(conv, spec, seed)
        for name in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "output_padding",
            "dilation",
            "groups",
            "padding_mode",
        ):
            setattr(self, name, getattr(conv, name))
        self.transposed = True

    def _init_parameters(self) -> None:
        torch.nn.ConvTranspose2d.reset_parameters(self)  # reads only weight, bias

    def forward(self, x: torch.Tensor, output_size: list[int] | None = None) -> torch.Tensor:
        output_padding = self._output_padding(
            x, output_size, self.stride, self.padding, self.kernel_size, 2, self.dilation
        )
        # (on the meta device, shapes only: full_precision's meta forward)
        if self.spec.is_identity or on_meta(x, self.weight, self.bias):
            return full_precision(
                F.conv_transpose2d,
                x,
                self.weight,
                self.bias,
                stride=self.stride,
                padding=self.padding,
                output_padding=output_padding,
                groups=self.groups,
                dilation=self.dilation,
            )
        if x.dim() == 3:  # one unbatched C x H x W image, as nn.ConvTranspose2d takes it
            return self.forward(x.unsqueeze(0), output_size).squeeze(0)
        self._check_input(x)
        n, c, h, w = x.shape
        rows = x.permute(0, 2, 3, 1).reshape(n, h * w, c)  # N x L x C, one row per pixel
        # per group, (O/G*kh*kw) x C/G: the weight's rows as a linear layer's out x in
        per_group = self.weight.reshape(self.groups, c // self.groups, -1)
        weight = per_group.transpose(1, 2).reshape(-1, c // self.groups)
        # fp32 out of the GEMM, for the fold to sum; the input in its own dtype, which the
        # backward saves (an fp32 copy of a bf16 input held twice its bytes)
        out_dtype = gemm_output_dtype(x)
        cols = _grouped_linear(rows, weight, None, self.lowbit_state, self.groups, torch.float32)
        # every kernel position summed into place, then ``padding`` cut off at the start and
        # ``padding - output_padding`` at the end (zeros added where that is negative)
        size = [
            (length - 1) * s + d * (k - 1) + 1
            for length, s, d, k in zip((h, w), self.stride, self.dilation, self.kernel_size)
        ]
        out = F.fold(cols.transpose(1, 2), size, self.kernel_size, self.dilation, 0, self.stride)
        (pad_h, pad_w), (extra_h, extra_w) = self.padding, output_padding
        out = F.pad(out, (-pad_w, extra_w - pad_w, -pad_h, extra_h - pad_h))
        if self.bias is not None:
            out = out + self.bias.float()[:, None, None]
        return out.to(out_dtype).contiguous(memory_format=_output_memory_format(x, self.weight))

    def _check_input(self, x: torch.Tensor) -> None:
        """F.conv_transpose2d's errors (`_check_image`): reshaped into rows, a wrong channel
        count would surface as a mismatch of GEMM shapes."""
        _check_image(x, self.weight, self.in_channels, "conv_transpose2d", "transposed=1")

    def extra_repr(self) -> str:
        return f"{torch.nn.ConvTranspose2d.extra_repr(self)}, {self.spec.describe()}"
