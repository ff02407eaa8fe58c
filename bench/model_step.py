"""Time one CLIP training step on this machine's CPU (Radford et al. 2021, Figure 3).

A step is forward, the symmetric cross-entropy over the N x N scaled cosine similarities,
backward and an AdamW update. Prints the median of a few timed steps after warm-up.

    .venv/bin/python bench/model_step.py [--repeats 5] [--warmup 2]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from clip_core.model import create_model

CASES = [("tiny", 64), ("ViT-B-32", 16)]  # (preset, batch)


def random_batch(model, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    size = model.config.vision.image_size
    text = torch.randint(1, 49405, (batch, model.context_length))
    text[:, 0], text[:, -1] = 49406, 49407  # full-length captions: [SOT] ... [EOT]
    return torch.randn(batch, 3, size, size), text


def train_step(model, optimizer, image: torch.Tensor, text: torch.Tensor) -> float:
    image_features, text_features, logit_scale = model(image, text)
    logits = logit_scale * image_features @ text_features.T  # (N, N)
    labels = torch.arange(len(image))
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def time_steps(name: str, batch: int, warmup: int, repeats: int) -> tuple[float, torch.nn.Module]:
    """Median seconds per step, and the model."""
    torch.manual_seed(0)
    model = create_model(name).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.2)
    image, text = random_batch(model, batch)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        train_step(model, optimizer, image, text)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times), model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'model':<10} {'params':>8} {'batch':>5} {'res':>4} {'step s':>7} {'img/s':>7}")
    for name, batch in CASES:
        seconds, model = time_steps(name, batch, args.warmup, args.repeats)
        params, res = sum(p.numel() for p in model.parameters()), model.config.vision.image_size
        print(f"{name:<10} {params / 1e6:>7.1f}M {batch:>5} {res:>4} {seconds:>7.3f} {batch / seconds:>7.1f}")


if __name__ == "__main__":
    main()
