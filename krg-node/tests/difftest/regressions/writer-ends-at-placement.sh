# difftest-modes: least-loaded
# difftest-repeat: 10
# Hung 1 run in 30 (seed 2026, case 91): in the last pipeline awk wrote
# all its output into the pipe and exited just after grep's placement
# found it as its stdin's writer; grep waited a minute for it to freeze.
set -o pipefail
bash -c 'while read -r x; do /usr/bin/printf '\''<%s>\n'\'' "$x"; done <<EOF
1
2
3
4
5
6
7
8
EOF
exit 5' nested-0
( { cat <<EOF
charlie 0 $((3 * 7)) ${HOME:+home}
EOF
} | "$DT_BIN/spawnkit" chain md5sum 'wc -l' | "$DT_BIN/spawnkit" run fork tr a-z A-Z ) > job1 &
( head -n 1922 "$DT_DATA/text" | od -An -c | tail -n 3 | sed 's/1/one/g' ) > job2 &
( for i in $(seq 27); do echo "i=$i"; done | sed '/7/d' | tee tee4 ) > job3 &
wait
cat job1 job2 job3
cat tee4
awk 'BEGIN { for (i = 1; i <= 7640; i++) print i * i % 1000 }' | grep 7 | od -An -c | tail -n 3
echo "rc=$?"

