"""History encoders of the user tower: one training pass (forward + backward) and one inference
forward over a batch of right-aligned sequences, on random d=64 item rows; prints JSON.

`sasrec` is timed twice: as the encoder runs its blocks (the last block from the last query only,
fused attention) and through nn.TransformerEncoder's own forward over the same parameters
(`sasrec_torch_layers`, the reference it replaced). Best of --repeat runs each, 1 thread.
Usage: python benchmarks/encoders.py [--batch 1024] [--length 20] [--repeat 5]
"""

import argparse
import json
import time

import torch

from recsys_hnm.models.two_tower import LastKEncoder, LearnedRecencyEncoder, SelfAttentiveEncoder

DIM = 64


def torch_layers(encoder: SelfAttentiveEncoder):
    """The reference: every block through nn.TransformerEncoder's forward, every position."""
    def forward(items, valid):
        L = items.shape[1]
        x = encoder.dropout(items + encoder.positions.weight[-L:])
        causal = torch.ones(L, L, dtype=torch.bool).tril()
        allowed = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool)
        return encoder.norm(encoder.blocks(x, mask=~allowed.repeat_interleave(encoder.heads, dim=0))[:, -1])
    return forward


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--length", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, L = args.batch, args.length
    # histories of 1..L items, right-aligned (padding cells first, zero rows)
    lengths = torch.randint(1, L + 1, (B,))
    valid = torch.arange(L)[None, :] >= (L - lengths)[:, None]
    items = torch.randn(B, L, DIM) * 0.1 * valid[..., None]
    sasrec = SelfAttentiveEncoder(DIM, L)
    encoders = {"learned_recency": LearnedRecencyEncoder(L, 0.5), "last_k": LastKEncoder(DIM, 5),
                "sasrec": sasrec, "sasrec_torch_layers": torch_layers(sasrec)}
    result = {"batch": B, "length": L, "dim": DIM, "threads": args.threads}
    for name, encoder in encoders.items():
        leaf = items.clone().requires_grad_(True)
        sasrec.train()

        def train_pass():
            encoder(leaf, valid).sum().backward()

        def infer():
            with torch.no_grad():
                encoder(items, valid)
        train_s = best_of(args.repeat, train_pass)
        sasrec.eval()
        result[name] = {"train_pass_ms": round(1000 * train_s, 2), "inference_ms": round(1000 * best_of(args.repeat, infer), 2)}
    for key in ("train_pass_ms", "inference_ms"):
        result[f"sasrec_speedup_{key[:-3]}"] = round(result["sasrec_torch_layers"][key] / result["sasrec"][key], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
