"""The `bigmodel` command: one verb per step of the path.

    bigmodel train RECIPE.yaml [key=value ...] [--out RUN_DIR] [--resume RUN_DIR]
    bigmodel evaluate RUN_DIR [--split test|val|train] [--json]
    bigmodel predict RUN_DIR FILE... [--top-k K] [--json]
    bigmodel generate RUN_DIR|RECIPE --prompt TEXT [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
    bigmodel translate RUN_DIR "text" ... [--beam-size K]
    bigmodel explain RUN_DIR INPUT... [--method M] [--target LABEL] [--out DIR] [--json] | --evaluate [--limit N]
    bigmodel runs list | show RUN | compare RUN RUN...
    bigmodel recipe validate FILE [key=value ...] | schema | models
    bigmodel data scan FILE [--types email,phone,...] [--column C] [--json]

User errors print one line to stderr and exit with status 2; results go to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bigmodel.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="bigmodel: from data to a trained, evaluated and served model, driven by YAML recipes.",
)
runs_app = typer.Typer(no_args_is_help=True, help="The run index: list, show and compare runs.")
recipe_app = typer.Typer(no_args_is_help=True, help="Check recipes and print their schema.")
data_app = typer.Typer(no_args_is_help=True, help="Look at data before training on it.")
app.add_typer(runs_app, name="runs")
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")


def _echo_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2))


def _read_lines(lines: Path | None) -> list[str]:
    """The non-blank lines of a `--lines FILE` (UTF-8), or nothing without one."""
    if lines is None:
        return []
    if not lines.is_file():
        raise UserError(f"--lines {lines}: file not found")
    try:
        return [t for t in lines.read_text(encoding="utf-8").splitlines() if t.strip()]
    except UnicodeDecodeError:
        raise UserError(f"--lines {lines}: not a UTF-8 text file") from None


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# -------------------------------------------------------------------------------------------------------- train
@app.command()
def train(
    recipe: Annotated[
        str | None, typer.Argument(help="Recipe YAML (optional with --resume).", show_default=False)
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="Dotted overrides, e.g. train.optimizer.lr=3e-3")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory to create (default runs/<name>-<time>).")
    ] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue this run from its last checkpoint.")] = None,
    no_progress: Annotated[bool, typer.Option("--no-progress", help="No progress output.")] = False,
    report: Annotated[bool, typer.Option("--report", help="Also write RUN/report.html (bigmodel report).")] = False,
    nproc_per_node: Annotated[
        int | None, typer.Option("--nproc-per-node", help="Train in N processes on this machine (torchrun, DDP).")
    ] = None,
    nnodes: Annotated[int, typer.Option("--nnodes", help="Machines in the job (with --node-rank, --master-addr).")] = 1,
    node_rank: Annotated[int, typer.Option("--node-rank", help="This machine's rank, 0..nnodes-1.")] = 0,
    master_addr: Annotated[
        str | None, typer.Option("--master-addr", help="Address of the node-rank-0 machine.")
    ] = None,
    master_port: Annotated[int, typer.Option("--master-port", help="Its port for the rendezvous.")] = 29500,
    max_restarts: Annotated[
        int, typer.Option("--max-restarts", help="Restart the workers this often after a failure (resume).")
    ] = 0,
) -> None:
    """Train a recipe; print the test metrics; the last line of stdout is the run directory."""
    from bigmodel import api
    from bigmodel.config import load_recipe

    overrides = list(overrides or [])
    if recipe is not None and "=" in recipe and not recipe.endswith((".yaml", ".yml")):
        overrides.insert(0, recipe)
        recipe = None
    if recipe is None and resume is None:
        raise UserError(
            "bigmodel train: give a recipe file (bigmodel train recipes/quickstart.yaml) or --resume RUN_DIR"
        )
    if overrides and recipe is None:
        raise UserError("bigmodel train --resume: overrides need the recipe file too (the run's recipe must match)")
    if out is not None and resume is not None:
        raise UserError("bigmodel train: --out and --resume exclude each other (a resumed run stays in its folder)")
    rec = load_recipe(recipe, overrides) if recipe is not None else None  # a bad recipe fails here, before a launch
    if out is not None and resume is None and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        # torchrun restarted this job's workers (--max-restarts) after a failure: continue the run they started
        from bigmodel.training.checkpoint import latest_checkpoint

        if (out / "recipe.yaml").is_file() and latest_checkpoint(out / "checkpoints") is not None:
            rec, out, resume = None, None, out
    if (nproc_per_node or 1) > 1 or nnodes > 1:
        from bigmodel.training.launch import launch

        args = [*([recipe] if recipe else []), *overrides]
        args += ["--out", str(out)] if out is not None else []
        args += ["--resume", str(resume)] if resume is not None else []
        args += ["--no-progress"] if no_progress else []
        args += ["--report"] if report else []
        sys.exit(launch(args, nproc_per_node or 1, nnodes, node_rank, master_addr, master_port, max_restarts))
    result = api.train(rec, out=out, resume=resume, progress=False if no_progress else None, report=report)
    from bigmodel.training.distributed import is_main_process

    if not is_main_process():  # under torchrun, rank 0 reports the run
        return
    from bigmodel.config import read_yaml, validate_recipe
    from bigmodel.tasks import get_task

    ran = rec or validate_recipe(read_yaml(result.run_dir / "recipe.yaml"))
    head = get_task(ran.task).summary(result.metrics, ran.eval.split)
    typer.echo(
        f"{head}  train_time {result.train_time_s:.1f}s  steps {result.steps}"
        + ("  (stopped early)" if result.stopped_early else "")
    )
    if result.baseline is not None:
        typer.echo(_versus(result.metrics, result.baseline))
    typer.echo(str(result.run_dir))


def _versus(m: dict[str, Any], b: dict[str, Any]) -> str:
    """`model 93.45% vs baseline (linear) 84.12%`: the model beside the classic baseline on the same split."""
    return (
        f"model {100 * m['accuracy']:.2f}% vs baseline ({b['model']}) {100 * b['accuracy']:.2f}% {b['split']} accuracy"
        f"  (macro_f1 {m['macro_f1']:.4f} vs {b['macro_f1']:.4f})"
    )


# ----------------------------------------------------------------------------------------------------- evaluate
KeyFile = Annotated[
    Path | None,
    typer.Option(
        "--key-file",
        envvar="BIGMODEL_KEY_FILE",
        help="The key of an encrypted model (bigmodel export --encrypt); or BIGMODEL_KEY=<64 hex>.",
    ),
]


def _use_key(key_file: Path | None) -> None:
    if key_file is not None:
        from bigmodel.privacy.encrypt import set_key_file

        set_key_file(key_file)


@app.command(context_settings={"allow_interspersed_args": True})
def federate(
    args: Annotated[
        list[str] | None,
        typer.Argument(
            metavar="[server|client] RECIPE [KEY=VALUE...]",
            help="A recipe with a federated block (and dotted overrides); `server` / `client` for several machines.",
            show_default=False,
        ),
    ] = None,
    clients: Annotated[int | None, typer.Option("--clients", min=1, help="federated.clients")] = None,
    rounds: Annotated[int | None, typer.Option("--rounds", min=1, help="federated.rounds")] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Run directory to create (default runs/<name>-federated-<time>).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option("--resume", help="Continue this federated run after its last completed round.")
    ] = None,
    host: Annotated[str, typer.Option("--host", help="server: the address the SuperLink listens on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option("--port", help="server: the SuperLink's port.")] = 9092,
    partition_id: Annotated[
        int | None, typer.Option("--partition-id", help="client: which partition of the training split it holds.")
    ] = None,
    server: Annotated[str | None, typer.Option("--server", help="client: the server's HOST:PORT.")] = None,
    simulation: Annotated[
        bool,
        typer.Option(
            "--simulation", help="Flower's Simulation Runtime (virtual clients in Ray workers) instead of SuperNodes."
        ),
    ] = False,
) -> None:
    """Train a recipe federated with Flower: on this machine, a SuperLink and one SuperNode process per client on
    loopback (a line per round: accuracy, loss, clients, time); `federate server RECIPE` and `federate client RECIPE
    --partition-id I --server HOST:PORT` run the same federation across machines. The final global model is an
    ordinary run (evaluate, predict, serve, export); the last line of stdout is the run directory."""
    from bigmodel import federated
    from bigmodel.config import load_recipe
    from bigmodel.tasks import get_task

    rest = list(args or [])
    mode = rest.pop(0) if rest and rest[0] in ("server", "client") else "local"
    recipe_path = rest.pop(0) if rest and "=" not in rest[0] else None
    overrides = rest
    if recipe_path is None and resume is None:
        raise UserError("bigmodel federate: give a recipe file with a federated block, or --resume RUN_DIR")
    if simulation and mode != "local":
        raise UserError(f"bigmodel federate {mode}: --simulation runs every client on this machine; leave it out")
    if mode == "client":
        if recipe_path is None or partition_id is None or server is None:
            raise UserError("bigmodel federate client: give RECIPE, --partition-id I and --server HOST:PORT")
        if overrides:
            raise UserError("bigmodel federate client: no overrides (the client's recipe must be the server's)")
        sys.exit(federated.federate_client(recipe_path, partition_id, server))
    rec = load_recipe(recipe_path, overrides) if recipe_path is not None else None
    if mode == "server":
        summary = federated.federate_server(
            rec, host=host, port=port, out=out, clients=clients, rounds=rounds, resume=resume, echo=typer.echo
        )
    else:
        summary = federated.federate(
            rec, out=out, clients=clients, rounds=rounds, resume=resume, simulation=simulation, echo=typer.echo
        )
    from bigmodel.federated.core import load_run_recipe

    ran = load_run_recipe(Path(summary["run_dir"]) / "recipe.yaml")
    f = summary["federated"]
    typer.echo(
        f"{get_task(ran.task).summary(summary['metrics'], summary['split'])}  rounds {f['rounds']}  "
        f"time {f['round_time_s']:.1f}s  sent {f['bytes_sent'] / 1e6:.1f} MB"
    )
    typer.echo(summary["run_dir"])


@app.command()
def evaluate(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory (or the recipe of a pretrained language model, as it is).")
    ],
    split: Annotated[str, typer.Option("--split", help="test, val or train.")] = "test",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    beam_size: Annotated[
        int | None, typer.Option("--beam-size", min=1, help="Translation: beam size (1 = greedy).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Translation: decode only the first N pairs.")
    ] = None,
    lm_weight: Annotated[
        float | None,
        typer.Option("--lm-weight", min=0.0, help="Speech: the character LM's weight in beam search (0 = off)."),
    ] = None,
    lm_bonus: Annotated[
        float | None, typer.Option("--lm-bonus", help="Speech: the per-character bonus in beam search with the LM.")
    ] = None,
    key_file: KeyFile = None,
) -> None:
    """Classifiers: accuracy, precision/recall/F1 and the confusion matrix. Language models: loss and perplexity.
    Translation: loss, perplexity, BLEU and chrF (sacrebleu). Speech recognition: CER and WER (greedy; with
    --beam-size, beam search, with the model's character LM when it has one)."""
    _use_key(key_file)
    from bigmodel import api

    m = api.evaluate(run_dir, split=split, beam_size=beam_size, limit=limit, lm_weight=lm_weight, lm_bonus=lm_bonus)
    if as_json:
        _echo_json(m)
        return
    if "cer" in m:  # speech recognition
        line = f"{split}: CER {m['cer']:.4f}  WER {m['wer']:.4f}  loss {m['loss']:.4f}  ({m['num_examples']} clips)"
        if "beam_cer" in m:
            lm = m.get("lm")
            with_lm = f" + LM (order {lm['order']}, weight {lm['weight']:g}, bonus {lm['bonus']:g})" if lm else ""
            line += f"\nbeam {m['beam_size']}{with_lm}: CER {m['beam_cer']:.4f}  WER {m['beam_wer']:.4f}"
            if lm:
                line += (
                    f"\nbeam {m['beam_size']} without the LM: CER {m['beam_cer_without_lm']:.4f}"
                    f"  WER {m['beam_wer_without_lm']:.4f}"
                )
        line += f"\ntrivial baseline: CER {m['baseline_cer']:.4f}  WER {m['baseline_wer']:.4f}"
        for e in m.get("examples", []):
            line += f"\n  {e['file']}\n    ref: {e['reference']}\n    hyp: {e['hypothesis']}"
        typer.echo(line)
        return
    if "perplexity" in m:
        line = (
            f"{split}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.3f}  bits/token {m['bits_per_token']:.4f}"
            f"  ({m['num_tokens']} tokens)"
        )
        if "bleu" in m:
            line += (
                f"\nBLEU {m['bleu']:.2f}  chrF {m['chrf']:.2f}  ({m['num_sentences']} sentences, beam {m['beam_size']})"
            )
        typer.echo(line)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"{split}: accuracy {m['accuracy']:.4f}  macro precision {m['macro_precision']:.4f}  "
        f"macro recall {m['macro_recall']:.4f}  macro F1 {m['macro_f1']:.4f}  ({m['num_examples']} examples)"
    )
    if "baseline" in m:
        console.print(_versus(m, m["baseline"]), highlight=False)
    t = Table("class", "precision", "recall", "f1", "support")
    for c in m["per_class"]:
        t.add_row(c["label"], _fmt(c["precision"]), _fmt(c["recall"]), _fmt(c["f1"]), str(c["support"]))
    console.print(t)
    cm = Table("true \\ pred", *[str(i) for i in range(len(m["per_class"]))], title="confusion matrix")
    for i, row in enumerate(m["confusion_matrix"]):
        cm.add_row(f"{i} {m['per_class'][i]['label']}", *[str(v) for v in row])
    console.print(cm)


# ------------------------------------------------------------------------------------------------------ predict
@app.command()
def predict(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or model artifact folder.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Image files or sequence files (.ts .npy .npz .csv); for a text model, the texts."),
    ] = None,
    lines: Annotated[
        Path | None, typer.Option("--lines", help="Text models: a UTF-8 file with one text per line.")
    ] = None,
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="How many labels per input.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    key_file: KeyFile = None,
) -> None:
    """Predict labels with a trained model: image or sequence files, or texts (arguments or --lines FILE)."""
    _use_key(key_file)
    from bigmodel import api
    from bigmodel.runs import load_artifact

    art = load_artifact(run_dir)
    items = list(inputs or [])
    if art.spec.inputs == "texts":
        texts = items + _read_lines(lines)
        if not texts:
            raise UserError("nothing to predict: give texts as arguments or --lines FILE")
        results = api.predict(run_dir, texts=texts, top_k=top_k)
    else:
        if lines is not None:
            raise UserError(f"--lines is for text models; {run_dir} is an {art.kind} model (give files)")
        if not items:
            raise UserError("nothing to predict: give one or more files")
        results = api.predict(run_dir, [Path(f) for f in items], top_k=top_k)
    if as_json:
        _echo_json({"predictions": results})
        return
    for r in results:
        typer.echo(art.spec.format_prediction(r))


# ----------------------------------------------------------------------------------------------------- generate
@app.command()
def generate(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A language-model run directory or artifact folder, or a pretrained model's recipe."),
    ],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Text to continue.")] = "",
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=0)] = 200,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1)] = None,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)] = None,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", min=0.0)] = 1.0,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="End the text at this string (repeatable).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Same seed, same text.")] = None,
    no_stream: Annotated[bool, typer.Option("--no-stream", help="Print the text once it is complete.")] = False,
    key_file: KeyFile = None,
) -> None:
    """Continue a prompt with a trained language model, streaming the text to the terminal as it is generated.
    A pretrained chat model (chat template on) prints its reply only."""
    _use_key(key_file)
    from bigmodel.runs import load_artifact

    art = load_artifact(run_dir)
    pieces = art.stream_text(
        prompt,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=stop,
        seed=seed,
    )
    from bigmodel.models.base import ModelBase

    chat = isinstance(art.model, ModelBase) and art.model.uses_chat
    head = "" if chat else prompt  # a chat reply does not continue the prompt
    if no_stream:
        typer.echo(head + "".join(pieces))
        return
    sys.stdout.write(head)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------- translate
@app.command()
def translate(
    run_dir: Annotated[Path, typer.Argument(help="A translation run directory or artifact folder.")],
    texts: Annotated[list[str] | None, typer.Argument(help="Sentences to translate.")] = None,
    lines: Annotated[Path | None, typer.Option("--lines", help="A UTF-8 file, one sentence per line.")] = None,
    beam_size: Annotated[
        int | None, typer.Option("--beam-size", min=1, help="1 = greedy (default: the model's beam_size).")
    ] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", min=1)] = None,
    length_penalty: Annotated[
        float | None, typer.Option("--length-penalty", help="Beam scores / length^α (default: the model's).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    key_file: KeyFile = None,
) -> None:
    """Translate sentences with a trained encoder-decoder (beam search); one translation per line."""
    _use_key(key_file)
    from bigmodel.runs import load_artifact

    items = list(texts or []) + _read_lines(lines)
    if not items:
        raise UserError("nothing to translate: give sentences as arguments or --lines FILE")
    art = load_artifact(run_dir)
    out = art.translate(items, beam_size=beam_size, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    if as_json:
        _echo_json({"translations": [{"source": a, "translation": b} for a, b in zip(items, out, strict=True)]})
        return
    for t in out:
        typer.echo(t)


# ----------------------------------------------------------------------------------------------------- compress
@app.command()
def compress(
    run_dir: Annotated[Path, typer.Argument(help="The trained run to compress (never modified).")],
    method: Annotated[str, typer.Option("--method", help="prune | quantize | distill")],
    out: Annotated[Path, typer.Option("--out", help="A NEW run directory for the compressed model.")],
    amount: Annotated[float, typer.Option(help="prune: fraction of channels (structured) or weights to remove.")] = 0.5,
    structured: Annotated[
        bool, typer.Option("--structured/--unstructured", help="prune: remove whole channels (cnn-small, seed-cnn).")
    ] = True,
    scope: Annotated[str, typer.Option(help="unstructured prune: global | layer.")] = "global",
    finetune_epochs: Annotated[int, typer.Option(min=0, help="prune: fine-tuning epochs afterwards.")] = 2,
    mode: Annotated[
        str, typer.Option(help="quantize: dynamic (int8 Linear/Embedding/LSTM, activations per call).")
    ] = "dynamic",
    static: Annotated[
        bool, typer.Option("--static", help="quantize: static int8 for convnets, calibrated, run by ONNX Runtime.")
    ] = False,
    calibration: Annotated[int, typer.Option(min=1, help="quantize --static: calibration images.")] = 512,
    student: Annotated[Path | None, typer.Option(help="distill: the student recipe (same data and seed).")] = None,
    temperature: Annotated[float, typer.Option(min=0.1, help="distill: softmax temperature.")] = 4.0,
    alpha: Annotated[float, typer.Option(min=0.0, max=1.0, help="distill: weight of the KD term.")] = 0.7,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Prune, quantize or distill into a new run, with a measured before/after report (size, latency, accuracy)."""
    from bigmodel.deploy.compress import compress as do_compress
    from bigmodel.deploy.compress import print_report

    if scope not in ("global", "layer"):
        raise UserError(f"--scope {scope!r}: expected global or layer")
    report = do_compress(
        run_dir,
        method,
        out,
        amount=amount,
        structured=structured,
        scope=scope,
        finetune_epochs=finetune_epochs,
        mode=mode,
        static=static,
        calibration=calibration,
        student=student,
        temperature=temperature,
        alpha=alpha,
    )
    if as_json:
        _echo_json(report)
        return
    typer.echo(print_report(report))
    typer.echo(report["output"])


# ------------------------------------------------------------------------------------------------------- export
@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (its test split is used for the parity check).")],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript | exported-program")] = "onnx",
    out: Annotated[Path, typer.Option("--out", help="A new folder for the bundle.")] = Path("export"),
    tolerance: Annotated[float, typer.Option(min=0.0, help="Max abs difference allowed vs the eager model.")] = 1e-4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    encrypt: Annotated[
        bool, typer.Option("--encrypt", help="Write OUT/model.bmenc: the run's model and recipe, AES-256-GCM.")
    ] = False,
    key_file: KeyFile = None,
    new_key: Annotated[
        Path | None, typer.Option("--new-key", help="With --encrypt: create this key file (mode 0600) and use it.")
    ] = None,
) -> None:
    """Export a model with a dynamic batch axis, run it on real test inputs, and fail if it disagrees with eager.
    With --encrypt: one AES-256-GCM encrypted file that predict, evaluate, generate, translate and serve load with
    the key."""
    if encrypt or new_key is not None:
        from bigmodel.privacy.encrypt import encrypt_run, new_key_file, read_key_file, resolve_key

        if new_key is not None:
            if key_file is not None:
                raise UserError("--new-key and --key-file: give one (a new key, or an existing one)")
            key = read_key_file(new_key_file(new_key))
        else:
            key = read_key_file(key_file) if key_file is not None else resolve_key(None, run_dir)
        from bigmodel.rundir import require_run_dir

        target = encrypt_run(require_run_dir(run_dir), out / "model.bmenc", key)
        if as_json:
            _echo_json({"format": "aes-256-gcm", "file": str(target), "key_file": str(new_key or key_file or "")})
            return
        typer.echo(f"encrypted {run_dir} → {target} (AES-256-GCM); load it with --key-file")
        typer.echo(str(target))
        return
    try:
        from bigmodel.deploy.export import export as do_export
    except ImportError as e:
        raise UserError(
            f"bigmodel export needs the deploy extra: pip install 'bigmodel[deploy]' ({e.name} missing)"
        ) from None
    report = do_export(run_dir, fmt, out, tolerance=tolerance)
    if as_json:
        _echo_json(report)
        return
    p = report["parity"]
    typer.echo(
        f"exported {report['format']} → {out / report['file']}: max abs diff {p['max_abs_diff']:.3g} on "
        f"{p['checked_inputs']} test inputs (tolerance {p['tolerance']:g}) — parity ok"
    )
    typer.echo(str(out))


# ------------------------------------------------------------------------------------------------------ explain
@app.command()
def explain(
    run_dir: Annotated[Path, typer.Argument(help="A run directory or model artifact folder.")],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(help="Image, sequence or table files; texts for a text model; prompts for a language model."),
    ] = None,
    lines: Annotated[Path | None, typer.Option("--lines", help="Text models: one text per line.")] = None,
    method: Annotated[
        str | None,
        typer.Option(
            "--method",
            "-m",
            help="saliency | integrated_gradients | gradcam | occlusion | lime | kernel_shap | activations "
            "(default: integrated_gradients; occlusion for tables and embedding bags).",
        ),
    ] = None,
    target: Annotated[
        str | None, typer.Option("--target", help="The label to explain (name or index; default: the predicted one).")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="Folder for pictures and raw attributions (default RUN/explanations).")
    ] = None,
    new_tokens: Annotated[int, typer.Option("--new-tokens", min=1, help="Language models: tokens to explain.")] = 8,
    evaluate: Annotated[
        bool, typer.Option("--evaluate", help="Measure faithfulness and sanity on a split (no inputs).")
    ] = False,
    split: Annotated[str, typer.Option("--split", help="--evaluate: test, val or train.")] = "test",
    limit: Annotated[int, typer.Option("--limit", min=1, help="--evaluate: how many examples.")] = 500,
    methods: Annotated[
        str | None, typer.Option("--methods", help="--evaluate: comma-separated methods (default: the fast ones).")
    ] = None,
    no_sanity: Annotated[bool, typer.Option("--no-sanity", help="--evaluate: skip the randomisation check.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
) -> None:
    """Explain predictions (which pixels, tokens, time steps or columns drove them), show activations, or with
    --evaluate measure how faithful the explanations are (deletion/insertion vs random, sanity, completeness)."""
    from bigmodel.artifact import artifact_dir
    from bigmodel.rundir import is_recipe_file

    try:
        import bigmodel.explain as ex
    except ImportError as e:
        raise UserError(f"explain needs the explain extra: pip install 'bigmodel[explain]' ({e.name})") from None
    if evaluate:
        if inputs or lines:
            raise UserError("--evaluate measures a split; give no inputs")
        chosen = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
        result = ex.evaluate(run_dir, split=split, limit=limit, methods=chosen, sanity=not no_sanity)
        if as_json:
            _echo_json(result)
            return
        _print_faithfulness(result)
        return
    from bigmodel.runs import load_artifact

    art = load_artifact(run_dir)
    items = list(inputs or [])
    if art.spec.inputs in ("texts", "prompt"):
        texts = items + _read_lines(lines)
        files = None
    else:
        if lines is not None:
            raise UserError(f"--lines is for text models; {run_dir} is an {art.kind} model (give files)")
        texts, files = None, [Path(f) for f in items]
    if not items and not texts:
        raise UserError("nothing to explain: give inputs (files, or texts for a text model)")
    if out is None:  # beside the run (a pretrained model's recipe: in the working directory)
        out = Path("explanations") if is_recipe_file(run_dir) else artifact_dir(run_dir).parent / "explanations"
    results = ex.explain(
        run_dir, files=files, texts=texts, method=method, target=target, out=out, new_tokens=new_tokens
    )
    if as_json:
        _echo_json({"explanations": results})
        return
    _print_explanations(results)


def _print_explanations(results: list[dict[str, Any]]) -> None:
    from rich.console import Console

    from bigmodel.explain.render import terminal_tokens

    console = Console(highlight=False, soft_wrap=True)
    for r in results:
        head = f"{r['input']}\t{r['method_name']}"
        if "target" in r:
            head += f"\tpredicted {r['prediction']['label']} {r['prediction']['score']:.4f}"
            head += f"\texplaining {r['target']['label']}"
        elif "prediction" in r:
            head += f"\tpredicted {r['prediction']['label']} {r['prediction']['score']:.4f}"
        console.print(head, markup=False)
        if "tokens" in r and r["tokens"] and isinstance(r["tokens"][0], dict):
            console.print(
                terminal_tokens([t["token"] for t in r["tokens"]], [t["score"] for t in r["tokens"]], r["method"])
            )
        if "columns" in r:
            for c in r["columns"][:10]:
                console.print(f"  {c['score']:+.4f}  {c['column']} = {c['value']}", markup=False)
        if "generated_tokens" in r:
            console.print(f"  generated: {r['generated_text']!r}", markup=False)
            ctx = r["prompt_tokens"] + r["generated_tokens"]
            for tok, row, share in zip(r["generated_tokens"], r["attributions"], r["prompt_share"], strict=True):
                line = terminal_tokens(ctx[: len(row)], row, r["method"])
                console.print(f"  → {tok!r} ({share:.0%} from the prompt): ", end="", markup=False)
                console.print(line)
        for path in r.get("files", {}).values():
            if not path.endswith(".npy"):
                console.print(f"  {path}", markup=False)


def _print_faithfulness(res: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    console.print(
        f"{res['run']}: {res['examples']} {res['split']} examples, {res['kind']} model; curves of "
        f"{res['steps']} steps; random control AUC: deletion {res['random']['deletion_auc']:.4f}, "
        f"least-relevant-first {res['random']['deletion_lerf_auc']:.4f}"
        + (f", insertion {res['random']['insertion_auc']:.4f}" if "insertion_auc" in res["random"] else ""),
        markup=False,
    )
    t = Table(
        "method",
        "deletion AUC ↓",
        "z vs random",
        "LeRF AUC ↑",
        "z vs random",
        "insertion AUC ↑",
        "faithful",
        "IG completeness ≤5%",
        "s",
    )
    for m, row in res["methods"].items():
        c = row.get("completeness")
        t.add_row(
            m,
            f"{row['deletion_auc']:.4f}",
            f"{row['vs_random']['deletion']['z']:+.1f}",
            f"{row['deletion_lerf_auc']:.4f}",
            f"{row['vs_random']['deletion_lerf']['z']:+.1f}",
            f"{row['insertion_auc']:.4f}",
            "yes" if row["faithful"] else "NO",
            f"{c['within_5_percent']}/{c['examples']}" if c else "",
            f"{row['seconds']:.1f}",
        )
    console.print(t)
    san = res.get("sanity")
    if san:
        console.print("model randomisation (mean |Spearman| trained vs randomised; < 0.5 passes):", markup=False)
        for st in san["stages"]:
            vals = "  ".join(f"{k} {v:.3f}" for k, v in st.items() if k not in ("randomised_layers", "down_to"))
            console.print(f"  {st['randomised_layers']:>3} layers (down to {st['down_to']}): {vals}", markup=False)
    comp = res.get("comprehensiveness")
    if comp:
        for m, row in comp.items():
            if isinstance(row, dict):
                console.print(
                    f"comprehensiveness {m}: top-{comp['fraction']:.0%} drop {row['top_drop']:.4f} vs random "
                    f"{row['random_drop']:.4f}; larger on {row['top_beats_random']:.0%} of texts",
                    markup=False,
                )


# -------------------------------------------------------------------------------------------------------- serve
@app.command()
def serve(
    run_dir: Annotated[
        Path, typer.Argument(help="A run directory or model artifact folder, or a pretrained language model's recipe.")
    ],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8000,
    max_batch_size: Annotated[int, typer.Option(min=1, help="Most inputs per model call (1 = no batching).")] = 32,
    max_delay_ms: Annotated[
        float, typer.Option(min=0.0, help="Longest wait for a batch to fill after its first input.")
    ] = 5.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="BIGMODEL_API_KEY", help="Require this key (X-API-Key or Bearer).")
    ] = None,
    max_new_tokens: Annotated[
        int, typer.Option("--max-new-tokens", min=1, help="Language models: the most tokens one request may ask for.")
    ] = 1024,
    key_file: KeyFile = None,
) -> None:
    """Serve a model over HTTP: POST /v1/predict (dynamic batching), /v1/generate (language models, streaming),
    /v1/translate (translation models), /healthz, /metrics, /docs, a page at /."""
    _use_key(key_file)
    try:
        from bigmodel.serving.server import serve as run_server
    except ImportError as e:
        raise UserError(
            f"bigmodel serve needs the deploy extra: pip install 'bigmodel[deploy]' ({e.name} missing)"
        ) from None
    from bigmodel.runs import load_artifact

    art = load_artifact(run_dir)  # a bad path fails here, in one line, before the server starts
    typer.echo(f"serving {run_dir} on http://{host}:{port}  (docs: /docs, page: /)", err=True)
    run_server(art, host, port, max_batch_size, max_delay_ms, api_key, max_new_tokens=max_new_tokens)


# -------------------------------------------------------------------------------------------------------- audit
@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A classifier's run directory (or its encrypted export).")],
    membership: Annotated[
        bool, typer.Option("--membership", help="A loss-threshold membership-inference attack on the model.")
    ] = False,
    split: Annotated[str, typer.Option("--split", help="The non-members: test or val.")] = "test",
    canary: Annotated[
        str | None, typer.Option("--canary", help="Language models: a secret planted in the training text.")
    ] = None,
    prefix: Annotated[str | None, typer.Option("--prefix", help="The text the canary followed.")] = None,
    candidates: Annotated[int, typer.Option("--candidates", help="Random values the canary is ranked among.")] = 1000,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    key_file: KeyFile = None,
) -> None:
    """Measure what a trained model leaks about its training data: membership inference (ROC AUC, TPR at 1% FPR) for
    classifiers, a canary's reproduction and exposure for language models."""
    _use_key(key_file)
    if canary is not None:
        from bigmodel.privacy.audit import canary as run_canary

        c = run_canary(run_dir, canary, prefix or "", candidates)
        if as_json:
            _echo_json(c)
            return
        typer.echo(
            f"canary: {'REPRODUCED' if c['reproduced'] else 'not reproduced'} by greedy decoding "
            f"(it wrote {c['greedy']!r}); exposure {c['exposure']:.2f} of {c['max_exposure']:.2f} bits "
            f"(rank {c['rank']} among {c['candidates'] + 1})"
        )
        return
    if not membership:
        raise UserError("bigmodel audit: choose an audit (--membership, or --canary SECRET --prefix TEXT)")
    from bigmodel.privacy.audit import membership as run_membership

    r = run_membership(run_dir, split)
    if as_json:
        _echo_json(r)
        return
    typer.echo(
        f"membership inference (loss threshold), {r['members']} train vs {r['non_members']} {split} examples: "
        f"AUC {r['auc']:.3f}, TPR {r['tpr_at_1pct_fpr']:.3f} at 1% FPR "
        f"(mean loss {r['member_loss_mean']:.4f} members, {r['non_member_loss_mean']:.4f} non-members)"
    )
    p = r["privacy"]
    typer.echo(f"trained with DP-SGD: ε {p['epsilon']:.3f}, δ {p['delta']:g}" if p else "trained without DP")


# ------------------------------------------------------------------------------------------------------- report
@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="One run directory, or several to compare.")],
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="The HTML file (default RUN/report.html for one run).")
    ] = None,
    split: Annotated[
        str | None, typer.Option("--split", help="test, val or train (default: the run's final evaluation split).")
    ] = None,
    no_inference: Annotated[
        bool,
        typer.Option("--no-inference", help="From the run's files only: no calibration or highest-loss examples."),
    ] = False,
    top_losses: Annotated[
        int, typer.Option("--top-losses", min=0, help="Examples in the worst-examples gallery.")
    ] = 12,
) -> None:
    """One self-contained HTML page: overview, learning curves, the task's sections (confusion, calibration,
    worst examples; samples; translations), privacy and compression; several runs are compared. Opens offline."""
    from bigmodel.report import write_report

    out, rep = write_report(runs, output, inference=not no_inference, split=split, top_losses=top_losses)
    size = out.stat().st_size
    typer.echo(f"report: {out} ({size / 1024:.0f} KiB, {rep.timings['total_s']:.1f} s)", err=True)
    typer.echo(str(out))


# --------------------------------------------------------------------------------------------------------- runs
@runs_app.command("list")
def runs_list(as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """All runs in the index with their final metrics."""
    from bigmodel.runs import RunIndex

    rows = RunIndex().list()
    if as_json:
        _echo_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table("run", "model", "data", "seed", "status", "test acc", "train s", "created")
    for r in rows:
        acc = r["metrics"].get("test_accuracy")
        t.add_row(
            r["run_dir"],
            r["model"],
            r["data"],
            str(r["seed"]),
            r["status"],
            _fmt(acc) if acc is not None else "",
            _fmt(r["train_time_s"]) if r["train_time_s"] is not None else "",
            r["created"],
        )
    Console(width=200).print(t)


@runs_app.command("show")
def runs_show(run: Annotated[str, typer.Argument(help="Run directory or name.")]) -> None:
    """One run: its index entry and summary."""
    from bigmodel.runs import RunIndex

    r = RunIndex().get(run)
    summary = Path(r["run_dir"]) / "summary.json"
    if summary.is_file():
        r["summary"] = json.loads(summary.read_text(encoding="utf-8"))
    _echo_json(r)


@runs_app.command("compare")
def runs_compare(runs: Annotated[list[str], typer.Argument(help="Two or more runs.")]) -> None:
    """Final metrics of several runs side by side."""
    from rich.console import Console
    from rich.table import Table

    from bigmodel.runs import RunIndex

    idx = RunIndex()
    rows = [idx.get(r) for r in runs]
    keys = sorted({k for r in rows for k in r["metrics"]})
    t = Table("metric", *[Path(r["run_dir"]).name for r in rows])
    for field in ("model", "data", "seed", "status", "train_time_s"):
        t.add_row(field, *[_fmt(r[field]) for r in rows])
    for k in keys:
        t.add_row(k, *[_fmt(r["metrics"].get(k, "")) for r in rows])
    Console(width=200).print(t)


@runs_app.command("export")
def runs_export(
    run: Annotated[Path, typer.Argument(help="A run directory.")],
    to: Annotated[str, typer.Option("--to", help="mlflow | tensorboard")],
    uri: Annotated[
        str | None,
        typer.Option("--uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite beside the run)."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", help="TensorBoard: the log folder (default RUN/tensorboard).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Send a finished run's metrics log to MLflow or TensorBoard (the `track` extra)."""
    from bigmodel.training.tracking import export_run

    if to not in ("mlflow", "tensorboard"):
        raise UserError(f"--to {to!r}: expected mlflow or tensorboard")
    from bigmodel.training.tracking import require

    require([to])
    res = export_run(run, to, uri=uri, out=out)
    if as_json:
        _echo_json(res)
        return
    typer.echo(f"exported {res['points']} points ({res['records']} records) of {run} to {to}: {res['where']}")


# ------------------------------------------------------------------------------------------------------- recipe
@recipe_app.command("validate")
def recipe_validate(
    file: Annotated[Path, typer.Argument(help="Recipe YAML.")],
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides.")] = None,
    show: Annotated[bool, typer.Option("--show", help="Print the resolved recipe.")] = False,
) -> None:
    """Check a recipe; print 'ok' or one line naming what is wrong."""
    import yaml

    from bigmodel.config import load_recipe

    r = load_recipe(file, list(overrides or []))
    if show:
        typer.echo(yaml.safe_dump(r.to_dict(), sort_keys=False), nl=False)
    source = r.data.source if r.data is not None else "no data block"
    typer.echo(f"{file}: ok ({r.task}, {source}, {r.model.name})")


@recipe_app.command("schema")
def recipe_schema() -> None:
    """The recipe's JSON Schema."""
    from bigmodel.config import recipe_json_schema

    _echo_json(recipe_json_schema())


@recipe_app.command("models")
def recipe_models() -> None:
    """The registered models: name, tasks, declared capabilities, description (tab-separated)."""
    from bigmodel.registry import get_model, model_names

    for name in model_names():
        e = get_model(name)
        typer.echo(f"{name}\t{', '.join(e.tasks)}\t{', '.join(sorted(e.capabilities))}\t{e.description}")


# --------------------------------------------------------------------------------------------------------- data
@data_app.command("scan")
def data_scan(
    file: Annotated[Path, typer.Argument(help="A text file (one text per line), or CSV / TSV / JSONL.")],
    types: Annotated[
        str | None,
        typer.Option("--types", help="Comma-separated PII types (default: every type that needs no NER model)."),
    ] = None,
    column: Annotated[str, typer.Option("--column", help="CSV/TSV column or JSONL key holding the text.")] = "text",
    encoding: Annotated[str, typer.Option("--encoding")] = "utf-8",
    pii_model: Annotated[
        Path | None, typer.Option("--pii-model", help="A spaCy pipeline folder (person, location, organization).")
    ] = None,
    examples: Annotated[int, typer.Option("--examples", help="Texts with PII to show, masked.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
) -> None:
    """Report what PII a text file holds (counts per type, examples shown masked) without training on it."""
    from bigmodel.privacy.pii import PATTERN_TYPES, read_texts, scan

    chosen = [t.strip() for t in types.split(",") if t.strip()] if types else list(PATTERN_TYPES)
    r = scan(read_texts(file, column, encoding), chosen, pii_model, max(0, examples))
    if as_json:
        _echo_json({"file": str(file), **r})
        return
    typer.echo(f"{file}: {r['texts_with_pii']} of {r['texts']} texts hold PII")
    for t, n in r["counts"].items():
        typer.echo(f"  {t:<12} {n}")
    for e in r["examples"]:
        typer.echo(f"  e.g. {e}")


@data_app.command("prepare")
def data_prepare(
    recipe_path: Annotated[
        Path,
        typer.Argument(metavar="RECIPE", help="An image, text or audio classification, or a language_modeling recipe."),
    ],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    out: Annotated[Path, typer.Option("--out", help="The folder to write (must not exist, or be empty).")] = Path(
        "data/shards"
    ),
    shard_size: Annotated[int, typer.Option("--shard-size", min=1, help="Images per shard file.")] = 10_000,
) -> None:
    """Write the recipe's data (its train / val / test splits, carved with its seed) as shards on disk: images as
    uint8 arrays, labelled texts and a language model's text as token ids with their tokenizer, audio decoded to
    float32 samples with its feature statistics (and transcripts, for speech recognition). Train on them with
    `data.source=shards data.path=OUT`; data larger than `data.in_memory_limit_mb` is then read from disk a batch at a
    time."""
    from bigmodel.api import prepare_shards
    from bigmodel.config import load_recipe
    from bigmodel.tasks import get_task

    recipe = load_recipe(recipe_path, overrides or [])
    sizes = get_task(recipe.task).prepared_summary(prepare_shards(recipe, out, shard_size))
    typer.echo(f"{out}: {sizes}; train with data.source=shards data.path={out}", err=True)
    typer.echo(str(out))


# --------------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    try:
        rc = app(args=argv, standalone_mode=False)
        # typer turns a KeyboardInterrupt into Exit(130), which without standalone mode comes back as the return value
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            if rc == 130:
                print("interrupted", file=sys.stderr)
            sys.exit(rc)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click's own usage errors (typer >= 0.29 raises those of its vendored copy of click)
        if callable(getattr(e, "show", None)) and isinstance(getattr(e, "exit_code", None), int):
            e.show()
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            sys.exit(1)
        raise
