"""Reading what strace saw a process do on the network, and the watch that every test of
the suite runs the shared moatd under: moatd opens no outbound connection, and neither may
anything it loads, so a call that addresses anything but a Unix socket is egress."""

import ipaddress
import re
from pathlib import Path

# The calls that can address a peer: connect, and the sends that take an address.
ADDRESSING_CALLS = ("connect", "sendto", "sendmsg", "sendmmsg")
# Logged beside them, rare and cheap: what shows the watch saw the process serve.
SERVING_CALLS = ("socket", "bind", "listen", "accept", "accept4")


def egress_watch(trace: Path) -> list[str]:
    """A command prefix: what follows runs under strace, every thread, logging the calls
    that can address a peer, and those that open, bind and accept sockets, into `trace`
    (the seccomp filter stops the process at those calls only; reads and writes on
    connected sockets go untraced, and `-s 0` leaves the bytes sent out of the log)."""
    return ["strace", "-f", "-qq", "--seccomp-bpf", "-s", "0", "-e",
            "trace=" + ",".join(ADDRESSING_CALLS + SERVING_CALLS), "-e", "signal=none",
            "-o", str(trace), "--"]


def egress_in(trace: Path) -> list[str]:
    """The calls of an `egress_watch` trace that address a socket of any family but
    AF_UNIX (a send on a connected socket names no address and is not one of them)."""
    found = []
    for line in joined(trace.read_text(errors="replace").splitlines()):
        call = re.match(r"\d+\s+(\w+)\((.*)", line)
        if not call or call.group(1) not in ADDRESSING_CALLS:
            continue
        families = set(re.findall(r"sa_family=(AF_\w+)", call.group(2)))
        if families - {"AF_UNIX"}:
            found.append(line)
    return found


def calls_in(trace: Path, names: tuple[str, ...] | None = None) -> int:
    """How many calls (of `names`, or of any name) a trace holds."""
    calls = (re.match(r"\d+\s+(\w+)\(", line)
             for line in joined(trace.read_text(errors="replace").splitlines()))
    return sum(1 for call in calls if call and (names is None or call.group(1) in names))


def joined(lines: list[str]):
    """strace -f lines with each call split by another thread (`<unfinished ...>`, then
    `<... NAME resumed>`) put back together."""
    pending: dict[str, str] = {}
    for line in lines:
        pid, _, rest = line.partition(" ")
        if rest.endswith("<unfinished ...>"):
            pending[pid] = rest[:-len("<unfinished ...>")].rstrip()
        elif resumed := re.match(r"\s*<\.\.\. \w+ resumed>(.*)", rest):
            yield f"{pid} {pending.pop(pid, '')}{resumed.group(1)}"
        else:
            yield line


def internet_addresses(args: str) -> list[tuple[str, int, str]]:
    """(family, port, address) of every Internet socket address strace printed in `args`."""
    found = [("AF_INET", int(port), address) for port, address in re.findall(
        r'sa_family=AF_INET, sin_port=htons\((\d+)\), sin_addr=inet_addr\("([^"]+)"\)', args)]
    found += [("AF_INET6", int(port), address) for port, address in re.findall(
        r'sa_family=AF_INET6, sin6_port=htons\((\d+)\),.*?inet_pton\(AF_INET6, "([^"]+)"',
        args)]
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_loopback
