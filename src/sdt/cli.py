"""The ``sdt`` command: a thin layer over the library.

    sdt models            the model table (parameters, GFLOPs, the papers' numbers)
    sdt gen-train         train a class-conditional DiT (vanilla / fixed / cag attention) on Fashion-MNIST
    sdt sample            class-conditional samples from a generation run: PNG grid + .npz of uint8 images
    sdt fid               FID (in-domain extractor by default, or Inception from a local file) + conditional accuracy

Each subcommand is one ``add_*_parser`` function (its arguments) and one ``run_*`` function.
"""
import argparse
import sys
from typing import List, Optional


def add_models_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="print the model table (parameters, GFLOPs, papers' numbers)",
                              description="Print every registered SDT/RMT model with its parameters and "
                                          "GMACs, beside the numbers the papers report.")
    p.add_argument("--input-size", type=int, nargs=3, default=(3, 224, 224), metavar=("C", "H", "W"),
                   help="input size for the FLOP count (default: 3 224 224)")
    p.add_argument("names", nargs="*", help="models to list (default: all)")
    p.set_defaults(func=run_models)


def run_models(args: argparse.Namespace) -> int:
    from .complexity import model_table

    print(model_table(args.names or None, tuple(args.input_size)))
    return 0


def add_gen_train_parser(subparsers: argparse._SubParsersAction) -> None:
    from .generate import GenTrainConfig

    d = GenTrainConfig()
    p = subparsers.add_parser("gen-train", help="train a class-conditional DiT with spatial-decay attention",
                              description="Train a DiT (sdt.models.dit) on Fashion-MNIST train with DDPM or flow matching; "
                                          "writes config.json, model/ema safetensors, state.pt and log.jsonl to --output.")
    p.add_argument("--output", required=True, help="run folder")
    p.add_argument("--model", default=d.model, help=f"DiT config name (default {d.model}; see sdt.models.dit.list_dits())")
    p.add_argument("--attn", default=d.attn, choices=("vanilla", "fixed", "cag"), help="attention kind (default cag)")
    p.add_argument("--objective", default=d.objective, choices=("ddpm", "flow"), help="DDPM epsilon or SiT flow matching")
    p.add_argument("--learn-sigma", action="store_true", help="DDPM only: learned variance with the hybrid loss")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr, help=f"AdamW learning rate, no weight decay (default {d.lr}, DiT's)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-dir", default=d.data_dir, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--threads", type=int, default=d.threads, help="torch intra-op threads")
    p.add_argument("--resume", action="store_true", help="continue the run in --output from its last checkpoint")
    p.set_defaults(func=run_gen_train)


def run_gen_train(args: argparse.Namespace) -> int:
    from .generate import GenTrainConfig, train_generator

    config = GenTrainConfig(model=args.model, attn=args.attn, objective=args.objective,
                            model_kwargs=dict(learn_sigma=args.learn_sigma), steps=args.steps,
                            batch_size=args.batch_size, lr=args.lr, ema_decay=args.ema_decay, seed=args.seed,
                            data_dir=args.data_dir, checkpoint_every=args.checkpoint_every, threads=args.threads)
    print(train_generator(config, args.output, resume=args.resume))
    return 0


def add_sample_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sample", help="class-conditional samples from a generation run (PNG grid + .npz)",
                              description="Sample every class from a 'sdt gen-train' run with its EMA weights. Writes "
                                          "<out>.npz (arr_0: uint8 (N, H, W, C), labels) and <out>.png (a row per class).")
    p.add_argument("run", help="run folder of 'sdt gen-train'")
    p.add_argument("--out", required=True, help="output prefix (writes <out>.npz and <out>.png)")
    p.add_argument("--per-class", type=int, default=10, help="samples per class")
    p.add_argument("--sampler", default=None, help="ddim | ddpm (DDPM objective), heun | euler (flow); default ddim / heun")
    p.add_argument("--steps", type=int, default=50, help="sampling steps (DDPM: respaced)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="classifier-free guidance scale (1: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weights", default="ema", choices=("ema", "model"))
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    import time

    import torch

    from .generate import class_labels, load_generator, sample_images, save_samples

    torch.set_num_threads(args.threads)
    model, config = load_generator(args.run, args.weights)
    labels = class_labels(model.num_classes, args.per_class)
    start = time.perf_counter()
    images = sample_images(model, config.objective, labels, args.seed, args.sampler, args.steps, args.cfg_scale,
                           batch_size=args.batch_size)
    paths = save_samples(images, labels, args.out)
    print(f"{len(images)} samples in {time.perf_counter() - start:.0f}s -> {paths['npz']}, {paths['png']}")
    return 0


def add_fid_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("fid", help="FID of an .npz of samples against Fashion-MNIST, + conditional accuracy",
                              description="FID between the uint8 samples of an .npz ('sdt sample') and a Fashion-MNIST "
                                          "split, with the shipped in-domain extractor (default) or Inception from a "
                                          "local weights file. With labels in the .npz, also the in-domain classifier's "
                                          "accuracy on the samples.")
    p.add_argument("samples", help=".npz with arr_0 uint8 (N, H, W, C) [and labels]")
    p.add_argument("--reference", default="test", choices=("test", "train"), help="Fashion-MNIST split (default test, 10k)")
    p.add_argument("--num-reference", type=int, default=0, help="use the first N reference images (default: all)")
    p.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX .gz files")
    p.add_argument("--extractor", default="sdt_h_nano.fmnist_extractor", help="timm model[.tag] giving pre-logit features")
    p.add_argument("--extractor-checkpoint", default=None, help="safetensors weights for --extractor (e.g. from 'sdt train')")
    p.add_argument("--inception-weights", default=None, help="local Inception-v3 FID weights file: use Inception features")
    p.add_argument("--threads", type=int, default=2)
    p.set_defaults(func=run_fid)


def run_fid(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from .fashion_mnist import DEFAULT_DIR, load_fashion_mnist
    from .fid import compute_fid, conditional_accuracy, in_domain_extractor

    torch.set_num_threads(args.threads)
    with np.load(args.samples) as data:
        if "arr_0" not in data:
            raise SystemExit(f"{args.samples} has no arr_0 array; write it with 'sdt sample'")
        fake = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2).contiguous()
        labels = torch.from_numpy(data["labels"]).long() if "labels" in data else None
    real, _ = load_fashion_mnist(args.reference, args.data_dir or DEFAULT_DIR)
    reference = f"Fashion-MNIST {args.reference}"
    if args.num_reference:
        real, reference = real[:args.num_reference], f"{reference}[:{args.num_reference}]"
    extractor = in_domain_extractor(args.extractor, args.extractor_checkpoint)
    result = compute_fid(fake, real, reference, extractor, args.extractor,
                         args.inception_weights)
    print(result)
    if labels is not None:
        print(f"conditional accuracy {conditional_accuracy(extractor, fake, labels):.4f} "
              f"({len(fake)} samples, classifier {args.extractor})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdt", description="Spatial Decay Transformers: models, training, evaluation.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_models_parser(subparsers)
    add_gen_train_parser(subparsers)
    add_sample_parser(subparsers)
    add_fid_parser(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
