#!/usr/bin/env bash
# A throw-away two-node Slurm cluster on this machine, for tests and demos.
#
#   slurm/local-cluster.sh install   # apt-get the Debian packages (root; `up` does it when slurmctld is missing)
#   slurm/local-cluster.sh up        # start munge, slurmctld and nodes n1, n2; wait until both are idle
#   . /tmp/scalept-slurm/env         # SLURM_CONF and PATH for sbatch, squeue, sinfo, scontrol, sacct
#   slurm/local-cluster.sh status    # sinfo and squeue
#   slurm/local-cluster.sh down      # stop this cluster's daemons (by their own PIDs); --purge also deletes its dir
#
# Everything the cluster writes lives in one directory: $SCALEPT_SLURM_DIR (default
# /tmp/scalept-slurm): slurm.conf, the env file, a private munge key and socket, the
# controller's state, the node spool dirs, the daemons' logs and PID files, and bin/sacct.
# Other settings (environment): SCALEPT_SLURM_PORT (controller port, nodes use the next
# two; default 16817), SCALEPT_SLURM_TIMEOUT (seconds `up` waits for idle nodes; 60).
#
# Both nodes run on this host (NodeAddr=127.0.0.1, one slurmd per node name and port),
# each offering max(2, cores) CPUs, so an array of two 2-node tasks runs at once. Their
# names do not resolve: a DDP master address must come from NodeAddr (127.0.0.1 here).
# There is no accounting database, so bin/sacct is a stand-in that answers the status
# queries submitit makes from `scontrol show job` (finished jobs are kept for a day).
# Job ids restart at 1 after `down --purge`: give every run its own submitit folder.
set -euo pipefail

DIR=${SCALEPT_SLURM_DIR:-/tmp/scalept-slurm}
PORT=${SCALEPT_SLURM_PORT:-16817}
TIMEOUT=${SCALEPT_SLURM_TIMEOUT:-60}
NODES=(n1 n2)
PACKAGES=(slurmctld slurmd slurm-client munge)

die() { echo "local-cluster: $*" >&2; exit 1; }
say() { echo "local-cluster: $*" >&2; }

install_packages() {
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root: apt-get install -y --no-install-recommends ${PACKAGES[*]}"
  say "installing ${PACKAGES[*]} (Debian packages)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}" >/dev/null
}

# pid_alive NAME: true when the PID file of NAME names a live process started by this cluster.
pid_alive() {
  local file="$DIR/pids/$1.pid" pid
  [ -s "$file" ] || return 1
  pid=$(cat "$file")
  [ -r "/proc/$pid/cmdline" ] || return 1
  # Guard against a recycled PID: the process must be ours (its command line names our dir).
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$DIR/"
}

# start NAME COMMAND...: run COMMAND detached in its own session, output to log/NAME.out.
start() {
  local name=$1; shift
  if pid_alive "$name"; then return; fi
  setsid "$@" >"$DIR/log/$name.out" 2>&1 </dev/null &
  echo $! >"$DIR/pids/$name.pid"
}

stop() {
  local name=$1 pid i
  pid_alive "$name" || { rm -f "$DIR/pids/$name.pid"; return 0; }
  pid=$(cat "$DIR/pids/$name.pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 50); do
    [ -d "/proc/$pid" ] || break
    sleep 0.2
  done
  if [ -d "/proc/$pid" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$DIR/pids/$name.pid"
  say "stopped $name (pid $pid)"
}

write_config() {
  local cpus mem i port
  cpus=$(nproc); [ "$cpus" -ge 2 ] || cpus=2
  mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  cat >"$DIR/slurm.conf.new" <<EOF
# Written by slurm/local-cluster.sh: a two-node test cluster on $(hostname -s); do not edit.
ClusterName=scalept
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$PORT
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket
CredType=cred/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# finished jobs stay visible to scontrol (and so to bin/sacct) for a day
MinJobAge=86400
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
EOF
  for i in "${!NODES[@]}"; do
    port=$((PORT + 1 + i))
    echo "NodeName=${NODES[$i]} NodeAddr=127.0.0.1 NodeHostname=$(hostname -s) Port=$port CPUs=$cpus RealMemory=$mem State=UNKNOWN" \
      >>"$DIR/slurm.conf.new"
  done
  echo "PartitionName=debug Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP" >>"$DIR/slurm.conf.new"
  if [ -f "$DIR/slurm.conf" ] && cmp -s "$DIR/slurm.conf" "$DIR/slurm.conf.new"; then
    rm "$DIR/slurm.conf.new"
  else
    mv "$DIR/slurm.conf.new" "$DIR/slurm.conf"
  fi
  cat >"$DIR/env" <<EOF
# Source this file (. $DIR/env) to talk to the local test cluster.
export SLURM_CONF=$DIR/slurm.conf
export PATH=$DIR/bin:\$PATH
EOF
}

write_sacct() {
  # Accounting-free stand-in for `sacct -o JobID,State,NodeList --parsable2 -j ID ...` (what
  # submitit asks), answered from `scontrol show job -o`. Other fields are mapped to scontrol's
  # names where they exist; array tasks print as <job>_<task>, pending ranges as <job>_[a-b].
  cat >"$DIR/bin/sacct" <<'EOF'
#!/usr/bin/env bash
# sacct stand-in of slurm/local-cluster.sh (no accounting on the test cluster).
set -uo pipefail
fields=JobID,JobName,State,NodeList; sep="|"; header=1; jobs=()
while [ $# -gt 0 ]; do
  case $1 in
    -o|--format) fields=$2; shift ;;
    --format=*) fields=${1#*=} ;;
    -P|--parsable2|-p|--parsable) ;;
    -n|--noheader) header=0 ;;
    -j|--jobs) IFS=, read -ra ids <<<"$2"; jobs+=("${ids[@]}"); shift ;;
    --jobs=*) IFS=, read -ra ids <<<"${1#*=}"; jobs+=("${ids[@]}") ;;
    *) ;;  # -X, --starttime, ...: not needed here
  esac
  shift
done
[ "$header" = 1 ] && echo "${fields//,/$sep}"
[ ${#jobs[@]} -gt 0 ] || jobs=("")
for job in "${jobs[@]}"; do
  scontrol show job -o ${job:+"${job%%_*}"} 2>/dev/null
done | awk -v fields="$fields" -v sep="$sep" -v want="${jobs[*]}" '
  BEGIN {
    n = split(fields, f, ",")
    alias["jobid"] = "JobId"; alias["jobname"] = "JobName"; alias["state"] = "JobState"
    alias["nodelist"] = "NodeList"; alias["exitcode"] = "ExitCode"; alias["elapsed"] = "RunTime"
    alias["start"] = "StartTime"; alias["end"] = "EndTime"; alias["submit"] = "SubmitTime"
    alias["partition"] = "Partition"; alias["nnodes"] = "NumNodes"; alias["ncpus"] = "NumCPUs"
    alias["reason"] = "Reason"; alias["user"] = "UserId"; alias["account"] = "Account"
    nw = split(want, w, " ")
    for (i = 1; i <= nw; i++) { if (w[i] ~ /_/) { task[w[i]] = 1; split(w[i], b, "_"); tasks_of[b[1]] = 1 } else plain[w[i]] = 1 }
  }
  NF == 0 { next }
  {
    delete v
    for (i = 1; i <= NF; i++) { p = index($i, "="); if (p) v[substr($i, 1, p - 1)] = substr($i, p + 1) }
    id = v["JobId"]
    if ("ArrayJobId" in v && "ArrayTaskId" in v) {
      t = v["ArrayTaskId"]; sub(/%.*/, "", t)
      id = (t ~ /^[0-9]+$/) ? v["ArrayJobId"] "_" t : v["ArrayJobId"] "_[" t "]"
    }
    base = ("ArrayJobId" in v) ? v["ArrayJobId"] : v["JobId"]
    if (nw && !(base in plain) && !(id in task) && !((base in tasks_of) && index(id, "["))) next  # -j J_T: only that task
    if (id in printed) next  # asked by the array id and by the own job id of a task: print once
    printed[id] = 1
    if (v["NodeList"] == "(null)" || v["NodeList"] == "") v["NodeList"] = "None assigned"
    line = ""
    for (i = 1; i <= n; i++) {
      name = tolower(f[i]); sub(/%.*/, "", name)
      val = (name == "jobid") ? id : ((name in alias) ? v[alias[name]] : "")
      line = line (i > 1 ? sep : "") val
    }
    print line
  }'
EOF
  chmod +x "$DIR/bin/sacct"
}

node_states() { SLURM_CONF="$DIR/slurm.conf" sinfo -h -N -o '%N %t' 2>/dev/null | sort -u; }

wait_idle() {
  local deadline=$((SECONDS + TIMEOUT)) states
  while :; do
    states=$(node_states || true)
    if [ "$(grep -cE '^(n1|n2) (idle|mix|alloc)$' <<<"$states")" = "${#NODES[@]}" ]; then
      say "cluster up: ${states//$'\n'/, } ($DIR)"
      return 0
    fi
    if [ $SECONDS -ge $deadline ]; then
      say "nodes not idle after ${TIMEOUT}s: ${states:-no answer from slurmctld}"
      for log in "$DIR"/log/*.out; do  # a daemon's own log file, else what it printed before opening it
        [ -s "${log%.out}.log" ] && log=${log%.out}.log
        [ -s "$log" ] && { echo "--- $log" >&2; grep -E 'error|fatal' "$log" | tail -n 4 >&2; }
      done
      die "cluster did not come up (see the logs above; slurm/local-cluster.sh down, then up again)"
    fi
    sleep 0.5
  done
}

up() {
  command -v slurmctld >/dev/null || install_packages
  for tool in slurmctld slurmd munged sinfo; do command -v $tool >/dev/null || die "$tool is missing after install"; done
  mkdir -p "$DIR"/{bin,state,spool,run,log,pids,munge} "${NODES[@]/#/$DIR/spool/}"
  write_config
  write_sacct
  # A private munge daemon: own key, socket, PID and log under $DIR/munge (root runs it as munge).
  local as=()
  if [ "$(id -u)" = 0 ] && id munge >/dev/null 2>&1; then
    as=(runuser -u munge --)
    chown munge:munge "$DIR/munge"
  fi
  chmod 755 "$DIR/munge"  # munged wants its socket dir reachable by every client (the job's user too)
  if [ ! -s "$DIR/munge/munge.key" ]; then
    (umask 077; dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none)
    [ ${#as[@]} -eq 0 ] || chown munge:munge "$DIR/munge/munge.key"
  fi
  if ! pid_alive munged; then
    rm -f "$DIR/munge/munge.socket" "$DIR/munge/munge.socket.lock"
    "${as[@]}" munged --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/munge/munged.log" --seed-file="$DIR/munge/munged.seed" \
      || die "munged did not start; see $DIR/munge/munged.log"
    local i
    for i in $(seq 50); do [ -s "$DIR/munge/munged.pid" ] && break; sleep 0.1; done
    cp "$DIR/munge/munged.pid" "$DIR/pids/munged.pid"
  fi
  start slurmctld slurmctld -D -f "$DIR/slurm.conf"
  local node
  for node in "${NODES[@]}"; do start "slurmd-$node" slurmd -D -N "$node" -f "$DIR/slurm.conf"; done
  wait_idle
  echo "export SLURM_CONF=$DIR/slurm.conf PATH=$DIR/bin:\$PATH   # or: . $DIR/env"
}

down() {
  local node
  for node in "${NODES[@]}"; do stop "slurmd-$node"; done
  stop slurmctld
  stop munged
  if [ "${1:-}" = --purge ]; then
    rm -rf "$DIR"
    say "removed $DIR"
  fi
}

status() {
  local name
  for name in munged slurmctld "${NODES[@]/#/slurmd-}"; do
    if pid_alive "$name"; then echo "$name: running (pid $(cat "$DIR/pids/$name.pid"))"; else echo "$name: stopped"; fi
  done
  pid_alive slurmctld || return 3
  SLURM_CONF="$DIR/slurm.conf" sinfo
  SLURM_CONF="$DIR/slurm.conf" squeue
}

case ${1:-} in
  install) install_packages ;;
  up) up ;;
  down) down "${2:-}" ;;
  status) status ;;
  *) echo "usage: $0 install|up|down [--purge]|status   (state in \$SCALEPT_SLURM_DIR, default /tmp/scalept-slurm)" >&2; exit 2 ;;
esac
