"""Benchmark: `rewards.py serve` under concurrent load, on loopback (CPU).

Serves the `brightness` reward (a mean of pixels: next to no model time, so the figures are the server's and the
protocol's cost: encoding, HTTP, decoding) from rewards.make_server in this process, with one client that sent half
a body and stalls for the whole run, and `--clients` threads that each send `--requests` batches of `--batch`
images of `--size` px, with the JSON client (`remote`) or the reward-server pickle client (`deqa_server`). Every
answer is checked against the local reward after the timed run. Prints requests, concurrency, wall time, throughput
and latencies. Client and server share this process and its cores: on a small CPU the figures are mostly encoding.

Run: python bench_reward_server.py [--clients 8] [--requests 4] [--batch 16] [--size 512] [--protocol json]
"""
import argparse
import io
import socket
import statistics
import threading
import time

import numpy as np
from PIL import Image
import torch

import rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="per client")
    parser.add_argument("--batch", type=int, default=16, help="images per request")
    parser.add_argument("--size", type=int, default=512, help="image side, px")
    parser.add_argument("--protocol", default="json", choices=["json", "pickle"])
    args = parser.parse_args()

    server = rewards.make_server("127.0.0.1", 0, args.protocol, timeout=60.0)
    server.reward, server.name = rewards.make_reward("brightness"), "brightness"
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    stalled = socket.create_connection(("127.0.0.1", server.server_port))
    stalled.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)   # then nothing

    local = rewards.make_reward("brightness")
    latencies, answers, errors = [], {}, []

    def batch(c: int, k: int) -> torch.Tensor:
        return torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(c * 1000 + k))

    def expected(images):
        if args.protocol == "json":                                           # PNG: lossless
            return local(images, [""] * len(images))
        decoded = [np.asarray(Image.open(io.BytesIO(rewards.jpeg_bytes(a)))) for a in rewards.to_uint8(images)]
        return torch.tensor([d.mean() / 255 for d in decoded], dtype=torch.float32)

    def client(c: int) -> None:
        name = "remote" if args.protocol == "json" else "deqa_server"
        remote = rewards.make_reward(name, url=url, timeout=60, retries=0)
        try:
            for k in range(args.requests):
                images = batch(c, k)
                start = time.perf_counter()
                answers[c, k] = remote(images, [f"client {c}"] * args.batch)
                latencies.append(time.perf_counter() - start)
        except Exception as error:
            errors.append(repr(error))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    stalled.close()
    server.shutdown()
    wrong = [key for key, scores in answers.items() if not torch.allclose(scores, expected(batch(*key)), atol=1e-6)]
    n = args.clients * args.requests
    print(f"{args.protocol} protocol: {n} requests of {args.batch} images ({args.size} px), {args.clients} concurrent "
          f"clients + 1 stalled: {wall:.2f} s wall, {n / wall:.1f} requests/s, {n * args.batch / wall:.0f} images/s; "
          f"latency median {statistics.median(latencies):.3f} s, max {max(latencies):.3f} s; "
          f"wrong answers {len(wrong)}, errors {len(errors)}{': ' + errors[0] if errors else ''}")


if __name__ == "__main__":
    main()
