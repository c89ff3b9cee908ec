#!/usr/bin/env python3
"""Regenerate every number the README and docs/demo.md show from fresh runs, between their markers.

    .venv/bin/python scripts/refresh_docs.py        (about a minute on 2 cores; run from the repo root)

Blocks are delimited by `<!-- generated:NAME -->` ... `<!-- /generated:NAME -->` and written from:
- demo-live, demo-offline: `python -m layerguard.demo` (its printed table and demo-out/summary.json);
- curl-response, curl-clean: the docs' curl requests against the demo's live server (`--keep-running`, then
  `--stop`);
- calibrate-output: the README's calibrate.py command on the exported demo data;
- bench-headline: the headline of docs/benchmarks.md, from bench/results/*.json (`--only bench` refreshes
  just this block, without the demo run): the rule chosen on the well-trained zoos, one line per model of
  each (well-trained CIFAR-10 first, then GTSRB), then one summary line for the weakly trained CIFAR-10 zoo;
- test-time: how long the last `make test` took (the Makefile writes build/last-test-seconds;
  `--only test-time` refreshes just this block).
tests/test_docs.py reruns the calibration and compares the numbers in these blocks with a fresh run, within
the tolerances it states, so the docs cannot drift from what the code prints.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
CALIBRATE_ARGS = ["calibrate.py", "--model-file", "layerguard/demo/mnist_model.py", "--weights",
                  "demo-data/mnist_badnets.pt", "--data", "demo-data/reference.npz", "--channels", "1", "-o",
                  "demo-data/mnist_calibration.npz", "--benign-test", "demo-data/test.npz", "--poisoned",
                  "demo-data/triggered.npz", "--target-class", "7", "--quiet"]
DOCS = [ROOT / "README.md", ROOT / "docs" / "demo.md", ROOT / "docs" / "serving.md"]


def run(args: list[str]) -> str:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def replace_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(<!-- /generated:{name} -->)", re.S)
    if not pattern.search(text):
        return text
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text)


def live_excerpt(stdout: str) -> str:
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("digit true |"))
    end = next(i for i, ln in enumerate(lines) if "flagged:" in ln)
    return "```text\n" + "\n".join([*lines[start:start + 4], "  ...", lines[end]]) + "\n```"


def curl_response(image: str) -> str:
    """POST one of the demo's digit files to the demo's live server, as the docs' curl line does."""
    server = json.loads((ROOT / "demo-out" / "torchserve" / "server.json").read_text())
    key = json.loads((Path(server["workdir"]) / "key_file.json").read_text())["inference"]["key"]
    body = (ROOT / "demo-out" / "digits" / image).read_bytes()
    request = urllib.request.Request(f"http://127.0.0.1:{server['ports']['inference']}/predictions/mnist",
                                     data=body, method="POST", headers={"Authorization": f"Bearer {key}",
                                                                        "Content-Type": "application/octet-stream"})
    with urllib.request.urlopen(request, timeout=60) as response:
        answer = json.loads(response.read())
    return "```json\n" + json.dumps(answer, indent=2) + "\n```"


def bench_headline(results: Path | None = None) -> str:
    """The benchmark page's headline, from the result files in ``results`` (default bench/results;
    bench/run_all.py computes it)."""
    sys.path.insert(0, str(ROOT))
    from bench.run_all import RESULTS_DIR, headline_section, load, load_detection

    results = results or RESULTS_DIR
    lines = headline_section(load_detection(results), load(results, "overhead"), load(results, "serving_load"),
                             load(results, "serving_load_compact"))
    body = [ln for ln in lines[1:] if ln.strip()]
    link = "Every figure with its command, machine and date: [docs/benchmarks.md](docs/benchmarks.md)."
    return "\n".join(body) + "\n\n" + link


def test_time() -> str:
    seconds = int((ROOT / "build" / "last-test-seconds").read_text().split()[0])
    return (f"The last `make test` on the 2-core development machine took {seconds // 60} min {seconds % 60} s "
            "(with the virtual environment already in place).")


def write_blocks(blocks: dict[str, str]) -> None:
    for doc in DOCS:
        text = doc.read_text()
        for name, body in blocks.items():
            text = replace_block(text, name, body)
        doc.write_text(text)
        print(f"refreshed {doc.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--only", "bench"]:
        write_blocks({"bench-headline": bench_headline()})
        return 0
    if argv[:2] == ["--only", "test-time"]:
        write_blocks({"test-time": test_time()})
        return 0
    demo = run([PY, "-m", "layerguard.demo", "--keep-running"])
    try:
        curl = curl_response("triggered_3.png")
        clean = curl_response("clean_3_label3.png")
    finally:
        run([PY, "-m", "layerguard.demo", "--stop"])
    summary = json.loads((ROOT / "demo-out" / "summary.json").read_text())
    off = summary["offline"]
    offline = (f"TPR {100 * off['tpr']:.2f}% over {off['attacks_scored']} successful attacks, FPR "
               f"{100 * off['fpr']:.2f}% over {off['benign_scored']} clean digits, AUROC {off['auroc']:.4f}")
    run([PY, "-m", "layerguard.demo.mnist", "--out", "demo-data"])
    calibrate = run([PY, *CALIBRATE_ARGS])
    blocks = {"bench-headline": bench_headline(),
              "demo-output": "```text\n" + demo.split("Try it:")[0].rstrip() + "\n```",
              "demo-live": live_excerpt(demo), "demo-offline": offline, "curl-response": curl, "curl-clean": clean,
              "calibrate-output": "```text\n" + calibrate.rstrip() + "\n```"}
    write_blocks(blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
