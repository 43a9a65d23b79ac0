"""Where a GPU kernel's warps wait: an Nsight Compute source page summarized per stall and opcode.

  ncu --set full --kernel-name regex:alibi_flash_forward --launch-skip 2 --launch-count 1 \\
      -o /tmp/forward python SCRIPT.py   # any script that runs the kernel a few times
  ncu -i /tmp/forward.ncu-rep --page source --csv --print-source sass > forward.csv
  python benchmarks/sass_profile.py forward.csv [--top 25]

The source page has one row per SASS instruction: its warp-stall samples in total and per
reason (``stall_*`` columns) and how often it executed. This prints the share of samples
per stall reason, the instruction mix (share of executed warp instructions per opcode,
beside its share of samples) and the instructions that collected the most samples, which
is where a kernel's time goes (benchmarks/RESULTS.md, issue 11).
"""

import argparse
import collections
import csv
import pathlib

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
SOURCE = "Source"


def read(path: pathlib.Path) -> list[dict[str, str]]:
  """The source page's instruction rows (the first line names the kernel, the second the columns)."""
  lines = path.read_text().splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith('"Address"'))
  return list(csv.DictReader(lines[header:]))


def _number(text: str | None) -> float:
  return float((text or "0").replace(",", "") or 0)


def _stall_columns(rows) -> list[str]:
  """The per-reason sample columns of all samples (``stall_*``, not the "Not Issued" copies)."""
  return [c for c in rows[0] if c.startswith("stall_") and "Not Issued" not in c]


def _total_samples(rows) -> float:
  return sum(_number(r[SAMPLES]) for r in rows) or 1.0


def opcode(sass: str) -> str:
  """``@!P1 BRA 0x7f...`` -> ``BRA``; ``HGMMA.64x128x16.F32.BF16 R88, ...`` -> ``HGMMA``."""
  words = sass.split()
  if words and words[0].startswith("@"):
    words = words[1:]
  return words[0].split(".")[0] if words else ""


def stall_shares(rows) -> dict[str, float]:
  """Stall reason -> its share of all samples, largest first."""
  total = _total_samples(rows)
  shares = {c.removeprefix("stall_"): sum(_number(r[c]) for r in rows) / total for c in _stall_columns(rows)}
  return dict(sorted(shares.items(), key=lambda item: -item[1]))


def opcode_mix(rows) -> list[tuple[str, float, float]]:
  """(opcode, share of executed instructions, share of samples), most executed first."""
  executed, sampled = collections.Counter(), collections.Counter()
  for r in rows:
    op = opcode(r[SOURCE])
    executed[op] += _number(r[EXECUTED])
    sampled[op] += _number(r[SAMPLES])
  total_executed = sum(executed.values()) or 1.0
  total_sampled = _total_samples(rows)
  return [(op, n / total_executed, sampled[op] / total_sampled) for op, n in executed.most_common()]


def hot_lines(rows, top: int) -> list[tuple[int, float, str, list[str]]]:
  """(row index, share of samples, SASS, its two largest stall reasons) of the ``top`` rows, in address order."""
  total, reasons = _total_samples(rows), _stall_columns(rows)
  hottest = sorted(range(len(rows)), key=lambda i: -_number(rows[i][SAMPLES]))[:top]
  result = []
  for i in sorted(hottest):
    r = rows[i]
    worst = sorted(reasons, key=lambda c: -_number(r[c]))[:2]
    result.append((i, _number(r[SAMPLES]) / total, r[SOURCE].strip(), [c.removeprefix("stall_") for c in worst]))
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("csv", type=pathlib.Path, help="ncu -i REPORT --page source --csv --print-source sass")
  parser.add_argument("--top", type=int, default=25, help="how many of the most-sampled instructions to list")
  args = parser.parse_args()
  rows = read(args.csv)
  print(f"{len(rows)} instructions, {sum(_number(r[SAMPLES]) for r in rows):.0f} samples\n\nstall reasons:")
  for reason, share in stall_shares(rows).items():
    if share >= 0.005:
      print(f"  {reason:20s} {share:6.1%}")
  print("\nopcodes (executed / samples):")
  for op, executed, sampled in opcode_mix(rows)[:20]:
    print(f"  {op:12s} {executed:6.1%} {sampled:6.1%}")
  print(f"\nthe {args.top} most-sampled instructions (row, samples, SASS, main stalls):")
  for i, share, sass, worst in hot_lines(rows, args.top):
    print(f"  {i:5d} {share:6.1%}  {sass[:64]:64s} {', '.join(worst)}")


if __name__ == "__main__":
  main()
