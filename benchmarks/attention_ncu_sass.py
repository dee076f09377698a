"""Summarize ncu's SASS source page (``ncu --page source --csv --print-source sass``).

    python benchmarks/attention_ncu_sass.py REPORT-sass.csv [TOP] [KERNEL-SUBSTRING]

Per kernel in the page: the stall samples by reason and by opcode, and the TOP instructions
with the most samples, each with its top reasons and the two instructions before it (a stall is
charged to the instruction that waits, so its cause is usually just above).
"""
from __future__ import annotations

import csv
import sys
from collections import Counter


def _kernels(path: str):
    """(kernel name, header, rows) per kernel: ncu prints a "Kernel Name" row, then a table."""
    name, header, rows = None, None, []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            if not row:
                continue
            if row[0] == "Kernel Name":
                if header:
                    yield name, header, rows
                name, header, rows = row[1], None, []
            elif row[0] == "Address":
                header = row
            elif header and len(row) == len(header):
                rows.append(row)
    if header:
        yield name, header, rows


def _num(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def summarize(name: str, header: list[str], rows: list[list[str]], top: int) -> None:
    col = {h: i for i, h in enumerate(header)}
    src, samp = col["Source"], col["Warp Stall Sampling (All Samples)"]
    execd = col.get("Instructions Executed")
    reasons = [h for h in header if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(_num(r[samp]) for r in rows) or 1.0
    print(f"\n### {name[:100]}\n{len(rows)} SASS lines, {total:.0f} stall samples")
    by_reason = Counter({h: sum(_num(r[col[h]]) for r in rows) for h in reasons})
    print("by reason: " + ", ".join(f"{h[6:]} {n / total:.1%}"
                                    for h, n in by_reason.most_common(10) if n))
    by_op = Counter()
    for r in rows:
        by_op[(r[src].split() or ["?"])[0].split(".")[0]] += _num(r[samp])
    print("by opcode: " + ", ".join(f"{op} {n / total:.1%}" for op, n in by_op.most_common(16)))
    for h in ("L1 Wavefronts Shared Excessive", "L1 Conflicts Shared N-Way"):
        if h in col:
            worst = sorted(rows, key=lambda r: -_num(r[col[h]]))[:6]
            print(f"most {h}: " + "; ".join(f"{r[src].strip()[:60]} ({r[col[h]]})"
                                              for r in worst if _num(r[col[h]])))
    order = sorted(range(len(rows)), key=lambda i: -_num(rows[i][samp]))[:top]
    print(f"top {top} instructions (share of samples [executed]: top reasons):")
    for i in sorted(order):
        for j in (i - 2, i - 1):
            if j >= 0 and j not in order:
                print(f"          {rows[j][0][-5:]} {rows[j][src].strip()[:80]}")
        why = sorted(reasons, key=lambda h: -_num(rows[i][col[h]]))[:3]
        why = ", ".join(f"{h[6:]} {_num(rows[i][col[h]]) / total:.1%}" for h in why
                        if _num(rows[i][col[h]]))
        print(f"  {_num(rows[i][samp]) / total:6.2%} {rows[i][0][-5:]} {rows[i][src].strip()[:80]}"
              f" [{_num(rows[i][execd]) if execd is not None else 0:.0f}]: {why}")


def main(path: str, top: int = 40, only: str = "") -> None:
    for name, header, rows in _kernels(path):
        if only in name:
            summarize(name, header, rows, top)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:3]), *sys.argv[3:4])
