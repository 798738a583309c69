"""Tests for simpletun.py, one section for each of its sections, in the same order and under the
same names: the tunnel above the banner (the device, framing, the TCP link, the two directions,
the select loop, server and client, the command line), then each extra below it. Within a
section, fastest first: functions called directly, then the loop with stand-in fds, then end to
end with real devices in network namespaces (root only; marked netns)."""

import ast
import contextlib
import errno
import gc
import io
import ipaddress
import itertools
import json
import logging
import os
import random
import re
import select
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import types
import weakref

import pytest

import simpletun
from simpletun import HEADER, Tunnel

HERE = os.path.dirname(os.path.abspath(__file__))
# A suite started in the background (cmd &, a CI runner) ignores SIGINT, and a program it starts
# would inherit that: the Ctrl-C the tests press would not reach a demo. A handled signal is reset
# at exec, as a terminal's programs have it.
signal.signal(signal.SIGINT, signal.default_int_handler)
SCRIPT = os.path.join(HERE, "simpletun.py")
TIMEOUT = 5  # seconds any single wait may take before the test fails instead of hanging


# ---------------------------------------------------------------------------------------
# What the sections share: frames, packets, options, a stand-in device, waiting
# ---------------------------------------------------------------------------------------

def frame(packet, header=HEADER):
    """A packet as it goes on the wire: its length, then the packet."""
    return header.pack(len(packet)) + packet


def deframed(data, header=HEADER):
    """simpletun.deframe() on bytes: (the packets, as bytes; the bytes left over)."""
    packets = []
    rest = simpletun.deframe(memoryview(data), lambda packet: packets.append(bytes(packet)), header)
    return packets, bytes(rest)


def options(*argv):
    """The run's options, as parse_args() makes them from a command line (device tun9)."""
    return simpletun.parse_args(["-i", "tun9"] + list(argv))


def ipv4(protocol, payload, src="10.0.0.2", dst="10.0.0.1"):
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0, 64, protocol, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + payload


def ipv6(next_header, payload, src="fe80::1", dst="ff02::2"):
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), next_header, 255,
                       socket.inet_pton(socket.AF_INET6, src),
                       socket.inet_pton(socket.AF_INET6, dst)) + payload


def mac(text):
    return bytes.fromhex(text.replace(":", ""))


def ethernet(ethertype, payload, dst="ff:ff:ff:ff:ff:ff", src="6e:00:00:00:00:02"):
    return mac(dst) + mac(src) + struct.pack("!H", ethertype) + payload


def arp(op, sender="10.0.0.2", target="10.0.0.1", sender_mac="6e:00:00:00:00:02"):
    return struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac(sender_mac),
                       socket.inet_aton(sender), bytes(6), socket.inet_aton(target))


def icmpv6(kind, target):
    """A neighbour solicitation (135) or advertisement (136) for `target`."""
    return struct.pack("!BBHI", kind, 0, 0, 0) + socket.inet_pton(socket.AF_INET6, target)


ECHO_REQUEST = ipv4(1, struct.pack("!BBHHH", 8, 0, 0, 7, 1) + b"x" * 56)
TCP_SYN_ACK = ipv4(6, struct.pack("!HHIIBBHHH", 5201, 40000, 1, 2, 5 << 4, 0x12, 65535, 0, 0))
TCP_DATA = ipv4(6, struct.pack("!HHIIBBHHH", 40000, 5201, 1, 2, 5 << 4, 0x18, 65535, 0, 0)
                + b"d" * 100)
UDP_PACKET = ipv4(17, struct.pack("!HHHH", 40000, 7777, 8 + 5, 0) + b"hello")
NEIGHBOR_SOLICITATION = ipv6(58, icmpv6(135, "fe80::2"), dst="ff02::1:ff00:2")
NEIGHBOR_ADVERTISEMENT = ipv6(58, icmpv6(136, "fe80::2"), src="fe80::2", dst="fe80::1")
ROUTER_SOLICITATION = ipv6(58, struct.pack("!BBHI", 133, 0, 0, 0))
ECHO6_REPLY = ipv6(58, struct.pack("!BBHHH", 129, 0, 0, 9, 4), src="fd00::1", dst="fd00::2")
MLD_REPORT = ipv6(0, bytes([58, 0, 5, 2, 0, 0, 1, 0]) + struct.pack("!BBHHH", 143, 0, 0, 0, 1)
                  + bytes(20), src="::", dst="ff02::16")
UDP6 = ipv6(17, struct.pack("!HHHH", 5353, 5353, 8, 0), dst="ff02::fb")
SERVER_MAC, ALICE_MAC, BOB_MAC, CAROL_MAC = (
    "6e:00:00:00:00:01", "6e:00:00:00:00:02", "6e:00:00:00:00:03", "6e:00:00:00:00:04")


@pytest.fixture
def device():
    """A stand-in device: (ours, the kernel's side). A SOCK_SEQPACKET socketpair keeps packet
    boundaries as a tun fd does (a pipe would merge writes); ours is non-blocking, the kernel's
    side waits at most TIMEOUT s."""
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    kernel.settimeout(TIMEOUT)
    with ours, kernel:
        yield ours, kernel


def nothing_on(sock, seconds=0.2):
    """True if nothing arrives on `sock` within `seconds`."""
    return select.select([sock], [], [], seconds)[0] == []


def wait_for(condition, what, timeout=10):
    """Poll `condition` until it holds; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("timed out after %d s waiting for %s" % (timeout, what))


@contextlib.contextmanager
def returns_within(seconds, what):
    """Fail, not hang, if the code inside loops on (main thread only: SIGALRM)."""
    def stuck(*_):
        raise AssertionError("%s did not return within %d s" % (what, seconds))
    signal.signal(signal.SIGALRM, stuck)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, signal.SIG_DFL)


def messages_of(caplog, thread=None):
    """What one thread logged (default: this one): a rig's serve() thread, which runs on after its
    test, may log into a later test's caplog (a goodbye, a summary of refusals)."""
    ident = (thread or threading.current_thread()).ident
    return [record.getMessage() for record in caplog.records if record.thread == ident]


def free_port():
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def run_script(*args, timeout=TIMEOUT * 2, **kw):
    return subprocess.run([sys.executable, SCRIPT] + list(args), capture_output=True, text=True,
                          timeout=timeout, **kw)


def run_main_as_nobody(*argv):
    """Run full_main() in a forked child that has given up root; return (status, stderr text)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        status = 99
        try:
            os.close(read_end)
            os.setuid(65534)
            sys.stderr = os.fdopen(write_end, "w")
            status = simpletun.full_main(list(argv))
            sys.stderr.flush()
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        text = f.read()
    _, wait_status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(wait_status), text


class Rig:
    """relay() in a thread between a stand-in device and a stand-in TCP link (a socketpair, or the
    given pair). full=True: the full program's link (ExtraLink) and output (Lines, in .output)."""

    def __init__(self, device, debug=0, pair=None, full=False):
        self.device, self.kernel = device
        self.link, self.peer = pair or socket.socketpair()
        self.peer.settimeout(TIMEOUT)
        self.link.setblocking(False)
        self.tunnel = Tunnel(self.device.fileno(), "tun9", debug=debug)
        self.output, self.handler = io.StringIO(), None
        self.made = simpletun.Link(self.link, "peer")
        if full:
            args = options("-s", *["-d"] * debug)
            self.handler = simpletun.Lines(args, self.output)
            simpletun.log.addHandler(self.handler)
            simpletun.log.setLevel("DEBUG")
            self.made = simpletun.ExtraLink(self.link, "peer", args, heard=True)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            with selectors.DefaultSelector() as selector:
                simpletun.relay(self.tunnel, self.made, selector)
        except Exception as err:  # handed to the test, which asserts on it
            self.error = err

    def lines(self):
        """What the full program printed so far, a line each."""
        return self.output.getvalue().splitlines()

    def frames_from_peer(self, count):
        """Read `count` frames from the TCP side, within TIMEOUT."""
        data, packets = b"", []
        while len(packets) < count:
            more = self.peer.recv(65536)
            assert more, "link closed after %d of %d frames" % (len(packets), count)
            got, data = deframed(data + more)
            packets += got
        return packets

    def finish(self):
        """Close the TCP peer and wait for relay() to return."""
        self.peer.close()
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "relay() did not return after the peer closed"

    def close(self):
        if self.handler:
            simpletun.log.removeHandler(self.handler)
        self.peer.close()
        self.thread.join(TIMEOUT)
        self.link.close()


SERVING = []  # what a server started in a thread uses: the thread runs until the tests end, and so must
#               its fds stay open (closed under it: EBADF in the thread)


@pytest.fixture
def rig(device):
    """Rig(device, **options): relay() between the stand-in device and a TCP socketpair."""
    made = []
    yield lambda **kw: made.append(Rig(device, **kw)) or made[-1]
    for r in made:
        r.close()


def netns_unavailable():
    """Why the namespace tests cannot run here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and tun/tap devices)"
    if not shutil.which("ip"):
        return "needs ip from iproute2"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun (modprobe tun)"
    return None


def skip_or_fail(reason):
    if os.environ.get("SIMPLETUN_REQUIRE_NETNS") == "1":
        pytest.fail("end-to-end tests required (SIMPLETUN_REQUIRE_NETNS=1) but cannot run: " + reason)
    pytest.skip(reason)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 7777))
while True:
    data, peer = s.recvfrom(65535)
    s.sendto(data, peer)
"""

UDP_PROBE = """
import socket, sys
dst, count, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(wait)
if len(sys.argv) > 4:
    s.bind((sys.argv[4], 0))
answered = 0
for i in range(count):
    message = b"probe %d " % i + b"x" * (i * 37 % 1300)
    s.sendto(message, (dst, 7777))
    try:
        while s.recvfrom(65535)[0] != message:
            pass
        answered += 1
    except socket.timeout:
        pass
print(answered)
"""

_lab_numbers = itertools.count()


class Lab:
    """Two hosts -- network namespaces joined by a veth pair -- and everything started in them.

    server host: veth 192.0.2.1/24, tunnel 10.9.0.1/24    client host: veth 192.0.2.2/24, tunnel 10.9.0.2/24
    """

    SERVER_IP, CLIENT_IP = "192.0.2.1", "192.0.2.2"
    TUNNEL_IP = {"s": "10.9.0.1", "c": "10.9.0.2"}

    def __init__(self, tmp_path):
        tag = "stt%d-%d" % (os.getpid(), next(_lab_numbers))
        self.ns = {"s": tag + "s", "c": tag + "c"}
        self.tmp = tmp_path
        self.procs = []
        for ns in self.ns.values():
            self.ip("netns", "add", ns)
        self.ip("link", "add", "veth0", "netns", self.ns["s"], "type", "veth",
                "peer", "name", "veth0", "netns", self.ns["c"])
        for side, address in (("s", self.SERVER_IP), ("c", self.CLIENT_IP)):
            self.ip("-n", self.ns[side], "link", "set", "lo", "up")
            self.ip("-n", self.ns[side], "addr", "add", address + "/24", "dev", "veth0")
            self.ip("-n", self.ns[side], "link", "set", "veth0", "up")

    def add_host(self, side, number):
        """Another host, `side`, on a cable of its own to the server host: 192.0.N.2 there, 192.0.N.1 here."""
        self.ns[side] = self.ns["s"][:-1] + side
        self.ip("netns", "add", self.ns[side])
        self.ip("link", "add", "veth%d" % number, "netns", self.ns["s"], "type", "veth", "peer", "name",
                "veth0", "netns", self.ns[side])
        for host, address, device in (("s", "192.0.%d.1/24", "veth%d" % number),
                                      (side, "192.0.%d.2/24", "veth0")):
            self.ip("-n", self.ns[host], "addr", "add", address % number, "dev", device)
            self.ip("-n", self.ns[host], "link", "set", device, "up")
            self.ip("-n", self.ns[host], "link", "set", "lo", "up")
        return "192.0.%d.1" % number

    def ip(self, *args, check=True):
        return subprocess.run(["ip"] + list(args), capture_output=True, text=True, check=check,
                              timeout=TIMEOUT)

    def spawn(self, side, argv, log_name):
        """Start argv in a namespace, output to a log file; remember it for teardown."""
        log_path = self.tmp / log_name
        with open(log_path, "w") as log_file:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns[side]] + argv,
                                    stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc.log_path = log_path
        self.procs.append(proc)
        return proc

    def tunnel(self, side, *args, name=None, script=SCRIPT):
        """Start simpletun.py on one side (server: -s, client: -c SERVER_IP)."""
        role = ["-s"] if side == "s" else ["-c", self.SERVER_IP]
        name = name or "%s-%d.log" % (side, len(self.procs))
        return self.spawn(side, [sys.executable, "-u", script] + role + list(args), name)

    def configure(self, side, device):
        """Give the tunnel device its address and bring it up, once the program has made it."""
        wait_for(lambda: self.ip("-n", self.ns[side], "link", "show", device, check=False).returncode == 0,
                 "%s to appear in %s" % (device, self.ns[side]))
        self.ip("-n", self.ns[side], "addr", "add", self.TUNNEL_IP[side] + "/24", "dev", device)
        self.ip("-n", self.ns[side], "link", "set", device, "up")

    def echo(self, side, address=None):
        """Start a UDP echo server on the tunnel address of one side (or the address given)."""
        address = address or self.TUNNEL_IP[side]
        return self.spawn(side, [sys.executable, "-c", UDP_ECHO, address], "echo-%s.log" % address)

    def ping(self, side, count=1, to=None):
        """ping through the tunnel, as a user would; True if every reply came."""
        to = to or self.TUNNEL_IP["c" if side == "s" else "s"]
        return subprocess.run(["ip", "netns", "exec", self.ns[side], "ping", "-c", str(count), "-i", "0.2",
                               "-W", "1", to], capture_output=True).returncode == 0

    def probe(self, side, count=5, wait=1.0, to=None, source=None):
        """Send `count` UDP probes from one side to the echo on the other (or at `to`, from
        `source`); return how many came back."""
        to = to or self.TUNNEL_IP["c" if side == "s" else "s"]
        result = subprocess.run(["ip", "netns", "exec", self.ns[side], sys.executable, "-c", UDP_PROBE,
                                 to, str(count), str(wait)] + [source] * bool(source),
                                capture_output=True, text=True, timeout=count * wait + TIMEOUT)
        return int(result.stdout or 0)

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(TIMEOUT)
        for ns in self.ns.values():
            # anything still living in a namespace of ours was started by this test
            for pid in self.ip("netns", "pids", ns, check=False).stdout.split():
                os.kill(int(pid), signal.SIGKILL)
            self.ip("netns", "del", ns, check=False)


def log_of(proc):
    return proc.log_path.read_text()


@pytest.fixture
def lab(tmp_path):
    reason = netns_unavailable()
    if reason:
        skip_or_fail(reason)
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [ns for ns in the_lab.ns.values() if re.search(r"^%s\b" % ns, left, re.M)], \
            "namespaces left behind"


def start_pair(lab, device="tun0", *flags):
    """Server and client on `device`, addressed and up; return (server, client) processes."""
    server = lab.tunnel("s", "-i", device, "-d", *flags)
    lab.configure("s", device)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", device, "-d", *flags)
    lab.configure("c", device)
    return server, client


def tunnel_passes(lab, side="c"):
    """Wait until UDP probes from `side` come back through the tunnel."""
    wait_for(lambda: lab.probe(side, count=1, wait=0.5) == 1, "a probe to cross the tunnel from " + side)
    return True


def socket_listening(lab):
    return ":55555" in lab.ip("netns", "exec", lab.ns["s"], "ss", "-Hltn").stdout


def cut_tunnel(path):
    """The tunnel alone: the lines above the banner, and the line that runs its main()."""
    with open(SCRIPT) as f:
        lines = f.read().split("\n")
    banner = next(i for i, line in enumerate(lines) if line.startswith("# ===="))
    path.write_text("\n".join(lines[:banner]) + '\nif __name__ == "__main__":\n    sys.exit(main())\n')
    return str(path)


def rss_peak_kib(proc):
    """The most memory a process (its python, under ip netns exec) ever had resident."""
    with open("/proc/%d/status" % proc.pid) as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1))


# ---------------------------------------------------------------------------------------
# The device: tun_alloc(), Tunnel
# ---------------------------------------------------------------------------------------

def test_missing_clone_device_says_modprobe_tun(tmp_path):
    with pytest.raises(simpletun.UserError, match=r"^cannot open .*/tun: no such file: load the "
                                                  r"tun module \(modprobe tun\)$"):
        simpletun.tun_alloc("tun0", simpletun.IFF_TUN, clone_device=str(tmp_path / "tun"))


@pytest.mark.parametrize("code, name, says", [
    (errno.EPERM, "tun0", "cannot attach to tun0: not allowed: run as root (or with CAP_NET_ADMIN)"),
    (errno.EACCES, "tun0", "cannot attach to tun0: permission denied: run as root (or with CAP_NET_ADMIN)"),
    (errno.EBUSY, "tun0", "cannot attach to tun0: another program has it open (is another simpletun.py "
                          "running on it?)"),
    (errno.EINVAL, "lo", "cannot attach to lo: it exists and is not a device of this kind (tun: -u, tap: -a)"),
    (errno.ENOMEM, "tun0", "cannot attach to tun0: Cannot allocate memory"),
])
def test_tunsetiff_failures_are_explained(monkeypatch, code, name, says):
    err = OSError(code, os.strerror(code))
    monkeypatch.setattr(simpletun.fcntl, "ioctl", lambda *a: (_ for _ in ()).throw(err))
    with pytest.raises(simpletun.UserError) as raised:
        simpletun.tun_alloc(name, simpletun.IFF_TUN, clone_device="/dev/null")
    assert str(raised.value) == says


def test_the_device_is_asked_for_with_no_packet_information_in_front():
    asked = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(simpletun.fcntl, "ioctl", lambda fd, request, ifreq: asked.append(
            (request, ifreq)) or simpletun.IFREQ_FLAGS.pack(b"tap7", 0))
        fd, name = simpletun.tun_alloc("tap7", simpletun.IFF_TAP, clone_device="/dev/null")
        os.close(fd)
    assert name == "tap7"
    assert asked == [(simpletun.TUNSETIFF, simpletun.IFREQ_FLAGS.pack(
        b"tap7", simpletun.IFF_TAP | simpletun.IFF_NO_PI))]
    assert len(asked[0][1]) == 40  # struct ifreq on 64-bit Linux: the kernel never reads past it


def test_a_device_that_cannot_be_attached_leaves_no_fd_open(monkeypatch):
    opened = []
    real_open = os.open
    monkeypatch.setattr(simpletun.os, "open", lambda *args: opened.append(real_open(*args)) or opened[-1])

    def busy(*_):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))
    monkeypatch.setattr(simpletun.fcntl, "ioctl", busy)
    with pytest.raises(simpletun.UserError, match="cannot attach to tun7: another program has it open"):
        simpletun.tun_alloc("tun7", simpletun.IFF_TUN, clone_device="/dev/null")
    with pytest.raises(OSError) as closed:
        os.fstat(opened[0])
    assert closed.value.errno == errno.EBADF


def test_not_root_is_one_line_saying_so():
    if os.geteuid() == 0:  # drop to nobody for this one run
        status, stderr = run_main_as_nobody("-i", "tun0", "-s")
    else:
        result = run_script("-i", "tun0", "-s")
        status, stderr = result.returncode, result.stderr
    assert status == 1
    assert stderr == ("simpletun.py: error: cannot attach to tun0: not allowed: run as root (or with "
                      "CAP_NET_ADMIN)\n")


def test_a_packet_the_device_refuses_is_counted_said_and_the_next_is_written(device, caplog):
    ours, kernel = device
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the stand-in refuses a bigger one
    tunnel = Tunnel(ours.fileno(), "tun9")
    for packet in (b"x" * 60000, b"x" * 60000, b"small"):
        tunnel.write(packet)
    assert kernel.recv(65536) == b"small" and nothing_on(kernel, 0)
    assert (tunnel.net2tap, tunnel.dropped) == (3, 2)
    refusal = "NET2TAP %%d: tun9 refused a 60000-byte packet: %s" % os.strerror(errno.EMSGSIZE)
    assert caplog.messages == [refusal % 1, refusal % 2]  # the tunnel alone: each one


@pytest.mark.parametrize("debug, said", [(0, []), (1, ["NET2TAP 1: Read 5 bytes from the network",
                                                       "NET2TAP 1: Written 5 bytes to the tap interface"])])
def test_a_device_write_says_the_originals_lines_with_d_only(device, caplog, debug, said):
    caplog.set_level("DEBUG", logger="simpletun")
    ours, kernel = device
    Tunnel(ours.fileno(), "tun9", debug).write(b"hello")
    assert kernel.recv(100) == b"hello"
    assert caplog.messages == said


# ---------------------------------------------------------------------------------------
# Framing: deframe()
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1500, 65535])
def test_frame_is_big_endian_length_then_packet(size):
    packet = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    wire = frame(packet)
    assert wire[:2] == bytes([size >> 8, size & 0xFF])
    assert wire[2:] == packet


@pytest.mark.parametrize("size", [0, 1, 1500, 65535])
def test_deframe_returns_the_packet_of_one_whole_frame_and_nothing_left(size):
    packet = b"\xab" * size
    assert deframed(frame(packet)) == (([packet] if size else []), b"")  # an empty frame is no packet


@pytest.mark.parametrize("data, packets, rest", [
    (frame(b"one") + frame(b"two"), [b"one", b"two"], b""),
    (frame(b"one") + frame(b"two")[:3], [b"one"], frame(b"two")[:3]),
    (frame(b"") + frame(b"a") + frame(b""), [b"a"], b""),  # an empty frame is no packet: skipped
    (b"\x00\x03abc\x00\x01z\x00", [b"abc", b"z"], b"\x00"),  # a length's first byte waits
    (b"\x00", [], b"\x00"),
    (b"", [], b""),
    (b"\x00\x54" + b"E" * 10, [], b"\x00\x54" + b"E" * 10),  # a frame whose end has not come
    (b"\xff\xff" + b"z" * 65535 + b"\x00", [b"z" * 65535], b"\x00"),  # the longest a length states
])
def test_deframe_cuts_bytes_at_frame_boundaries_and_gives_the_rest_back(data, packets, rest):
    assert deframed(data) == (packets, rest)


def test_deframe_hands_packets_over_as_views_of_the_bytes_not_copies():
    data = memoryview(bytearray(frame(b"abc")))
    got = []
    simpletun.deframe(data, got.append)
    assert isinstance(got[0], memoryview) and got[0].obj is data.obj


@pytest.mark.parametrize("size", [0, 1, 1500])
def test_a_frame_fed_byte_by_byte_comes_out_once_whole(size):
    wire, out, rest = frame(b"\x45" * size), [], b""
    for i in range(len(wire)):
        got, rest = deframed(rest + wire[i:i + 1])
        out += got
        if i < len(wire) - 1:
            assert out == [] and rest == wire[:i + 1]
    assert out == ([b"\x45" * size] if size else []) and rest == b""


@pytest.mark.parametrize("size", [0, 1, 1500, 65535, 65536 + 1000])
def test_offload_frames_carry_a_4_byte_length(size):
    packet = b"\x5a" * size
    wire = frame(packet, simpletun.OFFLOAD_HEADER)
    assert wire[:4] == struct.pack("!I", size)
    assert deframed(wire, simpletun.OFFLOAD_HEADER) == (([packet] if size else []), b"")


@pytest.mark.parametrize("seed", range(4))
def test_deframe_fuzzed_with_random_bytes_keeps_at_most_one_unfinished_frame(seed):
    rng = random.Random(seed)
    for case in range(1000):
        stream = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 3000)))
        if case % 3 == 0:  # sometimes lengths near the maximum
            stream = b"\xff\xff" + stream
        rest, position = b"", 0
        while position < len(stream):
            chunk = stream[position:position + rng.randrange(1, 700)]
            position += len(chunk)
            packets, rest = deframed(rest + chunk)
            assert all(0 < len(packet) <= simpletun.MAX_PACKET for packet in packets)
            assert len(rest) < HEADER.size or len(rest) < HEADER.size + HEADER.unpack_from(rest)[0]


@pytest.mark.parametrize("seed", range(4))
def test_deframe_fuzzed_with_random_splits_returns_every_packet_whole(seed):
    rng = random.Random(100 + seed)
    for case in range(500):
        packets = [bytes(rng.randrange(256) for _ in range(rng.choice([0, 1, 2, rng.randrange(1600)])))
                   for _ in range(rng.randrange(1, 8))]
        wire = b"".join(frame(p) for p in packets)
        out, rest, position = [], b"", 0
        while position < len(wire):
            size = rng.randrange(1, 64) if rng.random() < 0.7 else rng.randrange(1, len(wire) + 1)
            got, rest = deframed(rest + wire[position:position + size])
            out += got
            position += size
        assert out == [p for p in packets if p] and rest == b""  # every packet; an empty frame is none


# ---------------------------------------------------------------------------------------
# The TCP link: tune(), listen_on(), connect_to(), Link
# ---------------------------------------------------------------------------------------

def test_port_in_use_is_a_user_error():
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        for address, family in (("127.0.0.1", socket.AF_INET), ("", socket.AF_INET)):
            with pytest.raises(simpletun.UserError) as error:
                simpletun.listen_on(port, address, family)
            # Regression: Python's own words named a tuple: "(while attempting to bind on address ('', 55555))"
            assert str(error.value) == "cannot listen on %s port %d: Address already in use" % (
                address or "every address", port)


def test_a_server_address_that_is_no_address_is_said_in_the_resolvers_words():
    with pytest.raises(simpletun.UserError, match="^cannot listen on no-such-host.invalid port 9: "
                                                  "(Name or service not known|.*not known)"):
        simpletun.listen_on(9, "no-such-host.invalid")


def test_connection_refused_is_a_user_error():
    port = free_port()  # a port that was free a moment ago, closed again
    with pytest.raises(simpletun.UserError) as error:
        simpletun.connect_to("127.0.0.1", port)
    assert str(error.value) == ("cannot connect to 127.0.0.1 port %d: Connection refused: is a server "
                                "running (simpletun.py -s), over TCP?" % port)


def test_connection_timeout_is_a_user_error_without_the_refusal_hint(monkeypatch):
    monkeypatch.setattr(simpletun, "CONNECT_TIMEOUT", 0.5)
    with socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # room for one waiting connection; the kernel drops SYNs beyond it
        port = full.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)):
            with pytest.raises(simpletun.UserError) as error:
                simpletun.connect_to("127.0.0.1", port)
    assert str(error.value) == "cannot connect to 127.0.0.1 port %d: timed out" % port


def test_a_connected_client_says_so_and_sends_small_frames_at_once(caplog):
    caplog.set_level("INFO", logger="simpletun")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        with simpletun.connect_to("127.0.0.1", listener.getsockname()[1]) as client:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1  # no Nagle stall
            assert client.getblocking() is False  # one direction never blocks the other
    assert caplog.messages == ["CLIENT: Connected to server 127.0.0.1"]


def test_server_accepts_a_client_over_ipv4_and_ipv6_loopback():
    with simpletun.listen_on(0, "", *simpletun.server_family(None)) as listener:
        port = listener.getsockname()[1]
        for host, expected in (("127.0.0.1", "127.0.0.1"), ("::1", "::1")):
            with simpletun.connect_to(host, port) as client:
                assert select.select([listener], [], [], TIMEOUT)[0]
                served, _ = listener.accept()
                with served:
                    assert simpletun.plain_address(served.getpeername()[0]) == expected
                    assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@pytest.mark.parametrize("sent, ended, orderly", [
    (b"", "the peer closed the connection", True),
    (b"\x00", "connection ended in the middle of a frame (1 bytes of it came)", False),
    (b"\x00\x54" + b"E" * 10, "connection ended in the middle of a frame (12 bytes of it came)", False),
    (b"GET / HTTP/1.1\r\n", "connection ended in the middle of a frame (16 bytes of it came)", False),
    (frame(b"last"), "the peer closed the connection", True),
])
def test_a_link_ends_one_way_saying_why_and_whether_in_order(sent, ended, orderly):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link, got = simpletun.Link(ours, "peer"), []
        theirs.sendall(sent)
        theirs.shutdown(socket.SHUT_WR)
        while not link.ended:
            select.select([ours], [], [], TIMEOUT)
            link.receive(lambda packet: got.append(bytes(packet)))
        assert (link.ended, link.orderly) == (ended, orderly)
        assert got == deframed(sent)[0]


def test_a_link_broken_by_a_reset_says_connection_lost_and_the_first_reason_stands():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs = listener.accept()[0]
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # a reset
        ours.setblocking(False)
        link = simpletun.Link(ours, "peer")
        select.select([ours], [], [], TIMEOUT)
        assert link.receive(lambda packet: None) is None
        assert link.ended == "connection lost: Connection reset by peer" and not link.orderly
        link.end("another reason", orderly=True)
        assert (link.ended, link.orderly) == ("connection lost: Connection reset by peer", False)
        link.close()
        assert ours.fileno() == -1


def test_a_link_keeps_no_more_than_the_unfinished_frame():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link, got = simpletun.Link(ours, "peer"), []
        theirs.sendall(frame(b"a" * 1000) * 50 + frame(b"b" * 3000)[:1234])
        while len(got) < 50:
            select.select([ours], [], [], TIMEOUT)
            link.receive(got.append)
        assert link.kept == 1234 and bytes(link.view[:1234]) == frame(b"b" * 3000)[:1234]
        theirs.sendall(frame(b"b" * 3000)[1234:])
        select.select([ours], [], [], TIMEOUT)
        link.receive(lambda packet: got.append(bytes(packet)))
        assert got[-1] == b"b" * 3000 and link.kept == 0


# ---------------------------------------------------------------------------------------
# The two directions: tap2net(), net2tap()
# ---------------------------------------------------------------------------------------

def test_a_packet_read_from_the_device_travels_as_one_frame(rig):
    r = rig()
    r.kernel.send(b"\x45" + b"\x00" * 83)
    assert r.peer.recv(86, socket.MSG_WAITALL) == HEADER.pack(84) + b"\x45" + b"\x00" * 83


def test_device_packets_are_read_no_longer_than_the_length_can_state(rig):
    # Regression (the original): a packet longer than its 2000-byte buffer overflowed the stack.
    r = rig()
    r.kernel.send(b"\x45" * 70000)  # longer than any device hands over: read in part, never framed wrong
    (packet,) = r.frames_from_peer(1)
    assert len(packet) == simpletun.MAX_PACKET == 65535


def test_a_frame_split_across_receives_reaches_the_device_whole(rig):
    r = rig()
    wire = frame(b"\x60" + b"\x11" * 99)
    r.peer.sendall(wire[:1])
    assert nothing_on(r.kernel)
    r.peer.sendall(wire[1:50])
    assert nothing_on(r.kernel)
    r.peer.sendall(wire[50:])
    assert r.kernel.recv(65536) == b"\x60" + b"\x11" * 99


def test_two_frames_in_one_send_reach_the_device_as_two_packets(rig):
    r = rig()
    r.peer.sendall(frame(b"first") + frame(b"second"))
    assert [r.kernel.recv(65536), r.kernel.recv(65536)] == [b"first", b"second"]


def test_empty_frames_are_skipped_without_a_word_and_the_tunnel_goes_on(rig, caplog):
    # Regression (the original): an empty frame ended its read loop. Regression: each empty frame
    # was written, refused by the device and logged: 4 MB of them made a million warning lines.
    r = rig()
    r.peer.sendall(frame(b"") * 1000 + frame(b"after"))
    assert r.kernel.recv(65536) == b"after"
    assert r.tunnel.net2tap == 1 and r.tunnel.dropped == 0
    assert caplog.messages == []


def test_a_packet_larger_than_the_originals_2000_byte_buffer_crosses_whole(rig):
    # Regression: the C original read at most 2000 bytes, and overflowed its stack on longer frames.
    r = rig()
    big = bytes(range(256)) * 40
    r.peer.sendall(frame(big))
    assert r.kernel.recv(65536) == big
    r.kernel.send(big)
    assert r.frames_from_peer(1) == [big]


def test_the_d_lines_use_the_originals_words_and_numbers(rig, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    r = rig(debug=1)
    for size in (84, 85):
        r.kernel.send(b"\x45" * size)
        r.frames_from_peer(1)
    r.peer.sendall(frame(b"\x45" * 60))
    r.kernel.recv(65536)
    r.finish()
    assert caplog.messages[:6] == [
        "TAP2NET 1: Read 84 bytes from the tap interface", "TAP2NET 1: Written 84 bytes to the network",
        "TAP2NET 2: Read 85 bytes from the tap interface", "TAP2NET 2: Written 85 bytes to the network",
        "NET2TAP 1: Read 60 bytes from the network", "NET2TAP 1: Written 60 bytes to the tap interface",
    ]


def test_without_d_no_per_packet_line_is_logged(rig, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    r = rig(debug=0)
    r.kernel.send(b"\x45" * 84)
    r.frames_from_peer(1)
    r.peer.sendall(frame(b"\x45" * 60))
    r.kernel.recv(65536)
    r.finish()
    assert not [m for m in caplog.messages if "TAP2NET" in m or "NET2TAP" in m]


def test_a_refused_packet_is_logged_dropped_and_the_tunnel_carries_on(rig, caplog):
    r = rig()
    # A send buffer smaller than the packet makes the stand-in device refuse it (EMSGSIZE),
    # as a real device refuses garbage (EINVAL) or writes while it is down (EIO).
    r.device.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    r.peer.sendall(frame(b"x" * 60000) * 3 + frame(b"small"))
    assert r.kernel.recv(65536) == b"small"
    r.kernel.send(b"reply")
    assert r.frames_from_peer(1) == [b"reply"]
    assert (r.tunnel.net2tap, r.tunnel.dropped) == (4, 3)
    assert len([m for m in caplog.messages if "tun9 refused a 60000-byte packet" in m]) == 3


def test_a_device_batch_of_big_packets_stops_at_the_queue_bound(device):
    # Regression guard: the batch must stop once the queue reaches OUT_LIMIT, however few packets that took.
    ours, kernel = device
    kernel.settimeout(None)  # (a send with a timeout waits for a quarter of the buffer free: the fifth would)
    link_end, peer = socket.socketpair()
    with link_end, peer:
        link_end.setblocking(False)
        link = simpletun.Link(link_end, "peer")
        link.out += bytes(simpletun.OUT_LIMIT - 10000)  # the peer reads nothing: the queue is nearly full
        for _ in range(5):
            kernel.send(ipv4(17, bytes(9000)))
        tunnel = Tunnel(ours.fileno(), "tun9")
        simpletun.tap2net(tunnel, link)
        left = 0
        while select.select([ours], [], [], 0)[0]:
            ours.recv(65536)
            left += 1
        assert (left, tunnel.tap2net) == (3, 2)  # two filled the queue past its bound: three wait


def test_a_device_batch_stops_at_max_batch_and_sends_what_it_read_in_one_send(device):
    ours, kernel = device
    sends = []

    class Counted:  # a socket that takes everything, and counts its sends
        def send(self, data):
            sends.append(len(data))
            return len(data)
    link = simpletun.Link(Counted(), "peer")
    for _ in range(simpletun.MAX_BATCH + 3):
        kernel.send(b"\x45" * 20)
    tunnel = Tunnel(ours.fileno(), "tun9")
    simpletun.tap2net(tunnel, link)
    assert tunnel.tap2net == simpletun.MAX_BATCH and sends == [22 * simpletun.MAX_BATCH]
    simpletun.tap2net(tunnel, link)
    assert tunnel.tap2net == simpletun.MAX_BATCH + 3 and sends[1:] == [22 * 3]


def test_a_device_that_goes_away_is_a_user_error_naming_it(device):
    ours, kernel = device

    class Gone:
        fd, name, debug, read_size, tap2net = -1, "tun9", 0, simpletun.MAX_PACKET, 0
    with pytest.raises(simpletun.UserError, match=r"^cannot read from tun9: Bad file descriptor$"):
        simpletun.tap2net(Gone(), simpletun.Link(None, "peer"))


# ---------------------------------------------------------------------------------------
# The select loop: relay(), watch()
# ---------------------------------------------------------------------------------------

def test_a_clean_close_ends_relay_in_order(rig):
    r = rig()
    r.peer.sendall(frame(b"last"))
    assert r.kernel.recv(65536) == b"last"
    r.finish()
    assert r.error is None and (r.made.ended, r.made.orderly) == ("the peer closed the connection", True)


def test_a_close_in_the_middle_of_a_frame_ends_relay_saying_so(rig):
    r = rig()
    r.peer.sendall(frame(b"y" * 500)[:100])
    r.finish()
    assert r.error is None
    assert (r.made.ended, r.made.orderly) == ("connection ended in the middle of a frame (100 bytes of it came)",
                                              False)


def test_a_burst_of_packets_arrives_whole_and_in_order(rig):
    r = rig()
    rnd = random.Random(7)
    packets = [bytes([i % 256]) * rnd.randint(1, 1500) for i in range(3000)]

    def write_all():
        for p in packets:
            r.kernel.send(p)  # blocks (up to TIMEOUT) while relay() is behind: as a device queue would

    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    time.sleep(0.5)  # the peer reads nothing yet: relay() fills the socket, then stops reading the device
    received = r.frames_from_peer(len(packets))  # (only a socket watched for writing drains what waits)
    writer.join(TIMEOUT)
    assert received == packets


def test_an_idle_tunnel_sleeps_in_select_without_a_timeout(rig, monkeypatch):
    timeouts = []

    class WatchedSelector(selectors.DefaultSelector):
        def select(self, timeout=None):
            timeouts.append(timeout)
            return super().select(timeout)
    monkeypatch.setattr(selectors, "DefaultSelector", WatchedSelector)
    r = rig()
    time.sleep(0.5)  # idle
    r.kernel.send(b"\x45" * 60)
    assert r.frames_from_peer(1) == [b"\x45" * 60]
    time.sleep(0.5)  # idle again
    r.finish()
    assert timeouts and set(timeouts) == {None}
    assert len(timeouts) < 10  # a handful of wake-ups for one packet, not a polling loop


def test_a_peer_that_stops_reading_does_not_grow_the_outgoing_buffer(rig):
    r = rig()
    sent_to_device = 0
    packet = b"\x45" * 1400
    r.kernel.setblocking(False)
    deadline = time.monotonic() + TIMEOUT
    # Keep the device busy while the TCP peer reads nothing: relay() must stop taking packets.
    while time.monotonic() < deadline:
        try:
            r.kernel.send(packet)
            sent_to_device += len(packet)
        except BlockingIOError:
            if nothing_on(r.peer, 0) and select.select([], [r.kernel], [], 0.5)[1] == []:
                break  # the device queue stays full: relay() stopped reading it
    taken = r.tunnel.tap2net * len(packet)
    # What relay() took is what it queued plus what the socket buffers hold.
    buffers = sum(s.getsockopt(socket.SOL_SOCKET, opt) for s, opt in (
        (r.link, socket.SO_SNDBUF), (r.peer, socket.SO_RCVBUF)))
    assert taken <= simpletun.OUT_LIMIT + simpletun.MAX_PACKET + 2 * buffers
    assert sent_to_device > taken  # the rest waits in the device queue, not in our memory
    # ... and the other direction still flows while this one is stuck.
    r.peer.sendall(frame(b"still moving"))
    r.kernel.setblocking(True)
    r.kernel.settimeout(TIMEOUT)
    assert r.kernel.recv(65536) == b"still moving"
    # The peer reads again: what waited goes out (the socket is watched for writing), then what the
    # device held back.
    assert r.frames_from_peer(sent_to_device // len(packet)) == [packet] * (sent_to_device // len(packet))


@pytest.mark.parametrize("queued, device_events, link_events", [
    (0, selectors.EVENT_READ, selectors.EVENT_READ),
    (simpletun.OUT_LIMIT - 1, selectors.EVENT_READ, selectors.EVENT_READ | selectors.EVENT_WRITE),
    (simpletun.OUT_LIMIT, None, selectors.EVENT_READ | selectors.EVENT_WRITE),
])
def test_each_turn_the_loop_watches_the_device_while_the_queue_has_room_and_the_socket_while_frames_wait(
        device, queued, device_events, link_events):
    # Promise: when the peer stops reading, the queue stops growing at OUT_LIMIT: the device is left
    # unread (the kernel then drops at the device, as a busy network card would).
    class Watched(selectors.DefaultSelector):
        def select(self, timeout=None):
            self.seen = {key.fileobj: key.events for key in self.get_map().values()}
            raise KeyboardInterrupt  # one turn of the loop is enough

    ours, _ = device
    link_end, peer = socket.socketpair()
    with link_end, peer, Watched() as selector:
        link = simpletun.Link(link_end, "peer")
        link.out += bytes(queued)
        with pytest.raises(KeyboardInterrupt):
            simpletun.relay(Tunnel(ours.fileno(), "tun9"), link, selector)
        assert selector.seen.get(ours.fileno()) == device_events
        assert selector.seen[link_end] == link_events
        assert not selector.get_map()  # relay() took back what it watched, however it ended


def test_watch_changes_what_the_selector_waits_for_only_when_it_changes():
    calls = []

    class Counted(selectors.DefaultSelector):
        def register(self, *args):
            calls.append("register")
            return super().register(*args)

        def modify(self, *args):
            calls.append("modify")
            return super().modify(*args)

        def unregister(self, *args):
            calls.append("unregister")
            return super().unregister(*args)
    a, b = socket.socketpair()
    with a, b, Counted() as selector:
        for events in (0, selectors.EVENT_READ, selectors.EVENT_READ, 3, 3, selectors.EVENT_READ, 0, 0):
            simpletun.watch(selector, a, events)
            key = selector.get_map().get(a)
            assert (key.events if key else 0) == events
    assert calls == ["register", "modify", "modify", "unregister"]


def test_another_fd_the_selector_watches_is_handled_by_its_own_function(device):
    ours, _ = device
    handled = []
    extra, other = socket.socketpair()
    link_end, peer = socket.socketpair()
    with extra, other, link_end, peer, selectors.DefaultSelector() as selector:
        selector.register(extra, selectors.EVENT_READ, lambda events: handled.append(extra.recv(10)))
        link = simpletun.Link(link_end, "peer")
        thread = threading.Thread(target=simpletun.relay, args=(Tunnel(ours.fileno(), "tun9"), link, selector),
                                  daemon=True)
        thread.start()
        other.sendall(b"x")
        wait_for(lambda: handled == [b"x"], "the other fd's handler")
        peer.close()
        thread.join(TIMEOUT)
        assert list(selector.get_map()) == [extra.fileno()]  # relay() leaves the other fd as it was


def test_a_link_that_ended_is_freed_without_the_cycle_collector(device):
    # Regression: each link referred to itself through its device handler, so its receive buffer
    # (1 MiB with --offload) stayed until the cycle collector ran: memory grew with every client.
    ours, _ = device
    link_end, peer = socket.socketpair()
    gc.disable()
    try:
        link = simpletun.ExtraLink(link_end, "peer", options("-s", "--offload"), heard=True)
        freed = weakref.ref(link)
        peer.sendall(frame(UDP_PACKET, simpletun.OFFLOAD_HEADER))
        peer.close()
        with selectors.DefaultSelector() as selector:  # outlives the link, as a server's does
            simpletun.relay(Tunnel(ours.fileno(), "tun9"), link, selector)
            link.close()
            del link
            assert freed() is None
            assert not selector.get_map()  # relay() took back what it watched
    finally:
        gc.enable()
        link_end.close()


# ---------------------------------------------------------------------------------------
# Server and client: serve(), run_client()
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("server_sends, status, says", [
    (b"", 0, "CLIENT: the peer closed the connection"),
    (HEADER.pack(84) + ECHO_REQUEST[:10], 1, "CLIENT: connection ended in the middle of a frame (12 bytes of it came)"),
], ids=["orderly close", "ends mid-frame"])
def test_the_tunnels_client_exits_0_when_the_server_closes_and_1_when_it_ends_mid_frame(device, caplog, server_sends,
                                                                                       status, says):
    ours, _ = device
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def server():
            sock = listener.accept()[0]
            with sock:
                sock.sendall(server_sends)
                sock.shutdown(socket.SHUT_WR)
                sock.recv(10)  # until the client's own end

        threading.Thread(target=server, daemon=True).start()
        tunnel = Tunnel(ours.fileno(), "tun9")
        assert simpletun.run_client(tunnel, "127.0.0.1", listener.getsockname()[1]) == status
    assert caplog.messages[-1] == says


def test_the_tunnels_server_serves_one_client_after_another_and_each_end_is_said(caplog):
    caplog.set_level("INFO", logger="simpletun")
    ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    kernel.settimeout(TIMEOUT)
    listener = socket.create_server(("127.0.0.1", 0))
    SERVING.append((ours, kernel, listener))  # serve() runs on until the tests end: so do its fds
    thread = threading.Thread(target=simpletun.serve, args=(Tunnel(ours.fileno(), "tun9"), listener), daemon=True)
    thread.start()
    for n, goodbye in enumerate((b"", frame(b"cut")[:3])):
        with socket.create_connection(listener.getsockname(), timeout=TIMEOUT) as client:
            client.sendall(frame(b"packet %d" % n) + goodbye)
            assert kernel.recv(100) == b"packet %d" % n
    wait_for(lambda: len([m for m in messages_of(caplog, thread) if m.startswith("SERVER: ")]) == 4, "two ends")
    assert [m for m in messages_of(caplog, thread) if m.startswith("SERVER: ")] == [
        "SERVER: Client connected from 127.0.0.1", "SERVER: the peer closed the connection",
        "SERVER: Client connected from 127.0.0.1",
        "SERVER: connection ended in the middle of a frame (3 bytes of it came)"]


# ---------------------------------------------------------------------------------------
# The command line: make_parser(), run(), main() -- and the tunnel end to end (root)
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, reason", [
    (["-s"], "an interface name is required"),
    (["-i", "tun0"], "choose server (-s) or client (-c HOST)"),
    (["-i", "a" * 16, "-s"], "an interface name is 1 to 15 bytes"),
    (["-i", "tun/0", "-s"], "no '/' or spaces: 'tun/0'"),
    (["-i", "tun0", "-s", "-c", "h"], "not allowed with argument"),
    (["-i", "tun0", "-s", "-p", "0"], "from 1 to 65535, not '0'"),
    (["-i", "tun0", "-s", "-p", "65536"], "from 1 to 65535"),
    (["-i", "tun0", "-s", "-p", "http"], "from 1 to 65535, not 'http'"),
    (["-i", "tun0", "-s", "-u", "-a"], "not allowed with argument"),
    (["-i", "tun0", "-s", "extra"], "unrecognized arguments: extra"),
])
def test_usage_errors_exit_2_with_a_reason_and_the_usage(args, reason):
    result = run_script(*args)
    assert result.returncode == 2
    assert reason in result.stderr
    assert result.stderr.startswith("usage: simpletun.py")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args, tap, port, debug", [
    (["-i", "tun0", "-s"], False, 55555, 0),
    (["-i", "tun0", "-s", "-u"], False, 55555, 0),
    (["-i", "tun0", "-s", "-p", "65535"], False, 65535, 0),  # the highest port
    (["-i", "t", "-s", "-p", "1"], False, 1, 0),  # the lowest port, the shortest name
    (["-i", "t" * 15, "-s"], False, 55555, 0),  # the longest name the kernel takes
    (["-i", "tap0", "-c", "h", "-a", "-p", "7000", "-d"], True, 7000, 1),
    (["--iface", "tap0", "--client", "h", "--tap", "--port", "7000", "-dd"], True, 7000, 2),
])
def test_flags_keep_the_originals_meaning(args, tap, port, debug):
    for parsed in (simpletun.make_parser().parse_args(args), simpletun.parse_args(args)):
        assert (parsed.tap, parsed.port, parsed.debug) == (tap, port, debug)


def test_help_names_every_flag_of_the_original():
    result = run_script("-h")
    assert result.returncode == 0
    for flag in ("-i NAME", "-s", "-c HOST", "-p PORT", "-u", "-a", "-d", "-h"):
        assert flag in result.stdout


def test_not_linux_is_one_line_saying_so():
    code = "import sys; sys.platform = 'darwin'; import simpletun; sys.exit(simpletun.main(['-i', 'tun0', '-s']))"
    result = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.returncode == 1
    assert result.stderr == ("simpletun.py: error: simpletun.py runs on Linux only (it needs /dev/net/tun); "
                             "this is darwin\n")


@pytest.mark.parametrize("raised, status, says", [
    (KeyboardInterrupt(), 0, ""),
    (simpletun.UserError("cannot do it"), 1, "simpletun.py: error: cannot do it\n"),
    (ValueError("a bug"), 1, "simpletun.py: unexpected error: ValueError: a bug\n"),
])
def test_run_turns_how_a_run_ends_into_a_status_and_at_most_one_line(capsys, raised, status, says):
    def start():
        raise raised
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert simpletun.run(start) == status
        assert signal.getsignal(signal.SIGTERM) is signal.default_int_handler  # SIGTERM as Ctrl-C
    finally:
        signal.signal(signal.SIGTERM, handler)
    assert capsys.readouterr().err == says


@pytest.mark.netns
def test_tun_tunnel_carries_traffic_both_ways_and_leaves_no_device(lab):
    server, client = start_pair(lab, "tun0")
    lab.echo("s"), lab.echo("c")
    assert tunnel_passes(lab, "c") and tunnel_passes(lab, "s")
    assert lab.probe("c", count=20, wait=1) == 20
    assert lab.probe("s", count=20, wait=1) == 20
    assert "CLIENT: Connected to server 192.0.2.1" in log_of(client)
    assert "SERVER: Client connected from 192.0.2.2" in log_of(server)
    assert "TAP2NET 1: Read" in log_of(client) and "NET2TAP 1: Written" in log_of(server)
    client.send_signal(signal.SIGTERM)
    assert client.wait(TIMEOUT) == 0
    assert re.fullmatch(r"simpletun.py: tun0: TAP2NET \d+ packets, NET2TAP \d+ packets, 0 dropped",
                        log_of(client).splitlines()[-1])  # the exit summary
    # The device the client made was transient: it went with the process.
    assert lab.ip("-n", lab.ns["c"], "link", "show", "tun0", check=False).returncode != 0


@pytest.mark.netns
@pytest.mark.parametrize("device, mode", [("tun0", []), ("tap0", ["-a"])])
@pytest.mark.parametrize("ends", ["tunnel alone, both ends", "tunnel alone as server, full client",
                                  "full server, tunnel alone as client"])
def test_the_tunnel_cut_at_the_banner_runs_alone_and_with_the_full_program(lab, tmp_path, device, mode, ends):
    alone = cut_tunnel(tmp_path / "tunnel_alone.py")
    server = lab.tunnel("s", "-i", device, "-d", *mode, script=SCRIPT if ends.startswith("full") else alone)
    lab.configure("s", device)
    wait_for(lambda: "SERVER: listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", device, "-d", *mode, script=SCRIPT if ends.endswith("client") else alone)
    lab.configure("c", device)
    lab.echo("s")
    lab.echo("c")
    assert tunnel_passes(lab, "c") and tunnel_passes(lab, "s")  # both directions
    assert lab.probe("c", count=5) == 5 and lab.probe("s", count=5) == 5
    client.send_signal(signal.SIGTERM)
    assert client.wait(TIMEOUT) == 0
    for proc in (server, client):
        assert "TAP2NET 1: Read" in log_of(proc) and "Traceback" not in log_of(proc)
    # Regression: the tunnel alone said "::ffff:192.0.2.2" for an IPv4 client
    assert "SERVER: Client connected from 192.0.2.2\n" in log_of(server)


@pytest.mark.netns
def test_the_tunnel_alone_says_nothing_of_a_flood_of_empty_frames_without_d(lab, tmp_path):
    # Regression: 4 MB of empty frames made the tunnel alone print a million warning lines.
    server = lab.tunnel("s", "-i", "tun0", script=cut_tunnel(tmp_path / "tunnel_alone.py"))
    wait_for(lambda: socket_listening(lab), "the server to listen")
    flood = "import socket; s = socket.create_connection(('%s', 55555)); s.sendall(bytes(4 << 20)); s.close()" % (
        lab.SERVER_IP)
    subprocess.run(["ip", "netns", "exec", lab.ns["c"], sys.executable, "-c", flood], check=True, timeout=30)
    wait_for(lambda: "the peer closed the connection" in log_of(server), "the server to see the end")
    assert log_of(server) == "SERVER: the peer closed the connection\n" and server.poll() is None


@pytest.mark.netns
def test_tap_tunnel_carries_ethernet_frames_and_resolves_arp(lab):
    for side in "sc":  # persistent tap devices made beforehand, as `ip tuntap add` users do
        lab.ip("-n", lab.ns[side], "tuntap", "add", "dev", "tap0", "mode", "tap")
    server, client = start_pair(lab, "tap0", "-a")
    lab.echo("s"), lab.echo("c")
    assert tunnel_passes(lab, "c") and tunnel_passes(lab, "s")
    assert lab.probe("c", count=20, wait=1) == 20
    neighbours = lab.ip("-n", lab.ns["c"], "neigh", "show", "dev", "tap0").stdout
    assert "10.9.0.1 lladdr" in neighbours  # ARP crossed the tunnel
    assert "Read 42 bytes from the tap interface" in log_of(client) + log_of(server)  # an ARP frame


@pytest.mark.netns
def test_device_down_drops_with_one_line_and_resumes_when_up(lab):
    server, client = start_pair(lab, "tun0")
    lab.echo("s")
    assert tunnel_passes(lab)
    lab.ip("-n", lab.ns["s"], "link", "set", "tun0", "down")
    assert lab.probe("c", count=5, wait=0.3) == 0
    wait_for(lambda: "refused" in log_of(server), "the refusal to be logged")
    lab.ip("-n", lab.ns["s"], "link", "set", "tun0", "up")
    assert tunnel_passes(lab)
    assert lab.probe("c", count=10) == 10
    text = log_of(server)
    # the first refusal says why; more within a second are counted on the next such line
    assert 1 <= text.count("refused a") <= 3
    assert "tun0 refused a 48-byte packet: Input/output error -- is the device down? (ip link set tun0 up)" in text \
        or re.search(r"tun0 refused a \d+-byte packet: Input/output error -- is the device down\? \(ip link set "
                     r"tun0 up\)", text)
    assert server.poll() is None and client.poll() is None


@pytest.mark.netns
def test_client_exits_0_when_server_closes_and_1_when_it_vanishes_mid_frame(lab):
    server, client = start_pair(lab, "tun0")
    lab.echo("s")
    assert tunnel_passes(lab)
    server.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0
    assert client.wait(TIMEOUT) == 0
    assert "CLIENT: the peer closed the connection" in log_of(client)

    half_frame = """
import socket
with socket.create_server(("", 55555)) as l:
    c, _ = l.accept()
    c.sendall(b"\\x00\\x54" + b"E" * 20)
    c.close()
"""
    fake = lab.spawn("s", [sys.executable, "-c", half_frame], "fake-server.log")
    wait_for(lambda: "55555" in lab.ip("netns", "exec", lab.ns["s"], "ss", "-ltn").stdout, "the fake server")
    client = lab.tunnel("c", "-i", "tun0")
    assert client.wait(TIMEOUT) == 1
    assert fake.wait(TIMEOUT) == 0
    assert "CLIENT: connection ended in the middle of a frame (22 bytes of it came)" in log_of(client)


@pytest.mark.netns
@pytest.mark.parametrize("setup, side, args, says", [
    ("busy", "s", ["-i", "tun0", "-s", "-p", "5001"],
     "cannot attach to tun0: another program has it open (is another simpletun.py running on it?)"),
    ("tap", "s", ["-i", "tap7", "-s", "-p", "5002"], "tap7: it exists and is not a device of this kind (tun: -u"),
    ("busy", "s", ["-i", "tun5", "-s"], "port 55555: Address already in use"),
    (None, "c", ["-i", "tun6", "-c", "192.0.2.1", "-p", "5003"],
     "refused: is a server running (simpletun.py -s), over TCP?"),
    (None, "c", ["-i", "tun6", "-c", "no-such-host.invalid"], "cannot connect to no-such-host.invalid port 55555"),
    (None, "s", ["-i", "veth0", "-s"], "veth0: it exists and is not a device of this kind"),
])
def test_user_errors_are_one_line_and_exit_1(lab, setup, side, args, says):
    if setup == "busy":
        holder = lab.tunnel("s", "-i", "tun0", "-d")
        wait_for(lambda: "listening" in log_of(holder), "the first server")
    if setup == "tap":
        lab.ip("-n", lab.ns["s"], "tuntap", "add", "dev", "tap7", "mode", "tap")
    result = subprocess.run(["ip", "netns", "exec", lab.ns[side], sys.executable, SCRIPT] + args,
                            capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert result.returncode == 1
    assert says in result.stderr
    # Regression: a zero summary line followed errors before any peer came.
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------------------------------
# 1. The full program's link: ExtraLink, keep_alive(), framing()
# ---------------------------------------------------------------------------------------

def connected_pair():
    """Two ends of a loopback TCP connection (a reset, unlike a socketpair's, is a TCP one)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ours = socket.create_connection(listener.getsockname())
        theirs = listener.accept()[0]
    ours.setblocking(False)
    theirs.settimeout(TIMEOUT)
    return ours, theirs


def received_by(link):
    """Receive once, after waiting for the socket; the packets it completed, as bytes."""
    got = []
    select.select([link.sock], [], [], TIMEOUT)
    link.receive(lambda packet: got.append(bytes(packet)))
    return got


@pytest.mark.parametrize("argv, header, size", [
    ([], HEADER, simpletun.RECV_SIZE), (["--offload"], simpletun.OFFLOAD_HEADER, simpletun.OFFLOAD_RECV_SIZE)])
def test_the_full_link_frames_as_the_options_say(argv, header, size):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        link = simpletun.ExtraLink(ours, "peer", options("-s", *argv), heard=True)
        assert (link.header, len(link.view)) == (header, size)


def test_keep_alive_lets_the_kernel_notice_a_vanished_peer_and_tunes_as_the_tunnel_does():
    with socket.socket() as sock:
        simpletun.keep_alive(sock)
        for level, option, value in simpletun.KEEPALIVE:
            assert sock.getsockopt(level, option) == value
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) and not sock.getblocking()


def test_debug_twice_says_what_each_receive_brought_before_the_packets_it_brought(rig):
    r = rig(debug=2, full=True)
    wire = frame(UDP_PACKET) * 2 + frame(ECHO_REQUEST)
    r.peer.sendall(wire[:-10])
    assert [r.kernel.recv(65536), r.kernel.recv(65536)] == [UDP_PACKET, UDP_PACKET]
    r.peer.sendall(wire[-10:])
    assert r.kernel.recv(65536) == ECHO_REQUEST
    r.finish()
    lines = [m for m in r.lines() if m.startswith("NET2TAP")]
    receives = [m for m in lines if m.startswith("NET2TAP: a receive")]
    assert receives == [
        "NET2TAP: a receive brought %d bytes from TCP: 2 whole frame(s); 76 of the next frame's 86 bytes "
        "wait for the next receive" % (len(wire) - 10),
        "NET2TAP: a receive brought 10 bytes from TCP (after 76 held from before): 1 whole frame(s); "
        "nothing left over",
    ]
    assert lines[0] == receives[0] and lines[7] == receives[1]  # each before the packets it brought


@pytest.mark.parametrize("rest, says", [(b"", "nothing left over"),
                                        (b"\x00", "1 byte(s) of the next frame's length wait"),
                                        (b"\x00\x10\x45", "3 of the next frame's 18 bytes wait")])
def test_debug_twice_says_what_of_the_next_frame_waits_after_the_whole_ones(caplog, rest, says):
    caplog.set_level(logging.DEBUG, logger="simpletun")
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "peer", options("-s", "-dd"), heard=True)
        theirs.sendall(frame(UDP_PACKET) + rest)
        assert received_by(link) == [UDP_PACKET]
    tail = " for the next receive" * bool(rest)
    assert caplog.messages[-1] == "NET2TAP: a receive brought %d bytes from TCP: 1 whole frame(s); %s%s" % (
        len(UDP_PACKET) + 2 + len(rest), says, tail)


def test_a_frame_longer_than_the_buffer_ends_the_link_with_a_reason():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "peer", options("-s", "--offload"), heard=True)
        sender = threading.Thread(target=lambda: theirs.sendall(b"\xff\xff\xff\xff" + bytes(len(link.view))),
                                  daemon=True)
        sender.start()
        with returns_within(TIMEOUT, "receiving a frame longer than the buffer"):
            while not link.ended:
                received_by(link)
        assert link.ended == ("a frame longer than this end's buffer (%d bytes): is the peer running another "
                              "wire format?" % len(link.view))
        ours.close()
        sender.join(TIMEOUT)


def test_a_peer_that_takes_nothing_until_the_kernel_drops_it_is_named_so():
    ours, theirs = socket.socketpair()
    link = simpletun.ExtraLink(ours, "peer", options("-s"))
    ours.setblocking(False)
    with ours, theirs:
        started = time.monotonic()
        while not link.stalled:  # the peer reads nothing: its side fills up
            link.out += bytes(65536)
            link.send_queued()
        assert started <= link.stalled <= time.monotonic() and link.out  # noted when nothing more was taken
        theirs.recv(65536)  # it takes something: not stalled any more
        link.send_queued()
        assert link.stalled is None
        cut = ssl.SSLEOFError(8, "EOF occurred in violation of protocol")
        link.heard = True
        assert "without a goodbye (close_notify)" in link.lost(cut)  # a peer killed, or a cut
        link.stalled = time.monotonic() - simpletun.USER_TIMEOUT
        for err in (cut, TimeoutError(errno.ETIMEDOUT, "Connection timed out")):
            assert link.lost(err) == ("connection dropped: the peer took none of this end's data for 40 s (it "
                                      "stopped reading, or cannot be reached)")
        link.stalled = time.monotonic() - simpletun.USER_TIMEOUT + 6  # not yet
        assert link.lost(ConnectionAbortedError(errno.ECONNABORTED, "Software caused connection abort")) == \
            "connection lost: Software caused connection abort"


def test_a_peer_that_takes_part_of_the_queue_again_is_no_longer_counted_as_stalled():
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "peer", options("-s"), heard=True)
        link.out += bytes(8 << 20)
        link.send_queued()  # the socket buffers fill up
        link.send_queued()  # nothing taken
        assert link.stalled is not None
        taken = 0
        while taken < 1 << 20 and select.select([theirs], [], [], 0.2)[0]:
            taken += len(theirs.recv(65536))  # the peer reads a little: the next send takes some, not all
        link.send_queued()
        assert link.out and link.stalled is None


@pytest.mark.parametrize("heard, says", [
    (False, simpletun.EVICTED),  # pushed out of a full waiting room: told why, not a bare reset
    (True, "connection lost: Connection reset by peer"),  # served before: a lost connection
])
def test_a_client_reset_before_its_first_packet_back_was_evicted_after_it_lost_its_connection(heard, says):
    ours, theirs = connected_pair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    theirs.close()  # what the room does to the newcomer it evicts: a reset
    with ours:
        link = simpletun.ExtraLink(ours, "127.0.0.1", options("-c", "h"), heard=heard)
        assert received_by(link) == [] and link.ended == says and not link.orderly


@pytest.mark.parametrize("server_sends, says, orderly", [
    (b"", simpletun.UNSERVED, False),
    (frame(b"\x00" * 40), simpletun.UNSERVED, False),  # garbage is no first packet: still unserved
    (simpletun.GREETING_FRAME, "the peer runs with --offload, this end without: start both ends with --offload, "
                               "or neither", False),
    (frame(ECHO_REQUEST), "the peer closed the connection", True),  # served, then closed: in order
])
def test_a_client_link_says_why_the_server_ended_it(caplog, server_sends, says, orderly):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "server", options("-c", "h"))
        theirs.sendall(server_sends)
        theirs.shutdown(socket.SHUT_WR)
        with returns_within(TIMEOUT, "receiving"):
            while not link.ended:
                received_by(link)
        assert (link.ended, link.orderly) == (says, orderly)
    served = [m for m in caplog.messages if "the server serves this end" in m]
    assert served == ["CLIENT: a first packet came back through the tunnel: the server serves this end"] * orderly


@pytest.mark.parametrize("tap, first, served", [
    (False, frame(b"\x00" * 40), False), (False, frame(ECHO_REQUEST), True),
    (True, frame(ECHO_REQUEST), False), (True, frame(ethernet(0x0806, arp(2))), True),
    (False, frame(simpletun.GREETING), False),
], ids=["tun garbage", "tun packet", "tap: an IP packet is no frame", "tap frame", "a greeting"])
def test_only_a_packet_that_could_be_one_for_this_mode_makes_a_client_say_it_is_served(caplog, tap, first, served):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "server", options("-c", "h", *["-a"] * tap))
        theirs.sendall(first)
        received_by(link)
        assert link.heard is served
    assert ("CLIENT: a first packet came back through the tunnel: the server serves this end" in
            caplog.messages) is served


@pytest.fixture
def heard_client(monkeypatch):
    """A client's link that has heard from its server, on a socketpair (the server's end: theirs), with
    a clock the test moves: now[0]."""
    now = [1000.0]
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: now[0])
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    with ours, theirs:
        yield simpletun.ExtraLink(ours, "server", options("-c", "h"), heard=True), theirs, now


def test_a_client_that_sends_and_hears_nothing_back_says_so_once_per_silence(caplog, heard_client):
    link, theirs, now = heard_client
    said = lambda: [m for m in caplog.messages if "nothing has come back" in m]  # noqa: E731
    assert link.due() is None  # nothing sent: no silence
    for silence in (1, 2):
        sent = now[0]
        for _ in range(3):  # packets, a second apart: the silence began with the first
            link.out += frame(ECHO_REQUEST)
            link.send_queued()
            now[0] += 1
        assert link.due() == sent + simpletun.SILENCE  # the clock wakes the loop then
        link.tick()
        link.tick()
        assert len(said()) == silence and link.due() is None  # said once; nothing more is due
        theirs.sendall(frame(ECHO_REQUEST))  # something comes back: the silence is over
        assert received_by(link) == [ECHO_REQUEST] and link.due() is None
        link.send_queued()  # (nothing queued: no silence begins)
        assert link.due() is None
        now[0] += 1  # the next ping, a second later
    assert said()[0] == simpletun.UNANSWERED % simpletun.SILENCE
    assert "is this end's address another client's" in said()[0]


def test_a_busy_client_is_not_looked_at_until_nothing_has_come_back_for_a_moment(heard_client):
    link, theirs, now = heard_client
    theirs.sendall(frame(ECHO_REPLY))
    assert received_by(link) == [ECHO_REPLY]  # something came back: the tunnel is busy
    for ahead, armed in ((0, False), (simpletun.BUSY / 2, False), (simpletun.BUSY, True)):
        now[0] += ahead
        link.out += frame(ECHO_REQUEST)
        link.send_queued()
        assert (link.due() is not None) == armed
    assert link.due() == now[0] + simpletun.SILENCE  # from the ping it looked at


TCP_SYN = ipv4(6, struct.pack("!HHIIBBHHH", 40000, 22, 1, 0, 5 << 4, 0x02, 65535, 0, 0))
ECHO_REPLY = ipv4(1, struct.pack("!BBHHH", 0, 0, 0, 7, 1) + b"x" * 56, src="10.0.0.1", dst="10.0.0.2")


@pytest.mark.parametrize("packet, tap, asks", [
    (ECHO_REQUEST, False, True), (TCP_SYN, False, True),
    (ipv6(58, struct.pack("!BBHHH", 128, 0, 0, 7, 1), dst="fd00::1"), False, True),
    (ethernet(0x0800, ECHO_REQUEST, dst="6e:00:00:00:00:01"), True, True),
    (ECHO_REPLY, False, False), (TCP_SYN_ACK, False, False), (TCP_DATA, False, False),
    (UDP_PACKET, False, False), (ROUTER_SOLICITATION, False, False), (MLD_REPORT, False, False),
    (ethernet(0x0800, ECHO_REQUEST), False, False), (b"", False, False),
    (ethernet(0x0806, arp(1, "10.0.0.2", "10.0.0.1")), True, True),  # who-has: before the ping
    (ethernet(0x0806, arp(1, "10.0.0.2", "10.0.0.2")), True, False),  # gratuitous: asks no one
    (ethernet(0x0806, arp(2, "10.0.0.2", "10.0.0.1"), dst="6e:00:00:00:00:01"), True, False)])
def test_only_a_ping_or_a_new_tcp_connection_waits_for_an_answer(packet, tap, asks):
    assert simpletun.awaits_answer(packet, tap) is asks


def test_a_packet_back_ends_the_silence_with_dd_too(monkeypatch):
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: 1000.0)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "server", options("-c", "h", "-dd"), heard=True)
        link.out += frame(ECHO_REQUEST)
        link.send_queued()
        assert link.due() == 1000.0 + simpletun.SILENCE
        theirs.sendall(frame(ECHO_REQUEST))
        select.select([ours], [], [], TIMEOUT)
        got = []
        assert link.receive(lambda packet: got.append(bytes(packet))) == len(frame(ECHO_REQUEST))  # Link's promise
        assert got == [ECHO_REQUEST] and link.due() is None


def test_what_nothing_answers_starts_no_silence(heard_client):
    # IPv6's housekeeping and a client's own answers go unanswered in every healthy tunnel.
    link, _, now = heard_client
    for packet in (ROUTER_SOLICITATION, MLD_REPORT, ECHO_REPLY, TCP_DATA):
        link.out += frame(packet)
        link.send_queued()
        now[0] += 2
        assert link.due() is None
    link.out += frame(TCP_SYN) + frame(ECHO_REPLY)
    link.send_queued()
    assert link.due() == now[0] + simpletun.SILENCE


def test_a_server_link_never_tells_of_a_silence(monkeypatch):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        link = simpletun.ExtraLink(ours, "client", options("-s"), heard=True)
        for _ in range(3):
            link.out += frame(ECHO_REQUEST)
            link.send_queued()
        assert link.due() is None


def test_a_clients_clock_calls_its_link_when_a_silence_is_due(caplog, monkeypatch):
    monkeypatch.setattr(simpletun, "SILENCE", 0.2)
    ours, theirs = connected_pair()
    with ours, theirs, simpletun.Clock() as clock:
        link = simpletun.client_link(ours, "server", options("-c", "h", "-d"), None, clock=clock)
        assert clock.timer is link
        link.out += frame(ECHO_REQUEST)
        link.send_queued()
        started = time.monotonic()
        with returns_within(TIMEOUT, "the clock"):
            while not [m for m in caplog.messages if "nothing has come back" in m]:
                for key, events in clock.select():  # no fd: only the timer wakes it
                    key.data(events)
        assert 0.2 <= time.monotonic() - started < 1


def test_a_link_that_closes_reads_what_the_peer_still_sends_so_the_peer_hears_no_reset():
    ours, theirs = connected_pair()
    link = simpletun.ExtraLink(ours, "127.0.0.1", options("-s"), heard=True)
    closer = threading.Thread(target=link.close)
    with theirs:
        closer.start()
        assert theirs.recv(10) == b""  # our FIN
        theirs.sendall(b"x" * 1000)  # packets of its own, still on their way after our FIN
        time.sleep(0.2)
        theirs.sendall(b"y" * 1000)  # a reset would have come by now: this send would fail
        theirs.shutdown(socket.SHUT_WR)
        closer.join(TIMEOUT)
        assert not closer.is_alive() and ours.fileno() == -1
        assert theirs.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0


def test_a_goodbye_the_peer_never_answers_ends_after_goodbye_time(monkeypatch):
    monkeypatch.setattr(simpletun, "GOODBYE_TIME", 0.3)
    ours, theirs = connected_pair()
    with theirs:
        link = simpletun.ExtraLink(ours, "127.0.0.1", options("-s"), heard=True)
        started = time.monotonic()
        link.close()  # the peer never closes its side
        assert 0.3 <= time.monotonic() - started < 0.3 + 1 and ours.fileno() == -1


def test_two_writes_sends_each_frames_length_and_packet_apart_with_nagle_on():
    sent = []

    class Socket:
        options = {}

        def setsockopt(self, level, option, value):
            self.options[option] = value

        def sendall(self, data):
            sent.append(bytes(data))

        def setblocking(self, on):
            pass
    link = simpletun.ExtraLink(Socket(), "peer", options("-s", "--two-writes"), heard=True)
    assert Socket.options[socket.TCP_NODELAY] == 0
    link.out += frame(ECHO_REQUEST) + frame(UDP_PACKET)
    link.send_queued()
    assert sent == [HEADER.pack(84), ECHO_REQUEST, HEADER.pack(len(UDP_PACKET)), UDP_PACKET] and not link.out


# ---------------------------------------------------------------------------------------
# 2. TLS (--tls): tls_context(), secure_client(), tls_goodbye()
# ---------------------------------------------------------------------------------------

def make_certificate(path, name="simpletun"):
    """One PEM file with a self-signed certificate and its key: the README's openssl command."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-days", "30", "-subj", "/CN=" + name, "-keyout", str(path), "-out", str(path)],
                   check=True, capture_output=True, timeout=TIMEOUT)
    return str(path)


def make_signed_certificate(path, signer):
    """One PEM file with a certificate the `signer` file's key signed, and its own key."""
    key, request = path.with_suffix(".key"), path.with_suffix(".csr")
    for command in (["openssl", "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                     "-subj", "/CN=signed", "-keyout", str(key), "-out", str(request)],
                    ["openssl", "x509", "-req", "-in", str(request), "-CA", signer, "-CAkey", signer,
                     "-days", "30", "-out", str(path)]):
        subprocess.run(command, check=True, capture_output=True, timeout=TIMEOUT)
    path.write_text(path.read_text() + key.read_text())
    return str(path)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """Two unrelated certificate+key files, 'a' and 'b'; and 'signed', a certificate 'a' signed."""
    if not shutil.which("openssl"):
        skip_or_fail("needs the openssl command to make certificates")
    where = tmp_path_factory.mktemp("certs")
    files = {name: make_certificate(where / (name + ".pem"), name) for name in ("a", "b")}
    files["signed"] = make_signed_certificate(where / "signed.pem", files["a"])
    return files


class Refused(Exception):
    """What one end of tls_link() said when it refused the other."""


def tls_link(server_file, client_file, server_peer=None, client_peer=None):
    """A connected pair of TLS sockets, as simpletun.py makes them: (server end, client end),
    or a Refused saying why in place of an end."""
    a, b = socket.socketpair()
    server_tls = simpletun.tls_context(True, server_file, server_peer)
    client_tls = simpletun.tls_context(False, client_file, client_peer)
    result = {}

    def server_side():
        sock = simpletun.wrap_tls(a, server_tls, server_side=True)
        sock.settimeout(TIMEOUT)
        try:
            sock.do_handshake()
            if not simpletun.pinned(sock, server_tls):
                raise Refused("its certificate is not the pinned one")
            sock.setblocking(False)
            result["server"] = sock
        except ssl.SSLError as err:
            result["server"] = Refused(simpletun.explain_tls(err))
        except Refused as err:
            result["server"] = err
    thread = threading.Thread(target=server_side)
    thread.start()
    try:
        result["client"] = simpletun.secure_client(b, client_tls)
    except simpletun.UserError as err:
        result["client"] = Refused(str(err))
    thread.join(TIMEOUT)
    return result["server"], result["client"]


def test_tls_link_carries_frames_both_ways(certs, rig):
    link, peer = tls_link(certs["a"], certs["a"])
    assert link.version() in ("TLSv1.3", "TLSv1.2")
    peer.setblocking(True)
    r = rig(pair=(link, peer), full=True)
    packets = [bytes([i]) * (100 + i * 13) for i in range(200)]
    for packet in packets:
        r.kernel.send(packet)
    assert r.frames_from_peer(len(packets)) == packets
    back = packets[:40]  # no more than the stand-in device's buffer holds unread
    r.peer.sendall(b"".join(frame(p) for p in back))
    assert [r.kernel.recv(65536) for _ in back] == back


def test_a_receive_takes_each_tls_record_whole_so_no_bytes_wait_inside_tls_unseen(certs):
    # TLS decrypts a record at a time (16 KiB at most), and a receive always has room for more, even
    # behind the longest unfinished frame: nothing stays decrypted inside TLS, where select() cannot
    # see it (ExtraLink.receive() says so, and takes no more).
    link, peer = tls_link(certs["a"], certs["a"])
    with link, peer:
        receiver = simpletun.ExtraLink(link, "peer", options("-s"), heard=True)
        packets = [bytes([n]) * size for n, size in enumerate([65535, 1, 16384, 65535, 1500, 30000])]
        wire = b"".join(frame(p) for p in packets)
        peer.setblocking(True)
        threading.Thread(target=lambda: [peer.sendall(wire[i:i + 7000]) for i in range(0, len(wire), 7000)],
                         daemon=True).start()  # records that end inside frames, and the longest frames
        got = []
        with returns_within(TIMEOUT * 2, "receiving"):
            while len(got) < len(packets):
                assert select.select([link], [], [], TIMEOUT)[0], got
                receiver.receive(lambda packet: got.append(bytes(packet)))
                assert link.pending() == 0
        assert got == packets


def test_dd_with_tls_says_how_many_bytes_of_records_the_cable_brought(certs, caplog):
    caplog.set_level(logging.DEBUG)
    link, peer = tls_link(certs["a"], certs["a"])
    with link, peer:
        receiver = simpletun.ExtraLink(link, "peer", options("-s", "-dd"), heard=True)
        peer.setblocking(True)
        peer.sendall(frame(ECHO_REQUEST))  # one record: 86 bytes of frame, and TLS's own around them
        assert select.select([link], [], [], TIMEOUT)[0]  # (a socketpair: the record comes whole)
        wire = receiver.waiting()
        assert wire > len(frame(ECHO_REQUEST))
        receiver.receive(lambda packet: None)
    assert "NET2TAP: a receive brought %d bytes of TLS records from TCP, 86 bytes of frames in them: 1 whole " \
           "frame(s); nothing left over" % wire in caplog.messages


def der_of(pem_file):
    with open(pem_file) as f:
        return ssl.PEM_cert_to_DER_cert(simpletun.PEM_CERTIFICATE.search(f.read()).group())


def test_tls_peer_with_another_certificate_is_refused(certs):
    server, client = tls_link(certs["a"], certs["b"])
    # TLS 1.3: the client checks the server's certificate during the handshake (and refuses it);
    # either way at least one end refuses, saying it is about the certificate.
    refusals = [str(x) for x in (server, client) if isinstance(x, Refused)]
    assert refusals
    assert all("certificate" in said for said in refusals), refusals


def test_tls_peer_names_the_one_certificate_each_end_accepts(certs):
    server, client = tls_link(certs["a"], certs["b"], server_peer=certs["b"], client_peer=certs["a"])
    assert not isinstance(server, Exception) and not isinstance(client, Exception)
    assert server.getpeercert(binary_form=True) == der_of(certs["b"])
    assert client.getpeercert(binary_form=True) == der_of(certs["a"])


def test_a_client_refuses_a_server_whose_certificate_the_pinned_one_signed(certs):
    # the chain check takes a certificate the pinned one signed; the pin does not
    server, client = tls_link(certs["signed"], certs["a"], server_peer=certs["a"])
    assert isinstance(client, Refused)
    assert str(client) == "CLIENT: the server's certificate is not the pinned one (--tls-peer)"


def test_expired_certificate_gets_its_own_hint_not_the_wrong_certificate_one():
    err = ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
    err.reason, err.verify_code, err.verify_message = "CERTIFICATE_VERIFY_FAILED", 10, "certificate has expired"
    said = simpletun.explain_tls(err)
    assert "has expired" in said and "not the one this end accepts" not in said


@pytest.mark.parametrize("reason, says", [
    ("CERTIFICATE_VERIFY_FAILED", "TLS failed (certificate verify failed): the peer's certificate is not the one "
                                  "this end accepts"),
    ("TLSV1_ALERT_UNKNOWN_CA", "TLS failed (tlsv1 alert unknown ca): the peer refused this end's certificate"),
    ("WRONG_VERSION_NUMBER", "TLS failed (wrong version number): the peer does not speak TLS"),
    ("UNEXPECTED_EOF_WHILE_READING", "the peer closed the connection during the TLS handshake"),
    ("SOMETHING_ELSE", "TLS failed: something else"),
])
def test_each_tls_failure_is_one_line_saying_what_it_probably_means(reason, says):
    err = ssl.SSLError(1, reason)
    err.reason = reason
    assert simpletun.explain_tls(err).startswith(says)


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    ("hello\n", "not a PEM file holding a certificate and its private key"),
    ("KEY_ONLY", "not a PEM file holding a certificate and its private key"),
    ("CERT_ONLY", "not a PEM file holding a certificate and its private key"),
])
def test_unusable_tls_file_is_one_line(certs, tmp_path, content, says):
    path = tmp_path / "tunnel.pem"
    if content is not None:
        pem = open(certs["a"]).read()
        key = pem[:pem.index("-----BEGIN CERTIFICATE-----")]
        cert = simpletun.PEM_CERTIFICATE.search(pem).group()
        path.write_text({"KEY_ONLY": key, "CERT_ONLY": cert}.get(content, content))
    with pytest.raises(simpletun.UserError) as error:
        simpletun.tls_context(True, str(path))
    assert str(error.value) == "--tls %s: %s%s" % (path, says, " (see the README: Encryption)" * bool(content))


def test_unreadable_tls_file_is_one_line_and_exit_1(certs, tmp_path):
    secret = tmp_path / "secret.pem"
    shutil.copy(certs["a"], secret)
    os.chmod(secret, 0)
    if os.geteuid() == 0:
        os.chmod(tmp_path, 0o755)  # nobody may enter the folder, not read the file
        status, stderr = run_main_as_nobody("-i", "tun0", "-s", "--tls", str(secret))
    else:
        result = run_script("-i", "tun0", "-s", "--tls", str(secret))
        status, stderr = result.returncode, result.stderr
    assert status == 1
    assert stderr.strip() == "simpletun.py: error: --tls %s: cannot read it (permission denied)" % secret


def test_peer_certificate_file_without_a_certificate_is_one_line(certs, tmp_path):
    junk = tmp_path / "peer.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(simpletun.UserError, match=re.escape("--tls-peer %s: not a PEM file holding a certificate"
                                                            % junk)):
        simpletun.tls_context(False, certs["a"], str(junk))


def test_a_tls_client_whose_server_never_answers_the_handshake_says_so_in_time(certs, monkeypatch):
    monkeypatch.setattr(simpletun, "HANDSHAKE_TIMEOUT", 0.3)
    with socket.create_server(("127.0.0.1", 0)) as silent:
        sock = socket.create_connection(silent.getsockname())
        started = time.monotonic()
        with pytest.raises(simpletun.UserError, match="no TLS handshake within 0.3 s: does the server run with --tls"):
            simpletun.secure_client(sock, simpletun.tls_context(False, certs["a"]))
        assert time.monotonic() - started < 0.3 + 1
        peer, _ = silent.accept()
        with peer:
            peer.settimeout(TIMEOUT)
            while peer.recv(65536):  # its hello, then the end of the connection: the client closed it
                pass


def test_a_tls_client_after_its_handshake_never_blocks_the_loop(certs):
    a, b = socket.socketpair()
    server = simpletun.wrap_tls(a, simpletun.tls_context(True, certs["a"]), server_side=True)
    thread = threading.Thread(target=server.do_handshake, daemon=True)
    thread.start()
    with server, simpletun.secure_client(b, simpletun.tls_context(False, certs["a"])) as client:
        thread.join(TIMEOUT)
        assert client.gettimeout() == 0.0  # non-blocking: "not now" comes back at once, as the loop expects


def test_a_tls_connection_that_breaks_inside_tls_is_named_as_tls_not_as_a_missing_goodbye():
    class Link:
        heard = True
    assert simpletun.explain_tls_ending(ssl.SSLError(1, "bad record mac"), Link()) == "TLS failed: bad record mac"
    eof = ssl.SSLError(1, "unexpected eof while reading")
    eof.reason = "UNEXPECTED_EOF_WHILE_READING"  # (OpenSSL 3's own reason, as some Python builds raise it)
    assert simpletun.explain_tls_ending(eof, Link()).startswith("connection lost: the peer ended the TLS "
                                                                "connection without a goodbye")


@pytest.mark.parametrize("goodbye", ["close_notify", "cut"])
def test_tls_end_without_close_notify_is_a_broken_connection(certs, rig, goodbye):
    server, client = tls_link(certs["a"], certs["a"])
    client.setblocking(True)
    r = rig(pair=(server, client), full=True)
    client.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    if goodbye == "close_notify":
        client.settimeout(0.5)
        with contextlib.suppress(OSError):
            client.unwrap()  # sends close_notify; the relay under test does not answer it
    else:  # a FIN with no close_notify before it, as the kernel sends for a killed peer
        client.shutdown(socket.SHUT_WR)
    r.thread.join(TIMEOUT)  # before close(): unread bytes would make the close a reset
    client.close()
    if goodbye == "cut":
        assert r.made.ended == ("connection lost: the peer ended the TLS connection without a goodbye "
                                "(close_notify): it was killed, or the connection was cut")
    else:
        assert (r.made.ended, r.made.orderly) == ("the peer closed the connection", True)


RECORDING_PROXY = """
import select, socket, sys
# Forward one TCP connection from 127.0.0.1:6000 to the server; write every byte seen to a file.
listen_port, server, record = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with socket.create_server(("127.0.0.1", listen_port)) as l, open(record, "wb") as seen:
    print("ready", flush=True)
    a, _ = l.accept()
    b = socket.create_connection((server, 55555))
    while True:
        for s in select.select([a, b], [], [])[0]:
            data = s.recv(65536)
            if not data:
                sys.exit(0)
            seen.write(data)
            seen.flush()
            (b if s is a else a).sendall(data)
"""


@pytest.mark.netns
@pytest.mark.parametrize("tls", [False, True])
def test_underlay_carries_plaintext_only_without_tls(lab, certs, tls):
    record = lab.tmp / "underlay.bytes"
    tls_args = ["--tls", certs["a"]] if tls else []
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d", *tls_args)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    proxy = lab.spawn("c", [sys.executable, "-c", RECORDING_PROXY, "6000", lab.SERVER_IP, str(record)], "proxy.log")
    wait_for(lambda: "ready" in log_of(proxy), "the recording proxy")
    lab.spawn("c", [sys.executable, "-u", SCRIPT, "-i", "tun0", "-c", "127.0.0.1", "-p", "6000",
                    "--addr", "10.9.0.2/24", "-d"] + tls_args, "client.log")
    lab.echo("s")
    assert tunnel_passes(lab, "c")
    assert lab.probe("c", count=3) == 3
    seen = record.read_bytes()
    assert len(seen) > 300
    # UDP_PROBE's messages start "probe N "; in clear they are there for anyone on the path to read.
    assert (b"probe 1 " in seen) == (not tls)
    if tls:
        assert "(TLSv1.3, pinned certificate)" in log_of(server)


@pytest.mark.netns
def test_tls_server_refuses_wrong_peers_and_keeps_serving(lab, certs):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d", "--tls", certs["a"])
    wait_for(lambda: "listening" in log_of(server), "the server to listen")

    started = time.monotonic()
    wrong = lab.tunnel("c", "-i", "tun0", "--tls", certs["b"])
    assert wrong.wait(TIMEOUT) == 1
    assert "certificate" in log_of(wrong)
    wait_for(lambda: "SERVER: refused %s" % lab.CLIENT_IP in log_of(server), "the server to log the refusal")
    assert "certificate" in log_of(server).split("SERVER: refused", 1)[1].splitlines()[0]

    plain = lab.tunnel("c", "-i", "tun0")
    wait_for(lambda: log_of(server).count("SERVER: refused") == 2, "the plaintext client to be refused",
             timeout=simpletun.HANDSHAKE_TIMEOUT + 5)
    plain.wait(TIMEOUT)
    assert "the server closed the connection without sending a packet" in log_of(plain)
    assert "--tls" in log_of(plain)
    assert time.monotonic() - started < 2 * simpletun.HANDSHAKE_TIMEOUT + 5

    assert server.poll() is None
    lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--tls", certs["a"])
    lab.echo("s")
    assert tunnel_passes(lab, "c")


@pytest.mark.netns
def test_tls_client_against_plaintext_server_says_so_on_both_ends(lab, certs):
    # --addr: the server's device has packets queued for whoever becomes the client
    server = lab.tunnel("s", "-i", "tun0", "-d", "--addr", "10.9.0.1/24")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", "tun0", "--tls", certs["a"])
    assert client.wait(simpletun.HANDSHAKE_TIMEOUT + TIMEOUT) == 1
    assert "does it run with --tls" in log_of(client)
    wait_for(lambda: "it began a TLS handshake: it runs with --tls, this end without" in log_of(server),
             "the server to name the cause")
    assert server.poll() is None


@pytest.mark.netns
def test_tls_server_killed_is_a_lost_connection_and_stopped_is_an_orderly_end(lab, certs):
    for how, status, says in (("kill", 1, "CLIENT: connection lost: the peer ended the TLS connection without "
                                          "a goodbye (close_notify)"),
                              ("stop", 0, "CLIENT: the peer closed the connection")):
        server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "--tls", certs["a"], "-d")
        wait_for(lambda: "listening" in log_of(server), "the server to listen")
        client = lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--tls", certs["a"])
        echo = lab.echo("s")
        assert tunnel_passes(lab)
        if how == "kill":
            server.kill()  # SIGKILL: no goodbye of any kind
        else:
            server.send_signal(signal.SIGTERM)
        assert client.wait(TIMEOUT) == status, log_of(client)
        assert says in log_of(client)
        server.wait(TIMEOUT)
        echo.kill()
        echo.wait()


@pytest.mark.netns
def test_certificate_signed_by_the_pinned_one_is_refused_and_the_client_says_so(lab, certs):
    server = lab.tunnel("s", "-i", "tun0", "--tls", certs["a"], "-d")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--tls", certs["signed"], "--tls-peer", certs["a"])
    assert client.wait(TIMEOUT * 2) == 1
    assert "the peer refused this end" in log_of(client)
    assert "its certificate is not the pinned one" in log_of(server)


# ---------------------------------------------------------------------------------------
# 3. Who gets a place on the server: Clock, WaitingRoom, first_frame_verdict()
# ---------------------------------------------------------------------------------------

class Timer:
    """A Clock's timer, as a test wants it: due at `when`, counting its ticks."""

    def __init__(self, when=None):
        self.when, self.ticks = when, 0

    def due(self):
        return self.when

    def tick(self):
        self.ticks += 1
        self.when = None


@pytest.mark.parametrize("tls, offload, asked", [(True, False, "TLS handshake"), (True, True, "TLS handshake"),
                                                 (False, True, "--offload greeting"),
                                                 (False, False, "a first packet")])
def test_the_waiting_room_names_the_proof_it_waits_for_in_each_mode(tls, offload, asked):
    room = types.SimpleNamespace(tls=tls, args=types.SimpleNamespace(offload=offload))
    assert simpletun.WaitingRoom.proof_asked(room) == asked


def test_a_clock_waits_no_longer_than_its_timer_and_hands_it_over_as_an_event_the_loop_calls():
    timer = Timer(time.monotonic() + 0.2)
    with simpletun.Clock(timer) as clock:
        started = time.monotonic()
        ready = clock.select()  # nothing else to wait for: the timer's time ends the wait
        assert 0.15 <= time.monotonic() - started < 0.2 + 1
        (key, events), = ready
        assert timer.ticks == 0  # select() only hands it over ...
        key.data(events)  # ... the loop calls it, as any fd's handler
        assert timer.ticks == 1 and clock.select(0) == []  # nothing due: nothing handed over
        a, b = socket.socketpair()
        with a, b:
            clock.register(a, selectors.EVENT_READ, "a's handler")
            b.send(b"x")
            timer.when = time.monotonic() + 60
            assert [key.data for key, _ in clock.select()] == ["a's handler"]  # an fd, no timer yet


@pytest.mark.parametrize("size, says", [(13, "too short for an Ethernet frame"), (14, simpletun.PROVEN)])
def test_a_tap_newcomers_first_frame_may_be_as_short_as_an_ethernet_header(size, says):
    head = frame(ethernet(0x0806, arp(1)))[:HEADER.size + size]
    head = HEADER.pack(size) + head[HEADER.size:]
    assert says in simpletun.first_frame_verdict(head, tap=True, offload=False)


def test_the_start_of_a_packet_too_short_for_its_length_field_is_no_ip_packet():
    for packet in (ECHO_REQUEST, ECHO6_REPLY):
        for size in range(8):  # never an error: whatever a stranger sends is judged
            assert simpletun.looks_like_ip(packet[:size], len(packet)) is (size >= 6), (packet[:1], size)


def test_an_ipv4_header_shorter_than_20_bytes_is_no_ip_packet():
    for ihl in range(16):  # the header's length in 4-byte words: 5 (20 bytes) or more
        packet = bytes([0x40 | ihl]) + ECHO_REQUEST[1:]
        assert simpletun.looks_like_ip(packet, len(packet)) is (ihl >= 5), ihl
        assert (simpletun.first_frame_verdict(frame(packet), tap=False, offload=False) is simpletun.PROVEN) \
            is (ihl >= 5), ihl


@pytest.mark.parametrize("head, tap, offload, verdict", [
    (b"", False, False, simpletun.WAIT),
    (b"\x00", False, False, simpletun.WAIT),
    (frame(ECHO_REQUEST)[:14], False, False, simpletun.WAIT),  # 12 of the 13 bytes that decide
    (frame(ECHO_REQUEST)[:15], False, False, simpletun.PROVEN),  # (13: enough to tell a greeting too)
    (frame(ECHO6_REPLY)[:15], False, False, simpletun.PROVEN),
    (frame(b""), False, False, "its first frame is empty: that is not a packet"),
    (simpletun.GREETING_FRAME, False, False, "it runs with --offload, this end without"),
    (simpletun.GREETING_FRAME[:14], False, True, simpletun.WAIT),
    (simpletun.GREETING_FRAME, False, True, simpletun.PROVEN),
    (frame(ECHO_REQUEST)[:15], False, True, "it runs without --offload (or is the C simpletun)"),
    (frame(ECHO_REQUEST)[:16], True, False, "its first frame is an IP packet, not an Ethernet frame: it runs in "
                                            "tun mode (-u), this end in tap (-a)"),
    (frame(b"\x00" * 40)[:15], False, False, "its first frame (40 bytes) is not an IP packet: noise, or a peer in "
                                            "tap mode (-a) while this end is tun"),
])
def test_a_newcomers_first_bytes_decide_whether_it_is_a_tunnel_end_of_this_kind(head, tap, offload, verdict):
    assert simpletun.first_frame_verdict(head, tap, offload) == verdict


@pytest.mark.parametrize("record", [b"\x16\x03\x01", b"\x16\x03\x02", b"\x16\x03\x03"])  # TLS 1.0, 1.1, 1.2
def test_a_plaintext_server_names_a_tls_handshake_of_every_record_version(record):
    assert simpletun.first_frame_verdict(record + b"\x02\x00\x01", tap=False, offload=False) == \
        "it began a TLS handshake: it runs with --tls, this end without"


@pytest.mark.parametrize("address, plain", [("::ffff:192.0.2.9", "192.0.2.9"), ("fd00::9", "fd00::9"),
                                            ("192.0.2.9", "192.0.2.9")])
def test_an_address_is_named_as_people_write_it(address, plain):
    assert simpletun.plain_address(address) == plain


@contextlib.contextmanager
def room_with_pairs(device, count, *argv):
    """A server's waiting room (the stand-in device, a loopback listener, the options of `-s ARGV`)
    and `count` connected socket pairs, (ours, theirs); everything is closed afterwards."""
    pairs = [socket.socketpair() for _ in range(count)]
    try:
        with socket.create_server(("127.0.0.1", 0)) as listener:
            room = simpletun.WaitingRoom(listener, Tunnel(device[0].fileno(), "tun9"), options("-s", *argv))
            with room:
                yield room, pairs
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def waiting(room, sock, address="192.0.2.9", deadline=None):
    """A newcomer in the room, as accept() lets one in."""
    sock.setblocking(False)
    newcomer = room.newcomers[sock] = simpletun.Newcomer(sock, address, deadline)
    room.register(sock, selectors.EVENT_READ, lambda events: room.advance(newcomer))
    return newcomer


def test_an_ipv4_newcomer_on_the_dual_stack_port_is_named_as_people_write_it(device):
    with simpletun.listen_on(0, "", *simpletun.server_family(None)) as listener:
        room = simpletun.WaitingRoom(listener, Tunnel(device[0].fileno(), "tun9"), options("-s"))
        with room, socket.create_connection(("127.0.0.1", listener.getsockname()[1]), timeout=TIMEOUT):
            assert select.select([listener], [], [], TIMEOUT)[0]
            room.accept(selectors.EVENT_READ)
            assert [newcomer.address for newcomer in room.newcomers.values()] == ["127.0.0.1"]  # not ::ffff:


def test_a_newcomer_sent_away_earlier_in_the_same_wake_up_is_not_read_again(device):
    with room_with_pairs(device, 1) as (room, [(ours, theirs)]):
        newcomer = waiting(room, ours)
        theirs.sendall(b"GET / HTTP/1.1\r\n\r\n")  # its bytes and its deadline in one wake-up
        room.send_away(newcomer, "silent", "its time is up", "cut")
        room.advance(newcomer)  # its readable event, handled after: nothing more happens to it
        assert sum(room.refused.values()) == 1 and ours in room.closing and not room.newcomers


@pytest.mark.parametrize("sent, says", [
    (b"", "it closed the connection without greeting: it runs without --offload"),
    (simpletun.GREETING_FRAME[:5], "it closed the connection after 5 bytes, without proving itself"),
])
def test_an_offload_newcomer_that_closes_is_named_by_what_it_sent_first(device, caplog, sent, says):
    with room_with_pairs(device, 1, "--offload") as (room, [(ours, theirs)]):
        newcomer = waiting(room, ours, deadline=time.monotonic() + TIMEOUT)
        theirs.sendall(sent)
        theirs.shutdown(socket.SHUT_WR)
        room.advance(newcomer)
        assert caplog.messages[-1] == "SERVER: refused 192.0.2.9: " + says
        assert room.refused == {"closed": 1}


def test_an_offload_newcomers_greeting_is_not_part_of_its_first_frame(device):
    with room_with_pairs(device, 1, "--offload") as (room, [(ours, theirs)]):
        newcomer = waiting(room, ours, deadline=time.monotonic() + TIMEOUT)
        theirs.sendall(simpletun.GREETING_FRAME + frame(ECHO_REQUEST, simpletun.OFFLOAD_HEADER))
        room.advance(newcomer)
        link = room.proven
        assert link.header is simpletun.OFFLOAD_HEADER and link.kept == 0  # the greeting went no further
        assert received_by(link) == [ECHO_REQUEST]


def test_a_plaintext_newcomers_first_bytes_go_on_to_the_device_with_the_rest_of_its_frame(device, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    with room_with_pairs(device, 1) as (room, [(ours, theirs)]):
        newcomer = waiting(room, ours)
        theirs.sendall(frame(UDP_PACKET)[:20])  # more than proof_size(): the room reads only what decides
        room.advance(newcomer)
        link = room.proven
        assert bytes(link.view[:link.kept]) == frame(UDP_PACKET)[:15] and link.heard
        theirs.sendall(frame(UDP_PACKET)[20:])
        assert received_by(link) == [UDP_PACKET]
    assert "SERVER: 192.0.2.9 proved itself with the first 15 bytes of its first frame; they go on to the " \
           "device with the rest of that frame" in caplog.messages
    assert "SERVER: Client connected from 192.0.2.9" in caplog.messages


def test_newcomers_and_goodbyes_end_at_their_deadline_to_the_moment(device, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: now[0])
    with room_with_pairs(device, 3) as (room, pairs):
        room.active = types.SimpleNamespace(address="10.0.0.9")  # a client is served: silence has a deadline
        silent = waiting(room, pairs[0][0], "silent")  # deadline: PROOF_TIMEOUT after it came
        greeting = waiting(room, pairs[1][0], "greeting", 1000.0 + simpletun.PROOF_TIMEOUT + 2)
        room.say_goodbye(pairs[2][0], "cut")  # a goodbye: GOODBYE_TIME s for the peer's half
        ends = [(1000.0 + simpletun.GOODBYE_TIME, room.closing, pairs[2][0]),
                (1000.0 + simpletun.PROOF_TIMEOUT, room.newcomers, silent.sock),
                (1000.0 + simpletun.PROOF_TIMEOUT + 2, room.newcomers, greeting.sock)]
        for deadline, waits, sock in sorted(ends, key=lambda end: end[0]):
            assert room.due() == deadline  # the clock wakes the loop then
            now[0] = deadline - 0.01
            room.tick()
            assert sock in waits, deadline
            now[0] = deadline
            room.tick()
            assert sock not in waits, deadline
        assert room.report_at == 1000.0 + simpletun.PROOF_TIMEOUT + simpletun.REPORT_EVERY  # its first refusal's


def test_a_silent_plaintext_newcomer_has_no_deadline_while_no_one_is_served(device):
    with room_with_pairs(device, 1) as (room, pairs):
        waiting(room, pairs[0][0])
        assert room.due() is None
        room.active = types.SimpleNamespace(address="10.0.0.9")
        assert room.due() is not None


def test_two_newcomers_proven_in_one_wake_up_leave_no_connection_behind(device):
    # Regression: the second overwrote the first in the room, whose connection was never closed.
    with room_with_pairs(device, 2) as (room, pairs):
        newcomers = [waiting(room, ours, "peer%d" % i) for i, (ours, _) in enumerate(pairs)]
        for newcomer in newcomers:
            room.admit(newcomer)
        assert room.proven.address == "peer0"  # plaintext: the first keeps it
        theirs = pairs[1][1]
        theirs.settimeout(TIMEOUT)
        assert theirs.recv(10) == b""  # the second heard an orderly close


def test_an_event_for_a_connection_closed_earlier_in_the_same_wake_up_costs_nothing(device):
    # Regression: with 64 connections closing, making room closed the oldest; its event, already
    # in the same select() batch, then closed it a second time: KeyError, and the server died.
    with room_with_pairs(device, simpletun.MAX_CLOSING + 1) as (room, pairs):
        for ours, theirs in pairs[:-1]:
            room.say_goodbye(ours, "orderly")
            theirs.close()  # each closing connection now has an event: its peer's end
        batch = room.select(0)  # the batch of events, before anyone is handled
        assert len(batch) == simpletun.MAX_CLOSING
        room.say_goodbye(pairs[-1][0], "orderly")  # making room closes the oldest
        assert len(room.closing) == simpletun.MAX_CLOSING  # (bounded: the newest in, the oldest out)
        assert pairs[0][0] not in room.closing and pairs[1][0] in room.closing and pairs[-1][0] in room.closing
        for key, events in batch:
            key.data(events)  # the oldest's event comes after its close: nothing may break
        assert len(room.closing) <= simpletun.MAX_CLOSING


def test_a_goodbye_the_peer_never_answers_is_given_up_after_goodbye_time(device):
    with room_with_pairs(device, 1) as (room, pairs):
        ours, theirs = pairs[0]
        room.say_goodbye(ours, "orderly")  # the peer never closes its side
        room.tick()
        assert ours in room.closing
        room.closing[ours] -= simpletun.GOODBYE_TIME + 0.1  # time passes
        room.tick()
        assert ours not in room.closing and ours.fileno() == -1  # forgotten, and closed


def test_refusals_are_summed_up_report_every_s_after_the_first_however_steady_and_only_if_one_was_unnamed(
        device, monkeypatch, caplog):
    now = [1000.0]
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: now[0])
    summaries = lambda: [m for m in caplog.messages if "not named above" in m]  # noqa: E731
    with room_with_pairs(device, 0) as (room, _):
        room.refuse("192.0.2.1", "reset", "it reset the connection at once")
        now[0] += simpletun.REPORT_EVERY / 2
        room.refuse("192.0.2.2", "closed", "it closed the connection")  # another reason: named too
        now[0] += simpletun.REPORT_EVERY / 2
        room.tick()
        assert summaries() == []  # every refusal was named: nothing to sum up
        for _ in range(4):  # a steady trickle, one every 3 s: the summary comes all the same
            room.refuse("192.0.2.3", "reset", "it reset the connection at once")
            now[0] += 3
            room.tick()
        assert summaries() == ["SERVER: refused 4 connection(s) in the last %d s (3 not named above): 4 reset"
                               % simpletun.REPORT_EVERY]


def test_a_reason_is_named_once_whatever_its_numbers(device, caplog):
    with room_with_pairs(device, 0) as (room, _):
        for size in (40, 41, 1500):
            room.refuse("192.0.2.1", "not a tunnel end", "its first frame (%d bytes) is not an IP packet" % size)
        room.refuse("192.0.2.1", "reset", "it reset the connection at once")
    assert caplog.messages == ["SERVER: refused 192.0.2.1: its first frame (40 bytes) is not an IP packet",
                               "SERVER: refused 192.0.2.1: it reset the connection at once"]
    assert room.unsaid == 2 and room.refused == {"not a tunnel end": 3, "reset": 1}


class ServerRig:
    """serve_with_room() in a thread on a loopback port, with a stand-in device; clients are
    plain sockets. Its serve() runs until the tests end: its device stays open as long."""

    def __init__(self, tls=None, argv=()):
        self.device, self.kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.kernel.settimeout(TIMEOUT)
        self.device.setblocking(False)
        self.port = free_port()
        self.tunnel = Tunnel(self.device.fileno(), "tun9", debug=1)
        self.args = options("-s", "-p", str(self.port), "--bind", "127.0.0.1", "-d", *argv)
        self.thread = threading.Thread(target=simpletun.serve_with_room, args=(self.tunnel, self.args, tls),
                                       daemon=True)
        self.thread.start()
        wait_for(lambda: socket.socket().connect_ex(("127.0.0.1", self.port)) == 0, "the server to listen")
        self.clients = []

    def connect(self):
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)
        self.clients.append(sock)
        return sock

    def closed_by_server(self, sock, within=TIMEOUT):
        """True if the server ends this connection (an orderly FIN, read as b"") within `within` s."""
        sock.settimeout(within)
        try:
            while True:
                if not sock.recv(65536):
                    return True
        except socket.timeout:
            return False

    def close(self):
        for sock in self.clients:  # the device stays open: serve() runs on until the tests end
            sock.close()


SERVING_RIGS = []  # every ServerRig made: its serve() thread runs until the tests end, so its stand-in
#                   device must stay open as long (collected, it was closed under the thread: EBADF)


@pytest.fixture
def server_rig(caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    rigs = []
    yield lambda *argv, tls=None: rigs.append(ServerRig(tls, argv)) or rigs[-1]
    for r in rigs:
        r.close()
    SERVING_RIGS.extend(rigs)


@pytest.mark.parametrize("first_bytes, says", [
    (frame(b""), "its first frame is empty"),
    (frame(b"\x00" * 40), "is not an IP packet"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "is not an IP packet"),
    (bytes(random.Random(3).getrandbits(8) for _ in range(3000)), "not an IP packet"),
    (frame(ECHO_REQUEST[:20] + b"\x00" * 10), "is not an IP packet"),  # its length field says 84
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", "it began a TLS handshake"),
    (frame(simpletun.GREETING), "it runs with --offload, this end without"),
], ids=["empty frame", "zeros", "http", "random bytes", "cut-off IPv4", "TLS hello", "offload greeting"])
def test_nonsense_never_takes_the_slot_and_the_real_client_still_gets_in(server_rig, caplog, first_bytes, says):
    r = server_rig()
    junk = r.connect()
    junk.sendall(first_bytes)
    assert r.closed_by_server(junk)
    assert any(says in m for m in caplog.messages if "SERVER: refused" in m), caplog.messages
    client = r.connect()
    client.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET  # the first thing the device ever saw
    assert any("proved itself with the first %d bytes of its first frame" % (2 + 13) in m for m in caplog.messages)


@pytest.mark.parametrize("tap, packet, says", [
    (True, UDP_PACKET, "an IP packet, not an Ethernet frame: it runs in tun mode (-u)"),
    (True, b"\x01\x02", "too short for an Ethernet frame"),
    (False, ethernet(0x0806, arp(1)), "not an IP packet: noise, or a peer in tap mode (-a)"),
])
def test_peer_of_the_other_mode_is_named_by_the_server(server_rig, caplog, tap, packet, says):
    r = server_rig(*["-a"] * tap)
    other = r.connect()
    other.sendall(frame(packet))
    assert r.closed_by_server(other)
    assert any(says in m for m in caplog.messages), caplog.messages


def test_second_plaintext_client_is_turned_away_at_once_and_the_first_keeps_its_place(server_rig, caplog):
    r = server_rig()
    first = r.connect()
    first.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    second = r.connect()
    second.sendall(frame(ECHO_REQUEST))
    assert r.closed_by_server(second, within=2)
    assert "SERVER: turned away 127.0.0.1: it proved itself, but 127.0.0.1 is being served (one client at a " \
           "time)" in caplog.messages
    first.sendall(frame(TCP_DATA))
    assert r.kernel.recv(65536) == TCP_DATA  # ECHO_REQUEST never reached the device


def test_a_server_says_without_d_when_it_listens_and_when_its_client_comes_and_goes(device, caplog):
    caplog.set_level("WARNING", logger="simpletun")
    ours, kernel = device
    port = free_port()
    args = options("-s", "-p", str(port), "--bind", "127.0.0.1")
    thread = threading.Thread(target=simpletun.serve_with_room, args=(Tunnel(ours.fileno(), "tun9"), args),
                              daemon=True)
    thread.start()
    wait_for(lambda: "SERVER: listening on port %d" % port in caplog.messages, "the server to listen")
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as client:
        client.sendall(frame(UDP_PACKET))
        assert kernel.recv(65536) == UDP_PACKET
    wait_for(lambda: len(messages_of(caplog, thread)) == 3, "the client to leave")
    assert messages_of(caplog, thread) == ["SERVER: listening on port %d" % port,
                                           "SERVER: Client connected from 127.0.0.1",
                                           "SERVER: the peer closed the connection"]


def test_a_silent_newcomer_leaves_after_proof_timeout_while_a_client_is_served_and_only_then(server_rig, caplog,
                                                                                            monkeypatch):
    monkeypatch.setattr(simpletun, "PROOF_TIMEOUT", 0.5)
    r = server_rig()
    first = r.connect()
    first.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    for _ in range(2):  # a second one after the first: the same
        silent = r.connect()
        assert r.closed_by_server(silent, within=3)
    refused = [m for m in caplog.messages if "it sent no packet within 0.5 s while 127.0.0.1 is being served" in m]
    assert len(refused) == 1  # (the second: the same reason, counted)
    first.close()
    wait_for(lambda: "SERVER: the peer closed the connection" in caplog.messages, "the server to see it leave")
    quiet = r.connect()
    assert not r.closed_by_server(quiet, within=1)  # no one is served now: no one waits behind it
    quiet.sendall(frame(TCP_DATA))
    assert r.kernel.recv(65536) == TCP_DATA


def test_idle_real_client_is_never_dropped_for_newcomers_that_prove_nothing(server_rig, monkeypatch):
    # Regression: a real client that had sent nothing yet was dropped after 10 s for a silent intruder.
    monkeypatch.setattr(simpletun, "PROOF_TIMEOUT", 0.3)
    r = server_rig()
    real = r.connect()
    intruders = [r.connect() for _ in range(5)]
    for intruder in intruders:
        intruder.sendall(frame(b""))  # nonsense: refused, whatever the real client does
    time.sleep(1)
    real.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET


def test_flood_of_held_open_connections_cannot_keep_the_real_client_out(server_rig, caplog):
    r = server_rig()
    rng = random.Random(5)
    flood = []
    for i in range(200):  # bounded: 200 connections, each silent, closing or noise
        sock = socket.create_connection(("127.0.0.1", r.port), timeout=TIMEOUT)
        if i % 3 == 1:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(50)))
        if i % 3 == 2:
            sock.close()
        else:
            flood.append(sock)
    try:
        started = time.monotonic()
        real = r.connect()
        real.sendall(frame(UDP_PACKET))
        assert r.kernel.recv(65536) == UDP_PACKET
        assert time.monotonic() - started < TIMEOUT
        assert any("the waiting room is full" in m for m in caplog.messages)
    finally:
        for sock in flood:
            sock.close()


def test_a_full_waiting_room_resets_its_longest_waiting_newcomer_not_the_newest(server_rig, monkeypatch):
    # Promise: a flood cannot keep a real client out: the oldest waiting newcomer leaves for a new one.
    monkeypatch.setattr(simpletun, "MAX_NEWCOMERS", 3)
    r = server_rig()
    waits = [r.connect() for _ in range(3)]
    time.sleep(0.2)  # all three in the room, oldest first
    newest = r.connect()
    waits[0].settimeout(TIMEOUT)
    with pytest.raises(ConnectionResetError):
        waits[0].recv(10)  # the longest waiting: reset
    newest.sendall(frame(UDP_PACKET))  # the newest is still there, and proves itself
    assert r.kernel.recv(65536) == UDP_PACKET
    assert all(select.select([s], [], [], 0)[0] == [] for s in waits[1:])


def test_refusals_beyond_the_first_of_a_kind_are_summed_up_with_their_count(server_rig, caplog, monkeypatch):
    # Promise: under a flood, refusals are counted and summed up, not printed one by one.
    monkeypatch.setattr(simpletun, "REPORT_EVERY", 0.5)
    r = server_rig()
    for _ in range(5):
        r.connect().sendall(b"GET / HTTP/1.1\r\n\r\n")
    wait_for(lambda: any("not named above" in m for m in caplog.messages), "the summary")
    summary = next(m for m in caplog.messages if "not named above" in m)
    # (the rig's own probe for the port is one more refusal: "1 closed")
    assert re.search(r"refused 6 connection\(s\) in the last \d+ s \(4 not named above\): 1 closed, 5 not a "
                     r"tunnel end$", summary), summary
    assert len([m for m in caplog.messages if "refused 127.0.0.1: its first frame" in m]) == 1


def test_each_summary_of_refusals_counts_its_own_period_and_comes_while_the_server_is_idle(server_rig, caplog,
                                                                                           monkeypatch):
    # Promise: a flood's refusals are named once per reason (whatever its byte count), then summed up once
    # per REPORT_EVERY s, each summary counting only its own period; and it comes with nothing else going on.
    monkeypatch.setattr(simpletun, "REPORT_EVERY", 1.0)
    r = server_rig()
    said = lambda: messages_of(caplog, r.thread)  # noqa: E731
    for period in range(2):
        for size in (40, 41, 42):  # three reasons alike but for their byte count
            sock = r.connect()
            sock.sendall(frame(b"\x00" * size))
            assert r.closed_by_server(sock)
            sock.close()  # the server's goodbye ends: nothing of the flood is left to wake the server
        wait_for(lambda: len([m for m in said() if "not named above" in m]) > period, "summary %d" % period)
    summaries = [m for m in said() if "not named above" in m]
    assert re.search(r"\(2 not named above\): (1 closed, )?3 not a tunnel end$", summaries[0]), summaries
    assert re.search(r"refused 3 connection\(s\) in the last 1 s \(2 not named above\): 3 not a tunnel end$",
                     summaries[1]), summaries
    assert len([m for m in said() if "is not an IP packet" in m]) == 2  # named once in each period


def test_an_offload_servers_newcomer_that_never_greets_is_cut_even_with_no_client_served(server_rig, caplog,
                                                                                          monkeypatch):
    monkeypatch.setattr(simpletun, "HANDSHAKE_TIMEOUT", 0.5)
    r = server_rig("--offload")
    sock = r.connect()
    sock.sendall(b"\x00")  # one byte: neither a greeting nor an end
    assert r.closed_by_server(sock, within=3)
    assert any("no --offload greeting within 0.5 s: it runs without --offload" in m for m in messages_of(caplog, r.thread))


def test_a_server_survives_a_client_that_resets_before_it_is_served(server_rig, caplog):
    # Linux still hands such a connection to accept(), but it has no peer address any more.
    r = server_rig()
    gone = r.connect()
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.close()  # linger 0: a reset
    client = r.connect()
    client.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    assert r.thread.is_alive()


def tls_client(r, certs, name="a"):
    """A TLS client of a ServerRig, as run_client() makes one; returns its TLS socket."""
    sock = socket.create_connection(("127.0.0.1", r.port), timeout=TIMEOUT)
    tls = simpletun.secure_client(sock, simpletun.tls_context(False, certs[name]))
    tls.setblocking(True)
    tls.settimeout(TIMEOUT)
    r.clients.append(tls)
    return tls


def test_tls_handshakes_run_side_by_side_so_silent_connections_cost_nothing(server_rig, certs):
    r = server_rig(tls=simpletun.tls_context(True, certs["a"]))
    silent = [r.connect() for _ in range(20)]
    started = time.monotonic()
    client = tls_client(r, certs)
    client.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    # One after another, the first silent connection alone would cost HANDSHAKE_TIMEOUT.
    assert time.monotonic() - started < simpletun.HANDSHAKE_TIMEOUT / 2
    assert all(select.select([s], [], [], 0)[0] == [] for s in silent)  # still waiting, none closed yet


def test_tls_newest_proven_client_takes_the_slot_and_the_old_one_hears_an_orderly_end(server_rig, certs, caplog):
    r = server_rig(tls=simpletun.tls_context(True, certs["a"]))
    old = tls_client(r, certs)
    old.sendall(frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET
    for packet in (ECHO_REQUEST, TCP_DATA):  # the newest, then newer still
        new = tls_client(r, certs)
        new.sendall(frame(packet))
        assert r.kernel.recv(65536) == packet
        assert old.recv(65536) == b""  # close_notify: an orderly end, not a ragged one (that would raise)
        old = new
    replaced = [m for m in caplog.messages if "the newest authenticated client wins" in m]
    assert replaced == ["SERVER: 127.0.0.1 proved itself with the pinned certificate: it replaces 127.0.0.1 (the "
                        "newest authenticated client wins)"] * 2
    assert caplog.messages.count("SERVER: Client connected from 127.0.0.1 (TLSv1.3, pinned certificate)") == 3



@pytest.mark.netns
def test_server_survives_leaving_killed_and_garbage_clients_then_serves_the_next(lab):
    server, client = start_pair(lab, "tun0")
    lab.echo("s")
    assert tunnel_passes(lab)
    client.send_signal(signal.SIGTERM)
    assert client.wait(TIMEOUT) == 0
    wait_for(lambda: "SERVER: the peer closed the connection" in log_of(server), "the clean close")

    client = lab.tunnel("c", "-i", "tun0")
    lab.configure("c", "tun0")
    assert tunnel_passes(lab)
    client.kill()
    client.wait(TIMEOUT)

    garbage = """
import os, socket, sys
for payload in (b"", b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n", os.urandom(5000), b"\\xff\\xff" + b"z" * 100,
                b"\\x00\\x10" + b"\\x00" * 16 + b"\\x45" * 20, b"\\x00\\x00" * 10):
    with socket.create_connection((sys.argv[1], 55555), timeout=5) as s:
        s.sendall(payload)
print("sent")
"""
    garbage_proc = lab.spawn("c", [sys.executable, "-c", garbage, lab.SERVER_IP], "garbage.log")
    assert garbage_proc.wait(TIMEOUT * 2) == 0
    wait_for(lambda: all(says in log_of(server) for says in ("it closed the connection after 0 bytes",
                                                             "its first frame is empty", "is not an IP packet")),
             "the server to name each kind of garbage")
    assert server.poll() is None, "the server died:\n" + log_of(server)

    client = lab.tunnel("c", "-i", "tun0")
    lab.configure("c", "tun0")
    assert tunnel_passes(lab)
    assert lab.probe("c", count=10) == 10
    text = log_of(server)
    for says in ("it closed the connection after 0 bytes", "its first frame is empty",
                 "is not an IP packet", "Traceback"):
        assert (says in text) == (says != "Traceback"), says


HOLD_OPEN = """
import socket, sys, time
socks = []
for i in range(int(sys.argv[2])):
    socks.append(socket.create_connection((sys.argv[1], 55555), timeout=5))
print("open", len(socks), flush=True)
time.sleep(float(sys.argv[3]))
"""


DRIP = """
import socket, sys, time
socks = []
for i in range(15):  # bounded: 15 silent connections, one every 2 s
    socks.append(socket.create_connection((sys.argv[1], 55555), timeout=5))
    time.sleep(2)
"""


@pytest.mark.netns
def test_tls_client_is_in_at_once_behind_silent_connections_and_junk_costs_the_tunnel_nothing(lab, certs):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d", "--tls", certs["a"])
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    silent = lab.spawn("c", [sys.executable, "-c", HOLD_OPEN, lab.SERVER_IP, "20", "60"], "silent.log")
    wait_for(lambda: "open 20" in log_of(silent), "20 silent connections")
    lab.spawn("c", [sys.executable, "-c", DRIP, lab.SERVER_IP], "drip.log")  # and one more every 2 s
    started = time.monotonic()
    lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--tls", certs["a"])
    lab.echo("s")
    wait_for(lambda: "Client connected from" in log_of(server), "the real client", timeout=TIMEOUT)
    assert time.monotonic() - started < 2 + 1  # its process's start-up included
    assert tunnel_passes(lab)
    junk = lab.spawn("c", [sys.executable, "-c", HOLD_OPEN, lab.SERVER_IP, "200", "5"], "junk.log")
    assert lab.probe("c", count=30, wait=1) == 30  # while 200 junk connections arrive
    wait_for(lambda: "open 200" in log_of(junk), "200 junk connections")
    assert server.poll() is None


@pytest.mark.netns
def test_plaintext_real_client_is_in_within_15_s_after_a_flood_held_open(lab):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24")
    wait_for(lambda: socket_listening(lab), "the server to listen")
    flood = lab.spawn("c", [sys.executable, "-c", HOLD_OPEN, lab.SERVER_IP, "200", "60"], "flood.log")
    wait_for(lambda: "open 200" in log_of(flood), "200 connections held open", timeout=30)
    started = time.monotonic()
    lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24")
    lab.echo("s")
    wait_for(lambda: lab.probe("c", count=1, wait=0.5) == 1, "the real client to be served", timeout=15)
    assert time.monotonic() - started < 15
    assert rss_peak_kib(server) < 32 * 1024


@pytest.mark.netns
def test_floods_of_empty_and_one_byte_frames_keep_the_server_under_32_mib(lab):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24")
    wait_for(lambda: socket_listening(lab), "the server to listen")
    flood = """
import socket, sys
with socket.create_connection((sys.argv[1], 55555), timeout=5) as s:
    s.sendall(bytes.fromhex("0054450000540001000040010000c0000202c0000201") + bytes(62))  # proof: an IPv4 packet
    for tiny in (b"\\x00\\x00", b"\\x00\\x01\\x45"):
        for _ in range(10):
            s.sendall(tiny * 100000)
print("sent", flush=True)
"""
    sender = lab.spawn("c", [sys.executable, "-c", flood, lab.SERVER_IP], "flood.log")
    assert sender.wait(60) == 0
    wait_for(lambda: "sent" in log_of(sender), "the flood")
    assert server.poll() is None
    assert rss_peak_kib(server) < 32 * 1024


ATTACK = """
import socket, struct, sys, time
host, started = sys.argv[1], time.monotonic()
held = []
for i in range(1000):  # connections in a row, the newest 200 held open
    held.append(socket.create_connection((host, 55555), timeout=5))
    if len(held) > 200:
        held.pop(0).close()
for sock in held:
    sock.close()
for i in range(3000):  # connect, then reset at once: the server meets the reset while accepting
    sock = socket.create_connection((host, 55555), timeout=5)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
print("attacked for %.1f s" % (time.monotonic() - started), flush=True)
"""


@pytest.mark.netns
@pytest.mark.parametrize("mode", [[], ["--tls"], ["--offload"]])
def test_an_attack_of_idle_connections_and_resets_neither_ends_the_server_nor_drops_its_client(lab, certs, mode):
    flags = ["--tls", certs["a"]] if mode == ["--tls"] else mode
    server, client = start_pair(lab, "tun0", *flags)
    lab.echo("s")
    assert tunnel_passes(lab)
    attacker = lab.spawn("c", [sys.executable, "-c", ATTACK, lab.SERVER_IP], "attacker.log")
    assert attacker.wait(120) == 0, log_of(attacker)
    assert server.poll() is None, "the server died:\n" + log_of(server)
    assert client.poll() is None, "the client was dropped:\n" + log_of(client)
    assert lab.probe("c", count=10) == 10  # the served client still crosses
    text = log_of(server)
    assert "unexpected error" not in text and "connection lost" not in text
    assert "refused" in text and rss_peak_kib(server) < 32 * 1024
    # a flood is summed up, not told connection by connection
    assert text.count("SERVER: refused 192.0.2.2:") < 100


CYCLES = """
import socket, sys
host, first, count = sys.argv[1], bytes.fromhex(sys.argv[2]), int(sys.argv[3])
for i in range(count):  # a peer that is admitted and leaves: its first frame, then an orderly end
    sock = socket.create_connection((host, 55555), timeout=5)
    sock.sendall(first)
    sock.shutdown(socket.SHUT_WR)
    while sock.recv(65536):  # the server's greeting (--offload), then its end of the connection
        pass
    sock.close()
print("cycles", count, flush=True)
"""


@pytest.mark.netns
@pytest.mark.parametrize("mode", [[], ["--offload"]])
def test_memory_stays_bounded_after_2000_peers_admitted_and_gone(lab, mode):
    server = lab.tunnel("s", "-i", "tun0", "-d", *mode)
    lab.configure("s", "tun0")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    udp = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes([10, 9, 0, 2]), bytes(4)) + bytes(8)
    first = simpletun.GREETING_FRAME if mode else frame(udp)
    peers = lab.spawn("c", [sys.executable, "-c", CYCLES, lab.SERVER_IP, first.hex(), "2000"], "peers.log")
    assert peers.wait(300) == 0, log_of(peers)
    text = log_of(server)
    assert server.poll() is None, text
    assert text.count("the peer closed the connection") == 2000  # each one was served, then left
    assert rss_peak_kib(server) < 32 * 1024


# ---------------------------------------------------------------------------------------
# 4. Setting up the device (--addr, --mtu): configure_device(), ip_command()
# ---------------------------------------------------------------------------------------

def test_an_address_is_given_to_the_device_at_once_for_ipv6_only(monkeypatch, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    calls = []
    monkeypatch.setattr(simpletun, "ip_command", lambda *args: calls.append(args) or "")
    simpletun.configure_device("tun9", ipaddress.ip_interface("10.0.0.1/24"))
    simpletun.configure_device("tun9", ipaddress.ip_interface("fd00::1/64"), 1400)
    simpletun.configure_device("tun9", mtu=1300)
    assert calls == [("addr", "replace", "10.0.0.1/24", "dev", "tun9"), ("link", "set", "tun9", "up"),
                     ("addr", "replace", "fd00::1/64", "dev", "tun9", "nodad"),  # no wait for DAD
                     ("link", "set", "tun9", "mtu", "1400", "up"),
                     ("link", "set", "tun9", "mtu", "1300")]  # an MTU alone: the device stays as it was
    said = [m for m in caplog.messages if m.startswith("Configured")]  # (not a server a test before left running)
    assert said == ["Configured tun9: address 10.0.0.1/24, up", "Configured tun9: MTU 1400, address fd00::1/64, up",
                    "Configured tun9: MTU 1300"]


@pytest.mark.parametrize("cidr, family, to", [
    ("10.0.0.2/24", socket.AF_INET, ("10.0.0.255", 9)),  # its network's broadcast, the discard port
    ("fd00::2/64", socket.AF_INET6, ("ff02::1", 9, 0, 7)),  # all nodes on the device's link
])
def test_a_client_announces_its_address_in_one_datagram_to_its_network(monkeypatch, cidr, family, to):
    sent = []

    class Socket:
        def __init__(self, family, kind):
            sent.append((family, kind))

        def __enter__(self):
            return self

        def __exit__(self, *_):
            pass

        def setsockopt(self, *option):
            sent.append(option)

        def bind(self, address):
            sent.append(("bound", address))

        def sendto(self, data, address):
            sent.append((data, address))
    monkeypatch.setattr(simpletun.socket, "socket", Socket)
    monkeypatch.setattr(simpletun.socket, "if_nametoindex", lambda name: {"tun9": 7}[name])
    simpletun.announce(ipaddress.ip_interface(cidr), "tun9")
    address = cidr.split("/")[0]
    assert sent == [(family, socket.SOCK_DGRAM), (socket.SOL_SOCKET, socket.SO_BROADCAST, 1),
                    ("bound", (address, 0)), (b"simpletun.py: %s is here" % address.encode(), to)]


def test_ip_failing_is_a_user_error_in_ips_own_words(monkeypatch, tmp_path):
    with pytest.raises(simpletun.UserError, match=r'^ip link show no-such-device-here: Device "no-such-device-here" '
                                                  r'does not exist.$'):
        simpletun.ip_command("link", "show", "no-such-device-here")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(simpletun.UserError, match=r"^this needs the ip command from iproute2 \(apt install "
                                                  r"iproute2\)$"):
        simpletun.ip_command("link")


# ---------------------------------------------------------------------------------------
# 5. What a line says (-dd, -ddd) and the demo's events: Lines, describe()
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("packet, tap, says", [
    (ECHO_REQUEST, False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP echo-request id=7 seq=1 (84 bytes)"),
    (ipv4(1, struct.pack("!BBHHH", 0, 0, 0, 7, 1)), False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP echo-reply id=7 seq=1 "
                                                           "(28 bytes)"),
    (ipv4(1, struct.pack("!BBHI", 3, 1, 0, 0)), False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP destination-unreachable "
                                                       "(28 bytes)"),
    (ipv4(1, struct.pack("!BBHI", 42, 7, 0, 0)), False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP type 42 code 7 (28 bytes)"),
    (TCP_SYN_ACK, False, "IPv4 10.0.0.2 > 10.0.0.1 TCP 5201 > 40000 [SYN,ACK] len=0 (40 bytes)"),
    (TCP_DATA, False, "IPv4 10.0.0.2 > 10.0.0.1 TCP 40000 > 5201 [ACK,PSH] len=100 (140 bytes)"),
    (ipv4(6, struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 5 << 4, 0x25, 0, 0, 0)), False,
     "IPv4 10.0.0.2 > 10.0.0.1 TCP 1 > 2 [FIN,RST,URG] len=0 (40 bytes)"),  # each flag named, in its order
    (ipv4(6, struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 5 << 4, 0, 0, 0, 0)), False,
     "IPv4 10.0.0.2 > 10.0.0.1 TCP 1 > 2 [none] len=0 (40 bytes)"),
    (UDP_PACKET, False, "IPv4 10.0.0.2 > 10.0.0.1 UDP 40000 > 7777 len=5 (33 bytes)"),
    (NEIGHBOR_SOLICITATION, False, "IPv6 fe80::1 > ff02::1:ff00:2 ICMPv6 neighbor-solicitation fe80::2 (64 bytes)"),
    (NEIGHBOR_ADVERTISEMENT, False, "IPv6 fe80::2 > fe80::1 ICMPv6 neighbor-advertisement fe80::2 (64 bytes)"),
    (ROUTER_SOLICITATION, False, "IPv6 fe80::1 > ff02::2 ICMPv6 router-solicitation (48 bytes)"),
    (ECHO6_REPLY, False, "IPv6 fd00::1 > fd00::2 ICMPv6 echo-reply id=9 seq=4 (48 bytes)"),
    (MLD_REPORT, False, "IPv6 :: > ff02::16 ICMPv6 multicast-listener-report (76 bytes)"),
    (UDP6, False, "IPv6 fe80::1 > ff02::fb UDP 5353 > 5353 len=0 (48 bytes)"),
    (ipv4(47, b"gre"), False, "IPv4 10.0.0.2 > 10.0.0.1 protocol 47 (23 bytes)"),
    (ethernet(0x0806, arp(1)), True,
     "ARP who-has 10.0.0.1 tell 10.0.0.2 (Ethernet 6e:00:00:00:00:02 > ff:ff:ff:ff:ff:ff broadcast)"),
    (ethernet(0x0806, arp(2, "10.0.0.1", "10.0.0.2", "6e:00:00:00:00:01"), dst="6e:00:00:00:00:02",
              src="6e:00:00:00:00:01"), True,
     "ARP reply 10.0.0.1 is-at 6e:00:00:00:00:01 (Ethernet 6e:00:00:00:00:01 > 6e:00:00:00:00:02)"),
    (ethernet(0x0806, arp(3)), True, "ARP operation 3 (Ethernet 6e:00:00:00:00:02 > ff:ff:ff:ff:ff:ff broadcast)"),
    (ethernet(0x0800, ECHO_REQUEST, dst="6e:00:00:00:00:01"), True,
     "IPv4 10.0.0.2 > 10.0.0.1 ICMP echo-request id=7 seq=1 (84 bytes) (Ethernet 6e:00:00:00:00:02 > "
     "6e:00:00:00:00:01)"),
    (ethernet(0x86DD, NEIGHBOR_SOLICITATION, dst="33:33:ff:00:00:02"), True,
     "IPv6 fe80::1 > ff02::1:ff00:2 ICMPv6 neighbor-solicitation fe80::2 (64 bytes) (Ethernet 6e:00:00:00:00:02 > "
     "33:33:ff:00:00:02 multicast)"),
    (ethernet(0x88CC, b"lldp"), True, "EtherType 0x88cc (18 bytes) (Ethernet 6e:00:00:00:00:02 > "
                                      "ff:ff:ff:ff:ff:ff broadcast)"),
])
def test_describe_says_what_a_packet_is(packet, tap, says):
    assert simpletun.describe(packet, tap) == says


@pytest.mark.parametrize("packet, tap, says", [
    (b"", False, "not an IP packet (0 bytes)"),
    (b"\x10garbage", False, "not an IP packet (8 bytes)"),
    (ECHO_REQUEST[:12], False, "IPv4 truncated header (12 bytes)"),
    (b"\x4f" + ECHO_REQUEST[1:30], False, "IPv4 truncated header (30 bytes)"),  # IHL says 60
    (b"\x44" + ECHO_REQUEST[1:], False, "IPv4 truncated header (84 bytes)"),  # IHL says 16: no IPv4 header
    (ECHO_REQUEST[:24], False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP truncated (4 bytes) (24 bytes)"),
    (TCP_SYN_ACK[:30], False, "IPv4 10.0.0.2 > 10.0.0.1 TCP truncated header (10 bytes) (30 bytes)"),
    (TCP_SYN_ACK[:39], False, "IPv4 10.0.0.2 > 10.0.0.1 TCP truncated header (19 bytes) (39 bytes)"),  # 1 short
    (UDP_PACKET[:25], False, "IPv4 10.0.0.2 > 10.0.0.1 UDP truncated header (5 bytes) (25 bytes)"),
    (UDP_PACKET[:27], False, "IPv4 10.0.0.2 > 10.0.0.1 UDP truncated header (7 bytes) (27 bytes)"),
    (ECHO_REQUEST[:27], False, "IPv4 10.0.0.2 > 10.0.0.1 ICMP truncated (7 bytes) (27 bytes)"),
    (ROUTER_SOLICITATION[:39], False, "IPv6 truncated header (39 bytes)"),
    (ethernet(0x0806, arp(1))[:20], True, "ARP truncated (6 bytes) (Ethernet 6e:00:00:00:00:02 > ff:ff:ff:ff:ff:ff "
                                          "broadcast)"),
    (b"\xff" * 13, True, "Ethernet truncated header (13 bytes)"),
])
def test_describe_is_honest_about_cut_off_and_garbage_packets(packet, tap, says):
    assert simpletun.describe(packet, tap) == says


@pytest.mark.parametrize("flags_and_offset, says", [
    (0x2000, "UDP 40000 > 7777"),  # more fragments follow, offset 0: the first fragment has the header
    (0x2000 | 185, "fragment (33 bytes)"),  # offset 185 * 8 bytes: a later fragment, no transport header
    (0x4000, "UDP 40000 > 7777"),  # don't fragment
])
def test_a_first_ipv4_fragment_is_described_by_its_transport_header(flags_and_offset, says):
    packet = bytearray(UDP_PACKET)
    struct.pack_into("!H", packet, 6, flags_and_offset)
    described = simpletun.describe(bytes(packet), tap=False)
    assert says in described and (says.startswith("fragment")) == ("fragment" in described)


def extension(next_header, size=8):
    """An IPv6 extension header (hop-by-hop, routing, destination options) of `size` bytes."""
    return bytes([next_header, size // 8 - 1]) + bytes(size - 2)


def fragment_header(next_header, offset=0):
    return struct.pack("!BBHI", next_header, 0, offset << 3, 7)


@pytest.mark.parametrize("packet, says", [
    (ipv6(0, extension(17) + UDP6[40:]), "IPv6 fe80::1 > ff02::2 UDP 5353 > 5353 len=0"),  # hop-by-hop
    (ipv6(60, extension(43, 16) + extension(58) + icmpv6(136, "fd00::1")),  # destination options, routing
     "IPv6 fe80::1 > ff02::2 ICMPv6 neighbor-advertisement fd00::1"),
    (ipv6(44, fragment_header(17) + UDP6[40:]), "IPv6 fe80::1 > ff02::2 UDP 5353 > 5353"),  # the first fragment
    (ipv6(44, fragment_header(17, 185) + b"rest of a UDP datagram"), "IPv6 fe80::1 > ff02::2 fragment (70 bytes)"),
    (ipv6(60, extension(60) * 9 + UDP6[40:]), "IPv6 fe80::1 > ff02::2 extension headers not read to their end"),
    (ipv6(60, b"\x11"), "IPv6 fe80::1 > ff02::2 extension headers not read to their end"),  # cut short
])
def test_describe_walks_ipv6_extension_headers_to_the_transport_as_far_as_it_reads(packet, says):
    assert simpletun.describe(packet, tap=False).startswith(says)


def test_a_tcp_segment_with_options_says_its_data_length_not_its_options():
    options_ = b"\x02\x04\x05\xb4" + b"\x01" * 8  # MSS, then no-ops: a 32-byte header
    segment = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 2, 8 << 4, 0x18, 65535, 0, 0) + options_ + b"hello"
    assert "TCP 40000 > 5201 [ACK,PSH] len=5" in simpletun.describe(ipv4(6, segment), tap=False)


def test_an_ipv4_packets_padding_beyond_its_total_length_is_not_its_payload():
    padded = UDP_PACKET + bytes(4)  # e.g. an Ethernet frame's minimum size, padded
    assert simpletun.describe(padded, tap=False) == "IPv4 10.0.0.2 > 10.0.0.1 UDP 40000 > 7777 len=5 (37 bytes)"


def test_describe_never_raises_on_random_bytes():
    rng = random.Random(4)
    seeds = [ECHO_REQUEST, TCP_DATA, MLD_REPORT, ethernet(0x0806, arp(1)), ethernet(0x86DD, UDP6)]
    for case in range(5000):
        if case % 2:  # a real packet cut short and with a few bytes changed
            packet = bytearray(rng.choice(seeds)[:rng.randrange(80)])
            for _ in range(rng.randrange(4)):
                if packet:
                    packet[rng.randrange(len(packet))] = rng.randrange(256)
        else:
            packet = bytes(rng.randrange(256) for _ in range(rng.randrange(100)))
        for tap, offload in ((False, False), (True, False), (False, True)):
            assert isinstance(simpletun.describe(bytes(packet), tap, offload), str)
            assert len(simpletun.journey_step(bytes(packet), tap, offload)) == 2


@pytest.mark.parametrize("packet, tap, step", [
    (ECHO_REQUEST, False, ("ICMP echo-request", 1)),
    (ipv4(1, struct.pack("!BBHHH", 0, 0, 0, 7, 9)), False, ("ICMP echo-reply", 9)),
    (ECHO6_REPLY, False, ("ICMPv6 echo-reply", 4)),
    (ethernet(0x0800, ECHO_REQUEST), True, ("ICMP echo-request", 1)),
    (ethernet(0x0806, arp(1)), True, ("ARP who-has 10.0.0.1", None)),
    (ethernet(0x0806, arp(2, "10.0.0.1", "10.0.0.2")), True, ("ARP reply 10.0.0.1", None)),
    (UDP_PACKET, False, (None, None)), (ROUTER_SOLICITATION, False, (None, None)),
    (ipv4(1, struct.pack("!BBHI", 3, 1, 0, 0)), False, (None, None)),
])
def test_journey_step_says_what_a_packet_is_on_a_pings_way_and_nothing_of_others(packet, tap, step):
    assert simpletun.journey_step(packet, tap) == step


def emitted(argv, msg, *args, level=logging.DEBUG, func=None, **extra):
    """What Lines prints for one log record of the run `argv`, as lines."""
    out = io.StringIO()
    record = logging.LogRecord("simpletun", level, __file__, 0, msg, args, None, func=func)
    record.__dict__.update(extra)
    simpletun.Lines(options(*argv), out).emit(record)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("argv, says", [
    ([], "(86 with its 2-byte length)"),
    (["--offload"], "(88 with its 4-byte length)"),
    (["--udp"], "(one datagram: no length in front, a datagram keeps its own)"),
    (["--udp", "--key", "class.key"],
     "(one datagram: no length in front, a datagram keeps its own, with its 8-byte number and 16-byte tag)"),
], ids=["tcp", "offload", "udp", "udp-key"])
def test_debug_twice_says_what_a_packet_becomes_on_the_wire_in_each_mode(argv, says):
    lines = emitted(["-s", "-dd"] + argv, "TAP2NET %d: Written %d bytes to the network", 1, 84, func="tap2net")
    assert lines == ["TAP2NET 1: Written 84 bytes to the network %s" % says]
    assert emitted(["-s", "-d"] + argv, "TAP2NET %d: Written %d bytes to the network", 1, 84,
                   func="tap2net") == ["TAP2NET 1: Written 84 bytes to the network"]  # -d: the original's line


def test_debug_twice_adds_what_each_packet_is(rig):
    r = rig(debug=2, full=True)
    r.kernel.send(ECHO_REQUEST)
    r.frames_from_peer(1)
    r.peer.sendall(frame(UDP_PACKET))
    r.kernel.recv(65536)
    r.finish()
    assert r.lines()[:7] == [
        "TAP2NET 1: Read 84 bytes from the tap interface (the original's words for any device: "
        "here tun9, a tun device)",
        "TAP2NET 1: IPv4 10.0.0.2 > 10.0.0.1 ICMP echo-request id=7 seq=1 (84 bytes)",
        "TAP2NET 1: Written 84 bytes to the network (86 with its 2-byte length)",
        "NET2TAP: a receive brought 35 bytes from TCP: 1 whole frame(s); nothing left over",
        "NET2TAP 1: Read 33 bytes from the network",
        "NET2TAP 1: IPv4 10.0.0.2 > 10.0.0.1 UDP 40000 > 7777 len=5 (33 bytes)",
        "NET2TAP 1: Written 33 bytes to the tap interface",
    ]


def test_the_originals_words_for_a_tun_device_are_explained_once(rig):
    r = rig(debug=2, full=True)
    for _ in range(2):
        r.kernel.send(ECHO_REQUEST)
        r.frames_from_peer(1)
    read = [line for line in r.lines() if "Read 84 bytes from the tap interface" in line]
    assert len(read) == 2 and ["the original's words" in line for line in read] == [True, False]


@pytest.mark.parametrize("debug", [0, 1])
def test_below_debug_twice_no_packet_is_decoded(rig, monkeypatch, debug):
    def refuse(*args):
        raise AssertionError("describe() called at -d level %d" % debug)
    monkeypatch.setattr(simpletun, "describe", refuse)
    r = rig(debug=debug, full=True)
    r.kernel.send(ECHO_REQUEST)
    r.peer.sendall(frame(UDP_PACKET))
    assert r.frames_from_peer(1) == [ECHO_REQUEST]
    assert r.kernel.recv(65536) == UDP_PACKET
    r.finish()
    assert r.error is None


def test_debug_three_times_shows_the_length_prefix_before_the_packet_on_the_wire(rig):
    r = rig(debug=3, full=True)
    r.kernel.send(ECHO_REQUEST)
    assert r.frames_from_peer(1) == [ECHO_REQUEST]
    r.finish()
    assert "TAP2NET 1: on the wire: [00 54] 45 00 00 54 00 01 00 00 40 01 00 00 0a 00 00 02 0a 00 00 01 08 00 00 00 ..." \
        in r.lines()


@pytest.mark.parametrize("size, more", [(24, False), (25, True)])
def test_debug_three_times_marks_a_packet_cut_short_on_the_wire_line_only_when_it_is(size, more):
    lines = emitted(["-s", "-ddd"], "TAP2NET %d: Read %d bytes from the tap interface", 1, size, func="tap2net",
                    packet=ECHO_REQUEST[:size])
    assert [line for line in lines if "on the wire" in line] == [
        "TAP2NET 1: on the wire: [00 %02x] %s%s" % (size, ECHO_REQUEST[:24].hex(" "), " ..." * more)]


def refusal(code=errno.EIO):
    return ("NET2TAP %d: %s refused a %d-byte packet: %s", 1, "tun9", 84, os.strerror(code))


def test_the_full_program_says_a_refusal_once_a_quiet_time_with_a_hint_and_counts_the_rest(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: now[0])
    out = io.StringIO()
    handler = simpletun.Lines(options("-s"), out)
    for at, code in ((100.0, errno.EIO), (100.5, errno.EIO), (100.9, errno.EINVAL), (101.0, errno.EINVAL),
                     (103.0, errno.EMSGSIZE)):
        now[0] = at
        msg, *args = refusal(code)
        handler.emit(logging.LogRecord("simpletun", logging.WARNING, "", 0, msg, tuple(args), None, func="write"))
    assert out.getvalue().splitlines() == [
        "NET2TAP 1: tun9 refused a 84-byte packet: Input/output error -- is the device down? (ip link set tun9 up)",
        "NET2TAP 1: tun9 refused a 84-byte packet: Invalid argument -- not a packet the device can carry (garbage, "
        "or the peer uses the other mode: -u/-a) (and 2 more since the last such line)",
        "NET2TAP 1: tun9 refused a 84-byte packet: Message too long"]  # no hint, and nothing unsaid


@pytest.mark.parametrize("argv, level, msg, args, func, extra, event", [
    ([], logging.DEBUG, "TAP2NET %d: Read %d bytes from the tap interface", (3, 61), "tap2net",
     {"packet": ECHO_REQUEST}, {"event": "read", "n": 3, "size": 61, "label": "ICMP echo-request", "seq": 1}),
    ([], logging.DEBUG, "TAP2NET %d: Written %d bytes to the network", (3, 61), "tap2net", {},
     {"event": "sent", "n": 3, "size": 61}),
    ([], logging.DEBUG, "NET2TAP %d: Read %d bytes from the network", (4, 33), "write",
     {"packet": UDP_PACKET}, {"event": "arrived", "n": 4, "size": 33, "label": None, "seq": None}),
    ([], logging.DEBUG, "NET2TAP %d: Written %d bytes to the tap interface", (4, 33), "write", {},
     {"event": "written", "n": 4, "size": 33}),
    (["-c", "h"], logging.INFO, "CLIENT: Connected to server %s", ("h",), "connect_to", {}, {"event": "connected"}),
    ([], logging.WARNING, "SERVER: listening on port %d", (9,), "serve_with_room", {"event": "listening"},
     {"event": "listening"}),
    ([], logging.WARNING, "NET2TAP %d: %s refused a %d-byte packet: %s", (1, "tun9", 5, "Bad"), "write", {},
     {"event": None}),
    ([], logging.WARNING, "SERVER: the peer closed the connection", (), "relay_until_closed", {}, {"event": None}),
])
def test_in_the_demo_each_line_is_an_event_whose_fields_say_what_it_is_never_its_words(argv, level, msg, args,
                                                                                        func, extra, event):
    before = time.monotonic()
    lines = emitted(["-s", "-dd", "--events"] + argv[2:] if argv[:1] == ["-c"] else ["-s", "-dd", "--events"],
                    msg, *args, level=level, func=func, **extra)
    first = json.loads(lines[0])
    assert first["text"] == msg % args or first["text"].startswith(msg % args)
    assert before <= first["t"] <= time.monotonic()
    assert {name: first.get(name) for name in event} == event
    assert all(set(json.loads(line)) == {"t", "text"} for line in lines[1:])  # -dd's lines: text only


def test_an_events_sent_and_written_lines_carry_their_packets_journey_step():
    out = io.StringIO()
    handler = simpletun.Lines(options("-s", "-dd", "--events"), out)

    def emit(msg, args, func, **extra):
        record = logging.LogRecord("simpletun", logging.DEBUG, "", 0, msg, args, None, func=func)
        record.__dict__.update(extra)
        handler.emit(record)
    emit("TAP2NET %d: Read %d bytes from the tap interface", (1, 84), "tap2net", packet=ECHO_REQUEST)
    emit("TAP2NET %d: Written %d bytes to the network", (1, 84), "tap2net")
    events = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [(e.get("event"), e.get("label"), e.get("seq")) for e in events if "event" in e] == [
        ("read", "ICMP echo-request", 1), ("sent", "ICMP echo-request", 1)]


def test_a_device_write_is_stamped_when_its_packet_arrived_so_the_timeline_keeps_causal_order():
    # Promise: in the demo's timeline a packet's reply (printed by the other end) never comes before
    # the line that wrote its request: the write line carries the time the packet came from TCP.
    out = io.StringIO()
    lines = simpletun.Lines(options("-s", "-d", "--events"), out)

    def record(msg, *args):
        return logging.LogRecord("simpletun", logging.DEBUG, "", 0, msg, args, None, func="write")
    arrived = record("NET2TAP %d: Read %d bytes from the network", 1, 84)
    arrived.packet = ECHO_REQUEST
    lines.emit(arrived)
    time.sleep(0.05)
    lines.emit(record("NET2TAP %d: Written %d bytes to the tap interface", 1, 84))
    read, written = [json.loads(line)["t"] for line in out.getvalue().splitlines()]
    assert written == read



def link_info(lab, side, device):
    """What `ip -j addr show` reports for a device: a dict with mtu, flags and addr_info."""
    out = lab.ip("-n", lab.ns[side], "-j", "addr", "show", "dev", device).stdout
    return json.loads(out)[0]


@pytest.mark.netns
@pytest.mark.parametrize("mode", [[], ["-a"]])
def test_addr_and_mtu_configure_the_device_as_ip_reports_it(lab, mode):
    server = lab.tunnel("s", "-i", "st0", "--addr", "10.7.1.1/20", "--mtu", "1400", "-d", *mode)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    info = link_info(lab, "s", "st0")
    assert info["mtu"] == 1400
    assert "UP" in info["flags"]
    assert [(a["local"], a["prefixlen"]) for a in info["addr_info"] if a["family"] == "inet"] == [("10.7.1.1", 20)]
    assert "Configured st0: MTU 1400, address 10.7.1.1/20, up" in log_of(server)


@pytest.mark.netns
def test_without_addr_a_configured_device_keeps_its_configuration(lab):
    ns = lab.ns["s"]
    lab.ip("-n", ns, "tuntap", "add", "dev", "tun4", "mode", "tun")
    lab.ip("-n", ns, "addr", "add", "10.8.0.1/16", "dev", "tun4")
    lab.ip("-n", ns, "link", "set", "tun4", "mtu", "1300")
    before = link_info(lab, "s", "tun4")
    server = lab.tunnel("s", "-i", "tun4", "-d")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    after = link_info(lab, "s", "tun4")
    assert (after["mtu"], after["flags"], after["addr_info"]) == (before["mtu"], before["flags"], before["addr_info"])
    assert "UP" not in after["flags"]


@pytest.mark.netns
def test_addr_lets_two_ends_talk_without_ip_commands(lab):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "-d")
    lab.echo("s")
    assert tunnel_passes(lab, "c")


UDP6_ECHO_ROUND_TRIP = """
import socket, sys
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
    s.settimeout(1)
    for _ in range(10):
        s.sendto(b"over IPv6", (sys.argv[1], 7777))
        try:
            print(s.recvfrom(100)[0].decode())
            break
        except socket.timeout:
            pass
"""


@pytest.mark.netns
@pytest.mark.parametrize("device, mode", [("tun0", []), ("tap0", ["-a"])])
@pytest.mark.parametrize("transport", [[], ["--udp"]])
def test_addr_takes_ipv6_and_the_tunnel_carries_it(lab, device, mode, transport):
    server = lab.tunnel("s", "-i", device, "--addr", "fd00::1/64", "-d", *mode, *transport)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    shown = [line for line in lab.ip("-n", lab.ns["s"], "addr", "show", "dev", device).stdout.splitlines()
             if "inet6 fd00::1/64" in line]
    assert shown and "tentative" not in shown[0]  # usable at once: no duplicate address detection first
    lab.tunnel("c", "-i", device, "--addr", "fd00::2/64", *mode, *transport)
    echo = "import socket; s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.bind(('fd00::1', 7777))\n" \
           "while True: data, peer = s.recvfrom(100); s.sendto(data, peer)"
    wait_for(lambda: "inet6 fd00::2/64" in lab.ip("-n", lab.ns["c"], "addr", "show", device, check=False).stdout,
             "the client's address")
    lab.spawn("s", [sys.executable, "-c", echo], "echo6.log")
    answer = subprocess.run(["ip", "netns", "exec", lab.ns["c"], sys.executable, "-c", UDP6_ECHO_ROUND_TRIP,
                             "fd00::1"], capture_output=True, text=True, timeout=20)
    assert answer.stdout.strip() == "over IPv6", answer.stderr + log_of(server)
    assert "Configured %s: " % device in log_of(server) and "address fd00::1/64, up" in log_of(server)


@pytest.mark.netns
def test_tap_mtu_goes_up_to_the_kernels_tap_maximum_and_no_further(lab):
    # Regression: --help promised 65535 for tap too; the kernel refused it when the device was set up.
    server = lab.tunnel("s", "-i", "tap3", "-a", "-s", "--mtu", str(simpletun.MAX_TAP_MTU), "-d")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    assert link_info(lab, "s", "tap3")["mtu"] == 65521
    result = run_script("-i", "tap4", "-a", "-s", "--mtu", "65535")
    assert result.returncode == 2
    assert "a tap device takes an MTU of at most 65521" in result.stderr


# ---------------------------------------------------------------------------------------
# 6. Segmentation offload (--offload): set_offload(), the greeting, describe_offloaded()
# ---------------------------------------------------------------------------------------

TCP_SUPER_PACKET = ipv4(6, struct.pack("!HHIIBBHHH", 40000, 5201, 1, 2, 5 << 4, 0x10, 65535, 0, 0) +
                        b"d" * (45 * 1448))  # 45 segments' payload, exactly: a byte more or less counts
UDP_SUPER_PACKET = ipv4(17, struct.pack("!HHHH", 40000, 7777, 8 + 3 * 1400, 0) + b"u" * (3 * 1400))


@pytest.mark.parametrize("gso_type, size, packet, says", [
    (1, 1448, TCP_SUPER_PACKET, "; TCP segment offload: 45 segments of 1448"),
    (1 | 0x80, 1448, TCP_SUPER_PACKET, "; TCP segment offload: 45 segments of 1448"),  # with ECN: the same cut
    (4, 1448, TCP_SUPER_PACKET, "; TCP segment offload: 45 segments of 1448"),  # (TCPv6's kind)
    (5, 1400, UDP_SUPER_PACKET, "; UDP segment offload: 3 segments of 1400"),  # behind an 8-byte header
    (3, 1400, UDP_SUPER_PACKET, "; UDP fragmentation offload: 3 segments of 1400"),
    (1, 0, TCP_SUPER_PACKET, "TCP 40000 > 5201 [ACK] len=65160 (65200 bytes)"),  # no segment size: no cut
    (0, 0, UDP_PACKET, "UDP 40000 > 7777 len=5 (33 bytes)"),
], ids=["tcp", "tcp-ecn", "tcpv6-kind", "udp", "ufo", "no-size", "no-offload"])
def test_decoder_says_how_the_kernel_will_cut_a_super_packet(gso_type, size, packet, says):
    header = simpletun.VIRTIO_NET_HDR.pack(1, gso_type, 28 if gso_type == 5 else 40, size, 20, 16)
    text = simpletun.describe(header + packet, tap=False, offload=True)
    assert text.endswith(says) and text.startswith("IPv4 10.0.0.2 > 10.0.0.1")
    assert simpletun.describe(header[:9], tap=False, offload=True) == "virtio header truncated (9 bytes)"


def test_a_plain_run_turns_the_devices_offload_off_and_an_offload_run_asks_for_udp_too(monkeypatch):
    calls = []

    def ioctl(fd, request, flags):
        calls.append((request, flags))
        if flags & simpletun.TUN_F_USO4:
            raise OSError(errno.EINVAL, "an older kernel")

    monkeypatch.setattr(simpletun.fcntl, "ioctl", ioctl)
    simpletun.set_offload(5, False)
    simpletun.set_offload(5, True)
    tcp = simpletun.TUN_F_CSUM | simpletun.TUN_F_TSO4 | simpletun.TUN_F_TSO6 | simpletun.TUN_F_TSO_ECN
    assert calls == [(simpletun.TUNSETOFFLOAD, flags)  # off; UDP too, else TCP only
                     for flags in (0, tcp | simpletun.TUN_F_USO4 | simpletun.TUN_F_USO6, tcp)]


@pytest.mark.parametrize("server_sends, says", [
    (simpletun.GREETING_FRAME, None),
    (frame(ECHO_REQUEST), "the server runs without --offload: its first frame is not the greeting"),
    (b"", "the server closed the connection instead of greeting: it runs without --offload (its log says so)"),
])
def test_an_offload_client_greets_and_names_a_server_that_does_not_greet_back(server_sends, says):
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.sendall(server_sends)
        if not server_sends:
            theirs.shutdown(socket.SHUT_WR)
        assert simpletun.greet_server(ours) == says
        assert theirs.recv(100) == simpletun.GREETING_FRAME  # the client greeted first


def test_an_offload_client_names_a_server_silent_past_the_greetings_time(monkeypatch):
    monkeypatch.setattr(simpletun, "GREETING_TIMEOUT", 0.3)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert simpletun.greet_server(ours) == ("no --offload greeting from the server within 0.3 s: it runs "
                                                "without --offload (or is the C simpletun)")



TCP_SINK = """
import hashlib, socket, sys
with socket.create_server((sys.argv[1], 7000)) as l:
    print("listening", flush=True)
    c, _ = l.accept()
    h, n = hashlib.sha256(), 0
    while True:
        d = c.recv(1 << 20)
        if not d:
            break
        h.update(d)
        n += len(d)
    print(n, h.hexdigest(), flush=True)
"""


TCP_SOURCE = """
import hashlib, os, socket, sys
data = os.urandom(int(sys.argv[2]))
with socket.create_connection((sys.argv[1], 7000), timeout=10) as s:
    s.sendall(data)
print(len(data), hashlib.sha256(data).hexdigest(), flush=True)
"""


def tcp_crosses(lab, size=4 << 20, sender="c"):
    """Send `size` random bytes by TCP from one host (the client's) to the other's tunnel address: True
    if every byte arrived intact."""
    receiver = "s" if sender == "c" else "c"
    sink = lab.spawn(receiver, [sys.executable, "-c", TCP_SINK, lab.TUNNEL_IP[receiver]],
                     "sink-%d.log" % len(lab.procs))
    wait_for(lambda: "listening" in log_of(sink), "the TCP sink")
    source = subprocess.run(["ip", "netns", "exec", lab.ns[sender], sys.executable, "-c", TCP_SOURCE,
                             lab.TUNNEL_IP[receiver], str(size)], capture_output=True, text=True, timeout=60)
    sink.wait(TIMEOUT)
    return source.returncode == 0 and source.stdout.split() == log_of(sink).split()[1:]


@pytest.mark.netns
@pytest.mark.parametrize("device, mode", [("tun0", []), ("tap0", ["-a"])])
def test_offload_carries_tcp_in_super_packets(lab, device, mode):
    server = lab.tunnel("s", "-i", device, "--addr", "10.9.0.1/24", "--offload", "-dd", *mode)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", device, "--addr", "10.9.0.2/24", "--offload", *mode)
    lab.echo("s")
    assert tunnel_passes(lab)
    assert tcp_crosses(lab)
    assert re.search(r"NET2TAP \d+: IPv4 10\.9\.0\.2 > 10\.9\.0\.1 TCP \d+ > 7000 .*; TCP segment offload: "
                     r"\d+ segments of \d+", log_of(server))
    client.send_signal(signal.SIGTERM)
    assert client.wait(TIMEOUT) == 0


PLAIN_SILENT_SERVER = """
import socket, time
with socket.create_server(("", 55555)) as l:
    print("listening", flush=True)
    c, _ = l.accept()
    time.sleep(30)
"""


@pytest.mark.netns
@pytest.mark.parametrize("server_flags, client_flags, server_says, client_says", [
    ([], ["--offload"], "it runs with --offload, this end without", "it runs without --offload"),
    (["--offload"], [], "it runs without --offload", "the peer runs with --offload, this end without"),
    (["-a"], ["-a", "--offload"], "it runs with --offload, this end without", "it runs without --offload"),
    (["-a", "--offload"], ["-a"], "it runs without --offload", "the peer runs with --offload, this end without"),
    (None, ["--offload"], None, "no --offload greeting from the server within 4 s"),
])
def test_offload_mismatch_is_named_on_both_ends_within_5_s(lab, server_flags, client_flags, server_says, client_says):
    device = "tap0" if "-a" in client_flags else "tun0"
    if server_flags is None:  # a plain peer that says nothing, as the C original does with nothing to send
        server = lab.spawn("s", [sys.executable, "-c", PLAIN_SILENT_SERVER], "silent-server.log")
    else:
        server = lab.tunnel("s", "-i", device, "--addr", "10.9.0.1/24", "-d", *server_flags)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    started = time.monotonic()
    client = lab.tunnel("c", "-i", device, "--addr", "10.9.0.2/24", *client_flags)
    wait_for(lambda: client_says in log_of(client), "the client to say it", timeout=TIMEOUT + 1)
    assert time.monotonic() - started < 5 + 0.5  # its process's start-up included
    assert client.wait(TIMEOUT) == 1
    if server_says:
        wait_for(lambda: server_says in log_of(server), "the server to say it: " + log_of(server))
        assert server.poll() is None


@pytest.mark.netns
def test_plain_run_resets_the_offload_an_earlier_offload_run_left_on_a_persistent_device(lab):
    for side in "sc":
        lab.ip("-n", lab.ns[side], "tuntap", "add", "dev", "tun0", "mode", "tun")
    ends = [lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "--offload", "-d")]
    wait_for(lambda: "listening" in log_of(ends[0]), "the server to listen")
    ends.append(lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--offload"))
    lab.echo("s")
    assert tunnel_passes(lab)
    for end in ends:
        end.send_signal(signal.SIGTERM)
        end.wait(TIMEOUT)
    server = lab.tunnel("s", "-i", "tun0", "-d")
    wait_for(lambda: log_of(server).count("listening") == 1, "the plain server to listen")
    lab.tunnel("c", "-i", "tun0")
    assert tunnel_passes(lab)
    assert tcp_crosses(lab, 1 << 20)  # unfinished checksums would make TCP die here


# ---------------------------------------------------------------------------------------
# 7. One packet per datagram (--udp, --key): UdpClient, UdpServer, Tags, Strangers
# ---------------------------------------------------------------------------------------

KEY = bytes(range(32))


@contextlib.contextmanager
def udp_ends(device, *argv, key=None):
    """A --udp server's link on loopback (the options of `-s --udp ARGV`), a Tunnel on the stand-in
    device, and a client's plain socket connected to the server: (tunnel, link, kernel, client)."""
    ours, kernel = device
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.connect(server.getsockname())
    client.settimeout(TIMEOUT)
    link = simpletun.UdpServer(server, options("-s", "--udp", *argv), key)
    try:
        yield Tunnel(ours.fileno(), "tun9"), link, kernel, client
    finally:
        link.close()
        client.close()


def udp_client(port, *argv, key=None):
    """A --udp client's link, its socket connected to 127.0.0.1 `port` (the options of `-c ...`)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect(("127.0.0.1", port))
    return simpletun.UdpClient(sock, options("-c", "127.0.0.1", "--udp", *argv), key)


@contextlib.contextmanager
def keyed_ends(device, key=KEY, client_key=KEY):
    """A --udp --key server's link with its stand-in device, and a --key client's link connected to it."""
    with udp_ends(device, key=key) as (tunnel, server, kernel, _):
        client = udp_client(server.sock.getsockname()[1], key=client_key)
        with contextlib.closing(client):
            yield tunnel, server, kernel, client


def until_received(tunnel, link):
    """net2tap() once the next datagram has come to the server's socket (or its served peer's own)."""
    select.select([link.sock] + [link.own] * bool(getattr(link, "own", None)), [], [], TIMEOUT)
    simpletun.net2tap(tunnel, link)


def datagram_to(server):
    """The next datagram to a --udp server's port: on its port's socket or its peer's own (the kernel
    shares datagrams between the two until a peer is served)."""
    ready = select.select([server.sock, server.own], [], [], TIMEOUT)[0]
    return ready[0].recv(65536)


def sealed(link, packet):
    """The datagram a --key link sends for `packet` (and what a listener on the cable could record)."""
    return b"".join(link.tags.seal(packet))


def forged(datagram):
    """A datagram with its tag's last bit flipped (a fixed byte instead was the right one 1 time in 256)."""
    return datagram[:-1] + bytes([datagram[-1] ^ 1])


def test_tags_open_what_the_other_direction_sealed_once_and_never_what_its_own_direction_did():
    client, server = simpletun.Tags(KEY, client=True), simpletun.Tags(KEY, client=False)
    datagram = b"".join(client.seal(UDP_PACKET))
    assert len(datagram) == len(UDP_PACKET) + simpletun.KEY_OVERHEAD
    assert datagram[simpletun.NUMBER.size:-simpletun.TAG_SIZE] == UDP_PACKET  # in clear: not secret
    assert server.open(datagram) == UDP_PACKET
    assert server.open(datagram) is False  # the same number again: a replay
    assert client.open(b"".join(client.seal(UDP_PACKET))) is None  # sent back to its sender: no right tag
    assert server.open(forged(b"".join(client.seal(UDP_PACKET)))) is None
    assert server.open(b"".join(simpletun.Tags(bytes(32), True).seal(UDP_PACKET))) is None  # another key
    assert server.open(bytes(simpletun.KEY_OVERHEAD - 1)) is None


def test_tags_take_a_late_datagram_within_the_window_once_and_refuse_one_older():
    client, server = simpletun.Tags(KEY, client=True), simpletun.Tags(KEY, client=False)
    datagrams = [b"".join(client.seal(UDP_PACKET)) for _ in range(simpletun.REPLAY_WINDOW + 2)]
    assert server.open(datagrams[-1]) == UDP_PACKET  # the newest
    late = len(datagrams) - 1 - (simpletun.REPLAY_WINDOW - 1)
    assert server.open(datagrams[late]) == UDP_PACKET  # 63 behind: still in the window
    assert server.open(datagrams[late]) is False  # but only once
    assert server.open(datagrams[late - 1]) is False  # 64 behind: too old to tell, refused
    assert server.open(datagrams[late + 1]) == UDP_PACKET and server.open(datagrams[late + 1]) is False


def test_tags_take_a_datagram_numbered_hours_ahead_at_once_and_then_none_older():
    client, server = simpletun.Tags(KEY, client=True), simpletun.Tags(KEY, client=False)
    assert server.open(b"".join(client.seal(UDP_PACKET))) == UDP_PACKET
    old = b"".join(client.seal(UDP_PACKET))
    client.number += 3600 * 10 ** 9  # a client restarted an hour later: its clock's numbers
    with returns_within(TIMEOUT, "open()"):
        assert server.open(b"".join(client.seal(UDP_PACKET))) == UDP_PACKET
    assert server.seen == 1 and server.open(old) is False


def test_strangers_are_named_once_each_a_few_at_a_time_and_the_latest_named_are_remembered(caplog, monkeypatch):
    monkeypatch.setattr(simpletun, "MAX_STRANGERS", 3)
    strangers = simpletun.Strangers("SERVER")
    senders = [("192.0.2.%d" % n, 9) for n in range(5)]
    for n, sender in enumerate(senders):  # NAMING_TIME s apart: each is named
        strangers.drop(sender, "noise", now=1000.0 + n * simpletun.NAMING_TIME)
    assert list(strangers.named) == senders[2:]  # the oldest two forgotten
    named = len(caplog.messages)
    strangers.drop(senders[-1], "noise", now=1100.0)  # the newest again: remembered, not named again
    assert len(caplog.messages) == named
    strangers.drop(senders[0], "noise", now=1100.0)  # the first, forgotten: named once more
    assert caplog.messages[-1] == "SERVER: dropping datagrams from 192.0.2.0 port 9: noise (counted, not logged again)"
    for n in range(20):  # a flood of new senders within one NAMING_TIME: a few named, the rest counted
        strangers.drop(("198.51.100.%d" % n, 9), "noise", now=1101.0)
    assert len(caplog.messages) == named + simpletun.NAMES_AT_ONCE
    assert (strangers.dropped, strangers.unnamed) == (27, 20 - simpletun.NAMES_AT_ONCE + 1)
    strangers.summary()
    assert caplog.messages[-1] == "SERVER: dropped 27 datagram(s) from other senders (%d of them from senders not " \
                                  "named: a flood of new ones)" % (21 - simpletun.NAMES_AT_ONCE)


def test_udp_each_packet_travels_as_one_datagram_without_a_length_both_ways(device):
    with udp_ends(device) as (tunnel, link, kernel, client):
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        assert kernel.recv(65536) == UDP_PACKET  # the datagram, written as one packet
        assert link.peer == client.getsockname()  # the server learnt its client
        kernel.send(ECHO_REQUEST)
        simpletun.tap2net(tunnel, link)
        assert client.recv(65536) == ECHO_REQUEST  # nothing in front: a datagram keeps its own length
        for _ in range(3):
            client.send(UDP_PACKET)
        time.sleep(0.1)
        simpletun.net2tap(tunnel, link)  # many datagrams in one wake-up, each its own packet
        assert [kernel.recv(65536) for _ in range(3)] == [UDP_PACKET] * 3


def test_udp_server_drops_strangers_naming_each_once_and_takes_a_new_client_after_its_silence(device, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    with udp_ends(device) as (tunnel, link, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as noise:
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        for _ in range(5):
            stranger.sendto(ECHO_REQUEST, link.sock.getsockname())  # a plausible packet, from elsewhere
            noise.sendto(b"GET / HTTP/1.1\r\n\r\n", link.sock.getsockname())
            noise.sendto(b"", link.sock.getsockname())  # empty: nothing to write, nothing to say
        time.sleep(0.1)
        for _ in range(3):  # (the port's socket, where strangers land, is read PORT_BUDGET at a time)
            simpletun.net2tap(tunnel, link)
        assert kernel.recv(65536) == UDP_PACKET and nothing_on(kernel, 0.1)
        kernel.send(ECHO_REQUEST)
        simpletun.tap2net(tunnel, link)
        assert client.recv(65536) == ECHO_REQUEST  # the client still has the slot
        dropping = [m for m in messages_of(caplog) if "dropping datagrams" in m]
        assert dropping == [
            "SERVER: dropping datagrams from 127.0.0.1 port %d: it sent a packet, but 127.0.0.1 port %d is being "
            "served (counted, not logged again)" % (stranger.getsockname()[1], client.getsockname()[1]),
            "SERVER: dropping datagrams from 127.0.0.1 port %d: its first frame (18 bytes) is not an IP packet: "
            "noise, or a peer in tap mode (-a) while this end is tun (counted, not logged again)"
            % noise.getsockname()[1]]  # one line per stranger, not per datagram
        link.heard_at -= simpletun.SILENCE * 0.75  # quiet, but not for long enough
        stranger.sendto(ECHO_REQUEST, link.sock.getsockname())
        until_received(tunnel, link)
        assert link.peer == client.getsockname() and nothing_on(kernel, 0.1)
        link.heard_at -= simpletun.SILENCE * 0.25  # the client has gone quiet
        stranger.sendto(ECHO_REQUEST, link.sock.getsockname())
        until_received(tunnel, link)
        assert kernel.recv(65536) == ECHO_REQUEST and link.peer == ("127.0.0.1", stranger.getsockname()[1])
        assert messages_of(caplog)[-1] == "SERVER: serving 127.0.0.1 port %d (127.0.0.1 port %d was silent for " \
                                          "3 s)" % (stranger.getsockname()[1], client.getsockname()[1])
        link.close()
        assert messages_of(caplog)[-1] == "SERVER: dropped 11 datagram(s) from other senders (each named above)"


def test_udp_served_peers_datagrams_come_through_a_flood_of_the_port(device):
    with udp_ends(device) as (tunnel, link, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        kernel.recv(65536)
        assert link.own.getpeername() == client.getsockname()  # the served peer has a socket of its own
        for _ in range(500):
            stranger.sendto(ECHO_REQUEST, link.sock.getsockname())  # more than the port's budget, many times
        client.send(UDP_PACKET)
        time.sleep(0.1)
        assert select.select([link.own], [], [], 0)[0]  # the kernel put the client's datagram on its socket
        simpletun.net2tap(tunnel, link)  # one wake-up: the peer's packet, and at most PORT_BUDGET of the port's
        assert kernel.recv(65536) == UDP_PACKET and link.strangers.dropped == simpletun.PORT_BUDGET
        for sock in (link.sock, link.own):  # on only while the peer's socket binds
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            with pytest.raises(OSError):  # no other program may share the port, even asking as we did
                other.bind(link.sock.getsockname())


def test_udp_client_says_once_when_nothing_answers_and_goes_on(caplog, monkeypatch):
    port = free_port()  # nothing listens there: ICMP port unreachable
    link = udp_client(port)
    with link.sock:
        for _ in range(3):
            link.out += frame(UDP_PACKET)
            link.send_queued()  # ICMP port unreachable comes back (to this send, or the next receive)
            select.select([link.sock], [], [], TIMEOUT)
            assert link.receive(lambda packet: None) is None
        said = [m for m in caplog.messages if "nothing answers" in m]
        assert said == ["CLIENT: nothing answers at 127.0.0.1 port %d (ICMP port unreachable): is the server "
                        "running, with --udp? The client goes on, and its packets are lost until it is" % port]
        assert not link.out
        assert link.due() is None  # the silence goes on: said already, otherwise
        link.tick()
        assert not [m for m in caplog.messages if "nothing has come back" in m]


def test_udp_a_server_told_that_nothing_answers_does_not_say_it_as_a_client_would(device, caplog):
    with udp_ends(device) as (tunnel, server, kernel, _):  # (its peer's own socket hears it: the client has gone)
        server.refused()
        assert caplog.messages == []


def test_udp_without_key_sends_the_peer_nothing_but_packets():
    # Regression: an empty "still here" datagram every second killed the VPN lab's relays, which write
    # every datagram to their device (an empty write fails).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(TIMEOUT)
        link = udp_client(server.getsockname()[1])
        with link.sock, simpletun.Clock(link) as clock:
            clock.register(link.sock, selectors.EVENT_READ)
            deadline = time.monotonic() + simpletun.UDP_HEARTBEAT * 1.5
            while time.monotonic() < deadline:
                assert clock.select(0.2) == []  # no timer: nothing to call
            assert nothing_on(server, 0)  # idle: not a byte sent
            link.out += frame(UDP_PACKET)
            link.send_queued()
            assert server.recvfrom(100)[0] == UDP_PACKET  # a packet is sent as it is


def test_udp_key_tags_every_datagram_and_the_key_holder_is_served(device):
    with keyed_ends(device) as (tunnel, server, kernel, client):
        client.out += frame(UDP_PACKET)
        client.send_queued()
        until_received(tunnel, server)
        assert kernel.recv(65536) == UDP_PACKET and server.peer == client.sock.getsockname()
        kernel.send(ECHO_REQUEST)
        simpletun.tap2net(tunnel, server)
        datagram = client.sock.recv(65536)
        assert len(datagram) == len(ECHO_REQUEST) + simpletun.KEY_OVERHEAD  # number, packet, tag
        assert datagram[simpletun.NUMBER.size:-simpletun.TAG_SIZE] == ECHO_REQUEST  # in clear: not secret
        assert client.take(client.peer, memoryview(datagram), time.monotonic()) == ECHO_REQUEST


@pytest.mark.parametrize("who", ["another key", "no key", "a forged tag"])
def test_udp_key_refuses_every_datagram_without_a_valid_tag_and_names_its_sender_once(device, caplog, who):
    with keyed_ends(device) as (tunnel, server, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        client.out += frame(UDP_PACKET)
        client.send_queued()
        until_received(tunnel, server)
        kernel.recv(65536)
        other = simpletun.Tags(bytes(32), client=True)
        for _ in range(5):
            datagram = {"another key": b"".join(other.seal(ECHO_REQUEST)), "no key": ECHO_REQUEST,
                        "a forged tag": forged(sealed(client, ECHO_REQUEST))}[who]
            stranger.sendto(datagram, server.sock.getsockname())
        time.sleep(0.1)
        assert server.receive(lambda packet: None) == 5 and server.strangers.dropped == 5
        assert nothing_on(kernel, 0.1)  # nothing written
        assert server.peer == client.sock.getsockname()  # the client keeps its slot
        assert [m for m in caplog.messages if "dropping datagrams" in m] == [
            "SERVER: dropping datagrams from 127.0.0.1 port %d: no valid --key tag: it runs with another key, or "
            "without --key (or it replays old datagrams) (counted, not logged again)" % stranger.getsockname()[1]]


def test_udp_key_refuses_a_replay_from_another_address_after_a_restart_and_a_reflection(device):
    with keyed_ends(device) as (tunnel, server, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        recorded = [sealed(client, UDP_PACKET) for _ in range(3)]  # recorded on the cable
        client.sock.send(recorded[0])
        until_received(tunnel, server)
        assert kernel.recv(65536) == UDP_PACKET
        attacker.sendto(recorded[0], server.sock.getsockname())  # the same datagram again, from elsewhere
        time.sleep(0.05)
        server.receive(lambda packet: pytest.fail("a replay was taken"))
        assert server.peer == client.sock.getsockname()
        # the client restarts (new numbers, new port); then every recorded datagram is replayed
        restarted = udp_client(server.sock.getsockname()[1], key=KEY)
        with restarted.sock:
            restarted.sock.send(sealed(restarted, ECHO_REQUEST))
            until_received(tunnel, server)
            assert kernel.recv(65536) == ECHO_REQUEST and server.peer == restarted.sock.getsockname()  # at once
            for datagram in recorded:
                attacker.sendto(datagram, server.sock.getsockname())
            kernel.send(UDP_PACKET)  # the server sends to its client: the attacker records and reflects it
            server.tags.number = server.tags.newest + 10  # (a number the window would take: only the direction
            simpletun.tap2net(tunnel, server)           # refuses it)
            attacker.sendto(restarted.sock.recv(65536), server.sock.getsockname())
            time.sleep(0.05)
            server.receive(lambda packet: pytest.fail("a replay or a reflection was taken"))
            assert server.strangers.dropped == 1 + 3 + 1
            assert server.peer == restarted.sock.getsockname() and nothing_on(kernel, 0.1)


def test_udp_key_holder_that_lost_the_slot_to_a_newer_one_is_told_so_not_that_its_key_is_wrong(device, caplog):
    with keyed_ends(device) as (tunnel, server, kernel, first):
        first.sock.send(sealed(first, UDP_PACKET))
        until_received(tunnel, server)
        newer = udp_client(server.sock.getsockname()[1], key=KEY)
        with newer.sock:
            newer.sock.send(sealed(newer, ECHO_REQUEST))
            until_received(tunnel, server)
            assert server.peer == newer.sock.getsockname()  # the newest key holder is served
            assert caplog.messages[-1] == "SERVER: serving 127.0.0.1 port %d (it holds the key; 127.0.0.1 port %d no " \
                                          "longer has the slot)" % (newer.sock.getsockname()[1],
                                                                    first.sock.getsockname()[1])
            first.sock.send(sealed(first, UDP_PACKET))
            until_received(tunnel, server)
            said = [m for m in caplog.messages if "dropping datagrams from 127.0.0.1 port %d"
                    % first.sock.getsockname()[1] in m]
            assert said == ["SERVER: dropping datagrams from 127.0.0.1 port %d: it holds the key, but 127.0.0.1 "
                            "port %d took its slot since: the newest key holder is served (a restarted end is the "
                            "newest) (counted, not logged again)" % (first.sock.getsockname()[1],
                                                                     newer.sock.getsockname()[1])]


def test_udp_key_a_replay_from_a_sender_never_served_is_named_a_replay_not_a_replaced_key_holder(device, caplog):
    with keyed_ends(device) as (tunnel, server, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
        recorded = sealed(client, UDP_PACKET)
        client.sock.send(recorded)
        until_received(tunnel, server)
        attacker.sendto(recorded, server.sock.getsockname())
        time.sleep(0.05)
        server.receive(lambda packet: None)
        said = [m for m in messages_of(caplog) if "port %d" % attacker.getsockname()[1] in m]
        assert len(said) == 1 and "no valid --key tag" in said[0] and "replays" in said[0], said


def test_udp_key_a_paused_client_keeps_its_slot_against_a_strangers_packets(device):
    with keyed_ends(device) as (tunnel, server, kernel, client), \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:
        client.sock.send(sealed(client, UDP_PACKET))
        until_received(tunnel, server)
        kernel.recv(65536)
        server.heard_at -= 10 * simpletun.SILENCE  # the client has been stopped for a long time
        for _ in range(3):
            stranger.sendto(ECHO_REQUEST, server.sock.getsockname())  # plausible, but with no tag
        time.sleep(0.05)
        server.receive(lambda packet: pytest.fail("a stranger's packet was taken"))
        assert server.peer == client.sock.getsockname()
        client.sock.send(sealed(client, ECHO_REQUEST))  # back: served as before
        until_received(tunnel, server)
        assert kernel.recv(65536) == ECHO_REQUEST


def test_udp_key_heartbeat_is_taken_as_still_here_and_never_written_to_the_device(device):
    with keyed_ends(device) as (tunnel, server, kernel, client):
        for packet in (b"", UDP_PACKET):  # a heartbeat, then a packet
            client.sock.send(sealed(client, packet))
        time.sleep(0.05)
        simpletun.net2tap(tunnel, server)
        assert kernel.recv(65536) == UDP_PACKET and nothing_on(kernel, 0.1)
        assert tunnel.net2tap == 1 and server.peer == client.sock.getsockname()


def test_udp_key_ends_say_still_here_every_second_and_the_client_says_when_nothing_comes_back(device, caplog,
                                                                                             monkeypatch):
    monkeypatch.setattr(simpletun, "SILENCE", 0.3)
    with keyed_ends(device, client_key=bytes(32)) as (tunnel, server, kernel, client), \
            simpletun.Clock(client) as clock:
        started = time.monotonic()
        ready = clock.select(0)  # the first beat is due at once: the loop calls it
        assert [key.fileobj for key, _ in ready] == [None]
        for key, events in ready:
            key.data(events)
        beat = datagram_to(server)
        assert len(beat) == simpletun.KEY_OVERHEAD and beat != sealed(client, b"")  # numbered: each one new
        while time.monotonic() - started < simpletun.UDP_HEARTBEAT + 1.5:
            for key, events in clock.select(0.1):  # the loop's wake-ups: the timer sends each beat
                key.data(events)
        beats = 1
        while select.select([server.sock, server.own], [], [], 0)[0]:
            assert len(datagram_to(server)) == simpletun.KEY_OVERHEAD
            beats += 1
        assert beats in (2, 3)  # one a second
        # the server holds another key: nothing it could answer would be taken
        assert [m for m in caplog.messages if "nothing has come back" in m] == [
            "CLIENT: nothing has come back from 127.0.0.1 for 0.3 s: does the server run with --udp, in this mode "
            "(-u), with the same --key? Its log says which (or nothing inside the tunnel answers)"]


def test_udp_key_ends_beat_once_a_heartbeat_has_gone_unsent_and_not_before(device):
    with keyed_ends(device) as (tunnel, server, kernel, client):
        client.sent_at = time.monotonic()
        assert client.due() == client.sent_at + simpletun.UDP_HEARTBEAT  # the loop wakes when the beat is due
        client.tick()  # (called early: nothing to send yet)
        assert not select.select([server.sock, server.own], [], [], 0.2)[0]
        client.sent_at -= simpletun.UDP_HEARTBEAT
        client.tick()
        beat = datagram_to(server)
        assert len(beat) == simpletun.KEY_OVERHEAD and server.tags.open(beat) == b""  # "still here": empty
        assert client.due() >= time.monotonic() + simpletun.UDP_HEARTBEAT - 0.1  # the next: a second on
        client.out += frame(UDP_PACKET)
        client.sent_at -= simpletun.UDP_HEARTBEAT
        client.tick()  # what waits goes, instead of an empty beat
        assert server.tags.open(datagram_to(server)) == UDP_PACKET


def test_udp_without_key_a_client_that_hears_nothing_back_says_so_once_per_silence(caplog, monkeypatch):
    monkeypatch.setattr(simpletun, "SILENCE", 0.2)
    monkeypatch.setattr(simpletun, "BUSY", 0.04)  # (a ping a second after an answer: here 0.05 s)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        link = udp_client(server.getsockname()[1])
        with link.sock:
            assert link.due() is None  # no --key: no beats, no timer
            link.out += frame(UDP_PACKET) + frame(ROUTER_SOLICITATION)
            link.send_queued()
            assert link.due() is None  # nothing waits for an answer to those
            for silence in (1, 2):
                for _ in range(3):
                    link.out += frame(ECHO_REQUEST)  # a ping, a second apart (here 0.05 s)
                    link.send_queued()
                    time.sleep(0.05)
                assert link.due() > time.monotonic() - 0.15  # SILENCE s after the first send
                time.sleep(max(0, link.due() - time.monotonic()))
                link.tick()
                said = [m for m in caplog.messages if "nothing has come back" in m]
                assert len(said) == silence and "in this mode (-u), without --key?" in said[0]
                server.sendto(ECHO_REQUEST, link.sock.getsockname())  # an answer: the silence is over
                select.select([link.sock], [], [], TIMEOUT)
                got = []
                link.receive(lambda packet: got.append(bytes(packet)))
                assert got == [ECHO_REQUEST] and link.asked is None
                time.sleep(0.05)
    assert caplog.messages.count("CLIENT: the first datagram came back from 127.0.0.1: the server serves this end") \
        == 1


@pytest.mark.parametrize("content, mode, says", [
    (bytes(range(32)), 0o644, "others may read it; a secret must be yours alone: chmod 600"),
    (bytes(range(32)), 0o640, "others may read it"),  # its group alone, as README says: owner only
    (bytes(range(32)), 0o602, "others may read it"),
    (b"short", 0o600, "5 bytes is too short a secret; make one of 32 random bytes: head -c 32 /dev/urandom >"),
    (None, 0o600, "No such file or directory"),
])
def test_unusable_key_file_is_one_line_and_exit_1(tmp_path, content, mode, says):
    if os.geteuid() != 0:
        pytest.skip("the device is opened first: root only")
    path = tmp_path / "class.key"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    result = run_script("-i", "tun9", "-c", "127.0.0.1", "--udp", "--key", str(path))
    assert result.returncode == 1
    assert result.stderr.startswith("simpletun.py: error: --key %s: " % path) and says in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("size, error", [(15, "15 bytes is too short a secret"), (16, None)])
def test_a_key_file_needs_16_bytes_or_more(tmp_path, size, error):
    path = tmp_path / "class.key"
    path.write_bytes(bytes(range(size)))
    path.chmod(0o600)
    if error:
        with pytest.raises(simpletun.UserError, match=error):
            simpletun.read_key(str(path))
    else:
        assert len(simpletun.read_key(str(path))) == 32


def gro_socket():
    """A UDP socket on loopback that takes runs of datagrams at once, as the tunnel's does."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setsockopt(simpletun.SOL_UDP, simpletun.UDP_GRO, 1)
    return sock


@pytest.mark.parametrize("key", [None, KEY])
def test_udp_sends_a_run_of_equal_packets_in_one_call_and_each_is_still_one_datagram(key):
    packets = [UDP_PACKET] * 10 + [ECHO_REQUEST, ECHO_REQUEST[:-8]]  # a run, then a run of one size and a smaller
    with gro_socket() as batched, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as plain:
        plain.bind(("127.0.0.1", 0))
        for receiver, whole in ((batched, True), (plain, False)):
            link = udp_client(receiver.getsockname()[1], key=key)
            with link.sock:
                for packet in packets:
                    link.out += frame(packet)
                link.send_queued()
            overhead = simpletun.KEY_OVERHEAD if key else 0
            if whole:  # the kernel kept the first run together: one send of ten
                size, notes, _, _ = receiver.recvmsg(65536, simpletun.GRO_SPACE)
                assert len(size) == 10 * (len(UDP_PACKET) + overhead)
                assert struct.unpack("=i", notes[0][2])[0] == len(UDP_PACKET) + overhead
            else:  # a socket that takes one datagram at a time sees each packet as its own datagram
                got = [receiver.recv(65536) for _ in packets]
                assert [g[simpletun.NUMBER.size:-simpletun.TAG_SIZE] if key else g for g in got] == packets


def test_a_run_of_datagrams_ends_at_a_smaller_packet_so_every_datagram_keeps_its_size():
    # Regression guard: UDP_SEGMENT cuts a send at one size; a run that went on after a shorter packet
    # would cut the packets after it at the wrong places.
    sizes = [200, 200, 120, 200, 200, 60, 60, 300]
    packets = [ipv4(17, bytes([n]) * (size - 20)) for n, size in enumerate(sizes)]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
        receiver.bind(("127.0.0.1", 0))
        link = udp_client(receiver.getsockname()[1])
        with link.sock:
            for packet in packets:
                link.out += frame(packet)
            link.send_queued()
        receiver.settimeout(TIMEOUT)
        assert [receiver.recv(65536) for _ in packets] == packets


def test_a_run_of_datagrams_fits_one_send_with_its_tags_and_a_size_too_big_to_batch_goes_alone():
    packets = frame(ipv4(17, bytes(980))) * 100  # 1000-byte packets
    link = udp_client(9, key=KEY)
    with link.sock:
        run, _ = link.next_run(memoryview(packets), 0)
        assert len(run) == simpletun.SEGMENTS_BYTES // (1000 + simpletun.KEY_OVERHEAD)  # 63 sealed in one send
        link.unbatched = 1000  # a run of 1000-byte datagrams was refused (the path's MTU): one by one
        run, end = link.next_run(memoryview(packets), 0)
        assert len(run) == 1 and end == 1002


def test_udp_a_run_the_path_refuses_to_send_at_once_goes_one_datagram_at_a_time(caplog):
    class Path:  # a socket whose route's MTU is smaller than the run's datagrams: UDP_SEGMENT says EINVAL
        sent = []

        def sendmsg(self, pieces, cut, flags, to):
            if cut:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            self.sent.append(b"".join(pieces))
    link = udp_client(9)
    link.sock.close()
    link.sock = Path()
    packets = [UDP_PACKET] * 5 + [ECHO_REQUEST] * 3
    for packet in packets:
        link.out += frame(packet)
    with returns_within(TIMEOUT, "send_queued()"):
        link.send_queued()
    assert Path.sent == packets and not link.out and link.unsent == 0 and caplog.messages == []
    assert link.unbatched == len(UDP_PACKET)  # from here on, packets this big go one per call


def test_udp_receive_cuts_a_run_the_kernel_handed_over_at_once_into_its_packets(device):
    with udp_ends(device) as (tunnel, link, kernel, client):
        client.sendmsg([UDP_PACKET] * 8, [(simpletun.SOL_UDP, simpletun.UDP_SEGMENT,
                                           struct.pack("=H", len(UDP_PACKET)))])
        until_received(tunnel, link)
        assert [kernel.recv(65536) for _ in range(8)] == [UDP_PACKET] * 8
        assert tunnel.net2tap == 8


def test_udp_big_datagrams_many_at_once_each_reach_the_device_whole(device):
    big = ipv4(17, bytes(range(256)) * 234)  # 59924 bytes: four of them outgrow one receive buffer
    with udp_ends(device) as (tunnel, link, kernel, client):
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        kernel.recv(65536)
        for _ in range(6):
            client.send(big)
        time.sleep(0.1)
        written = []
        for _ in range(6):  # (at least one whole datagram per receive)
            if len(written) == 6:
                break
            until_received(tunnel, link)
            while select.select([kernel], [], [], 0)[0]:
                written.append(kernel.recv(65536))
        assert written == [big] * 6 and not link.malformed


def test_udp_datagram_that_is_no_whole_ip_packet_is_one_line_counted_and_not_written(device, caplog):
    with udp_ends(device) as (tunnel, link, kernel, client):
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        kernel.recv(65536)
        for _ in range(3):
            client.send(ECHO_REQUEST[:40])  # cut short by a peer that read its device into a small buffer
        client.send(UDP_PACKET)
        time.sleep(0.05)
        simpletun.net2tap(tunnel, link)
        assert kernel.recv(65536) == UDP_PACKET and nothing_on(kernel, 0.1)
        assert link.malformed == 3
        assert [m for m in caplog.messages if "no whole IP packet" in m] == [
            "127.0.0.1 port %d sent a datagram that is no whole IP packet (40 bytes; its IP header says otherwise): "
            "not written; such datagrams are counted" % client.getsockname()[1]]
        link.close()
        assert "3 packet(s) were no whole packets" in caplog.messages


def test_udp_key_packets_go_to_the_device_as_they_came_the_key_holder_is_no_lab_relay(device):
    with keyed_ends(device) as (tunnel, server, kernel, client):
        client.sock.send(sealed(client, b"\x00" * 40))  # no IP packet, but from a key holder: the kernel judges
        until_received(tunnel, server)
        assert kernel.recv(65536) == b"\x00" * 40 and not server.malformed


@pytest.mark.parametrize("tap, packet", [(False, ECHO_REQUEST), (False, b""), (True, b"")])  # b"": a heartbeat
def test_udp_server_without_key_names_a_key_holders_datagrams_for_what_they_are(device, caplog, tap, packet):
    with udp_ends(device, *["-a"] * tap) as (tunnel, link, kernel, client):
        client.send(b"".join(simpletun.Tags(KEY, client=True).seal(packet)))
        until_received(tunnel, link)
        assert link.peer is None and nothing_on(kernel, 0.1)
        assert any("it runs with --key, this end without: give both ends the same --key FILE" in m
                   for m in messages_of(caplog))


def test_udp_server_with_no_client_says_so_once_and_never_that_it_wrote_to_the_network(device, caplog):
    caplog.set_level("DEBUG", logger="simpletun")
    with udp_ends(device) as (tunnel, link, kernel, client):
        tunnel.debug = 1
        for _ in range(3):
            kernel.send(ECHO_REQUEST)
            simpletun.tap2net(tunnel, link)
        assert not link.out and caplog.messages.count(
            "SERVER: no client yet: what the device hands over is dropped until one sends") == 1
        assert link.unsent == 0  # dropped as no one's, not tried and counted as lost
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        kernel.send(ECHO_REQUEST)
        simpletun.tap2net(tunnel, link)
        assert client.recv(65536) == ECHO_REQUEST


def test_udp_packet_this_host_will_not_send_is_one_line_counted_and_the_tunnel_goes_on(device, caplog):
    with udp_ends(device) as (tunnel, link, kernel, client):
        client.send(UDP_PACKET)
        until_received(tunnel, link)
        kernel.recv(65536)
        said = lambda: [m for m in caplog.messages if "was not sent" in m]  # noqa: E731
        for _ in range(2):
            kernel.send(b"\x45" + bytes(65534))  # more than a UDP datagram can carry (65507 bytes)
            simpletun.tap2net(tunnel, link)
            assert len(said()) == 1  # at the first, and only then
        kernel.send(ECHO_REQUEST)
        simpletun.tap2net(tunnel, link)
        assert client.recv(65536) == ECHO_REQUEST
        assert [m for m in caplog.messages if "was not sent" in m] == [
            "a datagram to 127.0.0.1 port %d was not sent: Message too long; such packets are lost, and counted"
            % client.getsockname()[1]]
        link.close()
        assert messages_of(caplog)[-1] == "2 packet(s) could not be sent"


def test_udp_socket_buffers_hold_a_burst():
    with open("/proc/sys/net/core/rmem_max") as f:
        ceiling = int(f.read())  # what a socket may ask for without CAP_NET_ADMIN
    link = simpletun.udp_link(options("-c", "127.0.0.1", "-p", "9", "--udp"))
    with link.sock:
        got = link.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2  # the kernel reports double
        assert got >= (simpletun.UDP_BUFFER if os.geteuid() == 0 else min(ceiling, simpletun.UDP_BUFFER))


def test_a_udp_end_says_where_it_listens_or_sends_and_a_port_in_use_is_one_line(caplog):
    caplog.set_level("INFO", logger="simpletun")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(simpletun.UserError, match=r"^cannot use UDP port %d on 127.0.0.1: Address already in "
                                                      r"use$" % port):
            simpletun.udp_link(options("-s", "--udp", "-p", str(port), "--bind", "127.0.0.1"))
        link = simpletun.udp_link(options("-c", "127.0.0.1", "--udp", "-p", str(port)))
        link.close()
    assert caplog.messages == ["CLIENT: Connected to server 127.0.0.1 (UDP: the socket only knows where to send)"]



@pytest.mark.netns
@pytest.mark.parametrize("device, mode", [("tun0", []), ("tap0", ["-a"])])
def test_udp_tunnel_carries_pings_and_transfers_both_ways_and_takes_back_a_restarted_client(lab, device, mode):
    server, client = start_pair(lab, device, "--udp", *mode)
    lab.echo("s"), lab.echo("c")
    assert tunnel_passes(lab, "c") and tunnel_passes(lab, "s")
    assert lab.probe("c", count=10) == 10 and lab.probe("s", count=10) == 10
    assert tcp_crosses(lab, 1 << 20, "c") and tcp_crosses(lab, 1 << 20, "s")
    assert "(one datagram" not in log_of(client)  # -d: the original's lines only
    client.send_signal(signal.SIGTERM)
    assert client.wait(TIMEOUT) == 0
    lab.tunnel("c", "-i", device, "--udp", *mode)  # a new client: a new source port
    lab.configure("c", device)
    assert tunnel_passes(lab, "c")  # once the old client has been silent for UDP_SILENCE s
    assert re.search(r"SERVER: serving 192.0.2.2 port \d+ \(192.0.2.2 port \d+ was silent for [3-9] s\)",
                     log_of(server))


UDP_FLOOD = """
import os, socket, struct, sys, time
host, started = sys.argv[1], time.monotonic()
plausible = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 28, 0, 0, 64, 17, 0, bytes(4), bytes(4)) + bytes(8)
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(50)]  # 50 strangers
for i in range(20000):
    what = (plausible, os.urandom(1400), b"", os.urandom(60000))[i % 4]
    try:
        socks[i % 50].sendto(what, (host, 55555))
    except OSError:  # a full socket buffer
        time.sleep(0.001)
print("flooded for %.1f s" % (time.monotonic() - started), flush=True)
"""


@pytest.mark.netns
@pytest.mark.parametrize("keyed", [False, True])
def test_udp_strangers_flood_is_counted_and_the_client_keeps_crossing(lab, tmp_path, keyed):
    server, client = start_pair(lab, "tun0", "--udp", *(["--key", key_file(tmp_path)] if keyed else []))
    lab.echo("s")
    assert tunnel_passes(lab)
    flood = lab.spawn("c", [sys.executable, "-c", UDP_FLOOD, lab.SERVER_IP], "flood.log")
    deadline = time.monotonic() + 60
    while flood.poll() is None and time.monotonic() < deadline:  # the client stays active: a probe a second
        assert lab.probe("c", count=5) >= 4  # while the flood lasts (the cable is shared)
    assert flood.wait(1) == 0, log_of(flood)
    assert lab.probe("c", count=10) == 10
    assert server.poll() is None and rss_peak_kib(server) < 32 * 1024 and rss_peak_kib(client) < 32 * 1024
    server.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0
    text = log_of(server)
    assert 1 <= text.count("dropping datagrams from") <= 50  # one line per stranger, not per datagram
    assert re.search(r"SERVER: dropped \d+ datagram\(s\) from other senders", text), text[-2000:]
    assert "Traceback" not in text and "unexpected error" not in text


STRANGERS_FLOOD = """
import socket, sys, time
s, end = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:  # as fast as one Python loop goes: 1400-byte datagrams at the server's port
    try:
        s.sendto(bytes(1400), (sys.argv[1], 55555))
    except OSError:
        pass
"""


@pytest.mark.netns
@pytest.mark.parametrize("keyed", [False, True])
def test_udp_tunnel_flooded_by_a_stranger_still_carries_a_tcp_stream(lab, tmp_path, keyed):
    server, client = start_pair(lab, "tun0", "--udp", "--mtu", "1400", *(["--key", key_file(tmp_path)] if keyed
                                                                          else []))
    lab.echo("s")
    assert tunnel_passes(lab)
    port_there = lab.add_host("f", 3)  # a third host, on a cable of its own to the server
    sink = lab.spawn("s", simpletun.calling("bench_sink(5201)"), "sink.log")
    wait_for(lambda: "listening" in log_of(sink), "the sink to listen")
    flood = lab.spawn("f", [sys.executable, "-c", STRANGERS_FLOOD, port_there, "5"], "flood.log")
    time.sleep(0.5)
    stream = subprocess.run(["ip", "netns", "exec", lab.ns["c"]] + simpletun.calling(
        "bench_send(%r, 5201, 3)" % lab.TUNNEL_IP["s"]), capture_output=True, text=True, timeout=20)
    assert flood.poll() is None  # the stream crossed while the flood went on
    assert float(stream.stdout) > 20, stream  # Mbit/s: the flood took its share of the CPU, not the tunnel
    assert flood.wait(TIMEOUT) == 0 and server.poll() is None
    assert "dropping datagrams from 192.0.3.2" in log_of(server)


@pytest.mark.netns
def test_udp_and_tcp_ends_that_do_not_match_say_so_within_5_s(lab):
    server = lab.tunnel("s", "-i", "tun0", "-d")  # TCP
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", "tun0", "--udp")
    lab.configure("c", "tun0")
    assert lab.probe("c", count=1, wait=0.5) == 0  # a packet, sent: the only thing a --udp end sends unasked
    wait_for(lambda: "nothing answers at 192.0.2.1 port 55555 (ICMP port unreachable): is the server running, "
                     "with --udp?" in log_of(client), "the --udp client to say so", timeout=4.5)
    assert client.poll() is None  # it goes on: a server may come
    server.send_signal(signal.SIGTERM)
    server.wait(TIMEOUT)
    client.send_signal(signal.SIGTERM)
    client.wait(TIMEOUT)
    server = lab.tunnel("s", "-i", "tun0", "--udp", "-d")
    wait_for(lambda: "listening on UDP" in log_of(server), "the --udp server to listen")
    client = lab.tunnel("c", "-i", "tun0")  # TCP
    assert client.wait(5) == 1
    assert "cannot connect to 192.0.2.1 port 55555: Connection refused" in log_of(client)


def key_file(tmp_path, name="class.key", content=None):
    """A --key file as the README says to make one: 32 random bytes, readable by its owner only."""
    path = tmp_path / name
    path.write_bytes(content or os.urandom(32))
    path.chmod(0o600)
    return str(path)


@pytest.mark.netns
def test_udp_key_tunnel_crosses_and_a_restarted_client_is_served_within_1_s(lab, tmp_path):
    key = key_file(tmp_path)
    server = lab.tunnel("s", "-i", "tun0", "-d", "--udp", "--key", key, "--addr", "10.9.0.1/24")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    # a packet and its number and tag fit one datagram on a 1500-byte cable: 1500 - 40 - 8 - 24
    assert "Configured tun0: MTU 1428, address 10.9.0.1/24, up" in log_of(server)
    client = lab.tunnel("c", "-i", "tun0", "-d", "--udp", "--key", key)
    lab.configure("c", "tun0")
    lab.echo("s")
    assert tunnel_passes(lab) and lab.probe("c", count=10) == 10
    assert tcp_crosses(lab, 1 << 20, "c")
    client.kill()  # no goodbye: its address and port are simply gone
    client.wait(TIMEOUT)
    client = lab.tunnel("c", "-i", "tun0", "--udp", "--key", key, "-d")
    wait_for(lambda: "CLIENT: Connected" in log_of(client), "the new client to start")
    wait_for(lambda: "(it holds the key; 192.0.2.2 port" in log_of(server), "the server to serve it", timeout=1)
    lab.configure("c", "tun0")
    assert lab.probe("c", count=5) == 5
    assert "dropping datagrams" not in log_of(server)


@pytest.mark.netns
@pytest.mark.parametrize("server_key, client_key, server_says", [
    ("a", "b", "no valid --key tag: it runs with another key, or without --key"),
    ("a", None, "no valid --key tag: it runs with another key, or without --key"),
    (None, "a", "it runs with --key, this end without: give both ends the same --key FILE"),
])
def test_udp_ends_with_different_keys_are_named_on_both_ends_within_5_s(lab, tmp_path, server_key, client_key,
                                                                          server_says):
    keys = {name: ["--key", key_file(tmp_path, name)] for name in ("a", "b")}
    server = lab.tunnel("s", "-i", "tun0", "--udp", "-d", *keys.get(server_key, []))
    lab.configure("s", "tun0")
    wait_for(lambda: "listening on UDP" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", "tun0", "--udp", *keys.get(client_key, []))
    started = time.monotonic()
    lab.configure("c", "tun0")
    lab.ping("c")  # what a user waits for an answer to (a --key end's beats are answered too, by a key holder)
    wait_for(lambda: server_says in log_of(server), "the server to name it", timeout=5 - (time.monotonic() - started))
    wait_for(lambda: "CLIENT: nothing has come back from 192.0.2.1 for 3 s" in log_of(client),
             "the client to say so", timeout=5 - (time.monotonic() - started))
    assert lab.probe("c", count=2, wait=0.3) == 0 and server.poll() is None and client.poll() is None


@pytest.mark.netns
@pytest.mark.parametrize("server_mode, client_mode, server_says", [
    ([], ["-a"], "is not an IP packet: noise, or a peer in tap mode (-a) while this end is tun"),
    (["-a"], [], "is an IP packet, not an Ethernet frame: it runs in tun mode (-u), this end in tap (-a)"),
])
def test_udp_tun_against_tap_is_named_on_both_ends_within_5_s(lab, server_mode, client_mode, server_says):
    devices = {"s": "tap0" if server_mode else "tun0", "c": "tap0" if client_mode else "tun0"}
    server = lab.tunnel("s", "-i", devices["s"], "--udp", "-d", *server_mode)
    lab.configure("s", devices["s"])
    wait_for(lambda: "listening on UDP" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", devices["c"], "--udp", *client_mode)
    started = time.monotonic()
    lab.configure("c", devices["c"])
    lab.probe("c", count=1, wait=0.2)  # a packet for the server to name
    lab.ping("c")  # (tap: the ARP request before it) what a user waits for an answer to
    wait_for(lambda: server_says in log_of(server), "the server to name it", timeout=5 - (time.monotonic() - started))
    said = "CLIENT: nothing has come back from 192.0.2.1 for 3 s: does the server run with --udp, in this mode (%s)" % (
        "-a" if client_mode else "-u")
    wait_for(lambda: said in log_of(client), "the client to say so", timeout=5 - (time.monotonic() - started))
    assert log_of(server).count(server_says) == 1 and log_of(client).count(said) == 1  # each said once
    assert "serving 192.0.2.2" not in log_of(server)  # the mismatched client is never served


LAB_RELAY = """
import fcntl, os, select, socket, struct, sys
# The VPN lab's UDP relay, as students write it: one raw packet per datagram, and every datagram
# written to the device unguarded (an empty one, or anything the device refuses, ends it).
name, port, peer = sys.argv[1], int(sys.argv[2]), (sys.argv[3:] or [None])[0]
tun = os.open("/dev/net/tun", os.O_RDWR)
fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH22x", name.encode(), 0x0001 | 0x1000))
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
address = (peer, port) if peer else None
if not peer:
    sock.bind(("0.0.0.0", port))
print("ready", flush=True)
while True:
    ready = select.select([sock, tun], [], [])[0]
    if sock in ready:
        data, address = sock.recvfrom(2048)
        os.write(tun, data)
    if tun in ready:
        packet = os.read(tun, 2048)
        if address:
            sock.sendto(packet, address)
"""


@pytest.mark.netns
def test_udp_ends_interoperate_with_the_vpn_labs_relay_idle_and_busy_for_60_s(lab):
    # our server and the lab's relay as client (tun0, 10.9.0.0/24); the relay as server and our client
    # (tun1, 10.8.0.0/24, port 55556): the relay writes every datagram it gets to its device
    relays = [lab.spawn("c", [sys.executable, "-c", LAB_RELAY, "tun0", "55555", lab.SERVER_IP], "relay-client.log"),
              lab.spawn("c", [sys.executable, "-c", LAB_RELAY, "tun1", "55556"], "relay-server.log")]
    for relay in relays:
        wait_for(lambda: "ready" in log_of(relay), "the relay to start")
    for device, address in (("tun0", "10.9.0.2/24"), ("tun1", "10.8.0.2/24")):  # before anything comes
        lab.ip("-n", lab.ns["c"], "addr", "add", address, "dev", device)
        lab.ip("-n", lab.ns["c"], "link", "set", device, "up")
    ends = relays + [lab.tunnel("s", "-i", "tun0", "--udp", "--addr", "10.9.0.1/24"),
                     lab.spawn("s", [sys.executable, "-u", SCRIPT, "-i", "tun1", "-c", lab.CLIENT_IP, "-p", "55556",
                                     "--udp", "--addr", "10.8.0.1/24"], "our-client.log")]
    wait_for(lambda: all("inet 10." in lab.ip("-n", lab.ns["s"], "addr", "show", device, check=False).stdout
                         for device in ("tun0", "tun1")), "our ends' devices")
    for side, address in (("s", "10.9.0.1"), ("c", "10.9.0.2"), ("s", "10.8.0.1"), ("c", "10.8.0.2")):
        lab.spawn(side, [sys.executable, "-c", UDP_ECHO, address], "echo-%s.log" % address)

    def probes(side, address, count):
        result = subprocess.run(["ip", "netns", "exec", lab.ns[side], sys.executable, "-c", UDP_PROBE, address,
                                 str(count), "1"], capture_output=True, text=True, timeout=count + TIMEOUT)
        return int(result.stdout or 0)

    started = time.monotonic()
    for side, address in (("c", "10.9.0.1"), ("s", "10.9.0.2"), ("s", "10.8.0.2"), ("c", "10.8.0.1")):
        wait_for(lambda: probes(side, address, 1) == 1, "a probe to %s from %s" % (address, side))
    while time.monotonic() - started < 30:  # idle
        assert all(end.poll() is None for end in ends)
        time.sleep(1)
    while time.monotonic() - started < 60:  # busy: both tunnels, both ways
        for side, address in (("c", "10.9.0.1"), ("s", "10.9.0.2"), ("s", "10.8.0.2"), ("c", "10.8.0.1")):
            assert probes(side, address, 20) >= 19, address
    assert all(end.poll() is None for end in ends), [log_of(end)[-500:] for end in ends]


@pytest.mark.netns
def test_udp_client_survives_a_server_restart_without_being_restarted(lab):
    server, client = start_pair(lab, "tun0", "--udp")
    lab.echo("s")
    assert tunnel_passes(lab)
    server.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0
    assert lab.probe("c", count=2, wait=0.5) == 0  # nobody there now
    wait_for(lambda: "nothing answers at 192.0.2.1 port 55555" in log_of(client), "the client to say so")
    server = lab.tunnel("s", "-i", "tun0", "--udp", "-d")
    lab.configure("s", "tun0")
    lab.echo("s")
    assert tunnel_passes(lab)  # the same client, not restarted
    assert client.poll() is None and "SERVER: serving 192.0.2.2 port" in log_of(server)


# ---------------------------------------------------------------------------------------
# 8. A class on one server (--clients N): Switch, serve_class()
# ---------------------------------------------------------------------------------------

def server_addresses(monkeypatch, *addresses):
    """The server's device has these addresses (IPv4, IPv6, MACs), as device_addresses() reads them."""
    packed = [mac(a) if a.count(":") == 5 else ipaddress.ip_address(a).packed for a in addresses]
    monkeypatch.setattr(simpletun, "device_addresses", lambda name: packed)


@pytest.fixture
def class_rig(server_rig, monkeypatch):
    """server_rig(-s --clients N ...), with the Switch it made in .switch."""
    made = []

    class Recorded(simpletun.Switch):
        def __init__(self, *args):
            super().__init__(*args)
            made.append(self)
    monkeypatch.setattr(simpletun, "Switch", Recorded)

    def start(*argv, tls=None):
        r = server_rig(*argv, tls=tls)
        wait_for(lambda: made, "the class's switch")
        r.switch = made[-1]
        return r
    return start


def student(r, address, mac_text=None):
    """A client of a class that has proven itself with a first packet from `address` (tap: from its MAC)."""
    sock = r.connect()
    first = ipv4(17, b"hello", src=address, dst="10.0.0.1")
    if mac_text:
        first = ethernet(0x0800, first, dst=SERVER_MAC, src=mac_text)
    sock.sendall(frame(first))
    assert r.kernel.recv(65536) == first  # it reached the server's device: it is in
    return sock


def received(sock, timeout=TIMEOUT):
    """The next packet a client's connection brings, or None if none comes within `timeout` s."""
    def exactly(size):  # (a TLS socket takes no MSG_WAITALL)
        data = b""
        while len(data) < size:
            more = sock.recv(size - len(data))
            if not more:
                raise struct.error("the connection ended")
            data += more
        return data

    sock.settimeout(timeout)
    try:
        (length,) = HEADER.unpack(exactly(2))
        return exactly(length)
    except (socket.timeout, struct.error):
        return None


def icmp_checksum_ok(data):
    return simpletun.checksum(data) == 0


@pytest.mark.parametrize("addresses, answer", [
    (["10.0.0.1", "fd00::1", SERVER_MAC], "ipv4"),
    (["fe80::1", "fd00::1", "10.0.0.1"], "ipv4"),
    ([SERVER_MAC], None),  # no IPv4 address to answer from
])
def test_an_ipv4_packet_refused_is_answered_icmp_administratively_prohibited_from_the_servers_address(addresses,
                                                                                                     answer):
    packed = [mac(a) if a.count(":") == 5 else ipaddress.ip_address(a).packed for a in addresses]
    spoofed = ipv4(17, struct.pack("!HHHH", 5000, 7, 13, 0) + b"hello", src="10.0.0.2", dst="10.0.0.9")
    got = simpletun.prohibited(spoofed, False, packed)
    if answer is None:
        assert got is None
        return
    header, icmp = got[:20], got[20:]
    assert icmp_checksum_ok(header) and icmp_checksum_ok(icmp)
    assert struct.unpack("!BBHHHBB", header[:10]) == (0x45, 0, len(got), 0, 0, 64, 1)
    assert header[12:16] == socket.inet_aton("10.0.0.1") and header[16:20] == socket.inet_aton("10.0.0.2")
    assert icmp[:2] == bytes([3, 13]) and icmp[4:8] == bytes(4)  # destination unreachable: communication
    #                                                      administratively prohibited; its unused word is zero
    assert icmp[8:] == spoofed[:28]  # its header and 8 bytes of what it carries (RFC 792): ping finds its own


def test_an_ipv6_packet_refused_is_answered_icmpv6_administratively_prohibited():
    packed = [ipaddress.ip_address(a).packed for a in ("fe80::1", "fd00::1")]
    spoofed = ipv6(58, struct.pack("!BBHHH", 128, 0, 0, 9, 1) + bytes(2000), src="fd00::2", dst="fd00::9")
    got = simpletun.prohibited(spoofed, False, packed)
    icmp = got[40:]
    pseudo = got[8:40] + struct.pack("!I3xB", len(icmp), 58)
    assert icmp_checksum_ok(pseudo + icmp) and icmp[:2] == bytes([1, 1])
    assert got[8:24] == ipaddress.ip_address("fd00::1").packed  # not the link-local one
    assert got[24:40] == ipaddress.ip_address("fd00::2").packed
    assert icmp[8:] == spoofed[:40 + 8]  # its header and 8 bytes: the echo request's id and seq


def test_a_tap_packet_refused_is_answered_in_a_frame_to_its_senders_mac_from_the_servers():
    packed = [mac(SERVER_MAC), socket.inet_aton("10.0.0.1")]
    spoofed = ethernet(0x0800, ipv4(17, bytes(8), src="10.0.0.2"), dst=SERVER_MAC, src=BOB_MAC)
    got = simpletun.prohibited(spoofed, True, packed)
    assert got[:14] == mac(BOB_MAC) + mac(SERVER_MAC) + b"\x08\x00"
    assert got[14 + 20:14 + 22] == bytes([3, 13]) and got[14 + 28:] == spoofed[14:14 + 28]
    assert simpletun.prohibited(ethernet(0x0806, arp(2), src=BOB_MAC), True, packed) is None  # ARP: no IP


def test_a_refused_student_is_told_at_most_once_a_second_and_never_for_the_servers_own_address(device,
                                                                                             monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: now[0])
    server_addresses(monkeypatch, "10.0.0.1")
    with room_with_pairs(device, 2, "--clients", "3") as (room, pairs):
        switch = simpletun.Switch(room, room.tunnel, 3)
        alice, bob = (simpletun.ExtraLink(pairs[n][0], name, room.args, heard=True)
                      for n, name in enumerate(("alice", "bob")))
        for link, address in ((alice, "10.0.0.2"), (bob, "10.0.0.3")):
            switch.seat(link)
            switch.owners[socket.inet_aton(address)] = link
        told = []
        for at, src in ((1000.0, "10.0.0.2"), (1000.5, "10.0.0.2"), (1001.0, "10.0.0.2"), (1001.5, "10.0.0.1")):
            now[0] = at
            before = len(bob.out)
            switch.from_client(bob, ipv4(17, b"x", src=src, dst="10.0.0.9"))  # alice's, then the server's
            told.append(len(bob.out) > before)
        assert told == [True, False, True, False]
        assert switch.spoofed == 4 and not alice.out
        switch.close()


@pytest.mark.parametrize("frame_, says", [
    (ethernet(0x0800, ipv4(17, b"x"), src="ff:ff:ff:ff:ff:ff"), "from ff:ff:ff:ff:ff:ff, a group address: no one "
                                                                "owns one"),
    (ethernet(0x86DD, ipv6(17, bytes(8)), src="33:33:00:00:00:01"), "from 33:33:00:00:00:01, a group address"),
    (ethernet(0x0806, arp(2, sender_mac=ALICE_MAC), src=BOB_MAC), "whose ARP sender is another MAC than the "
                                                                   "frame's own"),
    (ethernet(0x86DD, ipv6(60, extension(60) * 8 + extension(58) + icmpv6(136, "fd00::2"))),
     "whose IPv6 extension headers go on past the 8 read"),
    (ethernet(0x86DD, ipv6(44, fragment_header(58) + icmpv6(136, "fd00::2"))),
     "of neighbour discovery in fragments (RFC 6980 forbids it)"),
    (ethernet(0x86DD, ipv6(44, fragment_header(58) + icmpv6(135, "fd00::2"))),
     "of neighbour discovery in fragments (RFC 6980 forbids it)"),
    (ethernet(0x86DD, ipv6(44, fragment_header(58) + struct.pack("!BBHI", 133, 0, 0, 0))),  # a router's too
     "of neighbour discovery in fragments (RFC 6980 forbids it)"),
    (b"\x00" * 6 + socket.inet_aton("10.0.0.5") + b"\x00" * 3,  # what it would claim: a classmate's address
     "shorter than an Ethernet header (13 bytes)"),
])
def test_a_tap_frame_whose_claims_cannot_be_checked_says_why(frame_, says):
    claims = simpletun.claimed_addresses(frame_)
    assert isinstance(claims, str) and claims.startswith(says)


@pytest.mark.parametrize("frame_, claims", [
    (ethernet(0x0800, ipv4(17, b"x", src="10.0.0.3"), src=BOB_MAC), [BOB_MAC, "10.0.0.3"]),
    (ethernet(0x0806, arp(2, "10.0.0.3", sender_mac=BOB_MAC), src=BOB_MAC), [BOB_MAC, "10.0.0.3"]),
    (ethernet(0x0806, arp(1, "0.0.0.0", sender_mac=BOB_MAC), src=BOB_MAC), [BOB_MAC]),  # a probe: no claim
    (ethernet(0x86DD, ipv6(58, icmpv6(136, "fd00::2"), src="fe80::3"), src=BOB_MAC),
     [BOB_MAC, "fe80::3", "fd00::2"]),  # a neighbour advertisement: its target too
    (ethernet(0x86DD, ipv6(0, extension(58) + icmpv6(136, "fd00::2"), src="fe80::3"), src=BOB_MAC),
     [BOB_MAC, "fe80::3", "fd00::2"]),  # behind hop-by-hop
    (ethernet(0x86DD, ipv6(60, extension(58) + icmpv6(136, "fd00::2"), src="::"), src=BOB_MAC),
     [BOB_MAC, "fd00::2"]),  # behind destination options, from ::
    (ethernet(0x86DD, ipv6(43, extension(60, 24) + extension(58) + icmpv6(136, "fd00::2"), src="fe80::3"),
              src=BOB_MAC), [BOB_MAC, "fe80::3", "fd00::2"]),  # behind routing and destination options
    (ethernet(0x86DD, ipv6(60, extension(58) + icmpv6(135, "fd00::2"), src="fe80::3"), src=BOB_MAC),
     [BOB_MAC, "fe80::3"]),  # a solicitation asks: it claims nothing
    (ethernet(0x86DD, ipv6(44, fragment_header(58, 100) + bytes(24), src="fe80::3"), src=BOB_MAC),
     [BOB_MAC, "fe80::3"]),  # a later fragment: no message to read
    (ethernet(0x86DD, ipv6(44, fragment_header(58) + struct.pack("!BBHHH", 128, 0, 0, 1, 1), src="fe80::3"),
              src=BOB_MAC), [BOB_MAC, "fe80::3"]),  # a fragmented echo request: no neighbour discovery
])
def test_a_tap_frame_claims_its_mac_and_the_addresses_its_arp_ip_and_neighbour_advertisements_name(frame_, claims):
    packed = [mac(a) if a.count(":") == 5 else ipaddress.ip_address(a).packed for a in claims]
    assert simpletun.claimed_addresses(frame_) == packed


def test_class_passes_each_packet_to_the_client_that_owns_its_destination(class_rig, caplog):
    r = class_rig("--clients", "3")
    a, b = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    for_b = ipv4(17, b"for b", src="10.0.0.1", dst="10.0.0.3")
    r.kernel.send(for_b)
    assert received(b) == for_b and received(a, 0.2) is None  # only b's
    a_to_b = ipv4(17, b"from a", src="10.0.0.2", dst="10.0.0.3")
    a.sendall(frame(a_to_b))
    assert received(b) == a_to_b  # straight from a to b: the server forwards it itself
    assert nothing_on(r.kernel)  # the server's device never saw it
    unknown = ipv4(17, b"to no one", src="10.0.0.2", dst="10.0.0.99")
    a.sendall(frame(unknown))
    assert r.kernel.recv(65536) == unknown and received(b, 0.2) is None  # no one's: the server's device
    r.kernel.send(ipv4(17, b"to no one", src="10.0.0.1", dst="10.0.0.99"))
    assert received(a, 0.2) is None and received(b, 0.2) is None  # from the device, no one's: nowhere (tun)
    assert "SERVER: 127.0.0.1 joined the class (2 of 3 slots)" in caplog.messages
    assert "CLASS: 127.0.0.1 -> 127.0.0.1: 26 bytes, forwarded by the server" in caplog.messages  # -d says so


def test_class_drops_a_packet_from_another_clients_address_tells_its_sender_and_the_owner_keeps_working(
        class_rig, caplog, monkeypatch):
    server_addresses(monkeypatch, "10.0.0.1")
    r = class_rig("--clients", "3")
    a, b = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    for _ in range(3):
        b.sendall(frame(ipv4(17, b"spoofed", src="10.0.0.2", dst="10.0.0.1")))  # b claims a's address
    b.sendall(frame(ipv4(17, b"b's own", src="10.0.0.3", dst="10.0.0.1")))
    assert r.kernel.recv(65536) == ipv4(17, b"b's own", src="10.0.0.3", dst="10.0.0.1")  # the 3 spoofed: dropped
    assert [m for m in caplog.messages if "dropping" in m] == [
        "SERVER: dropping 127.0.0.1's packets from 10.0.0.2: that address is 127.0.0.1's (counted, not logged again)"]
    told = received(b)  # b is told, once in the second: an ICMP "administratively prohibited"
    assert told[12:16] == socket.inet_aton("10.0.0.1") and told[20:22] == bytes([3, 13])
    assert received(b, 0.2) is None
    for_a = ipv4(17, b"for a", src="10.0.0.1", dst="10.0.0.2")
    r.kernel.send(for_a)
    assert received(a) == for_a and received(b, 0.2) is None  # the owner keeps its address


def test_class_client_that_leaves_frees_its_addresses_and_slot_at_once(class_rig, caplog):
    r = class_rig("--clients", "2")
    a = student(r, "10.0.0.2")
    student(r, "10.0.0.3")  # (a second student: the class is full)
    late = r.connect()
    late.sendall(frame(ipv4(17, b"me too", src="10.0.0.4")))
    assert r.closed_by_server(late)  # a third: no slot, an orderly close, no packet
    assert any("turned away 127.0.0.1: it proved itself, but all 2 slots of the class are taken" in m
               for m in caplog.messages)
    a.close()
    wait_for(lambda: any("left the class: the peer closed the connection (1 of 2 slots)" in m
                         for m in caplog.messages), "a to leave")
    c = student(r, "10.0.0.2")  # a's address and slot, taken by a newcomer
    for_c = ipv4(17, b"for c", src="10.0.0.1", dst="10.0.0.2")
    r.kernel.send(for_c)
    assert received(c) == for_c


def test_class_client_that_stops_reading_loses_its_own_packets_only(class_rig, caplog):
    r = class_rig("--clients", "2")
    a, stopped = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    stopped.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    big = bytes(1400)
    for i in range(6000):  # 8 MB for the client that reads nothing (more than the sockets hold), a's among them
        r.kernel.send(ipv4(17, big, src="10.0.0.1", dst="10.0.0.3"))  # (never blocks: the device is read)
        if i % 100 == 0:
            r.kernel.send(ipv4(17, b"%d" % i, src="10.0.0.1", dst="10.0.0.2"))
            assert received(a) == ipv4(17, b"%d" % i, src="10.0.0.1", dst="10.0.0.2")
    assert "SERVER: 127.0.0.1 takes nothing: packets for it are dropped, counted" in caplog.messages


def test_class_over_tls_serves_students_holding_the_same_certificate_and_turns_away_one_too_many(
        class_rig, certs, caplog):
    r = class_rig("--clients", "2", tls=simpletun.tls_context(True, certs["a"]))
    students = [tls_client(r, certs) for _ in range(3)]
    for n, sock in enumerate(students[:2], 2):
        sock.sendall(frame(ipv4(17, b"hello", src="10.0.0.%d" % n)))
        assert r.kernel.recv(65536) == ipv4(17, b"hello", src="10.0.0.%d" % n)
    students[2].sendall(frame(ipv4(17, b"me too", src="10.0.0.4")))
    assert r.closed_by_server(students[2])  # the third: no slot (a newer certificate holder pushes no one out)
    students[0].sendall(frame(ipv4(17, b"to b", src="10.0.0.2", dst="10.0.0.3")))
    assert received(students[1]) == ipv4(17, b"to b", src="10.0.0.2", dst="10.0.0.3")  # decrypted, forwarded
    assert any("all 2 slots of the class are taken" in m for m in caplog.messages)
    assert "SERVER: 127.0.0.1 (TLSv1.3, pinned certificate) joined the class (2 of 2 slots)" in caplog.messages


def test_class_in_tap_mode_floods_broadcasts_and_learns_macs(class_rig):
    r = class_rig("--clients", "3", "-a")
    a = student(r, "10.0.0.2", ALICE_MAC)
    b = student(r, "10.0.0.3", BOB_MAC)
    who_has = ethernet(0x0806, arp(1, "10.0.0.2", "10.0.0.3"), src=ALICE_MAC)  # a's broadcast
    a.sendall(frame(who_has))
    assert received(b) == who_has and r.kernel.recv(65536) == who_has  # every other client, and the server
    mdns = ethernet(0x0800, b"m" * 30, dst="01:00:5e:00:00:fb", src=ALICE_MAC)  # IPv4 multicast: a group too
    a.sendall(frame(mdns))
    assert received(b) == mdns and r.kernel.recv(65536) == mdns
    unicast = ethernet(0x0800, b"x" * 30, dst=BOB_MAC, src=SERVER_MAC)
    r.kernel.send(unicast)
    assert received(b) == unicast and received(a, 0.2) is None
    unknown = ethernet(0x0800, b"y" * 30, dst="6e:00:00:00:00:99", src=SERVER_MAC)
    r.kernel.send(unknown)  # from the device to a MAC no one has sent from yet: to every client
    assert received(a) == unknown and received(b) == unknown
    to_unknown = ethernet(0x0800, b"z" * 30, dst="6e:00:00:00:00:99", src=ALICE_MAC)
    a.sendall(frame(to_unknown))  # from a client: the server's device only (no classmate hears it)
    assert r.kernel.recv(65536) == to_unknown and received(b, 0.2) is None


@pytest.mark.parametrize("address, packet", [
    ("10.0.0.1", lambda: ipv4(17, b"I am the server", src="10.0.0.1", dst="10.0.0.3")),
    ("fd00::1", lambda: ipv6(17, bytes(8), src="fd00::1", dst="fd00::3")),
    ("fe80::1", lambda: ipv6(17, bytes(8), src="fe80::1", dst="fe80::3")),
], ids=["IPv4", "IPv6", "IPv6 link-local"])
def test_a_student_sending_from_the_servers_tunnel_address_is_dropped_and_named(class_rig, caplog, monkeypatch,
                                                                                address, packet):
    server_addresses(monkeypatch, "10.0.0.1", "fd00::1", "fe80::1")
    r = class_rig("--clients", "3")
    a, b = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    b.sendall(frame(packet()))  # b takes the server's address, before the server has sent from it
    a.sendall(frame(ipv4(17, b"for the server", src="10.0.0.2", dst="10.0.0.1")))
    assert r.kernel.recv(65536) == ipv4(17, b"for the server", src="10.0.0.2", dst="10.0.0.1")  # b's: dropped
    assert received(b, 0.2) is None  # no answer (its kernel would drop one from its own address), and a's
    assert "SERVER: dropping 127.0.0.1's packets from %s: that address is the server's (counted, not logged " \
           "again)" % address in caplog.messages


@pytest.mark.parametrize("added, own, server", [("10.0.0.9", "10.0.0.2", "10.0.0.1"),
                                               ("fd00::9", "fd00::2", "fd00::1")])
def test_an_address_the_server_gets_after_the_students_joined_is_the_servers_and_taken_back(
        class_rig, caplog, monkeypatch, added, own, server):
    server_addresses(monkeypatch, server)
    r = class_rig("--clients", "2")
    a, b = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    packet = ipv6 if ":" in added else ipv4
    taken = packet(17, b"mine now", src=added, dst=server)
    b.sendall(frame(taken))  # b takes it first: no one had it
    assert r.kernel.recv(65536) == taken
    server_addresses(monkeypatch, server, added)  # the instructor adds it: ip addr add ... dev tun0
    r.switch.addresses_changed()  # what the kernel's netlink message sets off
    assert "SERVER: %s is this server's own address: taken back from 127.0.0.1" % added in caplog.messages
    b.sendall(frame(taken))
    assert nothing_on(r.kernel)  # b cannot send from it again
    to_it = packet(17, b"for the server", src=own, dst=added)
    a.sendall(frame(to_it))
    assert r.kernel.recv(65536) == to_it and received(b, 0.2) is None  # a's packets to it reach the server


def test_an_address_the_device_sends_from_is_the_servers_unless_a_client_has_it(class_rig, monkeypatch):
    server_addresses(monkeypatch, "10.0.0.1")
    r = class_rig("--clients", "2")
    a, b = student(r, "10.0.0.2"), student(r, "10.0.0.3")
    r.kernel.send(ipv4(17, b"routed", src="10.0.0.2", dst="10.0.0.3"))  # a's, passed back out by the kernel
    assert received(b) == ipv4(17, b"routed", src="10.0.0.2", dst="10.0.0.3")
    r.kernel.send(ipv4(17, b"for a", src="10.0.0.1", dst="10.0.0.2"))
    assert received(a) == ipv4(17, b"for a", src="10.0.0.1", dst="10.0.0.2")  # 10.0.0.2 is still a's
    r.kernel.send(ipv4(17, b"the lan's", src="10.1.0.2", dst="10.0.0.3"))  # a host behind the server
    assert received(b) == ipv4(17, b"the lan's", src="10.1.0.2", dst="10.0.0.3")
    b.sendall(frame(ipv4(17, b"me", src="10.1.0.2", dst="10.0.0.2")))  # b cannot take it now
    assert received(a, 0.2) is None


def test_a_tap_student_sending_from_the_servers_mac_reaches_no_classmates_packet(class_rig, caplog, monkeypatch):
    server_addresses(monkeypatch, SERVER_MAC, "10.0.0.1")
    r = class_rig("--clients", "3", "-a")
    a, b = student(r, "10.0.0.2", ALICE_MAC), student(r, "10.0.0.3", BOB_MAC)
    b.sendall(frame(ethernet(0x0800, ipv4(17, b"x", src="10.0.0.3"), dst=ALICE_MAC, src=SERVER_MAC)))
    to_server = ethernet(0x0800, ipv4(17, b"for the server"), dst=SERVER_MAC, src=ALICE_MAC)
    a.sendall(frame(to_server))
    assert r.kernel.recv(65536) == to_server and received(b, 0.2) is None and received(a, 0.2) is None
    assert "SERVER: dropping 127.0.0.1's packets from %s: that address is the server's (counted, not logged " \
           "again)" % SERVER_MAC in caplog.messages


@pytest.mark.parametrize("forged, says", [
    (lambda: ethernet(0x0806, arp(2, "10.0.0.2", "10.0.0.4", BOB_MAC), dst=CAROL_MAC, src=BOB_MAC),
     "from 10.0.0.2: that address is 127.0.0.1's"),  # "alice's IP is at bob's MAC"
    (lambda: ethernet(0x0806, arp(2, "10.0.0.1", "10.0.0.1", BOB_MAC), src=BOB_MAC),
     "from 10.0.0.1: that address is the server's"),  # gratuitous ARP for the server's IP
    (lambda: ethernet(0x0806, arp(1, "10.0.0.3", "10.0.0.2", ALICE_MAC), src=BOB_MAC),
     "whose ARP sender is another MAC than the frame's own"),
    (lambda: ethernet(0x0800, ipv4(17, b"x", src="10.0.0.2", dst="10.0.0.4"), dst=CAROL_MAC, src=BOB_MAC),
     "from 10.0.0.2: that address is 127.0.0.1's"),
    (lambda: ethernet(0x86DD, ipv6(58, icmpv6(136, "fd00::2"), src="fe80::3", dst="ff02::1"),
                      dst="33:33:00:00:00:01", src=BOB_MAC),
     "from fd00::2: that address is 127.0.0.1's"),  # a neighbour advertisement for alice's IPv6 address
    (lambda: ethernet(0x86DD, ipv6(60, extension(58) + icmpv6(136, "fd00::2"), src="fe80::3", dst="ff02::1"),
                      dst="33:33:00:00:00:01", src=BOB_MAC),
     "from fd00::2: that address is 127.0.0.1's"),  # the same, behind a destination options header
    (lambda: ethernet(0x86DD, ipv6(44, fragment_header(58) + icmpv6(136, "fd00::2"), src="fe80::3",
                                   dst="ff02::1"), dst="33:33:00:00:00:01", src=BOB_MAC),
     "of neighbour discovery in fragments"),
    (lambda: ethernet(0x0800, ipv4(17, b"x", src="10.0.0.3", dst="10.0.0.4"), dst=CAROL_MAC,
                      src="ff:ff:ff:ff:ff:ff"), "from ff:ff:ff:ff:ff:ff, a group address: no one owns one"),
], ids=["ARP reply for a classmate's IP", "gratuitous ARP for the server's IP", "ARP naming another MAC",
        "IPv4 from a classmate's IP", "neighbour advertisement for a classmate's IPv6",
        "the same behind destination options", "the same in fragments", "from the broadcast MAC"])
def test_a_tap_students_lie_about_an_address_is_dropped_and_reaches_no_one(class_rig, caplog, monkeypatch,
                                                                            forged, says):
    server_addresses(monkeypatch, SERVER_MAC, "10.0.0.1")
    r = class_rig("--clients", "3", "-a")
    a = student(r, "10.0.0.2", ALICE_MAC)
    a.sendall(frame(ethernet(0x86DD, ipv6(17, bytes(8), src="fd00::2", dst="fd00::1"), dst=SERVER_MAC,
                             src=ALICE_MAC)))
    assert r.kernel.recv(65536)  # alice has her IPv6 address too
    b = student(r, "10.0.0.3", BOB_MAC)
    carol = student(r, "10.0.0.4", CAROL_MAC)
    b.sendall(frame(forged()))
    assert received(carol, 0.3) is None and received(a, 0.2) is None  # no classmate heard the lie
    assert nothing_on(r.kernel)  # nor the server
    assert any(says in m and "dropping 127.0.0.1's packets" in m for m in caplog.messages), caplog.messages
    honest = ethernet(0x0806, arp(2, "10.0.0.3", "10.0.0.4", BOB_MAC), dst=CAROL_MAC, src=BOB_MAC)
    b.sendall(frame(honest))
    assert received(carol) == honest  # ARP between honest classmates keeps working
    broadcast = ethernet(0x0806, arp(1, "10.0.0.3", "10.0.0.2", BOB_MAC), src=BOB_MAC)
    b.sendall(frame(broadcast))
    assert received(carol) == broadcast and received(a) == broadcast  # and broadcasts reach everyone


def test_tap_students_probing_for_an_address_from_0_0_0_0_claim_nothing(class_rig):
    r = class_rig("--clients", "3", "-a")
    a, b = student(r, "10.0.0.2", ALICE_MAC), student(r, "10.0.0.3", BOB_MAC)
    for sock, mac_text in ((a, ALICE_MAC), (b, BOB_MAC)):  # an ARP probe (RFC 5227): "is 10.0.0.7 taken?"
        probe = ethernet(0x0806, arp(1, "0.0.0.0", "10.0.0.7", mac_text), src=mac_text)
        sock.sendall(frame(probe))
        assert r.kernel.recv(65536) == probe  # both reach the server: 0.0.0.0 is no one's


def test_a_tap_students_neighbour_solicitation_for_a_classmates_address_claims_nothing(class_rig, monkeypatch):
    server_addresses(monkeypatch, SERVER_MAC, "10.0.0.1")
    r = class_rig("--clients", "3", "-a")
    a = student(r, "10.0.0.2", ALICE_MAC)
    a.sendall(frame(ethernet(0x86DD, ipv6(17, bytes(8), src="fd00::2", dst="fd00::1"), dst=SERVER_MAC,
                             src=ALICE_MAC)))
    assert r.kernel.recv(65536)  # alice owns fd00::2
    b = student(r, "10.0.0.3", BOB_MAC)
    asking = ethernet(0x86DD, ipv6(58, icmpv6(135, "fd00::2"), src="fe80::3", dst="ff02::1:ff00:2"),
                      dst="33:33:ff:00:00:02", src=BOB_MAC)
    b.sendall(frame(asking))  # "who has fd00::2?": a question, not a claim
    assert received(a) == asking


def test_a_student_owns_at_most_max_owned_addresses_and_one_taken_back_frees_its_place(class_rig, caplog,
                                                                                      monkeypatch):
    monkeypatch.setattr(simpletun, "MAX_OWNED", 2)
    server_addresses(monkeypatch, "10.0.0.1")
    r = class_rig("--clients", "3")
    a = student(r, "10.0.0.2")
    a.sendall(frame(ipv4(17, b"second", src="10.0.0.5")))
    assert r.kernel.recv(65536) == ipv4(17, b"second", src="10.0.0.5")  # its second: taken
    a.sendall(frame(ipv4(17, b"third", src="10.0.0.6")))
    assert nothing_on(r.kernel, 0.3)  # its third: one too many
    assert any("from 10.0.0.6: it owns 2" in m for m in caplog.messages)
    server_addresses(monkeypatch, "10.0.0.1", "10.0.0.5")  # the server's device gets 10.0.0.5
    r.switch.addresses_changed()
    assert any("10.0.0.5 is this server's own address: taken back from 127.0.0.1" in m for m in caplog.messages)
    a.sendall(frame(ipv4(17, b"third", src="10.0.0.6")))
    assert r.kernel.recv(65536) == ipv4(17, b"third", src="10.0.0.6")  # one of its two places is free again


def test_the_class_follows_the_servers_addresses_through_netlink(device, monkeypatch):
    read = []
    monkeypatch.setattr(simpletun, "device_addresses", lambda name: read.append(name) or [])
    with room_with_pairs(device, 0, "--clients", "3") as (room, _):
        switch = simpletun.Switch(room, room.tunnel, 3)
        assert read == ["tun9"] and switch.netlink.family == socket.AF_NETLINK
        assert switch.netlink.getsockname()[1] == (simpletun.RTMGRP_LINK | simpletun.RTMGRP_IPV4_IFADDR |
                                                   simpletun.RTMGRP_IPV6_IFADDR)
        assert room.get_map()[switch.netlink].data  # the loop reads it, and reads the addresses again
        switch.close()


def test_the_servers_addresses_are_said_when_they_change_not_at_each_netlink_message(device, monkeypatch,
                                                                                      caplog):
    caplog.set_level(logging.DEBUG)
    server_addresses(monkeypatch, "10.0.0.1")
    said = lambda: [m for m in caplog.messages if "the server's own" in m]  # noqa: E731
    with room_with_pairs(device, 0, "--clients", "3", "-d") as (room, _):
        switch = simpletun.Switch(room, room.tunnel, 3)
        switch.addresses_changed()  # a link's state changed, say: the addresses did not
        assert said() == ["SERVER: tun9's addresses, the server's own: 10.0.0.1"]
        server_addresses(monkeypatch, "10.0.0.1", "fd00::1")
        switch.addresses_changed()
        assert said()[1:] == ["SERVER: tun9's addresses, the server's own: 10.0.0.1, fd00::1"]
        switch.close()


def test_a_student_who_joins_is_said_once_with_d_too(device, caplog):
    caplog.set_level(logging.DEBUG)
    with room_with_pairs(device, 1, "--clients", "3", "-d") as (room, pairs):
        switch = simpletun.Switch(room, room.tunnel, 3)
        switch.seat(simpletun.ExtraLink(pairs[0][0], "192.0.2.7", room.args, heard=True))
        assert [m for m in caplog.messages if "192.0.2.7" in m] == ["SERVER: 192.0.2.7 joined the class (1 of 3 slots)"]
        switch.close()


def test_a_class_client_that_takes_nothing_is_named_each_time_it_stalls_once(device, caplog):
    with room_with_pairs(device, 1, "--clients", "3") as (room, pairs):
        switch = simpletun.Switch(room, room.tunnel, 3)
        link = simpletun.ExtraLink(pairs[0][0], "10.0.0.3's host", room.args, heard=True)
        switch.seat(link)
        switch.owners[socket.inet_aton("10.0.0.3")] = link
        packet = ipv4(17, b"for it", src="10.0.0.1", dst="10.0.0.3")
        said = lambda: [m for m in messages_of(caplog) if "takes nothing" in m]  # noqa: E731
        for stall in (1, 2):  # it stops reading, reads again, stops again
            link.out += bytes(simpletun.OUT_LIMIT)
            for _ in range(3):
                switch.forward(packet, simpletun.SERVER, socket.inet_aton("10.0.0.3"))
            assert len(said()) == stall and switch.lost == 3 * stall  # each stall named once, each loss counted
            del link.out[:]  # it took everything
            switch.keep_watch(link)
        switch.close()


def test_a_student_who_leaves_in_the_wake_up_that_gave_it_a_packet_costs_the_class_nothing(device):
    with room_with_pairs(device, 2, "--clients", "3") as (room, pairs):
        switch = simpletun.Switch(room, room.tunnel, 3)
        alice, bob = (simpletun.ExtraLink(pairs[n][0], name, room.args, heard=True)
                      for n, name in enumerate(("alice", "bob")))
        for link, address in ((alice, "10.0.0.2"), (bob, "10.0.0.3")):
            switch.seat(link)
            switch.owners[socket.inet_aton(address)] = link
        for address in ("10.0.0.2", "10.0.0.3"):  # the device's packets for each, in one wake-up
            switch.out += frame(ipv4(17, b"hi", src="10.0.0.1", dst=address))
        frames, switch.out = switch.out, bytearray()
        simpletun.deframe(memoryview(frames), switch.from_device)  # (send_queued(), without its flush)
        assert switch.given == {alice, bob}
        switch.leave(bob, "it closed the connection")  # ... and bob's end came in the same wake-up
        switch.flush()
        assert switch.clients == [alice] and not alice.out
        assert pairs[0][1].recv(100) == frame(ipv4(17, b"hi", src="10.0.0.1", dst="10.0.0.2"))
        switch.close()


def test_a_class_that_stops_ends_each_students_connection_in_order_not_with_a_reset(device, caplog):
    with room_with_pairs(device, 0, "--clients", "3") as (room, _), \
            socket.create_server(("127.0.0.1", 0)) as listener:
        switch, students = simpletun.Switch(room, room.tunnel, 3), []
        for name in ("alice", "bob"):
            students.append(socket.create_connection(listener.getsockname(), timeout=TIMEOUT))
            ours = listener.accept()[0]
            ours.setblocking(False)
            switch.seat(simpletun.ExtraLink(ours, name, room.args, heard=True))
        switch.close()
        for theirs in students:
            with theirs:
                assert theirs.recv(10) == b""  # an orderly end (a reset: ConnectionResetError)
        assert "SERVER: bob left the class: the server stops (0 of 3 slots)" in messages_of(caplog)
        assert messages_of(caplog)[-1] == "SERVER: the class dropped 0 packet(s) from another's address, 0 for " \
                                          "clients taking nothing"


def test_flood_of_empty_frames_from_the_client_keeps_memory_flat(rig, monkeypatch):
    # Regression: one 256 KiB receive of empty frames became a list of 131 072 packets.
    import resource
    monkeypatch.setattr(simpletun.log, "propagate", False)  # pytest would keep every record
    r = rig(full=True)  # the full program's output: the refusals are counted, not printed
    flood = 131072  # one receive's worth
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r.peer.sendall(b"\x00\x00" * flood + frame(UDP_PACKET))
    assert r.kernel.recv(65536) == UDP_PACKET  # the first packet after them
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 4096
    assert r.tunnel.net2tap == 1


def test_the_servers_own_addresses_are_its_ipv4_and_ipv6_ones_as_ip_lists_them(monkeypatch):
    monkeypatch.setattr(simpletun, "ip_command", lambda *args: (
        "5: tun0    inet 10.0.0.1/24 scope global tun0\\       valid_lft forever preferred_lft forever\n"
        "5: tun0    inet6 fd00::1/64 scope global \\       valid_lft forever preferred_lft forever\n"
        "5: tun0    inet6 fe80::5/64 scope link \\       valid_lft forever preferred_lft forever\n"))
    assert simpletun.device_addresses("no-such-device-here") == [
        socket.inet_aton("10.0.0.1"), socket.inet_pton(socket.AF_INET6, "fd00::1"),
        socket.inet_pton(socket.AF_INET6, "fe80::5")]  # (and no MAC: a tun device has none)


RAW_FRAME = """
import socket, sys
device, frame = sys.argv[1], bytes.fromhex(sys.argv[2])  # one Ethernet frame, as given, on `device`
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((device, 0))
for _ in range(int(sys.argv[3])):
    s.send(frame)
"""


def mac_of(lab, side, device="tap0"):
    return re.search(r"link/ether ([0-9a-f:]{17})", lab.ip("-n", lab.ns[side], "link", "show", device).stdout)[1]


def send_raw(lab, side, raw, count=1):
    """Send an Ethernet frame (bytes) from a host's tap0, `count` times, as a raw-socket program does."""
    subprocess.run(["ip", "netns", "exec", lab.ns[side], sys.executable, "-c", RAW_FRAME, "tap0", raw.hex(),
                    str(count)], check=True, timeout=TIMEOUT)


def third_student(lab, *argv):
    """Carol: a third client of class_of_two()'s class, on host e (a cable of her own)."""
    cable = lab.add_host("e", 4)
    return lab.spawn("e", [sys.executable, "-u", SCRIPT, "-c", cable] + list(argv), "e.log")


@pytest.mark.netns
def test_a_student_who_sends_one_frame_from_the_broadcast_mac_blacks_out_no_one(lab):
    server, alice, bob = class_of_two(lab, "tap", "-a")
    carol = third_student(lab, "-i", "tap0", "-a", "--addr", "10.9.0.4/24")
    wait_for(lambda: log_of(server).count("joined the class") == 3, "carol to join")
    lab.spawn("d", [sys.executable, "-c", UDP_ECHO, "10.9.0.3"], "echo-d.log")
    everyone = ff = "ff:ff:ff:ff:ff:ff"
    send_raw(lab, "e", ethernet(0x0800, ipv4(17, b"x" * 30, src="10.9.0.4", dst="10.9.0.255"), dst=everyone,
                                src=ff))  # one frame whose source is the broadcast MAC
    wait_for(lambda: "from ff:ff:ff:ff:ff:ff, a group address: no one owns one" in log_of(server),
             "the server to name it")
    for side in ("s", "c", "d"):  # every cache forgets: only what the class learnt decides
        lab.ip("-n", lab.ns[side], "neigh", "flush", "dev", "tap0")
    for side, source, to in (("c", "10.9.0.2", "10.9.0.1"), ("c", "10.9.0.2", "10.9.0.3"),
                             ("s", "10.9.0.1", "10.9.0.3")):
        assert lab.probe(side, count=3, to=to, source=source) == 3, (source, to)
    assert carol.poll() is None and server.poll() is None


def neighbour_advertisement(target, mac_text, source, destination="ff02::1", behind=b""):
    """An unsolicited neighbour advertisement "`target` is at `mac_text`" (override set, hop limit 255),
    behind the extension headers `behind` (their first next header: ICMPv6's chain, 58, at their end)."""
    message = bytearray(struct.pack("!BBHI", 136, 0, 0, 0x20000000) + socket.inet_pton(socket.AF_INET6, target)
                        + bytes([2, 1]) + mac(mac_text))  # its target link-layer address option
    source, destination = (socket.inet_pton(socket.AF_INET6, a) for a in (source, destination))
    pseudo = source + destination + struct.pack("!I3xB", len(message), 58)
    struct.pack_into("!H", message, 2, simpletun.checksum(pseudo + message))
    first = 58 if not behind else 60
    return struct.pack("!IHBB16s16s", 6 << 28, len(behind) + len(message), first, 255, source,
                       destination) + behind + bytes(message)


@pytest.mark.netns
def test_a_neighbour_advertisement_behind_a_destination_options_header_changes_no_classmates_cache(lab):
    server, alice, bob = class_of_two(lab, "tap", "-a")
    for side, address in (("s", "fd00::1"), ("c", "fd00::2"), ("d", "fd00::3")):
        lab.ip("-n", lab.ns[side], "addr", "add", address + "/64", "dev", "tap0", "nodad")
    server_mac, bob_mac = mac_of(lab, "s"), mac_of(lab, "d")
    lab.spawn("s", [sys.executable, "-c", UDP_ECHO.replace("AF_INET,", "AF_INET6,"), "fd00::1"], "echo6.log")
    wait_for(lambda: subprocess.run(["ip", "netns", "exec", lab.ns["c"], "ping", "-6", "-c", "1", "-W", "1",
                                     "fd00::1"], capture_output=True).returncode == 0, "alice's ping -6 to work")
    time.sleep(1.2)  # (an entry newer than 1 s, locktime, takes no override: the lie must be able to work)
    lie = neighbour_advertisement("fd00::1", bob_mac, "fe80::3", behind=bytes([58, 0, 1, 4, 0, 0, 0, 0]))
    send_raw(lab, "d", ethernet(0x86DD, lie, dst="33:33:00:00:00:01", src=bob_mac), count=20)
    wait_for(lambda: "of neighbour" in log_of(server) or "from fd00::1: that address is the server's" in
             log_of(server), "the server to name it")
    assert server_mac in lab.ip("-n", lab.ns["c"], "-6", "neigh", "show", "fd00::1", "dev", "tap0").stdout
    ping = subprocess.run(["ip", "netns", "exec", lab.ns["c"], "ping", "-6", "-c", "4", "-i", "0.2", "-W", "1",
                           "fd00::1"], capture_output=True, text=True, timeout=TIMEOUT * 2)
    assert ping.returncode == 0 and " 0% packet loss" in ping.stdout, ping.stdout


@pytest.mark.netns
@pytest.mark.parametrize("added", ["10.9.0.100", "fd00::100"])
def test_an_address_added_mid_class_then_taken_by_a_student_still_reaches_the_server(lab, added):
    server, alice, bob = class_of_two(lab, "tun")
    six = ":" in added
    if six:
        for side, address in (("s", "fd00::1"), ("c", "fd00::2")):
            lab.ip("-n", lab.ns[side], "addr", "add", address + "/64", "dev", "tun0", "nodad")
    if six:
        lab.ip("-n", lab.ns["d"], "addr", "add", "fd00::3/64", "dev", "tun0", "nodad")
    host = ["/128", "nodad"] if six else ["/32"]  # (the address alone, with no network of its own)
    lab.ip("-n", lab.ns["s"], "addr", "add", added + host[0], "dev", "tun0", *host[1:])
    wait_for(lambda: re.search(r"tun0's addresses, the server's own: .*\b%s\b" % re.escape(added),
                               log_of(server)), "the server to read it")  # (netlink told it)
    echo = UDP_ECHO.replace("AF_INET,", "AF_INET6,") if six else UDP_ECHO
    lab.spawn("s", [sys.executable, "-c", echo, added], "echo-added.log")
    lab.ip("-n", lab.ns["d"], "addr", "add", added + host[0], "dev", "tun0", *host[1:])
    probe = UDP_PROBE.replace("AF_INET,", "AF_INET6,") if six else UDP_PROBE
    for _ in range(2):  # bob sends from it, to alice
        subprocess.run(["ip", "netns", "exec", lab.ns["d"], sys.executable, "-c", probe, "fd00::2" if six else
                        "10.9.0.2", "1", "0.3", added], capture_output=True, timeout=TIMEOUT)
    wait_for(lambda: "packets from %s: that address is the server's" % added in log_of(server),
             "the server to name bob")
    alice_probe = subprocess.run(["ip", "netns", "exec", lab.ns["c"], sys.executable, "-c", probe, added, "5", "1"],
                                 capture_output=True, text=True, timeout=TIMEOUT * 3)
    assert alice_probe.stdout.strip() == "5"  # alice's packets to it reach the server, not bob


@pytest.mark.netns
def test_a_student_on_a_classmates_address_sees_ping_say_the_packet_was_refused(lab):
    server, alice, bob = class_of_two(lab, "tun")
    carol = third_student(lab, "-i", "tun0", "--addr", "10.9.0.2/24")  # alice's address
    wait_for(lambda: log_of(server).count("joined the class") == 3, "carol to join")
    ping = subprocess.run(["ip", "netns", "exec", lab.ns["e"], "ping", "-c", "3", "-W", "1", "10.9.0.1"],
                          capture_output=True, text=True, timeout=TIMEOUT * 2)  # a ping a second, as a student's
    assert re.search(r"From 10\.9\.0\.1 icmp_seq=\d Packet filtered", ping.stdout), ping.stdout
    assert "dropping 192.0.4.2's packets from 10.9.0.2: that address is 192.0.2.2's" in log_of(server)
    assert lab.probe("c", count=3, to="10.9.0.1", source="10.9.0.2") == 3  # alice is still served
    assert carol.poll() is None



@pytest.mark.netns
@pytest.mark.parametrize("device, mode", [("tun0", []), ("tap0", ["-a"])])
def test_class_of_three_reach_the_server_and_each_other_and_a_leaver_frees_its_address(lab, tmp_path, device, mode):
    cables = {"c": lab.SERVER_IP, "d": lab.add_host("d", 3), "e": lab.add_host("e", 4)}
    server = lab.tunnel("s", "-i", device, "-d", "--clients", "3", "--addr", "10.9.0.1/24", *mode)
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    alone = cut_tunnel(tmp_path / "tunnel_alone.py")  # a student's client: the tunnel alone, configured by hand
    ends = {side: lab.spawn(side, [sys.executable, "-u", SCRIPT if side != "e" else alone, "-i", device, "-c",
                                   cables[side], *mode] + (["--addr", "10.9.0.%d/24" % n] if side != "e" else []),
                            "%s.log" % side) for side, n in (("c", 2), ("d", 3), ("e", 4))}
    lab.ip("-n", lab.ns["e"], "tuntap", "add", "dev", device, "mode", device[:3], check=False)
    wait_for(lambda: lab.ip("-n", lab.ns["e"], "link", "show", device, check=False).returncode == 0, "e's device")
    lab.ip("-n", lab.ns["e"], "addr", "add", "10.9.0.4/24", "dev", device)
    lab.ip("-n", lab.ns["e"], "link", "set", device, "up")
    for side, address in (("s", "10.9.0.1"), ("c", "10.9.0.2"), ("d", "10.9.0.3"), ("e", "10.9.0.4")):
        wait_for(lambda: address + "/24" in lab.ip("-n", lab.ns[side], "addr", "show", device, check=False).stdout,
                 address)
        lab.spawn(side, [sys.executable, "-c", UDP_ECHO, address], "echo-%s.log" % side)
    for side, source, destination in (("c", "10.9.0.2", "10.9.0.1"), ("d", "10.9.0.3", "10.9.0.1"),
                                      ("e", "10.9.0.4", "10.9.0.1"), ("c", "10.9.0.2", "10.9.0.3"),
                                      ("d", "10.9.0.3", "10.9.0.4"), ("e", "10.9.0.4", "10.9.0.2"),
                                      ("s", "10.9.0.1", "10.9.0.4")):
        wait_for(lambda: lab.probe(side, 1, 0.5, to=destination, source=source) == 1, "%s -> %s" % (source, destination))
        assert lab.probe(side, 5, 1.0, to=destination, source=source) == 5, (source, destination)
    text = log_of(server)
    assert text.count("joined the class") == 3 and "(3 of 3 slots)" in text
    assert re.search(r"CLASS: 192\.0\.2\.2 -> 192\.0\.3\.2: \d+ bytes, forwarded by the server", text), text[-3000:]
    ends["d"].send_signal(signal.SIGTERM)  # d leaves; a newcomer takes its address and its slot
    assert ends["d"].wait(TIMEOUT) == 0
    wait_for(lambda: "192.0.3.2 left the class" in log_of(server), "the server to see d leave")
    lab.spawn("d", [sys.executable, "-u", SCRIPT, "-i", device, "-c", cables["d"], "--addr", "10.9.0.3/24", *mode],
              "d-again.log")
    wait_for(lambda: "10.9.0.3/24" in lab.ip("-n", lab.ns["d"], "addr", "show", device, check=False).stdout,
             "d's address")  # (d's echo is still there, bound to that address)
    if mode:  # a new tap device has a new MAC address: c's ARP cache holds d's old one for a while
        lab.ip("-n", lab.ns["c"], "neigh", "flush", "dev", device)
    wait_for(lambda: lab.probe("c", 1, 0.5, to="10.9.0.3", source="10.9.0.2") == 1, "c to reach the new d")
    assert "dropping" not in log_of(server) and server.poll() is None
    server.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0
    assert "SERVER: the class dropped 0 packet(s) from another's address, 0 for clients taking nothing" \
        in log_of(server)


def class_of_two(lab, mode, *flags):
    """A class server (10.9.0.1) with its echo, alice (host c, 10.9.0.2) in and talking to it, and bob (host d,
    10.9.0.3, on a cable of his own) in; return (server, alice, bob) processes."""
    device = "tap0" if mode == "tap" else "tun0"
    cable_d = lab.add_host("d", 3)
    server = lab.tunnel("s", "-i", device, "-d", "--clients", "3", "--addr", "10.9.0.1/24", *flags)
    wait_for(lambda: "listening" in log_of(server) or server.poll() is not None, "the server to listen")
    ends = [lab.spawn(side, [sys.executable, "-u", SCRIPT, "-i", device, "-c", cable, "--addr", address, *flags],
                      "%s.log" % side) for side, cable, address in (("c", lab.SERVER_IP, "10.9.0.2/24"),
                                                                     ("d", cable_d, "10.9.0.3/24"))]
    wait_for(lambda: "10.9.0.1/24" in lab.ip("-n", lab.ns["s"], "addr", "show", device).stdout, "the server's address")
    lab.spawn("s", [sys.executable, "-c", UDP_ECHO, "10.9.0.1"], "echo-s.log")
    for side, source in (("c", "10.9.0.2"), ("d", "10.9.0.3")):
        wait_for(lambda: lab.probe(side, 1, 0.5, to="10.9.0.1", source=source) == 1, "%s to reach the server" % source)
    wait_for(lambda: log_of(server).count("joined the class") == 2, "both to join")
    return (server, *ends)


@pytest.mark.netns
@pytest.mark.parametrize("mode, tls", [("tun", False), ("tun", True), ("tap", False)],
                         ids=["tun", "tun --tls", "tap (the server's MAC)"])
def test_a_student_who_takes_the_servers_address_reaches_no_classmates_packet_to_it(lab, certs, mode, tls):
    flags = (["-a"] if mode == "tap" else []) + (["--tls", certs["a"]] if tls else [])  # (one certificate for all)
    server, alice, bob = class_of_two(lab, mode, *flags)
    if mode == "tun":  # ip addr add 10.9.0.1/32 dev tun0; a packet from it, to a classmate
        lab.ip("-n", lab.ns["d"], "addr", "add", "10.9.0.1/32", "dev", "tun0")
        taken = "10.9.0.1"
        lab.probe("d", 2, 0.3, to="10.9.0.2", source="10.9.0.1")
    else:  # ip link set tap0 address <the server's MAC>; then anything from it
        taken = re.search(r"link/ether ([0-9a-f:]{17})", lab.ip("-n", lab.ns["s"], "link", "show", "tap0").stdout)[1]
        lab.ip("-n", lab.ns["d"], "link", "set", "tap0", "address", taken)
        lab.probe("d", 2, 0.3, to="10.9.0.2", source="10.9.0.3")
    wait_for(lambda: "192.0.3.2's packets from %s: that address is the server's" % taken in log_of(server),
             "the server to name the student")
    assert lab.probe("c", 5, 1, to="10.9.0.1", source="10.9.0.2") == 5  # alice's packets still reach the server, not bob
    assert server.poll() is None and "Traceback" not in log_of(server)


FORGED_ARP = """
import socket, struct, sys
device, sender_ip, target_ip, to = sys.argv[1:5]  # an ARP reply "sender_ip is at my MAC", sent to `to`
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind((device, 0))
mine, to = s.getsockname()[4], bytes.fromhex(to.replace(":", ""))
arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2, mine, socket.inet_aton(sender_ip), to,
                  socket.inet_aton(target_ip))
for _ in range(3):
    s.send(to + mine + struct.pack("!H", 0x0806) + arp)
"""


def neighbour(lab, side, address):
    """The MAC address a host's ARP table has for `address` on its tap0."""
    return lab.ip("-n", lab.ns[side], "neigh", "show", address, "dev", "tap0").stdout


@pytest.mark.netns
def test_a_students_forged_arp_replies_change_no_classmates_neighbour_table(lab):
    server, alice, bob = class_of_two(lab, "tap", "-a")
    macs = {side: re.search(r"link/ether ([0-9a-f:]{17})", lab.ip("-n", lab.ns[side], "link", "show", "tap0").stdout)[1]
            for side in ("s", "c", "d")}
    assert macs["s"] in neighbour(lab, "c", "10.9.0.1") and macs["c"] in neighbour(lab, "s", "10.9.0.2")
    time.sleep(1.2)  # (an ARP entry newer than 1 s, locktime, takes no reply: the lies must be able to work)
    for sender, target, to in (("10.9.0.1", "10.9.0.1", "ff:ff:ff:ff:ff:ff"),  # gratuitous: "I am the server"
                               ("10.9.0.1", "10.9.0.2", macs["c"]),  # to alice: "the server is at my MAC"
                               ("10.9.0.2", "10.9.0.1", macs["s"])):  # to the server: "alice is at my MAC"
        subprocess.run(["ip", "netns", "exec", lab.ns["d"], sys.executable, "-c", FORGED_ARP, "tap0", sender, target,
                        to], check=True, timeout=TIMEOUT)
    time.sleep(0.3)
    assert macs["s"] in neighbour(lab, "c", "10.9.0.1") and macs["c"] in neighbour(lab, "s", "10.9.0.2")
    assert lab.probe("c", 5, 1, to="10.9.0.1", source="10.9.0.2") == 5
    assert "SERVER: dropping 192.0.3.2's packets from 10.9.0.1: that address is the server's" in log_of(server)
    assert "SERVER: dropping 192.0.3.2's packets from 10.9.0.2: that address is 192.0.2.2's" in log_of(server)


@pytest.mark.netns
def test_class_clients_say_they_are_in_and_one_turned_away_by_a_full_class_says_so_once_until_it_is_back(lab):
    cables = {"c": lab.SERVER_IP, "d": lab.add_host("d", 3), "e": lab.add_host("e", 4)}
    server = lab.tunnel("s", "-i", "tun0", "-d", "--clients", "2", "--addr", "10.9.0.1/24")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    lab.spawn("s", [sys.executable, "-c", UDP_ECHO, "10.9.0.1"], "echo-s.log")
    students = {side: lab.spawn(side, [sys.executable, "-u", SCRIPT, "-i", "tun0", "-c", cables[side], "--addr",
                                       "10.9.0.%d/24" % n] + (["--reconnect"] if side == "e" else []), side + ".log")
                for side, n in (("c", 2), ("d", 3))}
    wait_for(lambda: log_of(server).count("joined the class") == 2, "both to join")
    assert [log_of(students[side]).splitlines() for side in "cd"] == [
        ["CLIENT: connected to %s port 55555; the tunnel is up once a packet comes back through it" % cables[side]]
        for side in "cd"]  # without -d: one line
    wait_for(lambda: lab.probe("c", 1, 0.5, to="10.9.0.1", source="10.9.0.2") == 1, "a first packet to come back")
    assert "CLIENT: a first packet came back through the tunnel: the server serves this end" in log_of(students["c"])
    late = lab.spawn("e", [sys.executable, "-u", SCRIPT, "-i", "tun0", "-c", cables["e"], "--addr", "10.9.0.4/24",
                           "--reconnect"], "e.log")
    wait_for(lambda: "all 2 slots of the class are taken" in log_of(server), "the first refusal")
    time.sleep(3 * simpletun.RECONNECT_EVERY + 1)  # three more tries, each turned away
    lines = log_of(late).splitlines()
    assert len(lines) == 2 and "trying again every 3 s until it is back (--reconnect)" in lines[1], lines
    students["d"].send_signal(signal.SIGTERM)  # a place comes free
    wait_for(lambda: log_of(server).count("joined the class") == 3, "the late student to join", timeout=15)
    wait_for(lambda: lab.probe("e", 1, 0.5, to="10.9.0.1", source="10.9.0.4") == 1, "the late student's packet back")
    assert re.search(r"CLIENT: back after \d+ s: a packet came back through the tunnel \(--reconnect\)",
                     log_of(late)) and len(log_of(late).splitlines()) == 3, log_of(late)


@pytest.mark.netns
def test_class_client_beyond_the_slots_is_refused_on_both_ends_and_exits_1(lab):
    server = lab.tunnel("s", "-i", "tun0", "-d", "--clients", "2", "--addr", "10.9.0.1/24")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    for n in (2, 3):
        lab.tunnel("c", "-i", "tun%d" % n, "--addr", "10.9.0.%d/24" % n)
        wait_for(lambda: log_of(server).count("joined the class") == n - 1, "client %d to join" % n)
    third = lab.tunnel("c", "-i", "tun4", "--addr", "10.9.0.4/24")
    lab.probe("c", count=1, wait=0.2)  # (a client proves itself with its first packet)
    assert third.wait(10) == 1
    assert "all its --clients slots are taken" in log_of(third) and len(log_of(third).splitlines()) <= 3
    assert "it proved itself, but all 2 slots of the class are taken (--clients)" in log_of(server)


@pytest.mark.netns
def test_reconnect_keeps_a_tcp_connection_inside_the_tunnel_across_a_server_restart(lab):
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d")
    wait_for(lambda: "listening" in log_of(server), "the server to listen")
    client = lab.tunnel("c", "-i", "tun0", "--addr", "10.9.0.2/24", "--reconnect", "-d")
    talk = lab.spawn("c", [sys.executable, "-u", "-c", TCP_TALK, "10.9.0.1"], "talk.log")
    lab.spawn("s", [sys.executable, "-c", TCP_ECHO, "10.9.0.1"], "tcp-echo.log")
    wait_for(lambda: "echoed 1" in log_of(talk), "a first line over TCP, through the tunnel", timeout=15)
    server.send_signal(signal.SIGTERM)
    assert server.wait(TIMEOUT) == 0
    wait_for(lambda: "trying again every 3 s until it is back (--reconnect)" in log_of(client), "the client to say so")
    server = lab.tunnel("s", "-i", "tun0", "--addr", "10.9.0.1/24", "-d")
    wait_for(lambda: "CLIENT: Connected to server 192.0.2.1" in log_of(client)[log_of(client).index("trying again"):],
             "the client back")
    wait_for(lambda: "echoed 5" in log_of(talk), "the same TCP connection to go on", timeout=30)
    assert log_of(client).count("trying again") == 1 and client.poll() is None  # one line per outage
    assert "reset" not in log_of(talk)


TCP_ECHO = """
import socket, sys
with socket.create_server((sys.argv[1], 7001)) as listener:
    connection, _ = listener.accept()
    while True:
        data = connection.recv(100)
        if not data:
            break
        connection.sendall(data)
"""


TCP_TALK = """
import socket, sys, time
for _ in range(100):
    try:
        s = socket.create_connection((sys.argv[1], 7001), timeout=2)
        break
    except OSError:
        time.sleep(0.2)
s.settimeout(60)
for n in range(1, 6):
    s.sendall(b"line %d" % n)
    print("echoed", n, s.recv(100).decode(), flush=True)
    time.sleep(1)
"""


@pytest.mark.netns
def test_the_servers_own_addresses_are_read_from_a_real_device(lab):
    ns = lab.ns["s"]
    lab.ip("-n", ns, "tuntap", "add", "dev", "tap7", "mode", "tap")
    lab.ip("-n", ns, "addr", "add", "10.9.7.1/24", "dev", "tap7")
    lab.ip("-n", ns, "addr", "add", "fd00::7/64", "dev", "tap7", "nodad")
    lab.ip("-n", ns, "link", "set", "tap7", "up")
    mac = re.search(r"link/ether ([0-9a-f:]{17})", lab.ip("-n", ns, "link", "show", "tap7").stdout)[1]
    found = subprocess.run(["ip", "netns", "exec", ns] + simpletun.calling("print(device_addresses('tap7'))"),
                           capture_output=True, text=True, timeout=TIMEOUT).stdout
    addresses = set(ast.literal_eval(found))
    assert {socket.inet_aton("10.9.7.1"), socket.inet_pton(socket.AF_INET6, "fd00::7"),
            bytes.fromhex(mac.replace(":", ""))} <= addresses, found



class Demos:
    """The demos a test started. A demo names its namespaces after its pid: the test counts and removes
    only those, never another user's demo or another suite's on the same machine."""

    def __init__(self):
        self.pids = []

    def start(self, *args, **kw):
        """Start `simpletun.py --demo ARGS` with its output in a pipe; remember its pid."""
        process = subprocess.Popen([sys.executable, "-u", SCRIPT, "--demo"] + list(args), stdout=subprocess.PIPE,
                                   stderr=kw.pop("stderr", subprocess.STDOUT), text=True, **kw)
        self.pids.append(process.pid)
        return process

    def run(self, *args, timeout=60):
        """Run a demo to its end; return it as subprocess.run would."""
        process = self.start(*args, stderr=subprocess.PIPE)
        try:
            out, err = process.communicate(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        return subprocess.CompletedProcess(process.args, process.returncode, out, err)

    def left(self):
        """The namespaces this test's demos made that still exist."""
        listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        ours = tuple("%s%d-" % (simpletun.DEMO_PREFIX, pid) for pid in self.pids)
        return [line.split()[0] for line in listing.splitlines() if line.startswith(ours)]


@pytest.fixture
def clean_demo(tmp_path):
    """Root and ip for --demo; afterwards remove whatever this test's demos left (theirs only)."""
    reason = netns_unavailable()
    if reason:
        skip_or_fail(reason)
    demos = Demos()
    yield demos
    for name in demos.left():
        subprocess.run(["ip", "netns", "del", name])


@pytest.mark.netns
def test_demo_interrupted_by_ctrl_c_to_its_process_group_cleans_up_and_exits_1(clean_demo):
    # Regression: a terminal's Ctrl-C (SIGINT to the whole group) printed the children's
    # tracebacks and lost the server's summary line.
    demo = clean_demo.start(start_new_session=True)
    seen = []
    for line in demo.stdout:
        seen.append(line)
        if "CLIENT: Connected" in line:
            os.killpg(demo.pid, signal.SIGINT)
            break
    out = "".join(seen) + demo.stdout.read()
    assert demo.wait(TIMEOUT * 2) == 1, out
    assert "interrupted: stopping both ends" in out
    assert re.search(r"server\| simpletun.py: tun0: TAP2NET \d+ packets", out), out
    assert re.search(r"client\| simpletun.py: tun0: TAP2NET \d+ packets", out), out
    assert "Traceback" not in out
    assert "removed both namespaces" in out
    assert clean_demo.left() == []


def test_demo_without_ip_says_what_it_needs():
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    result = subprocess.run([sys.executable, SCRIPT, "--demo"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=dict(os.environ, PATH="/nonexistent"))
    assert result.returncode == 1
    assert result.stderr.strip() == ("simpletun.py: error: --demo needs the ip command from iproute2 "
                                     "(apt install iproute2)")


def test_demo_without_root_says_what_it_needs():
    if os.geteuid() == 0:
        status, stderr = run_main_as_nobody("--demo")
    else:
        result = run_script("--demo")
        status, stderr = result.returncode, result.stderr
    assert status == 1
    assert "--demo needs root" in stderr


TIMELINE_LINE = re.compile(r"^ *(\d+\.\d{3}) (server|client|ping|demo) *\| (.*)$")


PACKET_LINE = re.compile(r"^(TAP2NET|NET2TAP) \d+: ((?:IPv[46]|ARP) .*)$")


def timeline_of(out):
    """The demo's output as (time, label, text), checking that every line is one whole timeline line."""
    parsed = []
    for line in out.splitlines():
        if line.startswith("demo: removed ") and "left behind" in line:  # before the timeline starts
            continue
        match = TIMELINE_LINE.match(line)
        assert match, "not a timeline line: %r" % line
        assert not re.search(r"\d\.\d{3} (server|client|ping|demo) *\|", match.group(3)), "two lines fused: %r" % line
        parsed.append((float(match.group(1)), match.group(2), match.group(3)))
    return parsed


def assert_causal_order(timeline):
    """Every packet's TAP2NET lines on one end come before the other end's NET2TAP lines for it,
    and each end's first packet comes after its connected line."""
    times = [t for t, _, _ in timeline]
    assert times == sorted(times), "the timeline's times go backwards"
    sent = {}  # (sending side, what the packet is) -> how many times TAP2NET said so
    arrived = {}
    for _, side, text in timeline:
        match = PACKET_LINE.match(text)
        if not match:
            continue
        direction, what = match.groups()
        if direction == "TAP2NET":
            sent[side, what] = sent.get((side, what), 0) + 1
        else:
            other = "client" if side == "server" else "server"
            arrived[side, what] = arrived.get((side, what), 0) + 1
            assert sent.get((other, what), 0) >= arrived[side, what], \
                "%s's NET2TAP %r came before %s's TAP2NET" % (side, what, other)
    for side, connected in (("server", "SERVER: Client connected"), ("client", "CLIENT: Connected")):
        lines = [text for _, who, text in timeline if who == side]
        first_packet = next(i for i, text in enumerate(lines) if PACKET_LINE.match(text))
        assert any(connected in text for text in lines[:first_packet]), "%s: a packet before %r" % (side, connected)


class LineReader:
    """A process's output lines, read by a thread, waited for with a deadline."""

    def __init__(self, process):
        self.lines, self.process = [], process
        threading.Thread(target=lambda: [self.lines.append(line) for line in process.stdout], daemon=True).start()

    def wait_for(self, text, timeout=20):
        wait_for(lambda: any(text in line for line in self.lines), repr(text), timeout)
        return next(line for line in self.lines if text in line)

    def text(self):
        return "".join(self.lines)


@pytest.mark.netns
def test_demo_keep_stays_up_streams_the_timeline_and_cleans_up_on_sigterm(clean_demo):
    demo = clean_demo.start("--keep", "-dd", start_new_session=True)
    try:
        out = LineReader(demo)
        out.wait_for("the tunnel stays up until Ctrl-C")
        route = out.wait_for(" ip route ").split("|", 1)[1].split()[:6]
        assert "10.0.0.0/24 dev tun0" in subprocess.run(route, capture_output=True, text=True).stdout
        for wanted in (" bash ", " ping 10.0.0.1 ", "tcpdump -ni veth0", " ss -ti "):
            out.wait_for(wanted)
        namespace = route[3]
        subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                        "import sys; sys.path.insert(0, %r); import simpletun; simpletun.ping('10.0.0.1', 1)" % HERE],
                       check=True, timeout=TIMEOUT)
        # The demo's own pings were seq 1-3 of another id; this one streams in while the demo waits.
        out.wait_for("echo-request id=")
        wait_for(lambda: out.text().count("echo-reply") >= 2 * (simpletun.DEMO_PINGS + 1), "the new ping's lines")
    finally:
        demo.send_signal(signal.SIGTERM)
        status = demo.wait(TIMEOUT * 3)
    assert status == 0, out.text()
    out.wait_for("removed both namespaces")
    assert "Traceback" not in out.text()
    assert clean_demo.left() == []


@pytest.mark.netns
def test_demo_cable_that_loses_every_packet_keeps_the_client_out_and_says_how(clean_demo):
    method = simpletun.lossy_cable_method(100, 0)
    result = clean_demo.run("--loss", "100", timeout=60)
    assert result.returncode == 1
    assert "the cable loses 100 %% of packets each way (%s)" % method in result.stdout
    assert "the demo's client did not come up" in result.stderr
    assert clean_demo.left() == []


@pytest.mark.netns
@pytest.mark.parametrize("loss, transport", [("0", []), ("5", []), ("20", []), ("5", ["--udp"]), ("20", ["--udp"])])
def test_demo_with_a_lossy_cable_says_failed_only_when_the_tunnel_failed(clean_demo, loss, transport):
    result = clean_demo.run("--loss", loss, *transport, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout
    if loss == "0":
        assert "all 3 echo requests crossed the tunnel and their replies came back" in result.stdout
    else:
        # over TCP the tunnel's repairs make a reply late, not lost: the pinger waits longer for it
        assert re.search(r"ping  \| \d+ of 10 replies came back within %d s; the cable loses about %.0f %% of round "
                         r"trips" % (2 if transport else 6, 100 - (100 - int(loss)) ** 2 / 100), result.stdout), \
            result.stdout
        assert "the replies that came back are what the lossy cable leaves: the tunnel works" in result.stdout
    if loss != "0" and not transport:
        assert re.search(r"the tunnel's own TCP connection retransmitted \d+ segment\(s\) from the client and \d+ "
                         r"segment\(s\) from the server", result.stdout), result.stdout
    if transport:  # over UDP there is no connection of the tunnel's own to count for
        assert "the tunnel's own TCP connection" not in result.stdout, result.stdout
    assert clean_demo.left() == []


@pytest.mark.parametrize("replies, count, loss, explained", [
    (10, 10, 0, True), (9, 10, 0, False),  # a cable that loses nothing: every reply, or the tunnel failed
    (6, 10, 5, True), (2, 10, 5, False), (0, 10, 5, False),
    (3, 10, 20, True), (0, 10, 20, False), (0, 10, 100, True),
    (2, 10, 20, True), (1, 10, 20, False),  # either side of 1 in 1000: 0.6 % and 0.07 % likely
])
def test_a_lossy_demo_tells_a_lossy_cable_from_a_broken_tunnel(replies, count, loss, explained):
    assert simpletun.loss_explains(replies, count, loss) is explained


def run_in_a_terminal(argv, interrupt_when, pids, timeout=60):
    """Run argv on a pseudo-terminal, as a student does (its pid goes into `pids`), and press Ctrl-C once
    `interrupt_when` has been printed: the terminal sends SIGINT to its foreground process group. Return
    the output and the exit status."""
    import pty
    pid, terminal = pty.fork()
    if pid == 0:
        os.execv(argv[0], argv)
    pids.append(pid)
    out, pressed, deadline = b"", False, time.monotonic() + timeout
    with contextlib.suppress(OSError):  # the end of the output (EIO once the program has gone)
        while time.monotonic() < deadline:
            if select.select([terminal], [], [], 0.1)[0]:
                data = os.read(terminal, 65536)
                if not data:
                    break
                out += data
            if not pressed and interrupt_when(out.decode(errors="replace")):
                os.write(terminal, b"\x03")  # Ctrl-C
                pressed = True
    os.close(terminal)
    if time.monotonic() >= deadline:  # still running: stop it as its user would (it cleans up); the
        os.kill(pid, signal.SIGTERM)  # test then fails on what it printed, never hangs
    _, status = os.waitpid(pid, 0)
    return out.decode(errors="replace"), os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


@pytest.mark.netns
def test_ctrl_c_on_a_kept_demo_in_a_terminal_prints_both_retransmission_counts_every_time(clean_demo):
    # Regression: 2 Ctrl-C of 5 lost lab 7's figure ("an unknown number of from the server").
    for _ in range(3):
        out, status = run_in_a_terminal([sys.executable, "-u", SCRIPT, "--demo", "--keep"],
                                        lambda text: "icmp_seq=3 time=" in text and "stays up until" in text,
                                        clean_demo.pids)
        assert status == 0, out
        assert re.search(r"the tunnel's own TCP connection retransmitted \d+ segment\(s\) from the client and \d+ "
                         r"segment\(s\) from the server \(ss -ti\)", out), out
        assert "removed both namespaces" in out and "Traceback" not in out


def test_demo_says_in_one_line_what_a_lossy_cable_needs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    os.symlink(shutil.which("ip"), tmp_path / "ip")  # ip, and neither tc nor nft
    result = subprocess.run([sys.executable, SCRIPT, "--demo", "--loss", "10"], capture_output=True, text=True,
                            timeout=TIMEOUT, env=dict(os.environ, PATH=str(tmp_path)))
    assert result.returncode == 1
    assert result.stderr.strip() == ("simpletun.py: error: --loss needs tc with netem (kernel module sch_netem) or "
                                     "nft: this machine has neither (apt install nftables)")


def test_demo_delay_needs_netem_and_says_so_where_the_kernel_has_none():
    if os.geteuid() != 0:
        pytest.skip("the root check comes first")
    try:
        simpletun.lossy_cable_method(0, 20)
    except simpletun.UserError:
        result = run_script("--demo", "--delay", "20")
        assert result.returncode == 1
        assert "--delay needs netem" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    else:
        pytest.skip("this kernel has netem: --delay works here")


@pytest.mark.parametrize("loss", [0, 5])
def test_a_delay_without_netem_is_refused_up_front_with_a_loss_or_without(monkeypatch, loss):
    monkeypatch.setattr(simpletun.shutil, "which", lambda name: None if name == "tc" else "/usr/sbin/" + name)
    with pytest.raises(simpletun.UserError, match="^--delay needs netem"):  # (nft could lose, not delay)
        simpletun.lossy_cable_method(loss, 20)


def test_demo_bench_says_in_one_line_why_a_measurement_failed_and_goes_on(monkeypatch):
    said = []
    sink = types.SimpleNamespace(stdout=io.BytesIO(b"listening\n"), kill=lambda: None, wait=lambda: None)
    monkeypatch.setattr(simpletun, "start_in", lambda namespace, command: sink)

    def ip_command(*args):  # every measurement's process ends with an error
        raise simpletun.UserError("ip %s: Traceback (most recent call last):\n  ...\nConnectionRefusedError: "
                                  "[Errno 111] Connection refused" % " ".join(args[:3]))

    monkeypatch.setattr(simpletun, "ip_command", ip_command)
    simpletun.bench({"server": "s", "client": "c"}, said.append, "tun mode")
    assert said[1:7] == ["bench: %s failed: ConnectionRefusedError: [Errno 111] Connection refused" % call
                         for call in ["bench_send"] * 2 + ["bench_ping"] * 4]  # each the error it ended with
    assert [line.split()[-1] for line in said[-3:]] == ["failed"] * 3  # each row says so, none is made up


@pytest.mark.netns
def test_demo_bench_prints_the_underlay_and_the_tunnel_side_by_side(clean_demo):
    result = clean_demo.run("--bench", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo  | bench, tun mode:                    underlay   tunnel   tunnel vs underlay" in result.stdout
    row = re.search(r"TCP client -> server \(Mbit/s\) +([\d.]+) +([\d.]+) +x ([\d.]+)", result.stdout)
    assert row, result.stdout
    underlay, tunnel, ratio = map(float, row.groups())
    assert underlay > 0 and tunnel > 0 and abs(ratio - tunnel / underlay) < 0.002
    for direction in ("client -> server", "server -> client"):
        ping_row = re.search(r"ping %s \(ms\) +([\d.]+) +([\d.]+) +\+" % direction, result.stdout)
        assert ping_row and 0 < float(ping_row.group(1)) and 0 < float(ping_row.group(2))
    assert clean_demo.left() == []


@pytest.mark.netns
@pytest.mark.parametrize("mode", [[], ["-a"]])
def test_demo_lan_pings_a_host_behind_the_server_through_the_tunnel(clean_demo, mode):
    result = clean_demo.run("--lan", *mode, timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "demo  | client: ip route add 10.1.0.0/24 via 10.0.0.1" in out
    assert "the client pings 10.1.0.2 through it" in out
    for side, direction, what in (("client", "TAP2NET", "10.0.0.2 > 10.1.0.2 ICMP echo-request"),
                                  ("server", "NET2TAP", "10.0.0.2 > 10.1.0.2 ICMP echo-request"),
                                  ("server", "TAP2NET", "10.1.0.2 > 10.0.0.2 ICMP echo-reply")):
        assert re.search(r"^ *[\d.]+ %s *\| %s \d+: IPv4 %s" % (side, direction, what), out, re.M), what
    assert "reply from 10.1.0.2: icmp_seq=%d" % simpletun.DEMO_PINGS in out
    assert "removed all three namespaces" in out and clean_demo.left() == []


@pytest.mark.netns
def test_demo_kept_without_d_is_quiet(clean_demo):
    demo = clean_demo.start("--keep", start_new_session=True)
    try:
        out = LineReader(demo)
        out.wait_for("the tunnel stays up until Ctrl-C")
        out.wait_for("reply from 10.0.0.1: icmp_seq=%d" % simpletun.DEMO_PINGS)
    finally:
        demo.send_signal(signal.SIGTERM)
        status = demo.wait(TIMEOUT * 3)
    assert status == 0, out.text()
    assert "CLIENT: Connected to server 192.0.2.1" in out.text()
    assert not re.search(r"(TAP2NET|NET2TAP) \d+:", out.text())  # no line per packet
    # a baseline for lab 7: the outer retransmissions are counted on a cable that loses nothing too
    assert re.search(r"the tunnel's own TCP connection retransmitted \d+ segment\(s\) from the client and \d+ "
                     r"segment\(s\) from the server", out.text())
    assert clean_demo.left() == []


@pytest.mark.netns
def test_demo_whose_reader_goes_away_still_cleans_up(clean_demo):
    demo = clean_demo.start(stderr=subprocess.PIPE)
    head = subprocess.run(["head", "-3"], stdin=demo.stdout, capture_output=True, text=True, timeout=60)
    demo.stdout.close()  # as a shell's pipe: only head reads the demo's output
    assert demo.wait(60) == 0 and "Error" not in demo.stderr.read()
    assert len(head.stdout.splitlines()) == 3
    assert clean_demo.left() == []


class PingSocket:
    """The kernel's ping socket, as ping() uses it: answers(sequence) says what comes back to each
    echo request (default: its reply, at once); told records when each was sent and each answer taken."""

    def __init__(self, answers=None):
        self.answers = answers or (lambda sequence: [simpletun.ICMP_ECHO.pack(0, 0, 0, 0, sequence)])
        self.waiting, self.told = [], []

    def __call__(self, *_):  # (it stands in for socket.socket)
        return self

    def __enter__(self):
        return self

    def __exit__(self, *_):
        pass

    def sendto(self, data, _):
        self.told.append(("sent", time.monotonic()))
        self.waiting += self.answers(simpletun.ICMP_ECHO.unpack_from(data)[4])

    def recv(self, _):
        self.told.append(("received", time.monotonic()))
        return self.waiting.pop(0)


def with_ping_socket(monkeypatch, answers=None):
    sock = PingSocket(answers)
    monkeypatch.setattr(simpletun.socket, "socket", sock)
    monkeypatch.setattr(simpletun.select, "select", lambda r, *_: (r if r[0].waiting else [], [], []))
    return sock


def test_the_demos_ping_takes_only_the_reply_to_the_request_it_waits_for(monkeypatch):
    def answers(sequence):  # replies that come late, or are no replies
        late = [simpletun.ICMP_ECHO.pack(0, 0, 0, 0, sequence - 1)]  # the reply to the one before
        if sequence == 2:
            return late
        return late + [simpletun.ICMP_ECHO.pack(8, 0, 0, 0, 3), simpletun.ICMP_ECHO.pack(0, 0, 0, 0, 3)]
    with_ping_socket(monkeypatch, answers)
    times = simpletun.ping("10.0.0.1", count=3, timeout=0.01, interval=0)
    assert times[:2] == [None, None] and times[2] is not None  # 1: no reply in time; 2: only 1's, late


@pytest.mark.netns
def test_a_demo_whose_pings_fail_says_failed_and_exits_1(clean_demo, monkeypatch, capsys):
    # Promise: the demo's exit status tells whether the pings crossed. Here the pinger pings an address
    # no host has, through a tunnel that works.
    calling = simpletun.calling
    monkeypatch.setattr(simpletun, "calling", lambda call: calling(call.replace("'10.0.0.1'", "'10.0.0.99'")))
    clean_demo.pids.append(os.getpid())  # the demo runs in this process: its namespaces bear our pid
    handlers = [(number, signal.getsignal(number)) for number in (signal.SIGINT, signal.SIGTERM)]
    try:
        status = simpletun.demo(simpletun.parse_args(["--demo"]))
    finally:
        for number, handler in handlers:  # (the demo ignores both while it cleans up)
            signal.signal(number, handler)
    out = capsys.readouterr().out
    assert status == 1, out
    assert "FAILED: not every echo request came back through the tunnel" in out
    assert clean_demo.left() == []


@pytest.mark.netns
def test_a_class_demo_with_one_pinger_failing_says_failed_and_exits_1(clean_demo, monkeypatch, capsys):
    # Regression guard: the exit status and the "all N crossed" line followed the last pinger only.
    calling = simpletun.calling
    monkeypatch.setattr(simpletun, "calling", lambda call: calling(call.replace("'10.0.0.4'", "'10.0.0.99'")))
    clean_demo.pids.append(os.getpid())  # alice's ping to carol goes nowhere; every other ping crosses
    handlers = [(number, signal.getsignal(number)) for number in (signal.SIGINT, signal.SIGTERM)]
    try:
        status = simpletun.demo(simpletun.parse_args(["--demo", "--clients", "3"]))
    finally:
        for number, handler in handlers:
            signal.signal(number, handler)
    out = capsys.readouterr().out
    assert status == 1 and "FAILED: not every echo request came back through the tunnel" in out, out
    assert "reply from 10.0.0.3: icmp_seq=1" in out and clean_demo.left() == []


def test_the_lossy_cable_loses_the_share_asked_for(monkeypatch):
    calls = []
    monkeypatch.setattr(simpletun, "ip_command", lambda *args: calls.append(" ".join(args)) or "")
    for loss in (5, 0.5, 100):
        simpletun.make_cable_lossy(["ns"], "nft", loss, 0)
    simpletun.make_cable_lossy(["ns"], "netem", 5, 20)
    rules = [call for call in calls if "add rule" in call]
    assert ["numgen random mod 10000 < 500 counter" in rules[0], "mod 10000 < 50 counter" in rules[1],
            "numgen" not in rules[2] and "veth0 counter drop" in rules[2]] == [True] * 3
    assert calls[-1].endswith("netem loss 5% delay 20ms")


@pytest.mark.parametrize("ss_says, count", [("cubic rto:204 retrans:0/7 rcv_space:14480", "7"), ("cubic", "0")])
def test_the_demo_counts_every_retransmission_of_the_tunnels_connection(monkeypatch, ss_says, count):
    monkeypatch.setattr(simpletun, "ip_command", lambda *args: ss_says)
    assert simpletun.outer_retransmissions("ns", "( dport = :55555 )") == "%s segment(s)" % count


def test_a_demo_namespace_is_removed_as_stale_only_when_the_demo_that_made_it_has_gone(monkeypatch, capsys):
    gone = subprocess.Popen(["true"])
    gone.wait()
    names = ["%s%d-s" % (simpletun.DEMO_PREFIX, gone.pid), "%s%d-c" % (simpletun.DEMO_PREFIX, os.getpid()),
             "%s%d-a (id: 7)" % (simpletun.DEMO_PREFIX, gone.pid), "someone-elses"]
    monkeypatch.setattr(simpletun, "ip_command", lambda *args: "\n".join(names) + "\n")
    removed = []
    monkeypatch.setattr(simpletun, "remove_namespace", removed.append)
    simpletun.remove_stale_demos()
    assert removed == [names[0], names[2].split()[0]]  # the dead demo's, not ours, not another program's
    assert "demo: removed %s, left behind by an earlier demo" % names[0] in capsys.readouterr().out


def test_a_demo_namespace_another_demo_removed_first_is_gone_all_the_same(monkeypatch):
    listed = ["%s1-s" % simpletun.DEMO_PREFIX, "(id:", "3)"]

    def ip(*args):
        if args[1] == "list":
            return " ".join(listed)
        raise simpletun.UserError("ip netns %s: No such file or directory" % args[1])
    monkeypatch.setattr(simpletun, "ip_command", ip)
    simpletun.remove_namespace(simpletun.DEMO_PREFIX + "2-s")  # not listed: another demo removed it
    with pytest.raises(simpletun.UserError, match="No such file"):
        simpletun.remove_namespace(listed[0])  # still there, and ip cannot delete it: that is an error


def test_kept_class_demo_says_who_each_ping_reaches():
    ns = {"server": "S", "alice": "A", "bob": "B"}
    pings = [("alice", "10.0.0.1", "server"), ("alice", "10.0.0.3", "bob"), ("bob", "10.0.0.2", "alice")]
    text = simpletun.keep_instructions(ns, pings, False, "br0")
    assert re.search(r"ip netns exec A ping 10\.0\.0\.3 +alice pings bob through the tunnel", text), text
    assert re.search(r"ip netns exec B ping 10\.0\.0\.2 +bob pings alice through the tunnel", text), text
    single = simpletun.keep_instructions({"server": "S", "client": "C"}, [("client", "10.0.0.1", None)], True,
                                         "veth0")
    assert re.search(r"ip netns exec C ping 10\.0\.0\.1 +client pings 10\.0\.0\.1 through the tunnel", single)
    assert "tcpdump -ni veth0 -X udp port 55555" in single


def test_demo_bench_rows_say_the_tunnel_as_a_share_of_the_underlay_and_ping_as_time_added(monkeypatch):
    said = []
    sink = types.SimpleNamespace(stdout=io.BytesIO(b"listening\n"), kill=lambda: None, wait=lambda: None)
    monkeypatch.setattr(simpletun, "start_in", lambda namespace, command: sink)

    def ip_command(*args):  # each measurement, as its process prints it
        call, tunnel = args[-1], "10.0.0." in args[-1]
        return "%g" % ((500 if tunnel else 2000) if "bench_send" in call else (0.35 if tunnel else 0.1))

    monkeypatch.setattr(simpletun, "ip_command", ip_command)
    simpletun.bench({"server": "s", "client": "c"}, said.append, "tun mode")
    assert said[-3].split()[-2:] == ["x", "0.250"]  # the tunnel carries a quarter of what the cable does
    assert [line.split()[-2] for line in said[-2:]] == ["+0.250"] * 2  # and adds 0.25 ms to each round trip


@pytest.mark.parametrize("times, loss, status", [([0.001] * 3, 0, 0), ([0.001, None, 0.001], 0, 1),
                                                 ([0.001, None, 0.001], 20, 0), ([None] * 10, 20, 1)])
def test_the_demos_pinger_fails_unless_every_reply_came_or_the_lossy_cable_explains_it(monkeypatch, capsys, times,
                                                                                      loss, status):
    waited = []
    monkeypatch.setattr(simpletun, "ping", lambda address, count, wait, say: waited.append(wait) or times)
    assert simpletun.demo_ping("10.0.0.1", len(times), loss, 6) == status
    assert waited == [6]
    if loss:
        assert "%d of %d replies came back within 6 s; the cable loses about 36 %% of round trips (20 %% each " \
            "way)" % (len(times) - times.count(None), len(times)) in capsys.readouterr().out  # 1 - 0.8 * 0.8


# ---------------------------------------------------------------------------------------
# 9. The whole tunnel on one machine: Demo, Timeline, ping(), journey(), the bench
# ---------------------------------------------------------------------------------------

LABEL_WIDTH = 50  # --diagram: a label's most characters, its time included, so that it sits on its arrow


def journey_lanes_expected(hosts):
    """The lifelines in the packet's order: the pinger's host's device, simpletun.py and cable, the
    server's simpletun.py, then the server's device, or (a class) the other client's cable, simpletun.py
    and device."""
    first = ["ping", "D" + hosts[0], "S" + hosts[0], "C" + hosts[0], "Sserver"]
    if len(hosts) == 2:
        return first + ["Dserver"]
    return first + ["C" + hosts[2], "S" + hosts[2], "D" + hosts[2]]


def assert_diagram(path, out, target, hosts, says):
    """The --diagram file, as issue by issue it was promised: Mermaid lines only; the lifelines in the
    packet's order; every arrow between two neighbouring lifelines (or a lifeline and itself: none
    crosses one it does not touch), in time order, its label within LABEL_WIDTH; the first from ping,
    the last back to it at the round trip the note and the pinger's own line state (one clock); each
    TAP2NET/NET2TAP arrow's number and time those of its host's line in the run's timeline."""
    text = open(path).read()
    lines = text.splitlines()
    assert lines[0] == "sequenceDiagram"
    lanes = re.findall(r"^    participant (\w+) as ([a-z][a-z0-9.' ]+)$", text, re.M)
    names = [lane for lane, _ in lanes]
    assert names == journey_lanes_expected(hosts)
    steps = [line for line in lines[1 + len(lanes):-1] if not line.startswith("    Note over")]
    arrows = [re.fullmatch(r"    (\w+)->>(\w+): \+([\d.]+) ([^;#]+)", line) for line in steps]
    assert all(arrows), steps
    for arrow in arrows:
        assert len(arrow[0].split(": ", 1)[1]) <= LABEL_WIDTH, arrow[0]  # with its time
        assert abs(names.index(arrow[1]) - names.index(arrow[2])) <= 1, arrow[0]  # crosses no lifeline
    times = [float(a[3]) for a in arrows]
    assert times == sorted(times) and arrows[0].group(1, 2) == ("ping", "D" + hosts[0]) and arrows[-1][2] == "ping"
    note = re.fullmatch(r"    Note over ping,%s: round trip ([\d.]+) ms, as ping measured it\. On each arrow, the "
                        r"ms since the request left" % names[-1], lines[-1])
    assert note and note[1] == arrows[-1][3], lines[-1]  # the last arrow's time is the round trip
    assert re.search(r"ping  \| reply from %s: icmp_seq=1 time=%s ms$" % (re.escape(target), note[1]), out, re.M)
    request = float(re.search(r"^ *([\d.]+) ping  \| echo request to %s: icmp_seq=1$" % re.escape(target), out,
                              re.M)[1])
    for a in arrows:
        numbers = re.match(r"(TAP2NET|NET2TAP) (\d+): ", a[4])
        if numbers:  # that host's line of that packet, at that time (the timeline shows ms)
            host = next(end for end in (a[1], a[2]) if end.startswith("S"))[1:]
            verb = "Read"
            if (numbers[1], a[1][0]) == ("TAP2NET", "S") or " wrote " in a[4]:
                verb = "Written"
            seen = re.search(r"^ *([\d.]+) %s *\| %s %s: %s \d+ bytes" % (host, numbers[1], numbers[2], verb), out,
                             re.M)
            assert seen and abs((float(seen[1]) - request) * 1000 - float(a[3])) < 1.5, (a[0], out[-3000:])
    assert says in text and text.count("echo-request") == text.count("echo-reply") == 1, text
    return text


@pytest.mark.netns
@pytest.mark.parametrize("mode, device", [([], "tun0"), (["-a"], "tap0")])
def test_demo_shows_pings_crossing_draws_the_first_and_leaves_nothing_behind(clean_demo, tmp_path, mode, device):
    # A namespace as a killed demo would leave it: named after a process that no longer exists.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = "%s%d-s" % (simpletun.DEMO_PREFIX, dead.pid)
    subprocess.run(["ip", "netns", "add", stale], check=True)

    result = clean_demo.run(*mode, "--diagram", str(tmp_path / "journey.mmd"), timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    # (another suite's demo, beside this one, may have removed it first: then it is gone all the same)
    assert "removed %s, left behind by an earlier demo" % stale in out or stale not in subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True).stdout
    drawn = assert_diagram(tmp_path / "journey.mmd", out, "10.0.0.1", ["client", "server"], "frame: 2 + ")
    assert ("ARP who-has 10.0.0.1" in drawn) == bool(mode)  # -a: the ARP exchange first
    sizes = re.findall(r"Dclient->>Sclient: \+[\d.]+ TAP2NET \d+: (\d+ B \w+), ICMP echo-request", drawn)
    assert sizes == (["75 B frame"] if mode else ["61 B packet"])  # a frame is a frame
    assert ("cut a 75 B frame" in drawn) == bool(mode) and ("cut a 61 B packet" in drawn) != bool(mode)
    assert "a Mermaid sequence diagram: %s" % (tmp_path / "journey.mmd") in out
    assert "reply from 10.0.0.1: icmp_seq=%d" % simpletun.DEMO_PINGS in out
    for side, direction, what in (("client", "TAP2NET", "echo-request"), ("server", "NET2TAP", "echo-request"),
                                  ("server", "TAP2NET", "echo-reply"), ("client", "NET2TAP", "echo-reply")):
        assert re.search(r"^ *[\d.]+ %s *\| %s \d+: IPv4 10\.0\.0\.\d > 10\.0\.0\.\d ICMP %s"
                         % (side, direction, what), out, re.M), (side, direction, what)
    if mode:
        assert re.search(r"^ *[\d.]+ server *\| NET2TAP \d+: ARP who-has 10\.0\.0\.1 tell 10\.0\.0\.2", out, re.M)
    assert "server| Configured %s: address 10.0.0.1/24, up" % device in out
    assert clean_demo.left() == []
    assert "demo  | all %d echo requests crossed the tunnel" % simpletun.DEMO_PINGS in out


@pytest.mark.netns
@pytest.mark.parametrize("mode", [[], ["-a"], ["-ddd"], ["-a", "--offload"]])
def test_demo_timeline_is_one_line_per_event_in_causal_order(clean_demo, mode):
    for _ in range(3 if len(mode) < 2 else 1):
        result = clean_demo.run(*mode, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        timeline = timeline_of(result.stdout)
        assert_causal_order(timeline)
        assert sum("NET2TAP: a receive brought" in text for _, _, text in timeline) >= 6
        for n, (_, side, text) in enumerate(timeline):  # each receive's line before the packets it brought
            if text.startswith("NET2TAP: a receive brought"):
                rest = [t for _, s, t in timeline[n + 1:] if s == side and t.startswith("NET2TAP")]
                assert not rest or re.match(r"NET2TAP \d+: Read", rest[0]), (text, rest[:1])
    if "-ddd" in mode:
        assert re.search(r"TAP2NET \d+: on the wire: \[00 3d\] 45 00 00 3d", result.stdout)
    if "--offload" in mode:
        assert "CLIENT: the server runs --offload too" in result.stdout


@pytest.mark.netns
def test_demo_class_of_three_pings_the_server_and_each_other_through_it(clean_demo, tmp_path):
    result = clean_demo.run("--clients", "3", "--diagram", str(tmp_path / "journey.mmd"), timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "four hosts, each a network namespace, joined by veth pairs to a bridge, br0" in out
    assert re.search(r"demo  \|   bob    simpletun-demo-\d+-b  veth0 192.0.2.3/24  tun0 10.0.0.3/24", out)
    assert "demo  | server: simpletun.py -i tun0 -dd -s --addr 10.0.0.1/24 --clients 3" in out
    assert out.count("joined the class") == 3
    for pinger, to, address in (("alice", "carol", "10.0.0.4"), ("bob", "alice", "10.0.0.2"),
                                ("carol", "bob", "10.0.0.3")):
        assert "demo  | %s pings the server (10.0.0.1)" % pinger in out
        said = out.index("demo  | %s pings %s (%s): the server passes each packet on" % (pinger, to, address))
        ours = out[said:]  # what follows: the echo request, passed on by the server, the reply, passed back
        here = {"alice": "2", "bob": "3", "carol": "4"}[pinger]
        there, back = (re.search(r"server\| CLASS: 192\.0\.2\.%s -> 192\.0\.2\.%s: \d+ bytes, forwarded by the server"
                                 % ends, ours) for ends in ((here, address[-1]), (address[-1], here)))
        reply = ours.index("ping  | reply from %s: icmp_seq=1" % address)
        assert there and back and max(there.start(), back.start()) < reply, ours[:3000]
    assert "all 6 echo requests crossed the tunnel and their replies came back" in out
    assert "removed all four namespaces" in out and clean_demo.left() == []
    drawn = assert_diagram(tmp_path / "journey.mmd", out, "10.0.0.4", ["alice", "server", "carol"], "frame: 2 + ")
    assert re.search(r"Sserver->>Ccarol: \+[\d.]+ CLASS: passed on to carol", drawn)
    assert re.search(r"Sserver->>Calice: \+[\d.]+ CLASS: passed on to alice", drawn)
    assert "Dserver" not in drawn  # the server's own device never sees a packet between two clients


@pytest.mark.netns
def test_demo_class_kept_in_tap_mode_with_tls_stays_up_and_cleans_up_on_sigterm(clean_demo, certs, tmp_path):
    demo = clean_demo.start("--clients", "2", "-a", "--tls", str(certs["a"]), "--keep", "--diagram",
                            str(tmp_path / "journey.mmd"), start_new_session=True)
    try:
        out = LineReader(demo)
        out.wait_for("the tunnel stays up until Ctrl-C")
        for wanted in ("-s bash ", "-a bash ", "-b bash ", "-a ping 10.0.0.1 ", "-a ping 10.0.0.3 ", "-b ping 10.0.0.1 ",
                       "-b ping 10.0.0.2 ", "tcpdump -ni br0 -X tcp port 55555"):  # every host, every ping
            out.wait_for(wanted)
    finally:
        demo.send_signal(signal.SIGTERM)
        status = demo.wait(TIMEOUT * 3)
    assert status == 0, out.text()
    out.wait_for("removed all three namespaces")
    assert "interrupted: stopping every end" in out.text() and clean_demo.left() == []
    assert "all 4 echo requests crossed the tunnel and their replies came back" in out.text()
    assert out.text().count("(TLSv1.3, pinned certificate)") == 2 and "tap0 10.0.0.3/24" in out.text()
    drawn = assert_diagram(tmp_path / "journey.mmd", out.text(), "10.0.0.3", ["alice", "server", "bob"],
                           "in TLS")
    assert "ARP who-has 10.0.0.3" in drawn and "CLASS: passed on to bob" in drawn


@pytest.mark.netns
def test_demo_tls_diagram_names_the_tls_records_and_their_size_on_the_wire(clean_demo, certs, tmp_path):
    result = clean_demo.run("--tls", str(certs["a"]), "--diagram", str(tmp_path / "journey.mmd"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = assert_diagram(tmp_path / "journey.mmd", result.stdout, "10.0.0.1", ["client", "server"],
                           "frame: 2 + 61 B, in TLS")
    wire = [int(n) for n in re.findall(r"Cclient->>S\w+: \+[\d.]+ a receive: TLS records, (\d+) B on the wire", drawn)]
    assert len(wire) == 2 and all(n > 63 for n in wire)  # more than the 63-byte frame: TLS's header and tag
    assert re.search(r"NET2TAP: a receive brought %d bytes of TLS records from TCP, 63 bytes of frames in them"
                     % wire[0], result.stdout)


@pytest.mark.netns
def test_demo_offload_diagram_draws_its_frames_with_their_4_byte_length(clean_demo, tmp_path):
    result = clean_demo.run("--offload", "--diagram", str(tmp_path / "journey.mmd"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = assert_diagram(tmp_path / "journey.mmd", result.stdout, "10.0.0.1", ["client", "server"],
                           "frame: 4 + 71 B")  # the packet behind its 10-byte virtio header
    assert "a receive: 75 B from TCP" in drawn


@pytest.mark.netns
def test_demo_two_writes_draws_the_stall_between_the_length_and_the_packet(clean_demo, tmp_path):
    result = clean_demo.run("--two-writes", "--diagram", str(tmp_path / "journey.mmd"), timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    drawn = assert_diagram(tmp_path / "journey.mmd", result.stdout, "10.0.0.1", ["client", "server"],
                           "2 B, then 61 B: two writes")
    first = result.stdout[result.stdout.index("echo request to 10.0.0.1: icmp_seq=1"):]
    first = first[:first.index("reply from 10.0.0.1: icmp_seq=1")]
    receives = re.findall(r"server\| NET2TAP: a receive brought (\d+) bytes", first)
    assert re.findall(r"Cclient->>Sserver: \+[\d.]+ a receive: (\d+) B from TCP", drawn) == receives  # as the timeline
    if receives == ["2", "61"]:  # (most runs: a busy receiver may take both at once)
        stall = re.search(r"Note over Cclient,Sserver: (([\d.]+) ms later: Nagle waited for the length's ACK)$", drawn,
                          re.M)
        assert len(stall[1]) <= LABEL_WIDTH  # (a note over two lifelines is no wider than they are)
        times = [float(t) for t in re.findall(r"Cclient->>Sserver: \+([\d.]+) a receive: \d+ B from TCP", drawn)]
        assert abs(float(stall[2]) - (times[1] - times[0])) < 0.11 and float(stall[2]) > 20
        assert drawn.index(stall[0]) < drawn.index("a receive: 61 B")  # drawn between the two


@pytest.mark.netns
def test_demo_udp_crosses_in_datagrams(clean_demo, tmp_path):
    result = clean_demo.run("--udp", "--diagram", "-", timeout=60)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    (tmp_path / "journey.mmd").write_text(out[out.index("sequenceDiagram"):])  # -: after the timeline
    drawn = assert_diagram(tmp_path / "journey.mmd", out[:out.index("sequenceDiagram")], "10.0.0.1",
                           ["client", "server"], "one datagram of 61 B")
    assert re.search(r"Cclient->>Sserver: \+[\d.]+ NET2TAP", drawn) and "receive" not in drawn
    assert "Configured tun0: MTU 1452, address 10.0.0.1/24, up" in out
    assert "SERVER: listening on UDP port 55555" in out and "SERVER: serving 192.0.2.2 port " in out
    assert "Written 61 bytes to the network (one datagram: no length in front" in out
    assert "receive brought" not in out  # no stream, nothing to cut


def event(t, text, **fields):
    return dict(fields, t=1 + t / 10000, text=text)


def test_journey_draws_each_arrow_in_time_order_when_two_hosts_log_at_once():
    # A class in tap mode: the server passes alice's ARP broadcast on to bob, and writes it to its own device;
    # here bob's receive comes first, and bob cuts the frame only after the server's write.
    args = options("-s", "-a")
    arp_, reply = ("ARP who-has 10.0.0.3", None), ("ARP reply 10.0.0.3", None)
    told = [("ping", event(0, "echo request", event="request", seq=1, to="10.0.0.3")),
            ("alice", event(1, "", event="read", n=6, size=42, label=arp_[0], seq=None)),
            ("alice", event(2, "", event="sent", n=6, size=42, label=arp_[0], seq=None)),
            ("server", event(3, "", event="received", bytes=44, wire=0, **{"from": "192.0.2.2"})),
            ("server", event(4, "", event="forwarded", to="192.0.2.3", size=42, label=arp_[0], seq=None)),
            ("bob", event(5, "", event="received", bytes=44, wire=0, **{"from": "192.0.2.1"})),
            ("server", event(6, "", event="arrived", n=9, size=42, label=arp_[0], seq=None)),  # its own device
            ("server", event(7, "", event="written", n=9, size=42, label=arp_[0], seq=None)),
            ("bob", event(8, "", event="arrived", n=3, size=42, label=arp_[0], seq=None)),
            ("bob", event(9, "", event="written", n=3, size=42, label=arp_[0], seq=None)),
            ("bob", event(10, "", event="read", n=4, size=42, label=reply[0], seq=None)),
            ("bob", event(11, "", event="read", n=5, size=90, label=None, seq=None)),  # an IPv6 packet, say
            ("bob", event(12, "", event="sent", n=4, size=42, label=reply[0], seq=None)),
            ("ping", event(13, "reply", event="reply", seq=1, to="10.0.0.3"))]
    drawn = simpletun.journey(told, "10.0.0.3", ["alice", "server", "bob"], args).splitlines()
    arrows = [line for line in drawn if "->>" in line]
    assert [re.sub(r": \+[\d.]+ ", ": ", line.strip()) for line in arrows] == [
        "ping->>Dalice: echo request, icmp_seq=1",
        "Dalice->>Salice: TAP2NET 6: 42 B frame, ARP who-has 10.0.0.3",
        "Salice->>Calice: TAP2NET 6: frame: 2 + 42 B",
        "Calice->>Sserver: a receive: 44 B from TCP",
        "Sserver->>Cbob: CLASS: passed on to bob, 2 + 42 B",
        "Cbob->>Sbob: a receive: 44 B from TCP",
        "Sbob->>Sbob: NET2TAP 3: cut a 42 B frame",
        "Sbob->>Dbob: NET2TAP 3: wrote 42 B to the device",
        "Dbob->>Sbob: TAP2NET 4: 42 B frame, ARP reply 10.0.0.3",
        "Sbob->>Cbob: TAP2NET 4: frame: 2 + 42 B",
        "Dalice->>ping: echo reply, icmp_seq=1"]  # the server's own device is no lifeline of a class's journey
    times = [float(re.search(r": \+([\d.]+) ", line)[1]) for line in arrows]
    assert times == sorted(times) and times[-1] == 1.3
    assert all(len(line.split(": ", 1)[1]) <= LABEL_WIDTH for line in arrows)  # each sits on its arrow
    assert drawn[-1] == "    Note over ping,Dbob: round trip 1.30 ms, as ping measured it. On each arrow, the ms " \
                        "since the request left"


def test_journey_draws_a_stall_between_two_receives_as_a_note_between_their_arrows():
    # --two-writes: the length comes alone, and the packet 41.3 ms later (event() takes tenths of a ms).
    args = options("-s", "--two-writes")
    request = ("ICMP echo-request", 1)
    told = [("ping", event(0, "echo request", event="request", seq=1, to="10.0.0.1")),
            ("client", event(1, "", event="read", n=3, size=61, label=request[0], seq=1)),
            ("client", event(2, "", event="sent", n=3, size=61, label=request[0], seq=1)),
            ("server", event(3, "", event="received", bytes=2, wire=0, **{"from": "192.0.2.2"})),
            ("server", event(416, "", event="received", bytes=61, wire=0, **{"from": "192.0.2.2"})),
            ("server", event(417, "", event="arrived", n=3, size=61, label=request[0], seq=1)),
            ("ping", event(420, "reply", event="reply", seq=1, to="10.0.0.1"))]
    drawn = simpletun.journey(told, "10.0.0.1", ["client", "server"], args).splitlines()
    steps = [line.strip() for line in drawn if "->>" in line or "Note over C" in line]
    assert steps[2:6] == ["Sclient->>Cclient: +0.20 TAP2NET 3: 2 B, then 61 B: two writes",
                          "Cclient->>Sserver: +0.30 a receive: 2 B from TCP",
                          "Note over Cclient,Sserver: 41.3 ms later: Nagle waited for the length's ACK",
                          "Cclient->>Sserver: +41.60 a receive: 61 B from TCP"]


def test_journey_draws_which_ping_it_is_asked_for_and_none_without_its_reply():
    args = options("-s")
    told = [("ping", event(0, "", event="request", seq=1, to="10.0.0.1")),
            ("ping", event(5, "", event="request", seq=2, to="10.0.0.1")),
            ("client", event(6, "", event="read", n=7, size=61, label="ICMP echo-request", seq=2)),
            ("client", event(7, "", event="read", n=8, size=61, label="ICMP echo-request", seq=1)),
            ("ping", event(9, "", event="reply", seq=2, to="10.0.0.1"))]
    drawn = simpletun.journey(told, "10.0.0.1", ["client", "server"], args, seq=2)
    assert "TAP2NET 7: 61 B packet" in drawn and "TAP2NET 8" not in drawn and "icmp_seq=2" in drawn
    assert simpletun.journey(told, "10.0.0.1", ["client", "server"], args, seq=1) is None  # no reply: no diagram
    assert simpletun.journey(told, "10.0.0.9", ["client", "server"], args, seq=2) is None  # another target's


def test_the_timeline_keeps_the_last_line_of_a_process_that_ended_without_a_newline():
    timeline, (r, w) = simpletun.Timeline(), os.pipe()
    with open(r, "rb", buffering=0):
        os.set_blocking(r, False)
        timeline.sources[r] = ["server", b""]
        os.write(w, json.dumps({"t": 1.0, "text": "SERVER: listening on port 55555", "event": "listening"}).encode()
                 + b"\nsimpletun.py: error: its last words")
        os.close(w)
        while r in timeline.sources:
            timeline.read(r)
    assert [(who, e["text"]) for who, e in timeline.events] == [
        ("server", "SERVER: listening on port 55555"), ("server", "simpletun.py: error: its last words")]
    assert timeline.saw("server", "listening") and not timeline.saw("server", "connected")
    assert timeline.events[0][1]["t"] == 1.0  # an event keeps its own time; a plain line is stamped as it came


def test_the_timeline_prints_every_processs_lines_in_the_order_they_happened(capsys):
    timeline = simpletun.Timeline()
    for label, t, text in (("server", 3, "third"), ("client", 1, "first"), ("demo", 2, "second")):
        timeline.add(label, {"t": timeline.start + t, "text": text})
    timeline.emit(timeline.start + 2.5)  # what happened before then (the rest may still have company)
    assert capsys.readouterr().out == "  1.000 client| first\n  2.000 demo  | second\n"
    timeline.flush()
    assert capsys.readouterr().out == "  3.000 server| third\n"


def test_the_demos_pinger_tells_each_request_as_it_sends_it_and_each_reply_as_it_comes(monkeypatch):
    told = with_ping_socket(monkeypatch).told  # answering at once
    events = []
    times = simpletun.ping("10.0.0.1", count=2, interval=0, say=lambda **event: events.append(event))
    assert [(e["event"], e["seq"]) for e in events] == [("request", 1), ("reply", 1), ("request", 2), ("reply", 2)]
    (_, sent), (_, came) = told[:2]
    assert abs(events[0]["t"] - sent) < 0.01 and came <= events[1]["t"] <= came + 0.01  # one clock
    assert events[1]["text"] == "reply from 10.0.0.1: icmp_seq=1 time=%.2f ms" % (times[0] * 1000)
    assert abs(times[0] - (events[1]["t"] - events[0]["t"])) < 1e-6


# ---------------------------------------------------------------------------------------
# 10. The full command line: parse_args(), extended_end(), full_main()
# ---------------------------------------------------------------------------------------

def test_version_prints_the_version():
    result = run_script("--version")
    assert result.returncode == 0 and result.stdout == "simpletun.py %s\n" % simpletun.__version__


@pytest.mark.parametrize("args, reason", [
    (["--demo", "-s"], "--demo sets up both ends itself"),
    (["--demo", "--bind", "1.2.3.4"], "--demo sets up both ends itself"),
    (["--demo", "--clients", "4"], "--demo --clients N shows a class of 2 or 3 clients"),
    (["--demo", "--clients", "3", "--bench"], "not with --udp, --offload, --two-writes, --lan, --loss, --delay or "),
    (["--demo", "--clients", "2", "--udp"], "shows a class of 2 or 3 clients over TCP: not with --udp"),
    (["--demo", "--loss", "101"], "a percentage is a number from 0 to 100"),
    (["-i", "tun0", "-s", "--addr", "10.0.0.1"], "not an address/prefix such as 10.0.0.1/24 or fd00::1/64"),
    (["-i", "tun0", "-s", "--addr", "fd00::g/64"], "not an address/prefix"),
    (["-i", "tun0", "-s", "--addr", "10.0.0.300/24"], "not an address/prefix"),
    (["-i", "tun0", "-s", "--mtu", "67"], "an MTU is a number from 68 to 65535, not '67'"),
    (["-i", "tun0", "-s", "--mtu", "big"], "an MTU is a number from 68 to 65535"),
    (["-i", "tun0", "-s", "--tls-peer", "x.pem"], "--tls-peer needs --tls FILE"),
    (["-i", "tun0", "-c", "h", "--bind", "127.0.0.1"], "--bind is for the server (-s)"),
    (["-i", "tun0", "-s", "--udp", "--tls", "x.pem"], "--udp cannot go with --tls (the standard library has no DTLS"),
    (["-i", "tun0", "-s", "--udp", "--offload"], "--udp cannot go with --offload (its 64 KiB super-packets"),
    (["-i", "tun0", "-s", "--udp", "--two-writes"], "--udp cannot go with --two-writes (it is about TCP"),
    (["-i", "tun9", "-s", "--key", "/dev/null"], "--key is for --udp (over TCP, --tls proves who the peer is"),
    (["-i", "tun0", "-s", "--keep"], "--keep is for the demo (--demo --keep)"),
    (["-i", "tun0", "-s", "--loss", "5"], "--loss is for the demo"),
    (["-i", "tun0", "-s", "--diagram", "journey.mmd"], "--diagram is for the demo"),
    (["-i", "tun0", "-c", "h", "--clients", "3"], "--clients is for the server (-s)"),
    (["-i", "tun0", "-s", "--reconnect"], "--reconnect is for the client (-c HOST)"),
    (["-i", "tun0", "-s", "--clients", "3", "--offload"], "--clients cannot go with --offload"),
    (["-i", "tun0", "-s", "--clients", "0"], "a class is a number from 1 to"),
])
def test_options_that_do_not_go_together_are_a_usage_error_in_one_line(args, reason):
    result = run_script(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: simpletun.py")  # the usage, then why in one line
    assert result.stderr.splitlines()[-1].startswith("simpletun.py: error: ") and reason in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("argv, taken", [
    (["-i", "tap0", "-s", "-a", "--mtu", "65521"], ("mtu", 65521)),  # the kernel's tap maximum
    (["-i", "tap0", "-s", "-a", "--mtu", "65522"], "a tap device takes an MTU of at most 65521"),
    (["-i", "tun0", "-s", "--mtu", "65535"], ("mtu", 65535)),
    (["-i", "tun0", "-s", "--mtu", "68"], ("mtu", 68)),
    (["-i", "tun0", "-s", "--mtu", "67"], "an MTU is a number from 68 to 65535"),
    (["--demo", "--loss", "100"], ("loss", 100)),
    (["--demo", "--clients", "3"], ("clients", 3)),
    (["--demo", "--clients", "4"], "a class of 2 or 3 clients"),
    (["-i", "tun0", "-s", "--clients", "2", "--udp"], "--clients cannot go with --udp"),  # the smallest class
    (["-i", "tun0", "-s", "--clients", "1", "--udp"], ("clients", 1)),
    (["-i", "tun0", "-s", "--clients", str(simpletun.MAX_NEWCOMERS * 32)], ("clients", 1024)),
    (["-i", "tun0", "-s", "--clients", str(simpletun.MAX_NEWCOMERS * 32 + 1)], "a class is a number from 1 to 1024"),
])
def test_each_number_the_command_line_takes_is_taken_up_to_its_bound_and_not_past(capsys, argv, taken):
    if isinstance(taken, tuple):
        assert getattr(simpletun.parse_args(argv), taken[0]) == taken[1]
        return
    with pytest.raises(SystemExit):
        simpletun.parse_args(argv)
    assert taken in capsys.readouterr().err


@contextlib.contextmanager
def end_without_a_device(monkeypatch, device):
    """extended_end() with the stand-in device (no root) and configure_device() recorded, not run."""
    monkeypatch.setattr(simpletun, "tun_alloc", lambda name, flags: (os.dup(device[0].fileno()), name))
    monkeypatch.setattr(simpletun, "set_offload", lambda fd, enabled: None)
    configured = []
    monkeypatch.setattr(simpletun, "configure_device", lambda name, interface=None, mtu=None: configured.append(mtu))
    yield configured


@pytest.mark.parametrize("flags, mtu", [([], 1452), (["-a"], 1438), (["--key", "k"], 1428),
                                        (["-a", "--key", "k"], 1414), (["--mtu", "1300"], 1300)])
def test_udp_with_addr_gives_the_device_an_mtu_whose_packets_fit_one_datagram(monkeypatch, device, flags, mtu):
    def stop(args, key=None):
        raise simpletun.UserError("(the device is configured: no further)")

    monkeypatch.setattr(simpletun, "udp_link", stop)
    monkeypatch.setattr(simpletun, "read_key", lambda path: KEY)
    with end_without_a_device(monkeypatch, device) as configured:
        args = simpletun.parse_args(["-i", "tun9", "-s", "--udp", "--addr", "10.0.0.1/24"] + flags)
        with pytest.raises(simpletun.UserError):
            simpletun.extended_end(args)
    assert configured == [mtu]  # 1500 - 40 (IPv6) - 8 (UDP), less Ethernet's 14 (tap) and the tag's 24 (--key)


@pytest.mark.parametrize("moved, says", [((0, 3), "TAP2NET 0 packets, NET2TAP 3 packets"),
                                         ((2, 0), "TAP2NET 2 packets, NET2TAP 0 packets"), ((0, 0), None)])
def test_an_end_sums_up_what_crossed_when_anything_did_either_way(monkeypatch, device, caplog, moved, says):
    def serve(tunnel, args, tls=None):
        tunnel.tap2net, tunnel.net2tap = moved

    monkeypatch.setattr(simpletun, "serve_with_room", serve)
    with end_without_a_device(monkeypatch, device):
        simpletun.extended_end(simpletun.parse_args(["-i", "tun9", "-s"]))
    summary = [m for m in messages_of(caplog) if m.startswith("simpletun.py: tun9:")]
    assert summary == ([] if says is None else ["simpletun.py: tun9: %s, 0 dropped" % says])


def test_reconnect_says_each_outage_once_and_each_return_once(caplog, monkeypatch):
    # Regression guard: an outage line the first time only, or a line at every try.
    tries = iter(["refused", "heard", "turned away", "turned away", "refused", "heard", "refused", "stop"])
    slept = []

    class Tried:
        def __init__(self, how):
            self.heard, self.ended = how == "heard", "the server closed the connection without sending a packet"

        def close(self):
            pass

    def connect(host, port):
        how = next(tries)
        if how == "stop":
            raise KeyboardInterrupt
        if how == "refused":
            raise simpletun.UserError("cannot connect to %s port %d: Connection refused" % (host, port))
        return how

    monkeypatch.setattr(simpletun, "connect_to", connect)
    monkeypatch.setattr(simpletun, "relay", lambda tunnel, link, selector: None)
    monkeypatch.setattr(simpletun.time, "sleep", slept.append)
    with pytest.raises(KeyboardInterrupt):
        simpletun.run_client_again(None, "192.0.2.1", 55555, lambda sock, host, away: Tried(sock), None)
    outages = [m for m in caplog.messages if "trying again every 3 s" in m]
    assert len(outages) == 3, caplog.messages  # the first, after the first return, after the second
    assert outages[0] == "CLIENT: cannot connect to 192.0.2.1 port 55555: Connection refused; trying again every 3 s " \
                         "until it is back (--reconnect)"
    assert "without sending a packet" in outages[1]
    assert slept == [simpletun.RECONNECT_EVERY] * 7  # every try, RECONNECT_EVERY s after the last


@pytest.mark.parametrize("debug, away, says", [
    (0, None, ["CLIENT: connected to 127.0.0.1 port 55555; the tunnel is up once a packet comes back through it",
               "CLIENT: a first packet came back through the tunnel: the server serves this end"]),
    (1, None, ["CLIENT: a first packet came back through the tunnel: the server serves this end"]),  # -d said it
    (0, 7.0, ["CLIENT: back after 7 s: a packet came back through the tunnel (--reconnect)"]),  # an outage: no
])                                                                                          # "connected" again
def test_a_client_says_it_is_connected_and_when_the_first_packet_comes_back_once(caplog, monkeypatch, debug, away,
                                                                                 says):
    caplog.set_level("INFO" if debug else "WARNING", logger="simpletun")
    monkeypatch.setattr(simpletun.time, "monotonic", lambda: 100.0)
    ours, theirs = connected_pair()
    with ours, theirs:
        link = simpletun.client_link(ours, "127.0.0.1", options("-c", "127.0.0.1", *["-d"] * debug), None,
                                     away and 100.0 - away)
        for _ in range(2):  # two packets back: one line, for the first
            theirs.sendall(frame(ECHO_REQUEST))
            assert received_by(link) == [ECHO_REQUEST]
    assert [m for m in caplog.messages if m.startswith("CLIENT: ") and "Connected to" not in m] == says


def test_a_tls_client_says_how_it_proved_itself_when_it_connects(caplog, certs):
    caplog.set_level("WARNING", logger="simpletun")
    ours, theirs = connected_pair()
    server = simpletun.wrap_tls(theirs, simpletun.tls_context(True, certs["a"]), server_side=True)
    thread = threading.Thread(target=server.do_handshake, daemon=True)
    thread.start()
    with server, ours:
        link = simpletun.client_link(ours, "127.0.0.1", options("-c", "127.0.0.1", "--tls", certs["a"]),
                                     simpletun.tls_context(False, certs["a"]))
        thread.join(TIMEOUT)
        link.sock.close()
    said = [m for m in caplog.messages if m.startswith("CLIENT")]  # (not a server a test before left running)
    assert said == ["CLIENT: connected to 127.0.0.1 port 55555 (TLS, the pinned certificate); the "
                    "tunnel is up once a packet comes back through it"]


def test_a_udp_server_without_a_client_reads_its_device_but_never_says_it_wrote_to_the_network(
        device, caplog, monkeypatch):
    caplog.set_level("DEBUG", logger="simpletun")
    ours, kernel = device
    made, announced = [], []
    monkeypatch.setattr(simpletun, "udp_link", lambda *args: made.append(real_udp_link(*args)) or made[0])
    monkeypatch.setattr(simpletun, "announce", lambda *args: announced.append(args))  # a client's, not a server's
    port = free_port()
    args = options("-s", "--udp", "-d", "-p", str(port), "--bind", "127.0.0.1", "--addr", "10.0.0.1/24")
    thread = threading.Thread(target=simpletun.udp_end, args=(Tunnel(ours.fileno(), "tun9", debug=1), args),
                              daemon=True)
    thread.start()
    wait_for(lambda: "SERVER: listening on UDP port %d" % port in caplog.messages, "the server to listen")
    kernel.send(ECHO_REQUEST)  # no client yet
    wait_for(lambda: "TAP2NET 1: Read 84 bytes from the tap interface" in caplog.messages, "the read")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        client.connect(("127.0.0.1", port))
        client.settimeout(TIMEOUT)
        client.send(UDP_PACKET)
        assert kernel.recv(65536) == UDP_PACKET
        kernel.send(ECHO_REQUEST)
        assert client.recv(65536) == ECHO_REQUEST
        made[0].end("the test is over")
        client.send(UDP_PACKET)  # (wakes the loop: it sees its link ended)
        thread.join(TIMEOUT)
    written = [m for m in caplog.messages if m.endswith("bytes to the network")]
    assert written == ["TAP2NET 2: Written 84 bytes to the network"] and announced == []


real_udp_link = simpletun.udp_link


def test_a_client_asks_the_link_its_options_say(monkeypatch):
    for argv, two_writes in (([], False), (["--two-writes"], True)):
        ours, theirs = connected_pair()
        with ours, theirs:
            made = simpletun.client_link(ours, "h", options("-c", "h", *argv), None, 1.0)
            assert type(made) is simpletun.ExtraLink and made.args.two_writes is two_writes
            assert ours.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == (not two_writes)
            assert ours.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1


def test_an_offload_client_whose_server_does_not_greet_is_a_user_error_and_its_connection_is_closed():
    ours, theirs = connected_pair()
    with theirs:
        theirs.sendall(frame(ECHO_REQUEST))
        with pytest.raises(simpletun.UserError) as error:
            simpletun.client_link(ours, "h", options("-c", "h", "--offload"), None)
        assert str(error.value) == "CLIENT: the server runs without --offload: its first frame is not the greeting"
        assert ours.fileno() == -1
