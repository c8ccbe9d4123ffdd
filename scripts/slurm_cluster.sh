#!/bin/bash
# A one-node SLURM cluster under one directory, started and stopped by hand: for trying
# `hydra/launcher=submitit_slurm` on a workstation, and for the tests marked `slurm`.
#
#   scripts/slurm_cluster.sh start DIR   # slurmctld, slurmd and accounting (slurmdbd on MariaDB)
#   . DIR/env.sh                         # SLURM_CONF for sinfo, sbatch, squeue, sacct, scontrol
#   scripts/slurm_cluster.sh stop DIR    # every daemon it started; DIR stays for the logs
#
# Needs Debian's slurmctld, slurmd, slurm-client, slurmdbd and mariadb-server (`make slurm-packages`
# installs them, as root) and runs as root, without systemd: every daemon is started by hand
# with its files under DIR. Accounting is real (slurmdbd on its own MariaDB), because without
# it `sacct` fails and submitit cannot tell that a job died without a result (it would wait
# forever). Settings that make a requeue and a cancel take seconds, not minutes:
# sched_interval=1 (the scheduler looks every second), KillWait=5, cred_expire=5 (a requeued job
# need not wait 120 s), MinJobAge=300 (a finished job stays visible to squeue/scontrol).
# Ports: SLURM_CLUSTER_PORT (default 16817) and the next three.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)
base=${SLURM_CLUSTER_PORT:-16817}
ctld_port=$base slurmd_port=$((base + 1)) dbd_port=$((base + 2)) db_port=$((base + 3))
host=$(hostname -s)  # SlurmctldHost and NodeName must be this name
export SLURM_CONF=$dir/etc/slurm.conf

wait_for() {  # wait_for SECONDS WHAT COMMAND...: run COMMAND until it succeeds
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "slurm_cluster: $what did not come up within ${seconds}s; logs in $dir/log" >&2
  return 1
}

write_configs() {
  mkdir -p "$dir"/{etc,log,run,spool/ctld,spool/d,db}
  local cpus mem
  cpus=$(nproc)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MB, leaving the system its share
  cat >"$dir/etc/slurm.conf" <<EOF
ClusterName=vaecli
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation=$dir/spool/ctld
SlurmdSpoolDir=$dir/spool/d
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
KillWait=5
MinJobAge=300
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$dbd_port
JobAcctGatherType=jobacct_gather/none
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/etc/slurmdbd.conf" <<EOF
AuthType=auth/none
DbdAddr=127.0.0.1
DbdHost=$host
DbdPort=$dbd_port
SlurmUser=root
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dir/etc/slurmdbd.conf"  # slurmdbd refuses a config others can read (it holds a password)
  cat >"$dir/env.sh" <<EOF
export SLURM_CONF=$SLURM_CONF
EOF
}

start_database() {
  if [ ! -d "$dir/db/mysql" ]; then
    mariadb-install-db --user=root --datadir="$dir/db" --skip-test-db >"$dir/log/mariadb-install.log" 2>&1
  fi
  mariadbd --user=root --datadir="$dir/db" --socket="$dir/run/mariadb.sock" --port="$db_port" \
    --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$dir/run/mariadb.pid" \
    --log-error="$dir/log/mariadb.log" >/dev/null 2>&1 &
  wait_for 60 MariaDB mariadb --socket="$dir/run/mariadb.sock" -e "SELECT 1"
  mariadb --socket="$dir/run/mariadb.sock" -e "
    CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"
}

start() {
  if [ -f "$dir/run/slurmctld.pid" ] && kill -0 "$(cat "$dir/run/slurmctld.pid")" 2>/dev/null; then
    echo "slurm_cluster: already running in $dir" >&2
    return 0
  fi
  for daemon in slurmctld slurmd slurmdbd mariadbd sacctmgr; do
    command -v "$daemon" >/dev/null || { echo "slurm_cluster: $daemon is not installed (make slurm-packages)" >&2; exit 1; }
  done
  write_configs
  start_database
  slurmdbd  # reads slurmdbd.conf beside $SLURM_CONF; daemonizes
  wait_for 30 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster vaecli >/dev/null 2>&1 || true  # registered once; the next start finds it
  slurmctld -i  # -i: ignore state left in DIR by a cluster killed before
  wait_for 30 slurmctld scontrol ping
  slurmd
  wait_for 30 "an idle node" sh -c "sinfo -h -o %t | grep -q idle"
  echo "slurm_cluster: one-node cluster $host up in $dir (. $dir/env.sh for the client tools)"
}

stop() {
  for daemon in slurmd slurmctld slurmdbd mariadb; do
    local pidfile=$dir/run/$daemon.pid pid
    pid=$(cat "$pidfile" 2>/dev/null) || continue
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
  done
  echo "slurm_cluster: stopped ($dir)"
}

case $action in
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) usage ;;
esac
