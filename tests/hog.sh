#!/usr/bin/env bash
# Run a command while busy loops hog the CPU: how the suite is checked for flakiness under load.
#
#   tests/hog.sh [-n N] COMMAND [ARG...]
#
# Starts N busy loops (default: one per core, nproc), runs COMMAND under them, kills the loops
# whatever happens (the command's end, an error, Ctrl-C, SIGTERM), and exits with the
# command's exit code. Example: tests/hog.sh .venv/bin/pytest
set -uo pipefail

loops=$(nproc)
if [[ "${1:-}" == "-n" ]]; then
    loops=$2
    shift 2
fi
if [[ $# -eq 0 ]]; then
    echo "usage: $0 [-n N] COMMAND [ARG...]" >&2
    exit 2
fi

pids=()
cmd=
stop_loops() {
    if ((${#pids[@]})); then
        kill "${pids[@]}" 2>/dev/null
        wait "${pids[@]}" 2>/dev/null
    fi
    pids=()
}
on_signal() {  # pass the signal on to the command, stop the loops, exit as signalled
    [[ -n "$cmd" ]] && kill "-$1" "$cmd" 2>/dev/null && wait "$cmd" 2>/dev/null
    stop_loops
    exit "$2"
}
trap stop_loops EXIT
trap 'on_signal INT 130' INT
trap 'on_signal TERM 143' TERM

for ((i = 0; i < loops; i++)); do
    (trap - INT TERM; while :; do :; done) &
    pids+=($!)
done
echo "hog.sh: ${#pids[@]} busy loop(s) running (pids ${pids[*]}): $*" >&2

# In the background (bash runs traps only between commands) with our stdin, then waited for;
# SIGINT and SIGQUIT as they were (bash ignores them in background commands, and a Python
# program started with SIGINT ignored never stops on Ctrl-C, nor `capi sandbox` on SIGINT).
(trap - INT QUIT; exec "$@") <&0 &
cmd=$!
wait "$cmd"
code=$?
cmd=
stop_loops
echo "hog.sh: the command exited $code; busy loops stopped" >&2
exit "$code"
