"""Progress: a rich bar (loss, metric, samples/s, ETA) on a terminal; plain log lines otherwise (CI, pipes, files).

Progress goes to stderr, so stdout carries only results (its last line is the run directory).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from bigmodel.training.distributed import is_main_process
from bigmodel.training.trainer import Callback, Trainer


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s"


class ProgressCallback(Callback):
    def __init__(self, enabled: bool | None = None, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = is_main_process() if enabled is None else (enabled and is_main_process())
        self.rich = self.enabled and self.stream.isatty()
        self._progress: Any = None
        self._task: Any = None
        self._loss: float | None = None
        self._metric: str = ""

    def on_fit_start(self, trainer: Trainer) -> None:
        self._t0 = time.perf_counter()
        self._step0 = trainer.state.step
        self._samples0 = trainer.state.samples_seen
        if not self.enabled:
            return
        if self.rich and not trainer.solved:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(
                "train", total=trainer.total_steps, completed=trainer.state.step, info=""
            )
        elif trainer.solved:
            print(
                f"fitting {type(trainer.model).__name__} by its solver (one pass), device {trainer.device}",
                file=self.stream,
                flush=True,
            )
        else:
            print(
                f"training: {trainer.total_steps} steps ({trainer.epochs} epochs x {trainer.steps_per_epoch}), "
                f"device {trainer.device}, autocast {trainer.autocast_dtype or 'off'}",
                file=self.stream,
                flush=True,
            )

    def _rate(self, trainer: Trainer) -> float:
        dt = time.perf_counter() - self._t0
        return (trainer.state.samples_seen - self._samples0) / dt if dt > 0 else 0.0

    def _eta(self, trainer: Trainer) -> float:
        done = trainer.state.step - self._step0
        dt = time.perf_counter() - self._t0
        return (trainer.total_steps - trainer.state.step) * dt / done if done else 0.0

    def on_step_end(self, trainer: Trainer, loss: float | None) -> None:
        if loss is not None:
            self._loss = loss
        if self._progress is not None:
            info = f"loss {self._loss:.4f} " if self._loss is not None else ""
            info += f"{self._metric}{self._rate(trainer):,.0f} samples/s"
            self._progress.update(self._task, completed=trainer.state.step, info=info)

    def on_eval_end(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        mon = trainer.cfg.monitor
        if mon in metrics:
            self._metric = f"{mon} {metrics[mon]:.4f} "
        if self.enabled and not self.rich:
            st = trainer.state
            loss = f"loss {self._loss:.4f} " if self._loss is not None else ""
            print(
                f"epoch {st.epoch}/{trainer.epochs} step {st.step}/{trainer.total_steps} {loss}{self._metric}"
                f"{self._rate(trainer):,.0f} samples/s eta {_fmt_eta(self._eta(trainer))}",
                file=self.stream,
                flush=True,
            )

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._progress is not None:
            self._progress.stop()
