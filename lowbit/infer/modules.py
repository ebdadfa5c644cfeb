"""`QuantLinear`: a linear layer that holds its weight quantized, and the kernels that run it.

Forward, for ``x`` (M tokens x K) and the stored weight (N x K), ``out = x @ w.T + bias``:

- int8 ``weights-and-activations``: a real int8 GEMM. ``x`` is quantized per token (one scale per
  row, `quantize_per_token_int8`) and multiplied by the int8 weight with exact int32 accumulation:
  on x86 CPUs by oneDNN's quantized linear (``torch.ops.onednn.qlinear_pointwise``, the kernel
  PyTorch's own x86 quantization uses) on a weight packed once into oneDNN's layout, which applies
  ``s_w[n]`` in its epilogue, then ``* s_x[m]``; for fewer than `ONEDNN_MIN_ROWS` rows, where
  oneDNN is missing, and on CPUs where oneDNN's int8 linear is a slow reference implementation
  (`lowbit.infer.onednn`) by ``torch._int_mm`` and one rescale pass.
- int8 ``weights-only``: ``kernel="dequant"`` (default) dequantizes the int8 weight once to fp32 and
  runs the fp32 GEMM; ``kernel="int8pack"`` calls ``torch.ops.aten._weight_int8pack_mm`` (int8
  weights, fp32 activations) each time. Both give the same products up to fp32 summation order.
  On the CPUs measured (see docs/inference.md) the int8pack kernel is many times slower than the
  fp32 GEMM, which is why it is not the default.
- every other format is emulated: weights-only multiplies ``x`` by the dequantized weight (cached);
  weights-and-activations quantizes ``x`` with the weight's format and granularity along K and
  runs `lowbit.nn.gemm.emulated_gemm` on the exact low-precision values. `note()` says so.
"""

from __future__ import annotations

import torch

from lowbit.errors import UsageError
from lowbit.infer.onednn import onednn_int8_is_fast
from lowbit.infer.quant import (
    Mode,
    QuantRecipe,
    Target,
    quantize_activation,
    quantize_per_token_int8,
    quantize_weight,
    stored_shapes,
    weight_qtensor,
)
from lowbit.nn.gemm import emulated_gemm, int_mm, scale_rows_cols

KERNELS = ("dequant", "int8pack")


# Below this many rows (decoding: one token per forward) oneDNN's qlinear call costs more than
# torch._int_mm's: 57 against 191 tokens/s decoding the tiny model (benchmarks/inference.py).
ONEDNN_MIN_ROWS = 16


def _clear_cache(module, incompatible_keys) -> None:
    """After `load_state_dict`: the weights dequantized from the old buffers are stale."""
    module._cache.clear()


class QuantLinear(torch.nn.Module):
    """A linear layer whose weight is stored quantized (buffers ``qweight``, ``scale``[, ...])."""

    def __init__(self, in_features: int, out_features: int, recipe: QuantRecipe, bias: bool):
        super().__init__()
        self.in_features, self.out_features, self.recipe = in_features, out_features, recipe
        for name, (shape, dtype) in stored_shapes(out_features, in_features, recipe).items():
            self.register_buffer(name, torch.zeros(shape, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.kernel = "dequant"
        self.dense_type: type = torch.nn.Linear  # what `dequantize_model` gives back (or Conv1D)
        self._cache: dict[str, torch.Tensor] = {}
        self.register_load_state_dict_post_hook(_clear_cache)  # a function: torch.save pickles it

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, recipe: QuantRecipe) -> QuantLinear:
        layer = cls(linear.in_features, linear.out_features, recipe, linear.bias is not None)
        for name, tensor in quantize_weight(linear.weight, recipe).items():
            setattr(layer, name, tensor.to(linear.weight.device))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().float().clone()
        return layer.to(linear.weight.device)

    def stored(self) -> dict[str, torch.Tensor]:
        return {name: buf for name, buf in self.named_buffers(recurse=False)}

    def weight_qtensor(self):
        return weight_qtensor(self.stored(), self.in_features, self.recipe)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the quantized values stand for (fp32, N x K)."""
        return self.weight_qtensor().dequantize(torch.float32)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (fp32, N x K), for model code that reads a linear layer's
        ``weight`` (Ergo's decoder layer takes ``o_proj.weight.dtype`` in every forward: an
        AttributeError from a quantized folder). Made once: the weights-only GEMM's own copy,
        one more fp32 copy for the others."""
        return self._get("w", self.dequantized_weight)

    def __setattr__(self, name: str, value) -> None:
        if name == "weight":  # transformers' tie_weights, resize_token_embeddings
            raise UsageError(
                "a quantized layer's weight is stored quantized and cannot be replaced (tied or "
                "resized); fix: tie or resize the model's embeddings before quantizing it"
            )
        super().__setattr__(name, value)

    @property
    def uses_int8_kernel(self) -> bool:
        return (
            self.recipe.format is Target.INT8
            and self.recipe.group is None
            and (self.recipe.mode is Mode.WEIGHTS_AND_ACTIVATIONS or self.kernel == "int8pack")
        )

    def note(self) -> str:
        r = self.recipe
        if self.uses_int8_kernel:
            if r.mode is Mode.WEIGHTS_AND_ACTIVATIONS:
                kernel = (
                    f"oneDNN qlinear; torch._int_mm below {ONEDNN_MIN_ROWS} rows"
                    if self._onednn_weight()
                    else "torch._int_mm"
                )
                return f"int8 x int8 GEMM ({kernel}), per-token activation scales"
            return "int8-weight GEMM (torch.ops.aten._weight_int8pack_mm)"
        if r.mode is Mode.WEIGHTS_ONLY and r.format is Target.INT8 and r.group is None:
            # the kernel is the Python API's choice: the command line has no flag for it
            return (
                "int8 weights dequantized once, fp32 GEMM (faster on the CPUs measured than the "
                "int8-weight kernel, which lowbit.infer.set_kernel(model, 'int8pack') picks)"
            )
        if r.mode is Mode.WEIGHTS_ONLY:
            return f"{r.format.value} weights dequantized to fp32 (emulated: no {r.format.value} kernel)"
        return (
            f"{r.format.value} weights and activations, emulated GEMM on exact low-precision values"
        )

    def _onednn_weight(self):
        """(packed weight, fp32 scales, zero points) for oneDNN's qlinear, or () where PyTorch has
        no oneDNN quantized linear (non-x86 builds) or it is slow on this CPU."""

        def pack():
            # oneDNN is a CPU library
            if self.qweight.device.type != "cpu" or not onednn_int8_is_fast():
                return ()
            try:
                packed = torch.ops.onednn.qlinear_prepack(self.qweight, None)
            except (AttributeError, RuntimeError, NotImplementedError):
                return ()
            scales = self.scale.float().reshape(-1).contiguous()
            return packed, scales, torch.zeros(scales.numel(), dtype=torch.int64)

        return self._get("onednn", pack)

    def _int8_gemm(self, values: torch.Tensor, s_x: torch.Tensor) -> torch.Tensor:
        """``(values @ qweight.T) * s_x * s_w`` in fp32 from int8 values and M x 1 scales ``s_x``."""
        onednn = self._onednn_weight() if values.shape[0] >= ONEDNN_MIN_ROWS else ()
        if onednn:
            packed, s_w, zero_points = onednn
            acc = torch.ops.onednn.qlinear_pointwise(
                values,
                1.0,
                0,
                packed,
                s_w,
                zero_points,
                None,
                1.0,
                0,
                torch.float32,
                "none",
                [],
                "",
            )
            return acc.mul_(s_x)
        s_w = self._get("s_w_column", lambda: self.scale.float().reshape(-1, 1))
        # the weight as the K x N transposed view of its N x K rows: oneDNN's fast layout
        return scale_rows_cols(int_mm(values, self.qweight.t()), s_x, s_w)

    def _get(self, key: str, make) -> torch.Tensor:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, dtype = x.shape, x.dtype
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        r = self.recipe
        if r.mode is Mode.WEIGHTS_AND_ACTIVATIONS:
            if self.uses_int8_kernel and x2.device.type == "cpu":
                values, s_x = quantize_per_token_int8(x2)
                out = self._int8_gemm(values, s_x)
            else:
                w = self._get("qw", self.weight_qtensor)
                out = emulated_gemm(quantize_activation(x2, r), w)
        elif self.uses_int8_kernel:
            scales = self._get("s_w", lambda: self.scale.float().reshape(-1))
            out = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, scales)
        else:
            # the bias inside the GEMM (addmm), as the dense layer `lowbit export` writes adds it:
            # a sum after the GEMM rounds otherwise, and the export's logits would differ
            w = self._get("w", self.dequantized_weight)
            out = torch.nn.functional.linear(x2, w, self.bias)
            return out.reshape(*shape[:-1], self.out_features).to(dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.recipe.describe()}"
