# difftest-modes: two-choices,round-robin
# difftest-repeat: 20
# Hung 3 runs in 80 (seed 2026, case 32, minimised): cut and the bash
# stage were placed at once; cut's move found bash as its stdout's peer,
# then waited for a shadow's relay while bash started its own placement
# (exec tr), and ordered bash a stream swap bash never took (a process
# placed at its exec blocks its signals). Every stage waited on another.
sh -c 'sh -c '\''seq 16; exec /bin/echo end'\'' | cut -c1-3 | bash -c '\''exec "$@"'\'' _ tr 0-9 a-j | nl -ba
echo "rc=$?"
exit 5' | cat
