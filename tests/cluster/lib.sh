# shellcheck shell=bash disable=SC2034 # the constants are used by the scripts that source this
# Shared by tests/cluster/{up,down,load-image} (sourced, not run): the node's fixed names and
# addresses, the layout of DIR, and the cleanup that `down` runs and `up` runs first when it
# finds leftovers.
#
# One node per machine: the bridge, the cgroup root and the iptables guard chain have fixed
# names, so /run/l4proxy-cluster/owner names the DIR whose node holds them.

# --- addresses (named in tests/cluster/README.md) -------------------------------------------
bridge=l4c0
pod_cidr=10.88.0.0/16
node_ip=10.88.0.1 # the bridge's address: node InternalIP, API server, kubelet
service_cidr=10.96.0.0/16
dns_ip=10.96.0.10 # the kube-dns Service (CoreDNS), the kubelet's clusterDNS
cluster_domain=cluster.local
node_name=l4proxy-node
cgroup_root=l4proxy-cluster # under every cgroup hierarchy's root
guard_chain=L4C-GUARD       # mangle FORWARD: nothing forwarded between the bridge and elsewhere
machine_state=/run/l4proxy-cluster

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

log() { echo "tests/cluster/$(basename "$0"): $*" >&2; }
die() {
    log "$*"
    exit 1
}

# dns_a NAME [SERVER]: one UDP query for NAME's A records to SERVER (default: the kube-dns
# Service), 1 s timeout; prints the addresses, one a line, and fails unless the answer is
# NOERROR with at least one. (No dig on these machines: a few lines of python.)
dns_a() {
    python3 - "$1" "${2:-$dns_ip}" << 'PY'
import random, socket, struct, sys
name, server = sys.argv[1], sys.argv[2]
qid = random.randrange(1 << 16)
qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split("."))
query = struct.pack(">6H", qid, 0x0100, 1, 0, 0, 0) + qname + b"\0" + struct.pack(">2H", 1, 1)
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(1)
sock.sendto(query, (server, 53))
reply = sock.recv(4096)
rid, flags, qdcount, ancount = struct.unpack(">4H", reply[:8])
if rid != qid or flags & 0xF:
    sys.exit(f"{name}: rcode {flags & 0xF}")
def skip_name(at):  # past a name: labels up to the root, or up to a compression pointer
    while reply[at] and reply[at] & 0xC0 != 0xC0:
        at += reply[at] + 1
    return at + (2 if reply[at] else 1)
at = 12
for _ in range(qdcount):
    at = skip_name(at) + 4
found = []
for _ in range(ancount):
    at = skip_name(at)
    rtype, _class, _ttl, size = struct.unpack(">2HIH", reply[at:at + 10])
    at += 10
    if rtype == 1 and size == 4:
        found.append(socket.inet_ntoa(reply[at:at + 4]))
    at += size
if not found:
    sys.exit(f"{name}: no A record")
print("\n".join(found))
PY
}

# layout DIR: sets the paths of one node's directory.
layout() {
    dir=$1
    runtime_dir=$dir/containerd # containerd's root, state, socket and config
    socket=$runtime_dir/containerd.sock
    kubelet_dir=$dir/kubelet
    agents_dir=$dir/agents # pids of kube-controller-manager, kube-scheduler, kubelet, kube-proxy
    cni_dir=$dir/cni
}

# The l4proxy-controlplane helper (tests/support): starts etcd + kube-apiserver, and stops any
# DIR/pids record (name pid start-time; start time guards against reused pids).
controlplane() {
    cargo run -q --manifest-path "$repo/Cargo.toml" -p l4proxy-testenv --bin l4proxy-controlplane -- "$@"
}

# Every mount point at or below DIR, deepest first.
mounts_under() {
    findmnt -rn -o TARGET | awk -v d="$1" 'index($0, d "/") == 1 || $0 == d' | sort -r
}

# Every cgroup hierarchy mount point (v1 controllers, named ones, and the v2 tree).
cgroup_mounts() {
    findmnt -rn -t cgroup,cgroup2 -o TARGET
}

# pids of processes that are ours without a record: containerd's shims for our socket (they
# outlive a killed containerd) and anything left in our cgroups.
stray_pids() {
    local cmdline pid mnt
    local -a args
    for cmdline in /proc/[0-9]*/cmdline; do
        pid=${cmdline#/proc/}
        pid=${pid%/cmdline}
        mapfile -d '' args < "$cmdline" 2> /dev/null || continue
        [[ ${args[0]-} == *containerd-shim* && " ${args[*]} " == *" -address $socket "* ]] && echo "$pid"
    done
    for mnt in $(cgroup_mounts); do
        [[ -d $mnt/$cgroup_root ]] || continue
        find "$mnt/$cgroup_root" -name cgroup.procs -exec cat {} + 2> /dev/null
    done
}

# Whether anything of a node is left: processes, mounts, the bridge, cgroups, rules, the owner.
leftovers() {
    [[ -s $dir/pids || -s $agents_dir/pids || -s $runtime_dir/pids ]] && return 0
    [[ -n $(mounts_under "$dir") ]] && return 0
    [[ -e $machine_state/owner ]] && return 0
    ip link show "$bridge" > /dev/null 2>&1 && return 0
    local mnt
    for mnt in $(cgroup_mounts); do
        [[ -d $mnt/$cgroup_root ]] && return 0
    done
    # grep without -q reads all of its input: `grep -q` would exit at the first match and make
    # a long iptables-save die of SIGPIPE, which pipefail turns into "no match".
    iptables-save 2> /dev/null | grep -E '^:(KUBE-|CNI-HOSTPORT|CNI-DN-|L4C-)' > /dev/null && return 0
    return 1
}

# Removes the chains kube-proxy, kubelet, portmap and we made, and every rule that jumps to
# them, in one iptables-restore per table; everything else in the tables is written back as it
# was.
drop_rules() {
    local save=$1 restore=$2 table
    command -v "$save" > /dev/null || return 0
    for table in filter nat mangle raw; do
        # Not `grep -q`: see leftovers.
        "$save" -t "$table" 2> /dev/null | grep -E '(KUBE-|CNI-HOSTPORT|CNI-DN-|L4C-)' > /dev/null || continue
        "$save" -t "$table" | grep -vE '^:(KUBE-|CNI-HOSTPORT|CNI-DN-|L4C-)|-j (KUBE-|CNI-HOSTPORT|CNI-DN-|L4C-)|^-A (KUBE-|CNI-HOSTPORT|CNI-DN-|L4C-)' |
            "$restore" -T "$table" || log "could not clean $save -t $table"
    done
}

# Stops and removes everything a node in $dir made (idempotent; also after a crashed `up`).
cleanup() {
    local pid mnt ns
    # Agents first, so nothing recreates pods, rules or the node while the rest goes.
    [[ -s $agents_dir/pids ]] && controlplane down "$agents_dir"
    # Containers: kill every task through containerd while it still runs, so the shims exit.
    if [[ -S $socket && -s $runtime_dir/pids ]] && [[ -x ${node_bin-}/ctr ]]; then
        for id in $("$node_bin/ctr" -a "$socket" -n k8s.io tasks ls -q 2> /dev/null); do
            "$node_bin/ctr" -a "$socket" -n k8s.io tasks kill -a -s SIGKILL "$id" > /dev/null 2>&1 || true
        done
    fi
    [[ -s $runtime_dir/pids ]] && controlplane down "$runtime_dir"
    # Whatever survived (shims of a killed containerd, container processes): ours by socket or
    # cgroup, so SIGKILL by pid; wait for them with a deadline.
    local deadline=$((SECONDS + 20)) pids
    while pids=$(stray_pids | sort -u) && [[ -n $pids ]]; do
        for pid in $pids; do kill -KILL "$pid" 2> /dev/null || true; done
        ((SECONDS < deadline)) || die "processes of the node survive SIGKILL: ${pids//$'\n'/ }"
        sleep 0.2 # poll interval of a loop with a deadline
    done
    [[ -s $dir/pids ]] && controlplane down "$dir"
    # Mounts: overlay rootfs, shm, network namespaces (netns_mounts_under_state_dir), volumes.
    while read -r mnt; do
        [[ -n $mnt ]] && { umount "$mnt" 2> /dev/null || umount -l "$mnt" || true; }
    done < <(mounts_under "$dir")
    # cgroups, deepest first (rmdir of an empty cgroup; only our root's subtree).
    for mnt in $(cgroup_mounts); do
        [[ -d $mnt/$cgroup_root ]] || continue
        find "$mnt/$cgroup_root" -depth -type d -exec rmdir {} + 2> /dev/null || true
        [[ -d $mnt/$cgroup_root ]] && log "could not remove cgroup $mnt/$cgroup_root"
    done
    # The bridge and any veth still on it (their netns are gone with the mounts above).
    for ns in $(ip -o link show master "$bridge" 2> /dev/null | awk -F': ' '{ print $2 }' | cut -d@ -f1); do
        ip link del "$ns" 2> /dev/null || true
    done
    ip link del "$bridge" 2> /dev/null || true
    drop_rules iptables-save iptables-restore
    drop_rules ip6tables-save ip6tables-restore
    restore_sysctls
    remove_host_files
    rm -f "$machine_state/owner"
    rmdir "$machine_state" 2> /dev/null || true
    # State (etcd data, containerd, kubelet, CNI IPAM, certificates); logs stay in $dir.
    rm -rf "$runtime_dir" "$kubelet_dir" "$agents_dir" "$cni_dir" "$dir/etcd-data" "$dir/pki" "$dir/config" "$dir/kubeconfig"
}

# Sysctls the node needs; their old values are kept in $machine_state for `down`.
set_sysctl() { # set_sysctl KEY VALUE
    local file=/proc/sys/${1//.//} old
    old=$(< "$file")
    [[ $old == "$2" ]] && return
    grep -q "^$1 " "$machine_state/sysctls" 2> /dev/null || echo "$1 $old" >> "$machine_state/sysctls"
    echo "$2" > "$file"
}

restore_sysctls() {
    local key value
    [[ -f $machine_state/sysctls ]] || return 0
    while read -r key value; do
        echo "$value" > "/proc/sys/${key//.//}" || log "could not restore $key=$value"
    done < "$machine_state/sysctls"
    rm -f "$machine_state/sysctls"
}

# The few files the kubelet and CNI write to fixed host paths whatever their configuration:
# container log links, CNI result caches (ours are named after our network, and each names
# the container whose loopback result sits beside it), the kubelet's device-plugin socket, and
# the directories left empty by them and by containerd's shims.
remove_host_files() {
    local link result id
    for link in /var/log/containers/*.log; do
        [[ -L $link && $(readlink "$link") == "$dir"/* ]] && rm -f "$link"
    done
    for result in /var/lib/cni/results/l4proxy-cluster-*; do
        [[ -e $result ]] || continue
        id=${result#/var/lib/cni/results/l4proxy-cluster-}
        id=${id%-*}
        rm -f "$result" "/var/lib/cni/results/cni-loopback-$id-lo"
    done
    rm -f /var/lib/kubelet/device-plugins/kubelet.sock
    rmdir /var/lib/kubelet/device-plugins /var/lib/kubelet /var/lib/cni/results /var/lib/cni \
        /var/log/containers /run/containerd/s /run/containerd 2> /dev/null || true
}
