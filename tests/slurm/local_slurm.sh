#!/usr/bin/env bash
# A one-node SLURM on localhost for the tests (Debian's slurm-wlm and munge; root).
#
#   tests/slurm/local_slurm.sh start DIR   # munged, slurmctld, slurmd; prints SLURM_CONF=DIR/slurm.conf
#   tests/slurm/local_slurm.sh stop DIR    # stops the three daemons by their pid files
#
# Everything lives in DIR (config, munge key and socket, state, spool, logs, pid files): no
# system file is read or written, no systemd, no cgroups (proctrack/linuxproc, task/none). The
# node is this machine with its CPUs and no GPUs; jobs run as root. Exit code 3 with one line on
# stderr when the scheduler cannot start here (not root, packages missing, a daemon that fails).
set -euo pipefail
cmd=${1:-}; dir=${2:-}
[ -n "$cmd" ] && [ -n "$dir" ] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

cannot() { echo "cannot start SLURM here: $*" >&2; stop; exit 3; }

stop() {
  local name pid
  for name in slurmd slurmctld munged; do
    [ -f "$dir/$name.pid" ] || continue
    pid=$(cat "$dir/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    rm -f "$dir/$name.pid"
  done
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

start() {
  [ "$(id -u)" = 0 ] || cannot "not root (slurmd must run as root)"
  for b in munged mungekey slurmctld slurmd sbatch scontrol squeue; do
    command -v "$b" >/dev/null || cannot "no $b (apt-get install slurm-wlm munge)"
  done
  mkdir -p "$dir"/{state,spool}
  dir=$(cd "$dir" && pwd)
  chmod 755 "$dir"
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  mungekey -c -f -k "$dir/munge.key"
  munged --force --socket="$dir/munge.sock" --key-file="$dir/munge.key" \
    --log-file="$dir/munged.log" --pid-file="$dir/munged.pid" --seed-file="$dir/munged.seed" \
    || cannot "munged failed ($dir/munged.log)"
  cat > "$dir/slurm.conf" <<CONF
ClusterName=metadroptest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge.sock,cred_expire=5
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmctldDebug=debug2
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
KillWait=5
OverTimeLimit=0
MpiDefault=none
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -f "$dir/slurm.conf" -i || cannot "slurmctld failed ($dir/slurmctld.log)"
  slurmd -f "$dir/slurm.conf" -N "$host" || cannot "slurmd failed ($dir/slurmd.log)"
  export SLURM_CONF="$dir/slurm.conf"
  for _ in $(seq 100); do
    if sinfo -h -o '%t' 2>/dev/null | grep -qx idle; then
      echo "SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.2
  done
  cannot "the node did not come up within 20 s ($dir/slurmctld.log, $dir/slurmd.log)"
}

case "$cmd" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop DIR" >&2; exit 2 ;;
esac
