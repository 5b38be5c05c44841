#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the launcher tests and for trying slurm.sbatch locally.
#
#   scripts/local_slurm.sh install # only install slurm-wlm + munge (root; scripts/test.sh calls it)
#   scripts/local_slurm.sh up      # install them if needed, start munged, slurmctld, slurmd
#   scripts/local_slurm.sh down    # stop them and remove the state folder
#   scripts/local_slurm.sh env     # print the export line the SLURM clients need (SLURM_CONF)
#
# State, spool, logs and the generated slurm.conf live in $DISTILL_SLURM_DIR (default /tmp/distill-slurm).
# Jobs may be requeued (JobRequeue=1) and may be signalled before their time limit, as on a cluster.
set -euo pipefail

STATE=${DISTILL_SLURM_DIR:-/tmp/distill-slurm}
CONF=$STATE/slurm.conf

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return
  [ "$(id -u)" = 0 ] || die "slurm-wlm and munge are not installed; run this as root once (it installs them with apt-get)."
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null; }
}

start_munge() {
  mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
  [ -s /etc/munge/munge.key ] || mungekey -c -f -k /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  pgrep -x munged >/dev/null || munged --force
}

write_conf() {
  local host cpus memory
  host=$(hostname -s)
  cpus=$(nproc)
  memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
  mkdir -p "$STATE"/{ctld,spool,log}
  cat >"$CONF" <<EOF
ClusterName=distill-local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=${DISTILL_SLURMCTLD_PORT:-6817}
SlurmdPort=${DISTILL_SLURMD_PORT:-6818}
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
MpiDefault=none
InactiveLimit=0
KillWait=30
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$host CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
}

wait_for_node() {
  export SLURM_CONF=$CONF
  for _ in $(seq 1 60); do
    if sinfo -h -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then return; fi
    sleep 0.5
  done
  die "the node did not come up; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
}

up() {
  install_packages
  start_munge
  if [ -f "$STATE/slurmctld.pid" ] && kill -0 "$(cat "$STATE/slurmctld.pid")" 2>/dev/null; then
    echo "local SLURM already up; export SLURM_CONF=$CONF"; return
  fi
  write_conf
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  wait_for_node
  echo "local SLURM up (node $(hostname -s), $(nproc) CPUs); export SLURM_CONF=$CONF"
}

down() {
  for daemon in slurmd slurmctld; do
    [ -f "$STATE/$daemon.pid" ] && kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
  done
  sleep 1
  pkill -f "slurmstepd" 2>/dev/null || true
  rm -rf "$STATE"
  echo "local SLURM down"
}

case "${1:-}" in
  install) install_packages ;;
  up) up ;;
  down) down ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) die "usage: scripts/local_slurm.sh install|up|down|env" ;;
esac
