"""Static int8 for convnets, through ONNX Runtime: export the fp32 model to ONNX, calibrate activation ranges on real
training images, quantize (QDQ, per-channel int8 weights, uint8 activations), and run it with ONNX Runtime.

Picked by measurement over PyTorch's eager static quantization: `torch.ao` eager/FX static quantization is
deprecated in this torch and needs the model rewritten with quant/dequant stubs; ONNX Runtime quantizes the exported
graph as it is and its int8 convolution kernels run on this CPU (benchmarks/deploy.py reports the latency).
The artifact holds `model.onnx` instead of `model.safetensors`; `OrtClassifier` makes it look like any model to
evaluate, predict and serve (it takes the same normalised input).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


class OrtClassifier(nn.Module):
    """An ONNX Runtime session behind the `forward(x) -> logits` contract (CPU, inference only)."""

    is_convnet = True

    def __init__(self, path: Path) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        self.onnx_path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def quantize_static_onnx(model: nn.Module, calib: torch.Tensor, out: Path, batch: int = 32) -> Path:
    """fp32 `model` (normalised (B, C, H, W) input) → `out` (static int8 ONNX), calibrated on `calib`."""
    import logging
    import tempfile
    import warnings

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quant_pre_process,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [calib[i : i + batch].numpy() for i in range(0, len(calib), batch)]

        def get_next(self) -> dict[str, Any] | None:
            return {"x": self.batches.pop(0)} if self.batches else None

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fp32, pre = Path(tmp) / "fp32.onnx", Path(tmp) / "pre.onnx"
        batch_dim = torch.export.Dim("batch", min=1, max=65_536)
        prog = torch.onnx.export(
            model.eval(), (calib[:2],), dynamo=True, input_names=["x"], output_names=["logits"],
            dynamic_shapes=({0: batch_dim},), verbose=False,
        )  # fmt: skip
        prog.save(str(fp32))
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        quantize_static(
            str(pre),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
        )
    return out


def calibration_images(data: Any, normalizer: Any, n: int, seed: int) -> torch.Tensor:
    """`n` training images (seeded draw), normalised as the model sees them."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    return normalizer(data.train.x[idx]).to(torch.float32)


def load_runtime(folder: Path, config: dict[str, Any], build: Any) -> OrtClassifier:
    """The `onnxruntime` artifact runtime (entry point `bigmodel.runtimes`): the graph in `model.onnx` is the model."""
    return OrtClassifier(folder / "model.onnx")
