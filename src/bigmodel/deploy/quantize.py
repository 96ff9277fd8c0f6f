"""Int8 quantization that shrinks the file and runs int8 kernels: `Int8Linear` and `Int8Embedding`.

Weights are int8 with one fp32 scale per output channel (symmetric, max-abs); they are ordinary tensors, so the
artifact stays safetensors (no pickled quantized objects) and is ~4x smaller. Linear layers are *dynamically*
quantized (W8A8): activations are quantized per call and the product runs in int8 kernels. Embedding tables are int8
per row (a lookup, then one multiply). LSTM/GRU weights stay fp32.

Kernels, picked by measurement on a 2-core AVX-512 CPU (`benchmarks/deploy.py`; 1024x1024 Linear, batch 1 / 32 /
256: fp32 0.063 / 0.40 / 1.97 ms): FBGEMM's `quantized.linear_dynamic` with weights packed at load time
(0.031 / 0.099 / 0.67 ms) when PyTorch's quantized engine is there; else `torch._int_mm` on int8 rows
(0.081 / 0.164 / 0.52 ms). `torch._weight_int8pack_mm` (weight-only) was 5-100x *slower* than fp32 here, so it is not
offered. Why not `torch.ao.quantization.quantize_dynamic` itself: it is deprecated in this torch, its packed
parameters cannot be stored as plain tensors (safetensors), and it leaves embedding tables — most of a small text
model's bytes — in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("dynamic",)


def _quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ≈ q * scale[:, None], q in [-127, 127]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float32)


def _fbgemm_available() -> bool:
    try:
        return (
            "fbgemm" in torch.backends.quantized.supported_engines
            or "x86" in torch.backends.quantized.supported_engines
        )
    except Exception:  # builds without the quantized backend
        return False


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "dynamic") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown int8 mode {mode!r}; expected one of {MODES}")
        self.in_features, self.out_features, self.mode = in_features, out_features, mode
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._packed: object | None = None  # FBGEMM packed weights, built lazily from the int8 buffers
        self._wt: torch.Tensor | None = None  # (K, N) contiguous transpose for torch._int_mm

    @classmethod
    def from_float(cls, lin: nn.Linear, mode: str = "dynamic") -> Int8Linear:
        m = cls(lin.in_features, lin.out_features, lin.bias is not None, mode)
        q, s = _quantize_rows(lin.weight.detach().float())
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        if lin.bias is not None:
            m.bias.copy_(lin.bias.detach().float())
        return m

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._packed = self._wt = None
        super()._load_from_state_dict(*args, **kwargs)

    def _pack(self) -> object:
        import warnings

        with warnings.catch_warnings():  # quantized-tensor constructors warn about their future; the kernels are here
            warnings.simplefilter("ignore")
            zp = torch.zeros(self.out_features, dtype=torch.long)
            qw = torch._make_per_channel_quantized_tensor(self.weight_int8, self.weight_scale.double(), zp, 0)
            return torch.ops.quantized.linear_prepack(qw, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        if x2.device.type == "cpu" and _fbgemm_available():
            if self._packed is None:
                self._packed = self._pack()
            y = torch.ops.quantized.linear_dynamic(x2.contiguous(), self._packed, True)  # reduce_range on x86
        else:
            amax = x2.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)
            xs = amax / 127.0
            xq = torch.round(x2 / xs).clamp_(-127, 127).to(torch.int8)
            if self._wt is None or self._wt.device != x.device:
                self._wt = self.weight_int8.t().contiguous()
            y = torch._int_mm(xq, self._wt).float() * xs * self.weight_scale
            if self.bias is not None:
                y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {self.mode}"


class Int8Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(num_embeddings))

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> Int8Embedding:
        m = cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx)
        q, s = _quantize_rows(emb.weight.detach().float())
        m.weight_int8.copy_(q)
        m.weight_scale.copy_(s)
        return m

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight_int8).float() * F.embedding(ids, self.weight_scale[:, None])

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_model(model: nn.Module, mode: str = "dynamic") -> tuple[nn.Module, list[str]]:
    """Replace every nn.Linear and nn.Embedding (in place) by its int8 version. Returns the model and the names of
    the replaced modules. Call on an fp32 model in eval mode."""
    replaced: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_float(child, mode))
                replaced.append(full)
            elif type(child) is nn.Embedding:
                setattr(parent, name, Int8Embedding.from_float(child))
                replaced.append(full)
            else:
                walk(child, f"{full}.")

    walk(model, "")
    return model, replaced
