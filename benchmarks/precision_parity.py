"""Train the notebook's MNIST model and its best CIFAR-10 variant in one precision and print their test scores.

Run it once with --precision float32 and compare with the notebook's run (which uses "auto", mixed_bfloat16 on a CPU
with bfloat16): the same seed, data, architecture and settings as hw3_vae.ipynb's parameters cell. About 12 minutes
in float32 on 2 CPU cores. With another --seed, in each precision, it measures how far two seeds land apart, the
scale against which a difference between the precisions is read.

    VAE_DATA_DIR=../shared/data python benchmarks/precision_parity.py --precision float32
    VAE_DATA_DIR=../shared/data python benchmarks/precision_parity.py --precision mixed_bfloat16 --seed 1 --models mnist
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import vae_extensions as vx  # noqa: E402
import vae_runtime as vr  # noqa: E402
import vae_utils as vu  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="float32", choices=vr.PRECISIONS)
    parser.add_argument("--seed", type=int, default=0, help="the notebook's SEED is 0")
    parser.add_argument("--models", default="mnist,cifar10", help="which of the two models to train (comma-separated)")
    parser.add_argument("--output", default=None, help="also write the results rows to this JSON file")
    args = parser.parse_args(argv)
    models = set(args.models.split(","))
    if not models or models - {"mnist", "cifar10"}:
        parser.error(f"--models {args.models!r}: name mnist, cifar10 or both")
    scoring = {"iwae_samples": 32, "iwae_images": 500}
    rows = []
    if "mnist" in models:
        mnist = vu.prepare_data("mnist")
        training = vu.TrainConfig(epochs=16, batch_size=32, learning_rate=2e-3, lr_schedule="cosine",
                                  steps_per_execution=50, seed=args.seed, precision=args.precision)
        config = vu.VAEConfig(img_size=28, channels=1, latent_dim=176, num_convolutions=2, filters=32)
        rows.append(vx.train_and_score("MNIST ELBO", vu.build_model(config, training), mnist, training,
                                       **scoring).result)
    if "cifar10" in models:
        cifar = vu.prepare_data("cifar10")
        training = vu.TrainConfig(epochs=4, batch_size=64, learning_rate=1e-3, lr_schedule="cosine",
                                  steps_per_execution=50, seed=args.seed, precision=args.precision)
        config = vx.ExtendedVAEConfig(img_size=32, channels=3, latent_dim=512, num_convolutions=2, filters=16,
                                      likelihood="logistic_ar", upsampling="resize", spatial_latent=True)
        model = vu.build_model(config, training, model_class=vx.ExtendedCVAE)
        rows.append(vx.train_and_score("CIFAR-10 spatial, autoregressive", model, cifar, training, vx.KLWarmup(1),
                                       **scoring).result)
    for row in rows:
        print(f"{row['name']} ({args.precision}, seed {args.seed}): test ELBO {row['test_elbo']:.2f} nats, bits/dim "
              f"{row['bits_per_dim']:.4f}, PSNR {row['psnr_db']:.2f} dB, linear probe {row['probe_accuracy']:.2%}")
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
