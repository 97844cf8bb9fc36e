"""Judge every part of a GPU check PASS / FAIL / MISSING and print the table of figures.

    python bench/gpu/report.py RESULTS_DIR DEVICE_NAME PART [PART ...]

A part is MISSING when it never ran (its `.rc` file is absent: the setup failed before it), FAIL
when it exited non-zero (a crash, or 124: over its time budget), left no JSON, or missed a
check, and PASS otherwise. Writes summary.json and summary.txt; exits 1 unless every part
passed, so the caller's exit status says it too.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# the targets
SINGLE_STREAM_8B = 0.75  # of the bandwidth roofline
CONCURRENT_8B = 0.30  # of the compute roofline
SAMPLER_MS = 1.5
SAMPLER_T1_MS = 0.15  # the OpenAI SDK's default step (temperature 1) at B = 256, V = 128k

Row = tuple[str, str, str]


def main() -> None:
    results_dir, device_name, expected = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    verdicts: dict[str, str] = {}
    parts: dict[str, object] = {}
    rows: list[Row] = []
    for name in expected:
        verdict, part_rows, part = judge(results_dir, name)
        verdicts[name] = verdict
        parts[name] = part
        rows.append((f"[{name}]", "", verdict))
        rows += [(f"  {a}", b, c) for a, b, c in part_rows]
    counts = {v: sum(1 for x in verdicts.values() if x == v) for v in ("PASS", "FAIL", "MISSING")}
    totals = ", ".join(f"{n} {v}" for v, n in counts.items())
    summary = {"device": device_name, "verdicts": verdicts, "totals": counts, "parts": parts}
    (results_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    width = max((len(r[0]) for r in rows), default=10)
    lines = [f"device: {device_name}", ""]
    lines += [f"{a:<{width}}  {b}  {c}".rstrip() for a, b, c in rows]
    lines += ["", totals]
    table = "\n".join(lines)
    (results_dir / "summary.txt").write_text(table + "\n")
    print(table)
    sys.exit(0 if counts["PASS"] == len(expected) else 1)


def judge(results_dir: Path, name: str) -> tuple[str, list[Row], object]:
    """The verdict of one part, its figure rows and its JSON (None when there is none)."""
    rc_file = results_dir / f"{name}.rc"
    if not rc_file.exists():
        return "MISSING", [("not run", "the setup failed before it", "")], None
    rc = int(rc_file.read_text().strip() or 1)
    log = results_dir / f"{name}.log"
    last = (log.read_text(errors="replace").strip().splitlines() or ["no output"])[-1]
    if name == "tests":
        return ("PASS" if rc == 0 else "FAIL"), [("pytest", last, "")], {"returncode": rc}
    if rc != 0:
        why = "over its time budget" if rc in (124, 137) else f"exit {rc}"
        return "FAIL", [("crashed", f"{why}: {last[:120]}", "")], {"returncode": rc}
    result_file = results_dir / f"{name}.json"
    if not result_file.exists():
        return "FAIL", [("no result", "exited 0 without its JSON", "")], None
    part = json.loads(result_file.read_text())
    rows = figure_rows(name, part)
    failed = any(row[2].endswith("FAIL") for row in rows)
    return ("FAIL" if failed else "PASS"), rows, part


def figure_rows(name: str, part: dict) -> list[Row]:
    on_cuda = str(part.get("device", "")).startswith("cuda")
    rows: list[Row] = []
    if "decode_graphs" in part and on_cuda:
        rows.append(("CUDA graphs captured", "", _ok(part["decode_graphs"])))
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
        seeded = part["seeded_batch_invariant"]
        rows.append(
            (
                "seeded sampling, batch 1 vs 8",
                "identical"
                if seeded["identical"]
                else f"parted at {seeded['first_divergence']}, rounding chance <= "
                f"{seeded['divergence_chance_bound']:.2g}",
                f">= {seeded['alpha']:g} or identical: {_ok(seeded['pass'])}",
            )
        )
    elif name.startswith("speed"):
        single, many = part["single_stream"], part["concurrent_decode"]
        big = "8b" in part["shape"] and on_cuda
        rows.append(
            (
                f"single stream ({part['shape']})",
                f"{single['tok_per_s']:.1f} tok/s = "
                f"{single['fraction_of_roofline']:.0%} of bandwidth roofline",
                f">= {SINGLE_STREAM_8B:.0%}: "
                f"{_ok(single['fraction_of_roofline'] >= SINGLE_STREAM_8B)}"
                if big
                else "",
            )
        )
        rows.append(
            (
                f"{many['batch']} concurrent decodes ({part['shape']})",
                f"{many['tok_per_s']:.0f} tok/s, step {many['step_ms']:.2f} ms = "
                f"{many['fraction_of_compute_roofline']:.0%} of compute roofline",
                f">= {CONCURRENT_8B:.0%}: "
                f"{_ok(many['fraction_of_compute_roofline'] >= CONCURRENT_8B)}"
                if big
                else "",
            )
        )
    elif name.startswith("long_context"):
        rates = part["tok_per_s_by_context"]
        rows.append(
            (
                f"decode by context ({part['shape']})",
                ", ".join(f"{k}: {v:.1f} tok/s" for k, v in rates.items()),
                f"longest {part['longest_vs_shortest']:.2f}x of shortest",
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
        timings = {k: v for k, v in part.items() if k.endswith("_ms")}
        worst = max(timings.values())
        rows.append(
            (
                f"sampler B={part['batch']} V={part['vocab']}",
                ", ".join(f"{k[:-3]} {v:.2f} ms" for k, v in timings.items()),
                f"<= {SAMPLER_MS} ms: {_ok(worst <= SAMPLER_MS)}" if on_cuda else "",
            )
        )
        if "temperature_1_ms" in part:
            t1 = part["temperature_1_ms"]
            rows.append(
                (
                    f"sampler temperature 1, B={part['batch']} V={part['vocab']}",
                    f"{t1:.3f} ms",
                    f"<= {SAMPLER_T1_MS} ms: {_ok(t1 <= SAMPLER_T1_MS)}" if on_cuda else "",
                )
            )
        spread = part["temperature_1_distribution"]
        rows.append(
            (
                "temperature 1 draws follow softmax",
                f"{spread['draws']} draws, worst {spread['worst_standard_errors']:.1f} s.e.",
                f"<= 5: {_ok(spread['pass'])}",
            )
        )
    return rows


def _ok(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


if __name__ == "__main__":
    main()
