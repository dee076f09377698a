#!/usr/bin/env bash
# Nsight Compute over attention_ncu.py's cases: OUT_DIR/<case>.ncu-rep, the details page
# (<case>.txt) and, for gla's kernels, the SASS lines with the most stall samples
# (<case>-sass.csv, summarized by attention_ncu_sass.py).
#   bash benchmarks/attention_ncu.sh OUT_DIR [CASE...]
set -u
out=${1:?OUT_DIR}; shift
cases=${*:-bwd-d128-t4096 bwd-d64-t8192 fwd-d128-t8192 fwd-d128-t8192-gated cudnn-bwd-d128-t4096}
here=$(cd "$(dirname "$0")" && pwd)
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | tail -1)
mkdir -p "$out"
"$ncu" --version | tee "$out/ncu-version.txt"
for c in $cases; do
  # --clock-control none: the clocks stay as the machine sets them (METHOD.md)
  "$ncu" --clock-control none --profile-from-start off --set full --import-source yes \
      -f -o "$out/$c" python3 "$here/attention_ncu.py" "$c" > "$out/$c.log" 2>&1 \
    || { echo "ncu failed on $c"; tail -20 "$out/$c.log"; continue; }
  "$ncu" --import "$out/$c.ncu-rep" --page details > "$out/$c.txt" 2>&1
  case $c in cudnn-*) ;; *)
    "$ncu" --import "$out/$c.ncu-rep" --page source --csv --print-source sass \
        > "$out/$c-sass.csv" 2>&1
    python3 "$here/attention_ncu_sass.py" "$out/$c-sass.csv" > "$out/$c-sass-top.txt" 2>&1 ;;
  esac
  echo "== $c"; grep -E "^  [A-Za-z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|Registers Per|Achieved Occupancy|No Eligible|Issued Warp" "$out/$c.txt" | head -40
done
