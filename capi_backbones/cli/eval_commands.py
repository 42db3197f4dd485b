"""``capi-backbones eval classify|segment``: the paper's frozen-feature probes on a dataset folder."""

import argparse
import logging
import math
import sys
from dataclasses import replace

from capi_backbones.cli.errors import USER_ERRORS, CliError
from capi_backbones.cli.model_options import add_model_options, build_extractor
from capi_backbones.constants import CLI_DECODE_WORKERS
from capi_backbones.evals.defaults import (  # no torch
    ATTENTION_HEAD_DIM,
    CLASSIFIERS,
    DEFAULT_IGNORE_LABELS,
    DEFAULT_KNN_DTYPE,
    DEFAULT_KNN_KS,
    DEFAULT_PROBE_DTYPE,
    DEFAULT_PROBE_SEED,
    DEFAULT_SEGMENTATION_KS,
    DISTANCES,
    KNN_DTYPES,
    KNN_TEMPERATURE,
    LR_REFERENCE_BATCH,
    N_PICTURES,
    OFFICIAL_BATCH_SIZE,
    OFFICIAL_ITERATIONS,
    OFFICIAL_LEARNING_RATES,
    OFFICIAL_WEIGHT_DECAYS,
    PROBE_DTYPES,
    PROBES,
    SELECTION_FRACTION,
    TEST_FRACTION,
)
from capi_backbones.evals.representations import DEFAULT_REPRESENTATIONS  # no torch

__all__ = ["register"]

logger = logging.getLogger(__name__)

FAST_ITERATIONS, FAST_BATCH_SIZE = 1_250, 256  # --fast: 40x fewer images seen than the official 12,500 x 1024


def check_classify_arguments(args: argparse.Namespace) -> None:
    """classify's own checks, run by ``main`` before torch is imported: the representation names and the numbers."""
    from capi_backbones.evals.representations import REPRESENTATIONS  # no torch

    unknown = [name for name in args.representations if name not in REPRESENTATIONS]
    if unknown:
        raise CliError(f"--representations {','.join(unknown)}: unknown; choose from {', '.join(REPRESENTATIONS)}.")
    if min(args.knn_k) < 1 or args.head_dim < 1 or (args.probe_micro_batch or 1) < 1:
        raise CliError("--knn-k, --head-dim and --probe-micro-batch must be positive.")
    for flag, values, low in (("--learning-rates", args.learning_rates, "above 0"), ("--weight-decays",
                              args.weight_decays, "0 or more")):  # fmt: skip
        bad = [v for v in values or () if not (math.isfinite(v) and (v > 0 if low == "above 0" else v >= 0))]
        if bad:
            raise CliError(f"{flag} must be finite numbers {low}, got {bad[0]}; e.g. {flag} 0.001,0.01.")


def _listed(values) -> str:
    """Option values as the command line writes them: comma-separated."""
    return ",".join(map(str, values))


def _csv(kind):
    def parse(text: str) -> tuple:
        try:
            values = tuple(kind(part) for part in text.split(",") if part.strip())
        except ValueError as error:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {kind.__name__} values, got '{text}'"
            ) from error
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", metavar="DATA", help="dataset folder (layouts: see the description)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: cached features, checkpoints, "
                        "results.json (created; a rerun reuses what is there)")  # fmt: skip
    add_model_options(parser, image_size_note="; the evaluation resolution (a square)")
    parser.add_argument("--workers", type=int, default=CLI_DECODE_WORKERS,
                        help="image decoding processes (default %(default)s; 0: none)")  # fmt: skip
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def register(subparsers) -> None:
    """Add ``eval`` and its subcommands to ``subparsers``."""
    parser = subparsers.add_parser("eval", help="evaluate frozen features with the paper's probes",
                                   description="Frozen-feature evaluation protocols of the CAPI paper.")  # fmt: skip
    protocols = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    classify = protocols.add_parser(
        "classify",
        help="k-NN, linear and attentive probes on an ImageFolder dataset",
        description=(
            "Classification probes on frozen features. DATA is DATA/train/<class>/* with DATA/test (else DATA/val) "
            f"to report on, or DATA/<class>/* (a seeded {TEST_FRACTION:.0%} is test). Hyper-parameters are chosen on "
            f"DATA/val when DATA has train, val and test, else on a seeded {SELECTION_FRACTION:.0%} of train. Features "
            "are center crops (resize to "
            "256/224 of --image-size, crop), cached in --out; probes train on them, or with --augment on "
            "RandomResizedCrop + flip through the backbone. Probes: k-NN (cosine, "
            f"exp(sim/{KNN_TEMPERATURE}) votes), a grid of "
            "linear probes and attentive probes (lr x wd, AdamW, warmup + cosine), all in one run, checkpointed. "
            f"The defaults are the official protocol ({OFFICIAL_ITERATIONS:,} steps of a global batch of "
            f"{OFFICIAL_BATCH_SIZE}, lr x {OFFICIAL_BATCH_SIZE}/{LR_REFERENCE_BATCH}); --fast "
            "is a quick CPU setting whose results say they are not the official protocol. results.json and "
            "results.png (validation top-1 over the lr x wd grid, test top-1 per probe) are written to --out."
        ),
    )
    _common(classify)
    classify.add_argument("--probes", type=_csv(str), default=PROBES,
                          help=f"comma-separated: {_listed(PROBES)} (default all)")  # fmt: skip
    classify.add_argument("--representations", type=_csv(str),
                          default=DEFAULT_REPRESENTATIONS,
                          help="comma-separated: pooled, avg_patch, pooled+avg_patch (k-NN, linear), patch, registers "
                          "(attentive); default all")  # fmt: skip
    length = classify.add_mutually_exclusive_group()
    length.add_argument(
        "--iters", type=int, default=None, help=f"probe training steps (default {OFFICIAL_ITERATIONS}, official)"
    )
    length.add_argument("--epochs", type=float, default=None, help="probe training length in passes over train")
    classify.add_argument("--probe-batch-size", type=int, default=None,
                          help=f"global probe batch (default {OFFICIAL_BATCH_SIZE}, official; lr x "
                          f"batch/{LR_REFERENCE_BATCH})")  # fmt: skip
    classify.add_argument("--probe-micro-batch", type=int, default=None,
                          help="compute each probe batch in pieces of this size (same steps, less memory)")  # fmt: skip
    classify.add_argument("--probe-dtype", choices=(*PROBE_DTYPES, "auto"), default=DEFAULT_PROBE_DTYPE,
                          help="probe training precision (default %(default)s, official; bfloat16 autocast is "
                          "faster on CPUs and GPUs with native bf16, NOT the official protocol; auto: bfloat16 where "
                          "the device has native bf16, else float32)")  # fmt: skip
    classify.add_argument("--fast", action="store_true",
                          help=f"quick CPU setting, NOT the official protocol: {FAST_ITERATIONS} steps of batch "
                          f"{FAST_BATCH_SIZE} (--iters/--epochs/--probe-batch-size still override)")  # fmt: skip
    classify.add_argument(
        "--learning-rates",
        type=_csv(float),
        default=None,
        help=f"lr grid (default: official {len(OFFICIAL_LEARNING_RATES)})",
    )
    classify.add_argument(
        "--weight-decays",
        type=_csv(float),
        default=None,
        help=f"wd grid (default: official {len(OFFICIAL_WEIGHT_DECAYS)})",
    )
    classify.add_argument(
        "--knn-k", type=_csv(int), default=DEFAULT_KNN_KS, help=f"k-NN neighbours (default {_listed(DEFAULT_KNN_KS)})"
    )
    classify.add_argument(
        "--head-dim", type=int, default=ATTENTION_HEAD_DIM, help="attentive probe head size (default %(default)s)"
    )
    classify.add_argument("--augment", action="store_true", help="train probes on augmented images (slow on CPU)")
    classify.add_argument(
        "--seed", type=int, default=DEFAULT_PROBE_SEED, help="probe initialisation and data order (default %(default)s)"
    )
    classify.set_defaults(handler=run_classify, check=check_classify_arguments)

    segment = protocols.add_parser(
        "segment",
        help="k-NN and logistic-regression segmentation from patch features",
        description=(
            "Semantic segmentation from frozen patch features. DATA is DATA/{train,val,test}/{images,masks} (test, "
            f"else val, is reported on) or DATA/{{images,masks}} (a seeded {TEST_FRACTION:.0%} is test); masks are PNG "
            "label maps "
            "with the images' names. Images are resized to --image-size squared (bicubic), masks with nearest. "
            "k-NN (cosine and L2 on standardised features) and logistic regression on each patch's labels, "
            "hyper-parameters chosen on val or the official 10% of train; mIoU and pixel accuracy on test, as the "
            "official evaluation computes them."
        ),
    )
    _common(segment)
    segment.add_argument(
        "--classifiers", type=_csv(str), default=CLASSIFIERS, help=f"{_listed(CLASSIFIERS)} (default all)"
    )
    segment.add_argument(
        "--ks",
        type=_csv(int),
        default=DEFAULT_SEGMENTATION_KS,
        help=f"k-NN grid (default {_listed(DEFAULT_SEGMENTATION_KS)})",
    )
    segment.add_argument("--distances", type=_csv(str), default=DISTANCES, help=f"default {_listed(DISTANCES)}")
    segment.add_argument("--ignore-labels", type=_csv(int), default=DEFAULT_IGNORE_LABELS,
                         help="labels not scored, and train patches mostly made of them not fitted (default "
                         f"{_listed(DEFAULT_IGNORE_LABELS)}, "
                         "official ADE20K setting; use 255 for datasets whose class 0 is a real class)")  # fmt: skip
    segment.add_argument("--knn-dtype", choices=KNN_DTYPES, default=DEFAULT_KNN_DTYPE,
                         help="k-NN distance precision (default auto: bfloat16 as the official where the device has it "
                         "natively, else float32)")  # fmt: skip
    segment.add_argument("--num-classes", type=int, default=None, help="classes (default: largest train label + 1)")
    segment.add_argument(
        "--pictures",
        type=int,
        default=N_PICTURES,
        help="test images drawn in segmentation_examples.png (default %(default)s)",
    )
    segment.set_defaults(handler=run_segment)


def _extractor(args: argparse.Namespace):
    return build_extractor(args, keep_aspect=False, num_workers=args.workers)


def _config(args: argparse.Namespace) -> dict:
    return {key: value for key, value in vars(args).items() if key not in ("handler", "check")}


def _finish(args, payload: dict, header: list[str], keys: list[str]) -> int:
    from capi_backbones.evals.report import format_table, write_results

    path = write_results(args.out, {"config": _config(args), **payload})

    def cell(row: dict, key: str):
        if key == "selected":
            return "<<" if row.get(key) else ""
        return row[key] if row.get(key) is not None else "-"

    rows = [[cell(row, k) for k in keys] for row in payload["results"]]
    print(format_table(header, rows))
    if payload.get("picture"):
        print(f"picture: {payload['picture']}", file=sys.stderr)
    print(f"wall time: {payload.get('wall_time_s', 0):.0f} s", file=sys.stderr)
    skipped = payload["dataset"]["skipped"]
    for name, message in skipped.items():
        print(f"skipped: {name}: {message}", file=sys.stderr)
    print(f"results: {path}" + (f" ({len(skipped)} unreadable image(s) skipped)" if skipped else ""), file=sys.stderr)
    return 1 if skipped else 0


def run_classify(args: argparse.Namespace) -> int:
    from capi_backbones.features import FolderBusyError

    try:
        from capi_backbones.evals.classification_protocol import ClassificationSettings, run_classification
        from capi_backbones.evals.datasets import read_classification_folders
        from capi_backbones.evals.probe_grid import ProbeTrainingConfig, resolve_probe_dtype
        from capi_backbones.evals.representations import check_representations

        data = read_classification_folders(args.data)  # bad layouts fail before a model is loaded
        check_representations(args.representations)  # and bad names before any feature is extracted
        unknown = [p for p in args.probes if p not in PROBES]
        if unknown:
            raise ValueError(f"Unknown probe(s) {unknown}. Choose from {', '.join(PROBES)}.")
        if min(args.knn_k) < 1 or args.head_dim < 1 or (args.probe_micro_batch or 1) < 1:
            raise ValueError("--knn-k, --head-dim and --probe-micro-batch must be positive.")
        batch = args.probe_batch_size or (FAST_BATCH_SIZE if args.fast else OFFICIAL_BATCH_SIZE)
        if batch < 1 or (args.iters is not None and args.iters < 1):
            raise ValueError("--probe-batch-size and --iters must be positive.")
        n_fit = len(data.train) if data.val is not None else round((1.0 - SELECTION_FRACTION) * len(data.train))
        steps_per_epoch = max(1, n_fit // min(batch, n_fit))
        default_iters = FAST_ITERATIONS if args.fast else OFFICIAL_ITERATIONS
        iters = args.iters or (
            max(1, round(args.epochs * steps_per_epoch)) if args.epochs is not None else default_iters
        )
        training = ProbeTrainingConfig(
            iterations=iters,
            warmup_iterations=iters // 10,
            batch_size=batch,
            micro_batch_size=args.probe_micro_batch,
            dtype="float32" if args.probe_dtype == "auto" else args.probe_dtype,  # auto: once the device is known
            learning_rates=args.learning_rates or OFFICIAL_LEARNING_RATES,
            weight_decays=args.weight_decays or OFFICIAL_WEIGHT_DECAYS,
            seed=args.seed,
            checkpoint_every=max(1, iters // 10),
        )
        extractor = _extractor(args)
        if args.probe_dtype == "auto":  # the probes train on the extractor's device
            training = replace(training, dtype=resolve_probe_dtype("auto", extractor.device))
            logger.info("--probe-dtype auto: the probes train in %s on %s", training.dtype, extractor.device)
        settings = ClassificationSettings(
            probes=args.probes, representations=args.representations, knn_ks=args.knn_k, training=training,
            augment=args.augment, head_dim=args.head_dim, device=str(extractor.device),
        )  # fmt: skip
        payload = run_classification(data, extractor, args.out, settings, progress=not args.no_progress)
    except (*USER_ERRORS, FolderBusyError) as error:
        logger.debug("eval classify failed", exc_info=True)
        raise CliError.from_exception(error) from error
    header = ["probe", "representation", "setting", "", "val top-1", "top-1", "top-5"]
    code = _finish(
        args, payload, header, ["probe", "representation", "setting", "selected", "val_top1", "top1", "top5"]
    )
    training = payload.get("probe_training")
    if training is not None:
        print(f"probe training: {training['protocol']} (global batch {training['global_batch_size']}, lr x "
              f"{training['lr_scale']:g}, {training['iterations']} steps)", file=sys.stderr)  # fmt: skip
    return code


def run_segment(args: argparse.Namespace) -> int:
    from capi_backbones.features import FolderBusyError

    try:
        from capi_backbones.evals.datasets import read_segmentation_folders
        from capi_backbones.evals.segmentation_protocol import SegmentationSettings, run_segmentation

        data = read_segmentation_folders(args.data)
        extractor = _extractor(args)
        settings = SegmentationSettings(
            classifiers=args.classifiers, ks=args.ks, distances=args.distances, ignore_labels=args.ignore_labels,
            num_classes=args.num_classes, n_pictures=args.pictures, device=str(extractor.device),
            knn_dtype=args.knn_dtype,
        )  # fmt: skip
        payload = run_segmentation(data, extractor, args.out, settings, progress=not args.no_progress)
    except (*USER_ERRORS, FolderBusyError) as error:
        logger.debug("eval segment failed", exc_info=True)
        raise CliError.from_exception(error) from error
    header = ["classifier", "setting", "", "val mIoU", "mIoU", "pixel acc"]
    return _finish(args, payload, header, ["classifier", "setting", "selected", "val_miou", "miou", "pixel_accuracy"])
