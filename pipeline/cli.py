"""The `fer` command: the actions outside the DVC DAG.

Each sub-command imports its library lazily, so `fer --help` is fast and a broken optional
dependency only breaks the command that needs it.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.errors import as_user_error


def _synth(a: argparse.Namespace) -> None:
    from pipeline.data.synthetic import write_synthetic

    write_synthetic(a.out, layout=a.layout, n=a.n, seed=a.seed)
    print(f"wrote {a.layout} synthetic faces to {a.out}")


def _ingest(a: argparse.Namespace) -> None:
    from pipeline.data.ingest import ingest

    report = ingest(a.src, a.out, report_path=a.report, val_fraction=a.val_fraction,
                    seed=a.seed, max_bad_fraction=a.max_bad_fraction, workers=a.workers)
    print(f"ingested {report['dataset']} ({report['layout']}): "
          + ", ".join(f"{k}={v}" for k, v in report["counts"].items()))


def _ingest_imagenet(a: argparse.Namespace) -> None:
    from pipeline.data.imagenet_ingest import ingest_imagenet

    report = ingest_imagenet(a.src, a.out, report_path=a.report, shard_mb=a.shard_mb,
                             limit_per_class=a.limit_per_class, max_classes=a.max_classes,
                             seed=a.seed, max_bad_fraction=a.max_bad_fraction, workers=a.workers)
    shards = sum(len(v) for v in report["shards"].values())
    print(f"ingested imagenet ({report['layout']}, {len(report['classes'])} classes): "
          + ", ".join(f"{k}={v}" for k, v in report["counts"].items() if v) + f" in {shards} shards")


def _model_summary(a: argparse.Namespace) -> None:
    from pipeline.model.summary import summary_table

    print(summary_table(size=a.size, width=a.width, num_classes=a.num_classes))


def _predict(a: argparse.Namespace) -> None:
    from pipeline.infer.cli import predict_command

    predict_command(a)


def _export(a: argparse.Namespace) -> None:
    from pipeline.infer.cli import export_command

    export_command(a)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fer", description="LIP-VGG16 facial expression pipeline")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("synth", help="write procedurally drawn faces in a real dataset layout")
    s.add_argument("out")
    s.add_argument("--layout", choices=["rafdb", "sfew"], required=True)
    s.add_argument("--n", type=int, default=None, help="number of images (default: layout's own)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_synth)

    s = sub.add_parser("ingest", help="detect a dataset layout and write validated parquet")
    s.add_argument("src")
    s.add_argument("out")
    s.add_argument("--report", default=None, help="report JSON path (default reports/ingest_<dataset>.json)")
    s.add_argument("--val-fraction", type=float, default=0.1)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-bad-fraction", type=float, default=0.05)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=_ingest)

    s = sub.add_parser("ingest-imagenet", help="ILSVRC-2012 (or any ImageFolder) -> sharded parquet "
                                               "for imagenet_init's adapt/pretrain, written as it goes")
    s.add_argument("src", help="train/<wnid>/ and val/ (flat + LOC_val_solution.csv, or val/<wnid>/)")
    s.add_argument("out")
    s.add_argument("--report", default=None, help="report JSON path (default reports/ingest_imagenet.json)")
    s.add_argument("--shard-mb", type=float, default=256.0, help="approximate size of each parquet shard")
    s.add_argument("--limit-per-class", type=int, default=None,
                   help="at most this many images per class and split (e.g. 50: a smoke test)")
    s.add_argument("--max-classes", type=int, default=None,
                   help="only the first N classes in wnid order (e.g. 100: ImageNet-100)")
    s.add_argument("--seed", type=int, default=0, help="seed of the training rows' order")
    s.add_argument("--max-bad-fraction", type=float, default=0.05)
    s.add_argument("--workers", type=int, default=None)
    s.set_defaults(func=_ingest_imagenet)

    from pipeline.infer.cli import add_predict_arguments

    s = sub.add_parser("predict", help="detect faces in photos and print their expressions")
    add_predict_arguments(s)
    s.set_defaults(func=_predict)

    s = sub.add_parser("export", help="export a trained model (checkpoint or registry URI) to ONNX "
                                      "for `fer predict --model model.onnx` (onnxruntime)")
    s.add_argument("--onnx", required=True, metavar="OUT", help="the .onnx file to write")
    s.add_argument("--model", default=None,
                   help="a model.pt checkpoint or a registry URI (default: as fer predict)")
    s.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    s.add_argument("--log", action="store_true",
                   help="with --model models:/NAME/VERSION or models:/NAME@ALIAS: also log the file "
                        "beside that version (artifact onnx/<file> of its run, tag onnx_artifact)")
    s.set_defaults(func=_export)

    from pipeline.ablation import ablation_command, add_ablation_arguments
    from pipeline.tune.sweep import add_tune_arguments, tune_command

    s = sub.add_parser("tune", help="Ray Tune sweep (ASHA on val accuracy) over params.yaml's "
                                    "tune: space; resumes if interrupted")
    add_tune_arguments(s)
    s.set_defaults(func=tune_command)

    s = sub.add_parser("ablation", help="the paper's Table 1 and Table 3 rows -> reports/ablation.md")
    add_ablation_arguments(s)
    s.set_defaults(func=ablation_command)

    s = sub.add_parser("model-summary", help="parameters and FLOPs of every LIP-VGG16 variant")
    s.add_argument("--size", type=int, default=90)
    s.add_argument("--width", type=float, default=1.0)
    s.add_argument("--num-classes", type=int, default=7)
    s.set_defaults(func=_model_summary)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except Exception as e:  # noqa: BLE001 - user errors are one line, bugs keep their traceback
        msg = as_user_error(e)
        if msg is None:
            raise
        print(f"fer {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
