"""Merge the parts' JSON files into one JSON and print a table of the figures and targets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the targets
SINGLE_STREAM_8B = 0.60  # of the bandwidth roofline
CONCURRENT_8B = 0.30  # of the compute roofline
SAMPLER_MS = 1.5


def main() -> None:
    results_dir, device_name = Path(sys.argv[1]), sys.argv[2]
    parts = {p.stem: json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))}
    parts.pop("summary", None)
    rows: list[tuple[str, str, str]] = []
    for name, part in parts.items():
        if name.startswith("correctness"):
            logits = part["logits_vs_cpu_fp32"]
            rows.append(
                (
                    f"logits vs CPU fp32 ({part['shape']})",
                    f"rel. RMS {logits['rel_rms_error']:.4f}, top-1 {logits['top1_agreement']:.0%}",
                    f"<= {logits['tolerance']:.4f}: {_ok(logits['pass'])}",
                )
            )
            greedy = part["greedy_vs_hf_generate"]
            rows.append(
                (
                    "greedy = HF generate",
                    f"first divergence {greedy['first_divergence']} of {greedy['tokens']}",
                    _ok(greedy["pass"]),
                )
            )
            rows.append(
                ("seeded sampling batch-invariant", "", _ok(part["seeded_batch_invariant"]["pass"]))
            )
        elif name.startswith("speed"):
            single, many = part["single_stream"], part["concurrent_decode"]
            big = "8b" in part["shape"]
            rows.append(
                (
                    f"single stream ({part['shape']})",
                    f"{single['tok_per_s']:.1f} tok/s = "
                    f"{single['fraction_of_roofline']:.0%} of bandwidth roofline",
                    f">= 60%: {_ok(single['fraction_of_roofline'] >= SINGLE_STREAM_8B)}"
                    if big
                    else "",
                )
            )
            rows.append(
                (
                    f"{many['batch']} concurrent decodes ({part['shape']})",
                    f"{many['tok_per_s']:.0f} tok/s, step {many['step_ms']:.2f} ms = "
                    f"{many['fraction_of_compute_roofline']:.0%} of compute roofline",
                    f">= 30%: {_ok(many['fraction_of_compute_roofline'] >= CONCURRENT_8B)}"
                    if big
                    else "",
                )
            )
        elif name.startswith("offline"):
            rows.append(
                (
                    f"offline, nano-vllm workload ({part['shape']})",
                    f"winnow {part['winnow']['tok_per_s']:.0f} tok/s, HF generate "
                    f"{part['hf_generate']['tok_per_s']:.0f} tok/s",
                    f"{part['ratio']:.1f}x",
                )
            )
        elif name.startswith("sampler"):
            worst = max(v for k, v in part.items() if k.endswith("_ms"))
            rows.append(
                (
                    f"sampler B={part['batch']} V={part['vocab']}",
                    ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in part.items() if k.endswith("_ms")),
                    f"<= {SAMPLER_MS} ms: {_ok(worst <= SAMPLER_MS)}",
                )
            )
        elif name.startswith("tests"):
            rows.append(("CUDA tests (pytest)", part["summary"], _ok(part["returncode"] == 0)))
    summary = {"device": device_name, "parts": parts}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max(len(r[0]) for r in rows) if rows else 10
    lines = [f"device: {device_name}", ""]
    lines += [f"{a:<{width}}  {b}  {c}".rstrip() for a, b, c in rows]
    table = "\n".join(lines)
    (results_dir / "summary.txt").write_text(table + "\n")
    print(table)


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


if __name__ == "__main__":
    main()
