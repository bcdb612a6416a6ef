"""Load test of `scalevae demo`: N concurrent clients for S seconds on the loopback address, each checking every answer
against the answer the same request gets from the server alone.

    python benchmarks/demo_load.py FOLDER [--sentences F --labels L] [--clients 20 --seconds 60] [--output out.json]

The script starts `scalevae demo FOLDER` on a free loopback port, asks each request of a fixed mix (Reconstruct,
Interpolate, Sample from the prior and around a sentence, Edit when the folder has classes) once, alone, for its
reference answer, then runs the clients (one gradio_client each, through Gradio's queue, as the page does): each
sends the mix in its own order until the time is up. It reports the requests answered, those whose answer differed
from the reference (wrong) or that failed or timed out (lost), and the latency percentiles; exit status 1 when any
was wrong or lost. Without --folder's classes the Edit request is left out.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's scalevae, as the server the script starts from REPO

from scalevae.latent import CLASSES_FILE, LatentClasses  # noqa: E402

ANSWER_TIMEOUT = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(args, port: int, log) -> subprocess.Popen:
    command = [sys.executable, "-m", "scalevae.cli", "demo", args.folder, "--port", str(port)]
    for flag in ("sentences", "labels"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    command += ["--max_sentences", str(args.max_sentences), "--max_queue", str(args.max_queue)]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    server = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the demo server exited ({server.returncode}); see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5):
                return server
        except OSError:
            time.sleep(1)
    server.kill()
    raise SystemExit("the demo server did not start within 300 s")


def request_mix(folder: str, sentences: list[str]) -> list[tuple[str, tuple]]:
    """(api name, arguments) of each request of the mix."""
    config = json.loads((Path(folder) / "config.json").read_text())
    prior = f"prior ({config.get('prior')})"
    a, b, c = sentences[:3]
    mix = [
        ("/reconstruct", (a,)),
        ("/reconstruct", (b,)),
        ("/interpolate", (a, b, 5)),
        ("/interpolate", (b, c, 7)),
        ("/sample", (prior, "", 0.5, 6, 1.0, 0.9, 1)),
        ("/sample", (prior, "", 0.5, 6, 0.8, 0.95, 2)),
        ("/sample", ("around a sentence", c, 0.7, 4, 1.0, 0.9, 3)),
        ("/map", (f"{a}\n{c}",)),
    ]
    classes = Path(folder) / CLASSES_FILE
    if classes.is_file():
        labels = LatentClasses.load(classes)[0].labels
        mix += [("/edit", (a, labels[-1], 1.5)), ("/edit", (b, labels[0], 1.0))]
    return mix


def canonical(answer) -> str:
    return json.dumps(answer, sort_keys=True, default=str)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder")
    parser.add_argument("--sentences", default=None)
    parser.add_argument("--labels", default=None)
    parser.add_argument("--max_sentences", type=int, default=1000)
    parser.add_argument("--max_queue", type=int, default=32)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--output", default=None, help="write the figures as JSON")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= args.max_queue:
        raise SystemExit(f"--clients {args.clients} must be in [1, --max_queue {args.max_queue}]: no request refused.")
    if not 0 < args.seconds <= 600:
        raise SystemExit(f"--seconds {args.seconds} must be in (0, 600].")
    from gradio_client import Client

    source = args.sentences or str(REPO / "scalevae" / "corpus" / "stdlib.train.txt")
    sentences = [line.strip() for line in Path(source).read_text().splitlines() if line.strip()][:3]
    mix = request_mix(args.folder, sentences)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    with open(Path(args.output or "demo_load").with_suffix(".server.log"), "w") as log:
        server = start_server(args, port, log)
        try:
            alone = Client(url, verbose=False)
            reference = [canonical(alone.predict(*arguments, api_name=api)) for api, arguments in mix]
            latencies, wrong, lost = [], [], []
            guard = threading.Lock()
            clients = [Client(url, verbose=False) for _ in range(args.clients)]
            start = time.monotonic()
            deadline = start + args.seconds

            def run(k: int):
                i = k
                while time.monotonic() < deadline:
                    j = i % len(mix)
                    api, arguments = mix[j]
                    sent = time.monotonic()
                    try:
                        answer = canonical(clients[k].submit(*arguments, api_name=api).result(timeout=ANSWER_TIMEOUT))
                    except Exception as error:  # a request that failed or timed out is lost, whatever the cause
                        with guard:
                            lost.append(f"{api}: {type(error).__name__}: {error}")
                    else:
                        with guard:
                            latencies.append(time.monotonic() - sent)
                            if answer != reference[j]:
                                wrong.append(api)
                    i += 1

            threads = [threading.Thread(target=run, args=(k,)) for k in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - start
        finally:
            server.terminate()
            server.wait(timeout=60)
    cuts = statistics.quantiles(latencies, n=20) if len(latencies) >= 2 else [float("nan")] * 19
    figures = dict(
        clients=args.clients,
        seconds=round(elapsed, 1),
        requests=len(latencies) + len(lost),
        answered=len(latencies),
        wrong=len(wrong),
        lost=len(lost),
        p50_s=round(statistics.median(latencies), 3) if latencies else None,
        p95_s=round(cuts[18], 3),
        requests_per_s=round(len(latencies) / elapsed, 2),
        mix=[api for api, _ in mix],
        lost_examples=lost[:5],
    )
    print(json.dumps(figures, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(figures, indent=2) + "\n")
    return 1 if wrong or lost else 0


if __name__ == "__main__":
    sys.exit(main())
