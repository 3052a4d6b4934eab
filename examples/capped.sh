#!/bin/sh
# Run a command inside a fresh cgroup v1 memory cgroup of CAP bytes (page cache counted), the page cache
# dropped first; print the cgroup's peak, how often it hit the cap, and whether anything was OOM-killed.
# Root only. fate-bench --memory-limits does the same for cap = limit; this lets the two differ:
#     examples/capped.sh 1400000000 fate-run ART --memory-limit 1.2GB ...
set -u
CAP=$1; shift
G=/sys/fs/cgroup/memory/fate-capped-$$
mkdir "$G" && echo "$CAP" > "$G/memory.limit_in_bytes" && echo 0 > "$G/memory.swappiness" 2>/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches
sh -c "echo \$\$ > $G/cgroup.procs && exec \"\$@\"" sh "$@"
rc=$?
echo "cgroup: peak $(( $(cat "$G/memory.max_usage_in_bytes") / 1000000 )) MB, hit the cap $(cat "$G/memory.failcnt") times, oom_kill $(grep oom_kill "$G/memory.oom_control" | awk '{print $2}'), exit $rc" >&2
rmdir "$G"
exit $rc
