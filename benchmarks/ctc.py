"""The CTC model's bidirectional LSTM: packed sequences (`pack_padded_sequence`, what RNN classifiers use) against
`models/ctc.py`'s `bidirectional_lstm` (each clip reversed within its length; no packing, so it also exports), the
same weights and the same padded batch, in the same process, alternating rounds; forward + backward, under the
precision a run would use (bf16 autocast where the CPU has native bf16, else fp32).

    python benchmarks/ctc.py [--batch 16] [--steps 140] [--hidden 192] [--layers 3] [--rounds 5] [--json]

Steps are 20 ms frames (140 = 2.8 s of speech); lengths are drawn between 85% and 100% of the longest, as the
length-bucketed training batches have them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import emit_json, environment, median, print_env, print_table  # noqa: E402
from bigmodel.models.ctc import bidirectional_lstm  # noqa: E402
from bigmodel.training.trainer import cpu_has_native_bf16  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=140)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    env = environment()
    bf16 = cpu_has_native_bf16()
    torch.manual_seed(0)
    rnn = torch.nn.LSTM(a.hidden, a.hidden, a.layers, batch_first=True, bidirectional=True, dropout=0.1).train()
    x = torch.randn(a.batch, a.steps, a.hidden, requires_grad=True)
    lengths = torch.randint(int(0.85 * a.steps), a.steps + 1, (a.batch,))
    lengths[0] = a.steps

    def packed() -> torch.Tensor:
        p = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(rnn(p)[0], batch_first=True, total_length=a.steps)[0]

    def unpacked() -> torch.Tensor:
        return bidirectional_lstm(rnn, x, lengths)

    times: dict[str, list[float]] = {"packed": [], "unpacked": []}
    for r in range(a.rounds + 1):
        for name, fn in (("packed", packed), ("unpacked", unpacked)):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                y = fn()
            y.float().square().mean().backward()
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t)
    p, u = median(times["packed"]), median(times["unpacked"])
    if a.json:
        emit_json(
            {
                "env": env,
                "bf16_autocast": bf16,
                "packed_step_s": p,
                "unpacked_step_s": u,
                "unpacked_speedup_ratio": p / u,
            }
        )
        return
    print_env(env)
    print(
        f"BiLSTM {a.layers} x {a.hidden}, batch {a.batch} x {a.steps} steps, forward + backward, "
        f"{'bf16 autocast' if bf16 else 'fp32'}, median of {a.rounds} rounds"
    )
    print_table(["path", "step s", "vs packed"], [["packed", p, 1.0], ["unpacked (ctc.py)", u, p / u]])


if __name__ == "__main__":
    main()
