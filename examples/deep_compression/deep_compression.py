"""Deep Compression (Han et al., ICLR 2016) with torchslim: prune -> share weights -> entropy code.

    python examples/deep_compression/deep_compression.py [--bits 6] [--out lenet300.tslim]

Trains LeNet-300-100 on the 5,000 real MNIST digits, prunes 92/91/74% of fc1/fc2/fc3 with
retraining (masks kept by ts.MaskCallback), clusters every layer's non-zero weights to 2**bits
shared values, fine-tunes the centroids, packs the model into one entropy-coded file and loads
it back. benchmarks/pack.py is the measured version of the same chain (stage-by-stage table).
"""

from __future__ import annotations

import argparse

import torch

import torchslim as ts
from torchslim.pack import cluster_, pack, unpack


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bits", type=int, default=6)
    p.add_argument("--out", default="lenet300.tslim")
    args = p.parse_args()
    torch.set_num_threads(1)
    data = ts.load_data("mnist", seed=0)
    model = ts.create_model("zoo:lenet300", data=data)
    test = data.loader("test", batch_size=500)

    ts.fit(model, data, ts.TrainConfig(epochs=30, lr=0.05, weight_decay=1e-4), progress=False)
    print(f"dense       {100 * ts.evaluate(model, test)['accuracy']:.2f}%")

    for step in (0.5, 0.75, 1.0):  # reach the paper's per-layer sparsity in three steps
        ts.sparsify_(model, 0.0, overrides={"fc1": 0.92 * step, "fc2": 0.91 * step, "fc3": 0.74 * step})
        ts.fit(model, data, ts.TrainConfig(epochs=8, lr=0.02, weight_decay=1e-4), callbacks=[ts.MaskCallback()],
               progress=False)
    print(f"pruned      {100 * ts.evaluate(model, test)['accuracy']:.2f}%  ({100 * ts.sparsity_report(model).overall:.1f}% zeros)")

    cluster_(model, bits=args.bits)  # weight = codebook[indices]; the codebook is the trainable parameter
    ts.fit(model, data, ts.TrainConfig(epochs=6, lr=1e-4, optimizer="adam", lr_schedule="constant"), progress=False)
    print(f"shared      {100 * ts.evaluate(model, test)['accuracy']:.2f}%  ({args.bits}-bit codebooks, fine-tuned)")

    result = pack(model, args.out)  # ANS-coded indices and relative positions, checksummed
    restored = unpack(args.out)
    print(f"packed      {100 * ts.evaluate(restored, test)['accuracy']:.2f}%  {result.size_bytes:,} bytes, "
          f"{result.ratio:.1f}x smaller than the {result.dense_bytes:,} bytes of fp32 tensors")


if __name__ == "__main__":
    main()
