"""``napari-gradcam``: explain CT volumes from the command line, on one machine or a cluster.

    napari-gradcam sample ct scan.tif                       # a synthetic CT volume to try
    napari-gradcam models                                   # the demo models
    napari-gradcam models ct-patch-classifier               # its feature layers
    napari-gradcam explain scan.tif --model ct-patch-classifier --out maps.zarr
    napari-gradcam explain scan.tif --model my_card.yaml --mode slices --workers 4 --out m.zarr
    napari-gradcam explain scan.tif --model my_card.yaml --uncertainty flips,shifts --out m.zarr
                                                            # + m_uncertainty.zarr (std map)
    napari maps.zarr                                        # opens with the right scale

Exit codes: 0 done, 1 failure (e.g. a full disk), 2 bad usage or input (one line on stderr,
no traceback), 130 cancelled (Ctrl-C or SIGTERM stop the run at the next batch, a second one
at once; the partial output is removed either way).

Adding a subcommand: write ``def add_x(subparsers)`` that calls ``subparsers.add_parser(...)``
and ``parser.set_defaults(handler=function)`` where ``function(args) -> int``, decorate it
with :func:`register_command` (or list its module in :data:`COMMAND_MODULES`); the handler's
exceptions are mapped to exit codes here, so handlers just raise.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

Registrar = Callable[[Any], None]
_REGISTRARS: list[Registrar] = []

#: Modules imported when the parser is built, so that they can register subcommands (a module
#: that is missing is skipped: commands can live in optional parts of the package).
COMMAND_MODULES: tuple[str, ...] = ("napari_gradcam.cli_evidence",)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130
USAGE_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError,
                IsADirectoryError, KeyError, PermissionError)


def register_command(registrar: Registrar) -> Registrar:
    """Decorator: ``registrar(subparsers)`` adds one subcommand to ``napari-gradcam``."""
    if registrar not in _REGISTRARS:
        _REGISTRARS.append(registrar)
    return registrar


class UsageError(ValueError):
    """Bad command-line input found after parsing (exit code 2)."""


# --------------------------------------------------------------------------- progress


class ProgressBar:
    """``[#####     ] 12/64`` redrawn in place on a terminal; plain lines every 10 % (or 30 s)
    otherwise, so logs of batch jobs stay readable."""

    def __init__(self, label: str, stream: TextIO | None = None, width: int = 30) -> None:
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.started = time.perf_counter()
        self._last_line = -1.0
        self._last_fraction = -1.0

    def __call__(self, done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        elapsed = time.perf_counter() - self.started
        if self.tty:
            filled = round(self.width * fraction)
            bar = "#" * filled + " " * (self.width - filled)
            end = "\n" if done >= total else ""
            self.stream.write(f"\r{self.label} [{bar}] {done}/{total} {elapsed:6.1f} s{end}")
            self.stream.flush()
            return
        if done >= total or fraction - self._last_fraction >= 0.1 or (
                elapsed - self._last_line >= 30):
            self.stream.write(f"{self.label}: {done}/{total} ({100 * fraction:.0f} %) "
                              f"{elapsed:.1f} s\n")
            self.stream.flush()
            self._last_fraction, self._last_line = fraction, elapsed


# --------------------------------------------------------------------------- explain


@register_command
def add_explain(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "explain", help="explain a volume file and write the heatmap volume",
        description="Explain a 3D volume (TIFF, zarr, OME-Zarr or .npy) with a model and "
        "write the Grad-CAM volume with its voxel size and provenance (OME-Zarr recommended).")
    parser.add_argument("input", help="volume file: .tif/.tiff, .zarr/.ome.zarr or .npy")
    parser.add_argument("--model", required=True, metavar="NAME|CARD",
                        help="a demo model name (see 'napari-gradcam models') or a model card "
                        ".yaml")
    parser.add_argument("--layer", help="layer to explain (default: the card's target layer)")
    parser.add_argument("--method", default="gradcam", metavar="METHOD",
                        help=f"one of: {', '.join(method_names())} (default gradcam)")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--target", default="predicted", metavar="predicted|INDEX|CLASS",
                      help="class to explain (default: the predicted class of each slice or "
                      "window)")
    what.add_argument("--regression", nargs="?", type=int, const=SINGLE_VALUE, metavar="INDEX",
                      help="explain a regression head's prediction instead of a class: the "
                      "predicted property number INDEX of an (N, P) output, or the only one "
                      "(no INDEX) of an (N,) or (N, 1) output")
    parser.add_argument("--sign", type=int, choices=(1, -1), metavar="{+1,-1}",
                        help="with --regression: +1 (default) what increases the prediction, "
                        "-1 what decreases it")
    parser.add_argument("--output", type=output_spec, metavar="INDEX|KEY",
                        help="which output to explain when the model returns a tuple or dict "
                        "(an index, or a key such as logits)")
    parser.add_argument("--patch-grid", type=int, nargs="+", metavar="N",
                        help="transformer layers: the grid of patch tokens, one number per "
                        "spatial axis of the model's input (default: derived from the model)")
    parser.add_argument("--class-token", action=argparse.BooleanOptionalAction, default=None,
                        help="transformer layers: whether a class token precedes the patch "
                        "tokens (default: derived from the model)")
    parser.add_argument("--mode", choices=("slices", "volume"),
                        help="slices: a 2D model slice by slice; volume: a 3D model over "
                        "overlapping windows (default: from the model)")
    parser.add_argument("--axis", type=int, default=0, help="slice axis (slices mode)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="slices or windows per forward pass")
    parser.add_argument("--window", type=int, nargs=3, metavar=("Z", "Y", "X"),
                        help="window size (volume mode; default: the model's input size)")
    parser.add_argument("--overlap", type=float, default=0.25,
                        help="window overlap fraction (volume mode)")
    parser.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")
    parser.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                        help="output precision (float16 halves the file size)")
    parser.add_argument("--chunk", type=int,
                        help="planes per task and per output chunk (default: automatic)")
    parser.add_argument("--out", required=True, metavar="OUT.zarr",
                        help="output: .zarr (OME-Zarr), .tif or .npy")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("--trust", action="store_true",
                        help="allow model files that run code or read outside their folder "
                        "(pickled models, custom architectures, bioimage.io network files, .pt2 "
                        "with pickled objects); only for files you trust")
    parser.add_argument("--uncertainty", type=source_list, default=(),
                        metavar="flips,shifts,dropout[,windows]",
                        help="also write OUT_uncertainty (e.g. maps_uncertainty.zarr): the "
                        "per-voxel standard deviation of the map when the input is mirrored "
                        "(flips), moved by 1-2 pixels (shifts), explained with Monte-Carlo "
                        "dropout (dropout) and, in volume mode, between overlapping windows "
                        "(windows, always included in volume mode)")
    parser.add_argument("--n-dropout", type=int, default=8, metavar="N",
                        help="Monte-Carlo dropout samples for --uncertainty dropout (default 8)")
    parser.add_argument("--no-domain-check", action="store_true",
                        help="skip comparing the input with the model card's training "
                        "statistics (by default a warning says when the input looks unlike "
                        "the training data; the report is kept in the output's provenance)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N",
                       help="run on a local dask cluster of N worker processes")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="run on an existing dask cluster, e.g. tcp://head:8786")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    parser.set_defaults(handler=run_explain)


#: ``--regression`` without an index: the model predicts one value per sample.
SINGLE_VALUE = "single"


def method_names() -> list[str]:
    """Every method the core knows, from its registry (what ``--method`` accepts)."""
    from napari_gradcam.core.methods import METHODS

    return list(METHODS)


def output_spec(text: str) -> int | str:
    """``--output``: an integer is an index into a tuple, anything else a key of a dict."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("give an index (0, 1, ...) or a key (e.g. logits)")
    try:
        return int(text)
    except ValueError:
        return text


def source_list(text: str) -> tuple[str, ...]:
    """``--uncertainty flips,shifts``: the names, lower case, in order, without repeats."""
    names = [part.strip().lower() for part in text.split(",") if part.strip()]
    if not names:
        raise argparse.ArgumentTypeError("name at least one source: flips, shifts, dropout "
                                         "or windows")
    return tuple(dict.fromkeys(names))


def explain_target(args: argparse.Namespace) -> Any:
    """``--target`` as given, or a regression target from ``--regression``/``--sign``."""
    if args.regression is None:
        if args.sign is not None:
            raise UsageError("--sign only applies to --regression (which side of a regression "
                             "head's prediction to explain)")
        return args.target
    from napari_gradcam.core.targets import RegressionTarget

    index = None if args.regression == SINGLE_VALUE else args.regression
    return RegressionTarget(output_index=index, sign=args.sign or 1)


def run_explain(args: argparse.Namespace) -> int:
    from napari_gradcam.core.methods import canonical_name
    from napari_gradcam.distributed import ExplainOptions, explain_file, run_distributed

    options = ExplainOptions(
        method=canonical_name(args.method), layer=args.layer, target=explain_target(args),
        mode=args.mode, axis=args.axis, batch_size=args.batch_size,
        window=tuple(args.window) if args.window else None, overlap=args.overlap,
        device=args.device, dtype=args.dtype, trust=args.trust, chunk=args.chunk,
        output=args.output, patch_grid=tuple(args.patch_grid) if args.patch_grid else None,
        class_token=args.class_token, uncertainty=args.uncertainty, n_dropout=args.n_dropout,
        domain_check=not args.no_domain_check,
    )
    distributed = args.workers is not None or args.scheduler is not None
    label = "explain (chunks)" if distributed else "explain"
    progress = None if args.quiet else ProgressBar(label)

    def notify(message: str) -> None:  # retries, leftovers, the domain check: on stderr
        print(f"napari-gradcam: {message}", file=sys.stderr, flush=True)

    if distributed:
        summary = run_distributed(args.input, args.model, args.out, options=options,
                                  overwrite=args.overwrite, workers=args.workers,
                                  scheduler_address=args.scheduler, progress=progress,
                                  should_stop=getattr(args, "should_stop", None), notify=notify)
    else:
        summary = explain_file(args.input, args.model, args.out, options=options,
                               overwrite=args.overwrite, progress=progress,
                               should_stop=getattr(args, "should_stop", None), notify=notify)
    if not args.quiet:
        print(summary.describe())
    return EXIT_OK


# --------------------------------------------------------------------------- models


@register_command
def add_models(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models", help="list the demo models, or one model's feature layers",
        description="Without an argument: the demo models. With a name or card: the layers "
        "whose output is a feature map (what --layer accepts), with their output shapes.")
    parser.add_argument("model", nargs="?", metavar="NAME|CARD")
    parser.add_argument("--trust", action="store_true",
                        help="allow model files that run code or read outside their folder "
                        "(pickled models, custom architectures, bioimage.io network files, .pt2 "
                        "with pickled objects); only for files you trust")
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    from napari_gradcam.core.models import list_demo_models, load_model

    if args.model is None:
        cards = list_demo_models()
        if not cards:
            print("no demo models are installed; give a model card: napari-gradcam models "
                  "CARD.yaml")
            return EXIT_OK
        rows = [("name", "dims", "task", "classes", "default layer")]
        rows += [(c.name, f"{c.spatial_dims}D", c.task, ", ".join(c.class_names),
                  c.target_layer or "(auto)") for c in cards]
        _print_table(rows)
        return EXIT_OK
    loaded = load_model(args.model, trust=args.trust, device="cpu")
    card = loaded.card
    size = card.input_size or "64 per axis"
    print(f"{card.name}: {card.spatial_dims}D {card.task}, {card.in_channels} input "
          f"channel(s), classes: {', '.join(card.class_names)}")
    if card.description:
        print(card.description)
    print(f"feature-map layers (output shape C x spatial for an input of {size}); "
          "* = default:")
    rows = [("", "layer", "type", "output shape")]
    for layer in loaded.feature_layers:
        mark = "*" if layer.name == card.target_layer else ""
        shape = " x ".join(str(s) for s in layer.output_shape)
        calls = "" if layer.calls == 1 else f" (runs {layer.calls}x)"
        rows.append((mark, layer.name, layer.type_name + calls, shape))
    _print_table(rows)
    return EXIT_OK


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths,
                                                                      strict=True)).rstrip())


# --------------------------------------------------------------------------- sample


@register_command
def add_sample(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "sample", help="write a synthetic sample volume (to try the other commands)",
        description="Write a synthetic X-ray CT volume (cylindrical specimen with pores, a "
        "fatigue crack and reconstruction artefacts) as an ImageJ TIFF with its voxel size.")
    parser.add_argument("name", choices=("ct",), help="ct: X-ray CT volume (uint16)")
    parser.add_argument("out", metavar="OUT.tif")
    parser.add_argument("--shape", type=int, nargs=3, default=(128, 128, 128),
                        metavar=("Z", "Y", "X"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labels", metavar="LABELS.tif",
                        help="also write the ground-truth labels (1 pore, 2 crack)")
    parser.add_argument("--overwrite", action="store_true")
    parser.set_defaults(handler=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from napari_gradcam.io import check_output_path, output_kind, write_tiff_volume
    from napari_gradcam.samples.ct_volume import make_ct_volume

    if args.labels and Path(args.labels).expanduser().resolve() == Path(
            args.out).expanduser().resolve():
        raise UsageError(f"--labels {args.labels} is the volume's own output; give it another "
                         "name")
    for path in filter(None, (args.out, args.labels)):
        if output_kind(path) != "tiff":
            raise UsageError(f"sample volumes are written as TIFF; name the file *.tif, not "
                             f"{path!r}")
        check_output_path(path, args.overwrite)
    sample = make_ct_volume(tuple(args.shape), seed=args.seed)
    write_tiff_volume(args.out, sample.volume, scale=sample.scale, unit="micrometer",
                      overwrite=args.overwrite)
    print(f"wrote {args.out}: {sample.volume.shape} {sample.volume.dtype}, voxel size "
          f"{sample.scale} micrometer")
    if args.labels:
        write_tiff_volume(args.labels, sample.labels, scale=sample.scale, unit="micrometer",
                          overwrite=args.overwrite)
        print(f"wrote {args.labels}: labels 1 pore, 2 crack")
    return EXIT_OK


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The full parser, with every registered subcommand."""
    from napari_gradcam import __version__

    for module in COMMAND_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module:  # the module exists but something it needs is missing
                raise
    parser = argparse.ArgumentParser(
        prog="napari-gradcam",
        description="Grad-CAM for materials-science CNNs, headless: explain volumes, list "
        "models, write samples.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for registrar in _REGISTRARS:
        registrar(subparsers)
    return parser


class StopRequest:
    """Ctrl-C or SIGTERM asks the run to stop at the next batch (or chunk) boundary, where no
    write is in flight, so the partial output can be removed cleanly; a second signal aborts
    at once. Calling it returns True once asked, so it serves as ``should_stop``."""

    def __init__(self) -> None:
        self.requested = False
        self.aborted = False

    def __call__(self) -> bool:
        return self.requested

    def _handle(self, signum: int, frame: object) -> None:
        if self.aborted:  # already unwinding: further signals change nothing
            return
        if self.requested:
            self.aborted = True
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.requested = True
        print("\nnapari-gradcam: stopping after the current batch (again to abort now)",
              file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        signals = (signal.SIGINT, signal.SIGTERM)
        try:
            previous = [signal.signal(number, self._handle) for number in signals]
        except ValueError:  # not the main thread: leave signals alone
            yield self
            return
        try:
            yield self
        finally:
            for number, handler in zip(signals, previous, strict=True):
                signal.signal(number, handler)


def _error(message: str) -> None:
    print(f"napari-gradcam: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or argparse's own usage errors
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else EXIT_USAGE
    from napari_gradcam.core.run.job import JobError
    from napari_gradcam.core.volume import Cancelled
    from napari_gradcam.io import OutputError

    try:
        with StopRequest().installed() as stop:
            args.should_stop = stop
            return int(args.handler(args))
    except (KeyboardInterrupt, Cancelled):
        print("\nnapari-gradcam: cancelled; no output was written", file=sys.stderr)
        return EXIT_CANCELLED
    except OutputError as error:  # disk full, folder not writable: the message says it all
        if args.debug:
            raise
        _error(str(error))
        return EXIT_FAILURE
    except JobError as error:  # the job's words; bad input (a model option, data) is usage
        if args.debug:
            raise
        _error(str(error))
        return EXIT_USAGE if isinstance(error.__cause__, USAGE_ERRORS) else EXIT_FAILURE
    except USAGE_ERRORS as error:
        if args.debug:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
        _error(str(message))
        return EXIT_USAGE
    except Exception as error:
        if args.debug:
            raise
        _error(f"{type(error).__name__}: {error} (run with --debug for the traceback)")
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
