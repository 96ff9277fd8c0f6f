"""Int8 quantization that shrinks the file and runs int8 kernels: `Int8Linear`, `Int8Embedding`, `Int8LSTM`.

Weights are int8 with one fp32 scale per output channel (symmetric, max-abs); they are ordinary tensors, so the
artifact stays safetensors (no pickled quantized objects) and is ~4x smaller. Linear layers are *dynamically*
quantized (W8A8): activations are quantized per call and the product runs in int8 kernels. Embedding tables are int8
per row (a lookup, then one multiply). LSTM layers keep int8 gate weights and run FBGEMM's dynamic quantized LSTM
(`Int8LSTM`; packed sequences included). GRU and plain RNN layers stay fp32.

Kernels, picked by measurement on a 2-core AVX-512 CPU (a one-off microbenchmark during development, not shipped;
1024x1024 Linear, batch 1 / 32 / 256: fp32 0.063 / 0.40 / 1.97 ms): FBGEMM's `quantized.linear_dynamic` with weights
packed at load time (0.031 / 0.099 / 0.67 ms) when PyTorch's quantized engine is there; else `torch._int_mm` on int8
rows (0.081 / 0.164 / 0.52 ms). `torch._weight_int8pack_mm` (weight-only) was 5-100x *slower* than fp32 here, so it
is not offered. End-to-end figures on real models are in `benchmarks/deploy.py`.
Why not `torch.ao.quantization.quantize_dynamic` itself: it is deprecated in this torch, its packed parameters cannot
be stored as plain tensors (safetensors), and it leaves embedding tables — most of a small text model's bytes — in
fp32.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


class Int8LSTM(nn.Module):
    """An `nn.LSTM` (batch_first) with int8 gate weights (per gate row) and FBGEMM's dynamic quantized LSTM kernel."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int, bidirectional: bool) -> None:
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bidirectional = bidirectional
        self.dirs = 2 if bidirectional else 1
        G = 4 * hidden_size
        for layer in range(num_layers):
            in_size = input_size if layer == 0 else hidden_size * self.dirs
            for d in range(self.dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                self.register_buffer(f"w_ih_{sfx}", torch.zeros(G, in_size, dtype=torch.int8))
                self.register_buffer(f"s_ih_{sfx}", torch.ones(G))
                self.register_buffer(f"w_hh_{sfx}", torch.zeros(G, hidden_size, dtype=torch.int8))
                self.register_buffer(f"s_hh_{sfx}", torch.ones(G))
                self.register_buffer(f"b_ih_{sfx}", torch.zeros(G))
                self.register_buffer(f"b_hh_{sfx}", torch.zeros(G))
        self._params: list[object] | None = None

    @classmethod
    def from_float(cls, lstm: nn.LSTM) -> Int8LSTM:
        if not lstm.batch_first or lstm.proj_size or not lstm.bias:
            raise ValueError("Int8LSTM supports batch_first LSTMs with biases and no projection")
        m = cls(lstm.input_size, lstm.hidden_size, lstm.num_layers, lstm.bidirectional)
        for layer in range(lstm.num_layers):
            for d in range(m.dirs):
                sfx = f"l{layer}" + ("_reverse" if d else "")
                for kind in ("ih", "hh"):
                    q, sc = _quantize_rows(getattr(lstm, f"weight_{kind}_{sfx}").detach().float())
                    getattr(m, f"w_{kind}_{sfx}").copy_(q)
                    getattr(m, f"s_{kind}_{sfx}").copy_(sc)
                    getattr(m, f"b_{kind}_{sfx}").copy_(getattr(lstm, f"bias_{kind}_{sfx}").detach().float())
        return m

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self._params = None
        super()._load_from_state_dict(*args, **kwargs)

    def _cell_params(self) -> list[object]:
        import warnings

        params = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for layer in range(self.num_layers):
                for d in range(self.dirs):
                    sfx = f"l{layer}" + ("_reverse" if d else "")
                    packed = []
                    for kind in ("ih", "hh"):
                        w = getattr(self, f"w_{kind}_{sfx}")
                        zp = torch.zeros(w.shape[0], dtype=torch.long)
                        qw = torch._make_per_channel_quantized_tensor(
                            w, getattr(self, f"s_{kind}_{sfx}").double(), zp, 0
                        )
                        packed.append(torch.ops.quantized.linear_prepack(qw, getattr(self, f"b_{kind}_{sfx}")))
                    params.append(
                        torch.ops.quantized.make_quantized_cell_params_dynamic(
                            packed[0], packed[1], getattr(self, f"b_ih_{sfx}"), getattr(self, f"b_hh_{sfx}"), True
                        )
                    )
        return params

    def forward(self, x: object) -> tuple[object, tuple[torch.Tensor, torch.Tensor]]:
        from torch.nn.utils.rnn import PackedSequence

        if self._params is None:
            self._params = self._cell_params()
        packed = isinstance(x, PackedSequence)
        data = x.data if packed else x  # type: ignore[union-attr]
        B = int(x.batch_sizes[0]) if packed else data.shape[0]  # type: ignore[union-attr]
        zeros = torch.zeros(self.num_layers * self.dirs, B, self.hidden_size, dtype=torch.float32)
        hx = (zeros, zeros)
        if packed:
            out, h, c = torch.quantized_lstm(
                data.float(), x.batch_sizes, hx, self._params, True, self.num_layers, 0.0, False,  # type: ignore[union-attr]
                self.bidirectional, dtype=torch.qint8, use_dynamic=True,
            )  # fmt: skip
            if x.unsorted_indices is not None:  # type: ignore[union-attr]
                h = h.index_select(1, x.unsorted_indices)  # type: ignore[union-attr]
                c = c.index_select(1, x.unsorted_indices)  # type: ignore[union-attr]
            return PackedSequence(out, x.batch_sizes, x.sorted_indices, x.unsorted_indices), (h, c)  # type: ignore[union-attr]
        out, h, c = torch.quantized_lstm(
            data.float(), hx, self._params, True, self.num_layers, 0.0, False, self.bidirectional, True,
            dtype=torch.qint8, use_dynamic=True,
        )  # fmt: skip
        return out, (h, c)

    def extra_repr(self) -> str:
        return (
            f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
            f"bidirectional={self.bidirectional}, int8"
        )


def quantize_model(model: nn.Module, mode: str = "dynamic") -> tuple[nn.Module, list[str]]:
    """Replace every nn.Linear, nn.Embedding and (with FBGEMM) nn.LSTM in place by its int8 version. Returns the
    model and the names of the replaced modules. Call on an fp32 model in eval mode."""
    replaced: list[str] = []

    def walk(parent: nn.Module, prefix: str) -> None:
        for name, child in list(parent.named_children()):
            full = f"{prefix}{name}"
            if isinstance(child, nn.LSTM) and _fbgemm_available():
                setattr(parent, name, Int8LSTM.from_float(child))
                replaced.append(full)
            elif isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear.from_float(child, mode))
                replaced.append(full)
            elif type(child) is nn.Embedding:
                setattr(parent, name, Int8Embedding.from_float(child))
                replaced.append(full)
            else:
                walk(child, f"{full}.")

    walk(model, "")
    return model, replaced


def load_runtime(folder: Path, config: dict[str, Any], build: Any) -> nn.Module:
    """The `int8` artifact runtime (entry point `bigmodel.runtimes`): the fp32 model rebuilt, its Linear / Embedding /
    LSTM layers swapped for the int8 ones, then the stored int8 weights and scales loaded."""
    from bigmodel.artifact import load_weights

    model = build().eval()
    quantize_model(model, config["quantization"].get("mode", "dynamic"))
    load_weights(model, folder)
    return model
