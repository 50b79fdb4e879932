"""Pod Security Standards, "restricted" profile, as a checker for rendered pod specs.

Written from the Kubernetes documentation of the profile
(https://kubernetes.io/docs/concepts/security/pod-security-standards/, the
"baseline" controls plus the "restricted" ones, policy version latest). The
admission plugin itself is Go (k8s.io/pod-security-admission) and cannot run
here, so this re-states its rules: each check below is one control of the
page, named as the page names it. ``violations`` returns one message per
failed control; an empty list means the pod would be admitted into a
namespace labelled ``pod-security.kubernetes.io/enforce: restricted``.
"""

from __future__ import annotations

from typing import Any

Obj = dict[str, Any]

# Baseline "Capabilities": what a container may add (restricted narrows this below).
_BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
# Restricted "Volume Types".
_VOLUME_TYPES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip


def pod_specs(obj: Obj) -> list[tuple[str, Obj]]:
    """(where, pod spec) of every pod template in a Kubernetes object (RayClusters too)."""
    kind = obj.get("kind")
    spec = obj.get("spec", {})
    if kind == "Pod":
        return [("Pod", spec)]
    if kind in {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}:
        return [(kind, spec["template"]["spec"])]
    if kind == "CronJob":
        return [(kind, spec["jobTemplate"]["spec"]["template"]["spec"])]
    if kind == "RayCluster":
        out = [("headGroupSpec", spec["headGroupSpec"]["template"]["spec"])]
        out += [
            (f"workerGroupSpecs[{g['groupName']}]", g["template"]["spec"])
            for g in spec.get("workerGroupSpecs", [])
        ]
        return out
    return []


def _containers(pod: Obj) -> list[Obj]:
    return [
        *pod.get("initContainers", []),
        *pod.get("containers", []),
        *pod.get("ephemeralContainers", []),
    ]


def violations(pod: Obj) -> list[str]:
    """Every "restricted" control the pod spec fails (empty: admitted)."""
    out: list[str] = []
    psc = pod.get("securityContext", {})
    containers = _containers(pod)

    def each(name: str) -> list[tuple[str, Obj]]:
        return [(c.get("name", "?"), c.get("securityContext", {}).get(name)) for c in containers]

    # ---- baseline
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            out.append(f"Host Namespaces: {field} must be unset or false")
    if psc.get("windowsOptions", {}).get("hostProcess"):
        out.append("HostProcess: securityContext.windowsOptions.hostProcess must be false")
    for c in containers:
        sc = c.get("securityContext", {})
        name = c.get("name", "?")
        if sc.get("privileged"):
            out.append(f"Privileged Containers: {name} is privileged")
        if sc.get("windowsOptions", {}).get("hostProcess"):
            out.append(f"HostProcess: {name} sets hostProcess")
        added = set(sc.get("capabilities", {}).get("add", []))
        if added - _BASELINE_CAPS:
            out.append(f"Capabilities: {name} adds {sorted(added - _BASELINE_CAPS)}")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                out.append(f"Host Ports: {name} uses hostPort {port['hostPort']}")
        if sc.get("procMount", "Default") != "Default":
            out.append(f"/proc Mount Type: {name} sets procMount {sc['procMount']}")
        if sc.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"AppArmor: {name} sets appArmorProfile {sc['appArmorProfile']}")
        se = sc.get("seLinuxOptions", {})
        if se.get("type", "") not in _SELINUX_TYPES or se.get("user") or se.get("role"):
            out.append(f"SELinux: {name} sets seLinuxOptions {se}")
    for vol in pod.get("volumes", []):
        if "hostPath" in vol:
            out.append(f"HostPath Volumes: volume {vol.get('name')} is a hostPath")
    for sysctl in psc.get("sysctls", []):
        if sysctl.get("name") not in _SAFE_SYSCTLS:
            out.append(f"Sysctls: {sysctl.get('name')} is not a safe sysctl")
    if psc.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault", "Localhost"):
        out.append("AppArmor: pod appArmorProfile must be RuntimeDefault or Localhost")
    se = psc.get("seLinuxOptions", {})
    if se.get("type", "") not in _SELINUX_TYPES or se.get("user") or se.get("role"):
        out.append(f"SELinux: pod seLinuxOptions {se}")

    # ---- restricted
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= _VOLUME_TYPES:
            out.append(f"Volume Types: volume {vol.get('name')} is {sorted(kinds)}")
    for name, value in each("allowPrivilegeEscalation"):
        if value is not False:
            out.append(f"Privilege Escalation: {name} must set allowPrivilegeEscalation: false")
    pod_non_root = psc.get("runAsNonRoot") is True
    for name, value in each("runAsNonRoot"):
        if value is False or (value is None and not pod_non_root):
            out.append(f"Running as Non-root: {name} must run with runAsNonRoot: true")
    if psc.get("runAsUser") == 0:
        out.append("Running as Non-root user: pod runAsUser must not be 0")
    for name, value in each("runAsUser"):
        if value == 0:
            out.append(f"Running as Non-root user: {name} runAsUser must not be 0")
    pod_seccomp = psc.get("seccompProfile", {}).get("type")
    if pod_seccomp not in (None, "RuntimeDefault", "Localhost"):
        out.append(f"Seccomp: pod seccompProfile {pod_seccomp} is not allowed")
    for name, value in each("seccompProfile"):
        kind = (value or {}).get("type")
        if kind is None and pod_seccomp is None:
            out.append(f"Seccomp: {name} needs seccompProfile RuntimeDefault or Localhost")
        elif kind not in (None, "RuntimeDefault", "Localhost"):
            out.append(f"Seccomp: {name} seccompProfile {kind} is not allowed")
    for name, value in each("capabilities"):
        caps = value or {}
        if "ALL" not in caps.get("drop", []):
            out.append(f"Capabilities: {name} must drop ALL")
        extra = set(caps.get("add", [])) - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"Capabilities: {name} may add only NET_BIND_SERVICE, adds {sorted(extra)}")
    return out


def hardening_gaps(pod: Obj, needs_api_token: bool = False) -> list[str]:
    """What this project asks beyond "restricted": read-only root filesystems, memory
    limits, a sized memory-backed /dev/shm, no service-account token unless needed."""
    out = []
    if not needs_api_token and pod.get("automountServiceAccountToken") is not False:
        out.append("automountServiceAccountToken must be false (the pod never calls the API)")
    for c in _containers(pod):
        name = c.get("name", "?")
        if c.get("securityContext", {}).get("readOnlyRootFilesystem") is not True:
            out.append(f"{name}: readOnlyRootFilesystem must be true")
        if "memory" not in c.get("resources", {}).get("limits", {}):
            out.append(f"{name}: needs a memory limit")
    for vol in pod.get("volumes", []):
        empty = vol.get("emptyDir")
        if empty is not None and empty.get("medium") == "Memory" and not empty.get("sizeLimit"):
            out.append(f"volume {vol['name']}: a memory-backed emptyDir needs a sizeLimit")
    return out
