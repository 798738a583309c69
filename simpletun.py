#!/usr/bin/env python3
"""simpletun.py -- a tun/tap tunnel over TCP, small enough to read in one sitting.

Two hosts run this script, one as server (-s) and one as client (-c HOST). Each opens a
virtual network device -- tun carries IP packets, tap carries Ethernet frames -- and the
two ends copy packets between their device and one TCP connection:

        host A                                                       host B
    +----------+  read   +---------+            +---------+  write  +----------+
    |  tun0    | ------> | TAP2NET | ---TCP---> | NET2TAP | ------> |  tun0    |
    | (device) |         | frame() |   :55555   | Deframer|         | (device) |
    |          | <------ | NET2TAP | <--------- | TAP2NET | <------ |          |
    +----------+  write  +---------+            +---------+  read   +----------+

    TAP2NET: read a packet from the device -> frame() it -> send it on the TCP connection.
    NET2TAP: receive bytes from TCP -> Deframer cuts them into packets -> write each to the device.

Wire format, the same as the original C simpletun's, so either end may be the C program:
every packet travels as a 2-byte big-endian length followed by exactly that many bytes.
Nothing else is ever sent -- no greeting, no options, no checksum (TCP has one).

    +--------+--------+------------------------------+
    |  length (2 B)   |  packet (length bytes)       |
    +--------+--------+------------------------------+

WARNING: without --tls this tunnel protects nothing. Packets cross the network in clear,
and anyone who can reach the server's port becomes a host on your private network. With
--tls the frames travel inside TLS, and only a peer holding the pinned certificate's key
gets in.

The file reads in the order a packet travels:
    1. constants   2. the device (tun_alloc)   3. the TCP link (+ 3b. TLS)
    4. framing     5. what a packet is (-dd)   6. the two directions (tap2net, net2tap)
    7. the select loop (relay)                 8. server and client
    9. the one-machine demo                    10. the command line (main)
"""

import argparse
import errno
import ipaddress
import logging
import os
import re
import select
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # not a Unix at all: main() then refuses to run, in one line
    fcntl = None

__version__ = "1.0.0"

log = logging.getLogger("simpletun")


# ---------------------------------------------------------------------------------------
# 1. Constants
# ---------------------------------------------------------------------------------------

PORT = 55555  # the original's default port

# linux/if_tun.h and linux/if.h
TUN_CLONE_DEVICE = "/dev/net/tun"  # open it, then TUNSETIFF turns the fd into one device's fd
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int): attach this fd to the device named in a struct ifreq
IFF_TUN = 0x0001  # layer 3: the fd carries bare IP packets
IFF_TAP = 0x0002  # layer 2: the fd carries whole Ethernet frames
IFF_NO_PI = 0x1000  # drop the 4-byte "packet information" header (flags, EtherType) the kernel
#                     would otherwise put before every packet: the wire carries only the packet
IFNAMSIZ = 16  # interface names are at most 15 bytes plus the terminating NUL

# struct ifreq: a 16-byte name, then a union of many request types; TUNSETIFF reads only the
# leading short (ifr_flags) of the union. The union's largest member makes the struct 40 bytes
# on 64-bit Linux; we always pass 40 so the kernel never reads past our buffer.
IFREQ_FLAGS = struct.Struct("16sH22x")

# linux/sockios.h: the requests ifconfig makes to set up an interface, on any AF_INET socket.
# Each passes a struct ifreq: the interface name, then the one field the request reads or writes.
SIOCGIFFLAGS = 0x8913  # read the interface flags (ifr_flags)
SIOCSIFFLAGS = 0x8914  # write them: we add IFF_UP
SIOCSIFADDR = 0x8916  # set the IPv4 address (ifr_addr, a struct sockaddr_in)
SIOCSIFNETMASK = 0x891C  # set the IPv4 netmask (ifr_netmask, also a struct sockaddr_in)
SIOCSIFMTU = 0x8922  # set the MTU (ifr_mtu, an int)
IFF_UP = 0x1  # the interface flag "up" (linux/if.h) -- not IFF_TUN, a tun flag with the same value
IFREQ_ADDRESS = struct.Struct("16sH2x4s16x")  # name; sockaddr_in: family, port (unused), address
IFREQ_MTU = struct.Struct("16si20x")
MIN_MTU, MAX_MTU = 68, 65535  # IPv4's smallest MTU; the largest a tun device takes

# The wire format
HEADER = struct.Struct("!H")  # the length, big-endian ("network order"), as the original's htons()
MAX_FRAME = 0xFFFF  # the largest length two bytes can state
TLS_HANDSHAKE_RECORD = b"\x16\x03"  # how a TLS connection's first bytes look, to say so when they arrive

# The largest packet a device can hand us: tun/tap MTUs stop at 65535, and a tap frame adds its
# 14-byte Ethernet header and perhaps a 4-byte VLAN tag. (The original read 2000 bytes at most.)
MAX_DEVICE_PACKET = 65535 + 14 + 4

# The relay loop
MAX_BATCH = 64  # device packets read per wake-up before we send: bounds how long NET2TAP waits
OUT_LIMIT = 256 * 1024  # bytes queued for TCP before we stop reading the device; the kernel
#                         then drops packets at the device, as a busy network card would
RECV_SIZE = 256 * 1024  # bytes taken from TCP per receive: many frames per wake-up

# Noticing a peer that vanished without a word (power cut, cable pulled): keepalive probes
# after 20 s of silence, 4 probes 5 s apart; data unacknowledged for 40 s ends the connection.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 20, 5, 4
USER_TIMEOUT_MS = 40_000
CONNECT_TIMEOUT = 10  # seconds for the client's TCP connect

# Keeping the server's one client slot from being held by a peer that is not a tunnel end
HANDSHAKE_TIMEOUT = 5  # seconds for a TLS handshake; a silent or plaintext peer is dropped after it
FIRST_FRAME_GRACE = 10  # seconds a new plaintext client may stay silent and still keep its place
#                         when another client is waiting to connect


class UserError(Exception):
    """A problem the user can fix: main() prints it as one line and exits 1."""


class FrameError(Exception):
    """A byte stream that breaks the wire format: it ends in the middle of a frame."""


class PeerRefused(Exception):
    """A connection that is not the peer we want: failed TLS handshake, or a silent client in the way."""


# ---------------------------------------------------------------------------------------
# 2. Opening the device: tun_alloc()
# ---------------------------------------------------------------------------------------

def tun_alloc(name, flags, clone_device=TUN_CLONE_DEVICE):
    """Attach to the tun/tap device `name`, creating it if needed; return (fd, name)."""
    try:
        fd = os.open(clone_device, os.O_RDWR)
    except FileNotFoundError:
        raise UserError("%s does not exist: load the tun module (modprobe tun)" % clone_device) from None
    except PermissionError:
        raise UserError("cannot open %s: run as root (or with CAP_NET_ADMIN)" % clone_device) from None
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(name.encode(), flags | IFF_NO_PI))
    except OSError as err:
        os.close(fd)
        raise UserError(explain_tunsetiff(name, flags, err)) from None
    # Non-blocking, so that TAP2NET can read "until the device is empty" and never sleep there.
    os.set_blocking(fd, False)
    return fd, IFREQ_FLAGS.unpack(ifreq)[0].rstrip(b"\0").decode()


def explain_tunsetiff(name, flags, err):
    """Turn a TUNSETIFF failure into a sentence that says what to do about it."""
    wanted = "tap" if flags & IFF_TAP else "tun"
    if err.errno == errno.EPERM:
        return "not allowed to attach to %s: run as root (or with CAP_NET_ADMIN)" % name
    if err.errno == errno.EBUSY:
        return "%s is busy: another program has it open" % name
    if err.errno == errno.EINVAL:
        found = device_kind(name)
        if found in ("tun", "tap"):
            other_flag = "-a" if found == "tap" else "-u"
            return "%s is a %s device, not %s: use %s, or another name" % (name, found, wanted, other_flag)
        if found:
            return "%s is an existing interface that is not tun/tap: choose another name" % name
    return "cannot attach to %s: %s" % (name, err.strerror)


def device_kind(name):
    """Say what the interface `name` is: 'tun', 'tap', 'other', or None if there is none."""
    try:
        with open("/sys/class/net/%s/tun_flags" % name) as f:
            return "tap" if int(f.read(), 16) & IFF_TAP else "tun"
    except FileNotFoundError:
        return "other" if os.path.exists("/sys/class/net/%s" % name) else None
    except (OSError, ValueError):
        return "other"


def configure_device(name, interface=None, mtu=None):
    """What ifconfig does: set the MTU, the IPv4 address and netmask, and bring the device up.

    `interface` is an ipaddress.IPv4Interface (address and prefix) or None; without it the
    device keeps its addresses and up/down state, and only the MTU changes if one is given.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:

        def request(code, ifreq, what):
            try:
                return fcntl.ioctl(sock, code, ifreq)
            except OSError as err:
                raise UserError("cannot set the %s of %s: %s" % (what, name, err.strerror)) from None

        ifname = name.encode()
        if mtu:
            request(SIOCSIFMTU, IFREQ_MTU.pack(ifname, mtu), "MTU %d" % mtu)
        if interface:
            request(SIOCSIFADDR, IFREQ_ADDRESS.pack(ifname, socket.AF_INET, interface.ip.packed),
                    "address %s" % interface.ip)
            request(SIOCSIFNETMASK, IFREQ_ADDRESS.pack(ifname, socket.AF_INET, interface.netmask.packed),
                    "netmask %s" % interface.netmask)
            _, flags = IFREQ_FLAGS.unpack(request(SIOCGIFFLAGS, IFREQ_FLAGS.pack(ifname, 0), "flags"))
            request(SIOCSIFFLAGS, IFREQ_FLAGS.pack(ifname, flags | IFF_UP), "flags")
    done = (["MTU %d" % mtu] if mtu else []) + (["address %s" % interface, "up"] if interface else [])
    log.debug("Configured %s: %s", name, ", ".join(done))


class Tunnel:
    """One end's device, its -d level and its counters: all the loop needs besides the link."""

    def __init__(self, fd, name, tap=False, debug=0):
        self.fd, self.name, self.tap, self.debug = fd, name, tap, debug
        self.tap2net = self.tap2net_bytes = 0  # packets and bytes device -> network
        self.net2tap = self.net2tap_bytes = 0  # packets and bytes network -> device
        self.dropped = 0  # packets lost on the way: refused by the kernel or too long for the wire
        self.refusing = 0  # refusals since the device last accepted a packet

    def summary(self):
        """One line for the end of the run: packets and bytes each way."""
        return "%s: TAP2NET %d packets (%d bytes), NET2TAP %d packets (%d bytes), %d dropped" % (
            self.name, self.tap2net, self.tap2net_bytes, self.net2tap, self.net2tap_bytes, self.dropped)


# ---------------------------------------------------------------------------------------
# 3. The TCP link: listen_on(), accept_client(), connect_to()
# ---------------------------------------------------------------------------------------

def tune_link(sock):
    """Set the options every tunnel connection needs, and make it non-blocking."""
    # Nagle's algorithm would hold a small frame back until the previous one is acknowledged,
    # and the peer delays that ACK by up to 40 ms: the original's stall on every round trip.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    # A peer that vanished without closing must not hold the server's one client slot forever.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)
    # Never let one direction block the other: the loop sends and receives only what is ready.
    sock.setblocking(False)


def listen_on(port, address=None):
    """Open the server's listening socket: on every IPv6 and IPv4 address unless one is named."""
    try:
        if address:
            family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
            return socket.create_server((address, port), family=family)
        if socket.has_dualstack_ipv6():
            return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        return socket.create_server(("", port))  # like the original, SO_REUSEADDR is set for us
    except socket.gaierror as err:
        raise UserError("cannot listen on %s: %s" % (address, err.strerror)) from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError("port %d is already in use: is another server running? "
                            "(choose another port with -p)" % port) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise UserError("cannot listen on %s: no interface has that address" % address) from None
        raise UserError("cannot listen on port %d: %s" % (port, err.strerror)) from None


def peer_address(sock):
    """The peer's IP address as a person writes it (an IPv4 client of an IPv6 socket loses '::ffff:')."""
    address = sock.getpeername()[0]
    return address[7:] if address.startswith("::ffff:") else address


def accept_client(listener):
    """Wait for the next client; return its tuned socket and its address."""
    sock, _ = listener.accept()
    try:
        tune_link(sock)
        address = peer_address(sock)
    except OSError:  # it reset the connection before we got to it
        sock.close()
        raise
    log.debug("SERVER: Client connected from %s", address)
    return sock, address


def connect_to(host, port):
    """Connect to the server and return the tuned socket (host: IPv4, IPv6 or a name)."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except socket.gaierror as err:
        raise UserError("unknown host %s: %s" % (host, err.strerror)) from None
    except ConnectionRefusedError:
        raise UserError("connection to %s port %d refused: is the server running "
                        "(simpletun.py -s)?" % (host, port)) from None
    except socket.timeout:
        raise UserError("connection to %s port %d timed out after %g s"
                        % (host, port, CONNECT_TIMEOUT)) from None
    except OSError as err:
        raise UserError("cannot connect to %s port %d: %s" % (host, port, err.strerror)) from None
    tune_link(sock)
    log.debug("CLIENT: Connected to server %s", peer_address(sock))
    return sock


# ---------------------------------------------------------------------------------------
# 3b. Optional TLS (--tls): tls_context(), secure()
#     Both ends hold a certificate and its key; each accepts exactly one certificate from the
#     other (the same one, unless --tls-peer names another). No CA, no host names: holding the
#     key is what makes a host a member of the private network.
# ---------------------------------------------------------------------------------------

PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


def tls_context(server, own_file, peer_file=None):
    """Load this end's certificate and key and the peer's certificate; return (context, peer DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # no host names: the peer is known by its certificate alone
    context.verify_mode = ssl.CERT_REQUIRED  # on the server too: the client must prove itself
    try:
        context.load_cert_chain(own_file)
    except (OSError, ssl.SSLError, ValueError) as err:
        raise UserError("--tls %s: %s" % (own_file, why_unusable(err, "a certificate and its private key"))) from None
    peer_file = peer_file or own_file
    try:
        with open(peer_file) as f:
            peer_pem = PEM_CERTIFICATE.search(f.read())
        if not peer_pem:
            raise ValueError("no certificate")
        context.load_verify_locations(cadata=peer_pem.group())
    except (OSError, ssl.SSLError, ValueError) as err:
        raise UserError("--tls-peer %s: %s" % (peer_file, why_unusable(err, "a certificate"))) from None
    return context, ssl.PEM_cert_to_DER_cert(peer_pem.group())


def why_unusable(err, should_hold):
    """Why a --tls/--tls-peer file cannot be used, in words."""
    if isinstance(err, FileNotFoundError):
        return "no such file"
    if isinstance(err, PermissionError):
        return "cannot read it (permission denied)"
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError):
        return err.strerror or str(err)
    return "not a PEM file holding %s (see the README: Encryption)" % should_hold


# What OpenSSL's reasons mean for someone setting up a tunnel
TLS_HINTS = (
    (("CERTIFICATE_VERIFY_FAILED",),
     "the peer's certificate is not the one this end accepts (give both ends the same --tls file, "
     "or name the peer's certificate with --tls-peer)"),
    (("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED"),
     "the peer does not accept this end's certificate (give both ends the same --tls file, "
     "or name this end's certificate with --tls-peer there)"),
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE",), "the peer sent no certificate"),
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"),
     "the peer does not speak TLS: is it running without --tls?"),
)


def explain_tls(err):
    """One line for a TLS failure: what OpenSSL said, and what it probably means."""
    reason = getattr(err, "reason", None) or ""
    for reasons, hint in TLS_HINTS:
        if any(r in reason for r in reasons):
            return "TLS failed (%s): %s" % (reason.lower().replace("_", " "), hint)
    if isinstance(err, (ssl.SSLEOFError, ConnectionError)) or "EOF" in reason:
        return "the peer closed the connection during the TLS handshake: does it run with --tls, " \
               "and does it accept this end's certificate?"
    return "TLS failed: %s" % (reason.lower().replace("_", " ") or err)


def secure(sock, tls, server_side):
    """Run the TLS handshake on a new connection, within HANDSHAKE_TIMEOUT, and check that the peer's
    certificate is the pinned one; return the TLS socket, non-blocking like the plain one."""
    context, peer_certificate = tls
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        tls_sock = context.wrap_socket(sock, server_side=server_side)
    except socket.timeout:
        raise PeerRefused("no TLS handshake within %d s: does the peer run with --tls?" % HANDSHAKE_TIMEOUT) from None
    except OSError as err:  # ssl.SSLError included
        raise PeerRefused(explain_tls(err)) from None
    # The chain check above accepts any certificate the pinned one signed; we want that one only.
    if tls_sock.getpeercert(binary_form=True) != peer_certificate:
        tls_sock.close()
        raise PeerRefused("the peer's certificate is not the pinned one (--tls-peer)")
    tls_sock.setblocking(False)
    log.debug("%s: %s with the pinned peer, %s", "SERVER" if server_side else "CLIENT",
              tls_sock.version(), tls_sock.cipher()[0])
    return tls_sock


# ---------------------------------------------------------------------------------------
# 4. Framing: frame(), Deframer -- no I/O here, so tests can call them directly
# ---------------------------------------------------------------------------------------

def frame(packet):
    """Prefix a packet with its 2-byte length: the bytes that go on the wire."""
    if len(packet) > MAX_FRAME:
        raise FrameError("a %d-byte packet does not fit the 2-byte length of the wire format"
                         % len(packet))
    return HEADER.pack(len(packet)) + packet


class Deframer:
    """Cut a TCP byte stream back into packets: feed() it bytes as they come, get whole packets.

    TCP keeps no message boundaries: one receive may end inside a frame, or hold many.
    Between receives we keep only the unfinished frame at the end (`pending`), so the
    memory held never exceeds one maximum frame.
    """

    def __init__(self):
        self.pending = b""  # the start of a frame whose end has not arrived yet
        self.frames = 0  # whole frames cut so far

    def feed(self, data):
        """Add received bytes; return the packets they completed (maybe none, maybe many).

        The packets are memoryviews into the received bytes: cutting them copies nothing.
        """
        if self.pending:
            data = self.pending + data
        view = memoryview(data)
        packets, start = [], 0
        while len(data) - start >= HEADER.size:
            (length,) = HEADER.unpack_from(data, start)
            end = start + HEADER.size + length
            if end > len(data):
                break
            packets.append(view[start + HEADER.size:end])
            start = end
        self.pending = bytes(data[start:])  # a copy: `data` may be a buffer the next receive reuses
        self.frames += len(packets)
        return packets

    def close(self):
        """The stream has ended: raise FrameError if it ended in the middle of a frame."""
        if not self.pending:
            return
        if len(self.pending) < HEADER.size:
            raise FrameError("connection ended in the middle of a frame header (%d of 2 bytes)"
                             % len(self.pending))
        (length,) = HEADER.unpack_from(self.pending)
        # A TLS handshake record starts 16 03: read as a length, a frame that never completes.
        tls = self.frames == 0 and self.pending.startswith(TLS_HANDSHAKE_RECORD)
        raise FrameError("connection ended in the middle of a frame (%d of %d bytes)%s"
                         % (len(self.pending), HEADER.size + length,
                            "; it began like a TLS handshake: does the peer run with --tls, and this "
                            "end without?" if tls else ""))


# ---------------------------------------------------------------------------------------
# 5. Saying what a packet is, for -dd: describe()
#    Only called when -dd is on; bad or cut-off bytes get an honest description, never an error.
# ---------------------------------------------------------------------------------------

ETHERNET = struct.Struct("!6s6sH")  # destination MAC, source MAC, EtherType
ARP = struct.Struct("!HHBBH6s4s6s4s")  # hardware/protocol types and sizes, op, sender/target MAC and IP
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # version+IHL, TOS, total length, id, flags+fragment, TTL, proto, sum, src, dst
IPV6 = struct.Struct("!IHBB16s16s")  # version+class+flow, payload length, next header, hop limit, src, dst
PORTS = struct.Struct("!HH")  # the source and destination ports that start TCP and UDP headers

ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6 = 0x0800, 0x0806, 0x86DD
ARP_REQUEST, ARP_REPLY = 1, 2
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58  # IP protocol numbers
IPV6_EXTENSION_HEADERS = {0: "hop-by-hop", 43: "routing", 60: "destination-options"}
IPV6_FRAGMENT = 44

ICMP_TYPES = {0: "echo-reply", 3: "destination-unreachable", 5: "redirect", 8: "echo-request",
              11: "time-exceeded"}
ICMPV6_TYPES = {1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded",
                128: "echo-request", 129: "echo-reply", 133: "router-solicitation",
                134: "router-advertisement", 135: "neighbor-solicitation",
                136: "neighbor-advertisement", 143: "multicast-listener-report"}
TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x08, "PSH"), (0x01, "FIN"), (0x04, "RST"), (0x20, "URG"))


def describe(packet, tap):
    """One line saying what a packet is: an Ethernet frame (tap) or an IP packet (tun)."""
    packet = bytes(packet)
    return describe_ethernet(packet) if tap else describe_ip(packet)


def describe_ethernet(frame):
    if len(frame) < ETHERNET.size:
        return "Ethernet truncated header (%d bytes)" % len(frame)
    destination, source, ethertype = ETHERNET.unpack_from(frame)
    payload = frame[ETHERNET.size:]
    if ethertype == ETHERTYPE_ARP:
        inner = describe_arp(payload)
    elif ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6):
        inner = describe_ip(payload)
    else:
        inner = "EtherType 0x%04x (%d bytes)" % (ethertype, len(frame))
    if destination == b"\xff" * 6:
        kind = " broadcast"
    elif destination[0] & 1:  # the group bit: IPv4/IPv6 multicast, e.g. 33:33:.. for IPv6
        kind = " multicast"
    else:
        kind = ""
    return "%s (Ethernet %s > %s%s)" % (inner, mac_text(source), mac_text(destination), kind)


def mac_text(mac):
    return ":".join("%02x" % b for b in mac)


def describe_arp(payload):
    if len(payload) < ARP.size:
        return "ARP truncated (%d bytes)" % len(payload)
    _, _, _, _, op, sender_mac, sender_ip, _, target_ip = ARP.unpack_from(payload)
    sender, target = socket.inet_ntoa(sender_ip), socket.inet_ntoa(target_ip)
    if op == ARP_REQUEST:
        return "ARP who-has %s tell %s" % (target, sender)
    if op == ARP_REPLY:
        return "ARP reply %s is-at %s" % (sender, mac_text(sender_mac))
    return "ARP operation %d" % op


def describe_ip(packet):
    version = packet[0] >> 4 if packet else None
    if version == 4:
        return describe_ipv4(packet)
    if version == 6:
        return describe_ipv6(packet)
    return "not an IP packet (%d bytes)" % len(packet)


def describe_ipv4(packet):
    header_size = (packet[0] & 0x0F) * 4
    if len(packet) < IPV4.size or header_size < IPV4.size or len(packet) < header_size:
        return "IPv4 truncated header (%d bytes)" % len(packet)
    _, _, total, _, fragment, _, protocol, _, source, destination = IPV4.unpack_from(packet)
    addresses = "IPv4 %s > %s" % (socket.inet_ntoa(source), socket.inet_ntoa(destination))
    if fragment & 0x1FFF:  # a later fragment: its bytes continue a transport header we saw before
        return "%s fragment (%d bytes)" % (addresses, len(packet))
    payload = packet[header_size:max(total, header_size)]
    return "%s %s (%d bytes)" % (addresses, describe_transport(protocol, payload, ICMP_TYPES), len(packet))


def describe_ipv6(packet):
    if len(packet) < IPV6.size:
        return "IPv6 truncated header (%d bytes)" % len(packet)
    _, _, protocol, _, source, destination = IPV6.unpack_from(packet)
    addresses = "IPv6 %s > %s" % (socket.inet_ntop(socket.AF_INET6, source),
                                  socket.inet_ntop(socket.AF_INET6, destination))
    payload = packet[IPV6.size:]
    # Extension headers sit between the IPv6 header and the transport: skip them (MLD reports,
    # for example, carry a hop-by-hop header), each says its own length in 8-byte units.
    while protocol in IPV6_EXTENSION_HEADERS and len(payload) >= 2:
        protocol, size = payload[0], (payload[1] + 1) * 8
        payload = payload[size:]
    if protocol == IPV6_FRAGMENT:
        return "%s fragment (%d bytes)" % (addresses, len(packet))
    return "%s %s (%d bytes)" % (addresses, describe_transport(protocol, payload, ICMPV6_TYPES), len(packet))


def describe_transport(protocol, payload, icmp_types):
    """The part of an IP packet's line that says what it carries: TCP, UDP, ICMP or ICMPv6."""
    if protocol in (ICMP, ICMPV6):
        name = "ICMP" if protocol == ICMP else "ICMPv6"
        if len(payload) < 8:
            return "%s truncated (%d bytes)" % (name, len(payload))
        kind, code = payload[0], payload[1]
        text = "%s %s" % (name, icmp_types.get(kind, "type %d code %d" % (kind, code)))
        if icmp_types.get(kind, "").startswith("echo"):  # echo request/reply carry an id and a sequence
            identifier, sequence = PORTS.unpack_from(payload, 4)
            text += " id=%d seq=%d" % (identifier, sequence)
        elif protocol == ICMPV6 and icmp_types.get(kind, "").startswith("neighbor") and len(payload) >= 24:
            # neighbor solicitation/advertisement: IPv6's ARP; the target address follows
            text += " " + socket.inet_ntop(socket.AF_INET6, payload[8:24])
        return text
    if protocol == TCP:
        if len(payload) < 20:
            return "TCP truncated header (%d bytes)" % len(payload)
        source, destination = PORTS.unpack_from(payload)
        flags = ",".join(name for bit, name in TCP_FLAGS if payload[13] & bit) or "none"
        data = len(payload) - (payload[12] >> 4) * 4
        return "TCP %d > %d [%s] len=%d" % (source, destination, flags, max(data, 0))
    if protocol == UDP:
        if len(payload) < 8:
            return "UDP truncated header (%d bytes)" % len(payload)
        source, destination = PORTS.unpack_from(payload)
        return "UDP %d > %d len=%d" % (source, destination, len(payload) - 8)
    return "protocol %d" % protocol


# ---------------------------------------------------------------------------------------
# 6. The two directions: tap2net(), net2tap()
# ---------------------------------------------------------------------------------------

def tap2net(tunnel, out):
    """TAP2NET: read packets from the device until it is empty (or a batch is full); queue them framed."""
    fd, debug = tunnel.fd, tunnel.debug  # looked up once per batch, not once per packet
    for _ in range(MAX_BATCH):
        try:
            packet = os.read(fd, MAX_DEVICE_PACKET)
        except BlockingIOError:
            return
        except OSError as err:  # EBADFD: the device was deleted under us; nothing more will come
            raise UserError("cannot read from %s: %s (was the device removed?)"
                            % (tunnel.name, err.strerror)) from None
        size = len(packet)
        tunnel.tap2net += 1
        if debug:
            log.debug("TAP2NET %d: Read %d bytes from the tap interface", tunnel.tap2net, size)
            if debug > 1:
                log.debug("TAP2NET %d: %s", tunnel.tap2net, describe(packet, tunnel.tap))
        try:
            out += frame(packet)
        except FrameError as err:
            tunnel.dropped += 1
            log.warning("TAP2NET %d: dropped: %s (lower the MTU of %s)", tunnel.tap2net, err, tunnel.name)
            continue
        tunnel.tap2net_bytes += size
        if debug:
            log.debug("TAP2NET %d: Written %d bytes to the network", tunnel.tap2net, size)
        if len(out) >= OUT_LIMIT:
            return


def net2tap(tunnel, packets):
    """NET2TAP: write each packet to the device, one write per packet (the device takes one per write)."""
    fd, debug = tunnel.fd, tunnel.debug
    for packet in packets:
        size = len(packet)
        tunnel.net2tap += 1
        if debug:
            log.debug("NET2TAP %d: Read %d bytes from the network", tunnel.net2tap, size)
            if debug > 1 and size:
                log.debug("NET2TAP %d: %s", tunnel.net2tap, describe(packet, tunnel.tap))
        if not size:  # the kernel would refuse it; the C original would die on it
            if debug:
                log.debug("NET2TAP %d: skipped an empty frame", tunnel.net2tap)
            continue
        try:
            # A tun/tap write takes the whole packet or fails: there is no short write to resume.
            os.write(fd, packet)
        except OSError as err:
            note_refusal(tunnel, size, err)
            continue
        if tunnel.refusing:
            log.warning("NET2TAP %d: %s accepts packets again (%d refused before this one)",
                        tunnel.net2tap, tunnel.name, tunnel.refusing)
            tunnel.refusing = 0
        tunnel.net2tap_bytes += size
        if debug:
            log.debug("NET2TAP %d: Written %d bytes to the tap interface", tunnel.net2tap, size)


REFUSAL_HINTS = {
    errno.EIO: "is the device down? (ip link set %s up)",
    errno.EINVAL: "not a packet the device can carry (garbage, or the peer uses the other mode: -u/-a)",
}


def note_refusal(tunnel, size, err):
    """Count a packet the kernel would not take; warn at the first of a run, not for every packet."""
    tunnel.dropped += 1
    tunnel.refusing += 1
    if tunnel.refusing == 1:
        hint = REFUSAL_HINTS.get(err.errno, "").replace("%s", tunnel.name)
        log.warning("NET2TAP %d: %s refused a %d-byte packet: %s%s; dropping packets until it accepts one",
                    tunnel.net2tap, tunnel.name, size, err.strerror, " -- " + hint if hint else "")


# ---------------------------------------------------------------------------------------
# 7. The select loop: relay()
# ---------------------------------------------------------------------------------------

# "Not now, ask select() again": a full or empty socket, or (TLS) an incomplete record
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def send_queued(sock, out):
    """Send as much of `out` as the socket takes now -- many frames in one call -- and drop what went."""
    try:
        sent = sock.send(out)
    except WOULD_BLOCK:  # the socket buffer is full: select() tells us when it drains
        return
    del out[:sent]


def receive(sock, inbox):
    """Receive into `inbox`, a memoryview reused for every receive; return the part filled
    (empty at the end of the stream), or None if nothing is there yet."""
    try:
        return inbox[:sock.recv_into(inbox)]
    except WOULD_BLOCK:
        return None


def decrypted_waiting(sock):
    """Bytes a TLS socket has already decrypted: select() cannot see them, the kernel has no more."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


def relay(tunnel, sock, listener=None):
    """Copy packets both ways between the device and one connection, until the connection ends.

    Returns when the peer closes cleanly; raises FrameError if it closed in the middle of a
    frame, OSError if the connection broke. With `listener` (a server's plaintext client),
    raises PeerRefused if the client sent no frame in FIRST_FRAME_GRACE s and another is waiting.
    """
    out = bytearray()  # frames read from the device, not yet taken by TCP
    deframer = Deframer()
    # One receive buffer for the whole connection: a new 256 KiB object per receive costs page
    # faults and cold caches (5 % more CPU per packet in tunnel-bench).
    inbox = memoryview(bytearray(RECV_SIZE))
    grace_ends = time.monotonic() + FIRST_FRAME_GRACE
    while True:
        # While `out` is full we stop reading the device but keep reading the socket:
        # the peer may be waiting for us to drain its data before it can drain ours.
        readers = [sock, tunnel.fd] if len(out) < OUT_LIMIT else [sock]
        writers = [sock] if out else []
        # No timeout: an idle tunnel sleeps here until there is work. (EINTR is retried for us.)
        # Only TLS bytes already decrypted, or a silent new client's grace, set one.
        timeout = 0 if decrypted_waiting(sock) else None
        if listener and not deframer.frames:  # a plaintext client that has not sent a frame yet
            grace_left = grace_ends - time.monotonic()
            if grace_left > 0:
                timeout = grace_left if timeout is None else timeout
            else:  # from now on, a client waiting to connect takes the silent one's place
                readers.append(listener)
        readable, _, _ = select.select(readers, writers, [], timeout)

        if tunnel.fd in readable:
            tap2net(tunnel, out)
        if out:  # send right away, in the same wake-up: a frame never waits for the next one
            send_queued(sock, out)

        if sock in readable or decrypted_waiting(sock):
            data = receive(sock, inbox)
            if data is not None and not data:  # the end of the stream
                deframer.close()
                return
            if data:
                net2tap(tunnel, deframer.feed(data))

        if listener in readable and not deframer.frames:
            raise PeerRefused("dropped a client that sent no frame in %d s: another client is waiting"
                              % FIRST_FRAME_GRACE)


# ---------------------------------------------------------------------------------------
# 8. Server and client: serve(), run_client()
# ---------------------------------------------------------------------------------------

def relay_until_closed(tunnel, sock, side, listener=None):
    """Run relay() on one connection; log how it ended in one line; True if it ended cleanly."""
    try:
        relay(tunnel, sock, listener)
    except FrameError as err:
        log.warning("%s: the peer vanished: %s", side, err)
        return False
    except PeerRefused as err:
        log.warning("%s: %s", side, err)
        return False
    except ssl.SSLError as err:  # TLS 1.3: a client learns only now that the server refused its certificate
        log.warning("%s: %s", side, explain_tls(err))
        return False
    except OSError as err:
        log.warning("%s: connection lost: %s", side, err.strerror or err)
        return False
    log.warning("%s: the peer closed the connection", side)
    return True


def serve(tunnel, args, tls=None):
    """Server: serve one client at a time; when it leaves, keep the device and wait for the next."""
    with listen_on(args.port, args.bind) as listener:
        log.debug("SERVER: listening on port %d", args.port)
        while True:
            try:
                sock, address = accept_client(listener)
            except OSError as err:
                log.warning("SERVER: a client left before its connection started: %s", err.strerror or err)
                continue
            with sock:
                if tls:
                    try:
                        sock = secure(sock, tls, server_side=True)
                    except PeerRefused as err:
                        log.warning("SERVER: refused %s: %s", address, err)
                        continue
                # A client that proved itself with TLS keeps its place; a plaintext one must send a frame.
                with sock:
                    relay_until_closed(tunnel, sock, "SERVER", listener=None if tls else listener)
            log.debug("SERVER: waiting for the next client")


def run_client(tunnel, args, tls=None):
    """Client: relay until the server goes away; exit status 0 if it closed cleanly, else 1."""
    with connect_to(args.client, args.port) as sock:
        if tls:
            try:
                sock = secure(sock, tls, server_side=False)
            except PeerRefused as err:
                raise UserError("CLIENT: %s" % err) from None
        with sock:
            closed_cleanly = relay_until_closed(tunnel, sock, "CLIENT")
            if not tunnel.net2tap and not tls:
                log.warning("CLIENT: the server sent nothing before it closed: if it runs with --tls, "
                            "this end needs --tls too")
            return 0 if closed_cleanly else 1


# ---------------------------------------------------------------------------------------
# 9. The whole tunnel on one machine: demo()
#    Two network namespaces stand in for two hosts, a veth pair for the cable between them.
# ---------------------------------------------------------------------------------------

DEMO_PREFIX = "simpletun-demo-"  # namespaces are named DEMO_PREFIX + our pid + "-s" / "-c"
DEMO_UNDERLAY = {"server": "192.0.2.1/24", "client": "192.0.2.2/24"}  # the "physical" network
DEMO_TUNNEL = {"server": "10.0.0.1/24", "client": "10.0.0.2/24"}  # the private network
DEMO_PINGS = 3
DEMO_WAIT = 10  # seconds for each end to come up
ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


def internet_checksum(data):
    """The ones' complement sum of 16-bit words that IP, ICMP, TCP and UDP use (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(address, count=DEMO_PINGS, timeout=2.0):
    """Send ICMP echo requests to `address`, print each reply; return how many came back.

    What the ping command does, with a raw socket (root only): the demo cannot count on
    ping being installed.
    """
    identifier = os.getpid() & 0xFFFF
    replies = 0
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for sequence in range(1, count + 1):
            payload = b"simpletun.py demo, echo request %d" % sequence
            header = ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, identifier, sequence)
            checksum = internet_checksum(header + payload)
            sent = time.monotonic()
            sock.sendto(ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, checksum, identifier, sequence) + payload,
                        (address, 0))
            while select.select([sock], [], [], max(0, sent + timeout - time.monotonic()))[0]:
                reply = sock.recv(65535)  # a raw socket hands us the IP header too
                kind, _, _, their_id, their_sequence = ICMP_ECHO.unpack_from(reply, (reply[0] & 0x0F) * 4)
                if (kind, their_id, their_sequence) == (ICMP_ECHO_REPLY, identifier, sequence):
                    print("reply from %s: icmp_seq=%d time=%.2f ms"
                          % (address, sequence, (time.monotonic() - sent) * 1000), flush=True)
                    replies += 1
                    break
            else:
                print("no reply from %s to icmp_seq=%d within %g s" % (address, sequence, timeout), flush=True)
            time.sleep(0.2)
    return replies


def ip_command(*args):
    """Run `ip ARGS...` (iproute2); a failure is a UserError carrying ip's own message."""
    result = subprocess.run(("ip",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    if result.returncode != 0:
        raise UserError("ip %s: %s" % (" ".join(args), result.stderr.strip()))
    return result.stdout


def remove_stale_demos():
    """Remove the namespaces of earlier demos whose process is gone (killed before it cleaned up)."""
    for line in ip_command("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(DEMO_PREFIX) or not name[len(DEMO_PREFIX):-2].isdigit():
            continue
        try:
            os.kill(int(name[len(DEMO_PREFIX):-2]), 0)
            continue  # that demo is still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, someone else's
        remove_namespace(name)
        print("demo: removed %s, left behind by an earlier demo" % name, flush=True)


def remove_namespace(name):
    """End what still runs in a demo namespace (the demo started it), then delete the namespace."""
    for pid in ip_command("netns", "pids", name).split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    ip_command("netns", "delete", name)


def echo_lines(stream, label, watch):
    """Print each line of a child's output with its side's label; set watch[text] when text is seen."""
    for line in stream:
        print("%-6s| %s" % (label, line.rstrip("\n")), flush=True)
        for text, seen in watch.items():
            if text in line:
                seen.set()


def start_labelled(namespace, label, command, watch=None):
    """Start `command` inside `namespace`; a thread prints its output labelled. Returns (process, thread)."""
    process = subprocess.Popen(["ip", "netns", "exec", namespace] + command, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, universal_newlines=True)
    thread = threading.Thread(target=echo_lines, args=(process.stdout, label, watch or {}), daemon=True)
    thread.start()
    return process, thread


def wait_to_see(seen, what, process):
    """Wait for an end to print the line that says it is ready."""
    deadline = time.monotonic() + DEMO_WAIT
    while not seen.wait(0.1):
        if process.poll() is not None or time.monotonic() > deadline:
            raise UserError("the demo's %s did not come up: see its lines above" % what)


def demo(tap):
    """--demo: build two hosts, run a server and a client, ping through the tunnel, clean up."""
    if os.geteuid() != 0:
        raise UserError("--demo needs root, to make network namespaces: sudo ./simpletun.py --demo")
    if not shutil.which("ip"):
        raise UserError("--demo needs the ip command from iproute2 (apt install iproute2)")
    remove_stale_demos()
    mode, device = ("tap", "tap0") if tap else ("tun", "tun0")
    ns = {side: "%s%d-%s" % (DEMO_PREFIX, os.getpid(), side[0]) for side in ("server", "client")}
    script = [sys.executable, os.path.abspath(__file__), "-i", device, "-dd"] + (["-a"] if tap else [])
    server_ip = DEMO_UNDERLAY["server"].split("/")[0]
    target = DEMO_TUNNEL["server"].split("/")[0]
    print("demo: two hosts, each a network namespace, joined by a veth pair (the \"physical\" network):\n"
          "demo:   server %s  veth0 %s  %s %s\n"
          "demo:   client %s  veth0 %s  %s %s\n"
          "demo: a %s tunnel joins %s and %s; the client pings %s through it."
          % (ns["server"], DEMO_UNDERLAY["server"], device, DEMO_TUNNEL["server"],
             ns["client"], DEMO_UNDERLAY["client"], device, DEMO_TUNNEL["client"],
             mode, DEMO_TUNNEL["server"], DEMO_TUNNEL["client"], target), flush=True)
    running, crossed = [], False
    try:
        for name in ns.values():
            ip_command("netns", "add", name)
        ip_command("-n", ns["server"], "link", "add", "veth0", "type", "veth",
                   "peer", "name", "veth0", "netns", ns["client"])
        for side, name in ns.items():
            ip_command("-n", name, "addr", "add", DEMO_UNDERLAY[side], "dev", "veth0")
            ip_command("-n", name, "link", "set", "veth0", "up")
            ip_command("-n", name, "link", "set", "lo", "up")

        listening = threading.Event()
        running.append(start_labelled(ns["server"], "server", script + ["-s", "--addr", DEMO_TUNNEL["server"]],
                                      {"SERVER: listening": listening}))
        wait_to_see(listening, "server", running[-1][0])
        connected = threading.Event()
        running.append(start_labelled(ns["client"], "client", script + ["-c", server_ip, "--addr",
                                                                         DEMO_TUNNEL["client"]],
                                      {"CLIENT: Connected": connected}))
        wait_to_see(connected, "client", running[-1][0])

        pinger = [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import simpletun; "
                  "sys.exit(simpletun.ping(%r) != %d)" % (os.path.dirname(os.path.abspath(__file__)),
                                                           target, DEMO_PINGS)]
        process, thread = start_labelled(ns["client"], "ping", pinger)
        crossed = process.wait() == 0
        thread.join()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: clean up all the same, and say so
        print("demo: interrupted", flush=True)
        return 1
    finally:
        for process, _ in running:  # both ends print their summary line on SIGTERM
            if process.poll() is None:
                process.terminate()
        for process, thread in running:
            try:
                process.wait(DEMO_WAIT)
            except subprocess.TimeoutExpired:
                process.kill()
            thread.join(DEMO_WAIT)
        for name in ns.values():
            if name in ip_command("netns", "list"):
                remove_namespace(name)
        print("demo: removed both namespaces and everything in them", flush=True)
    if crossed:
        print("demo: all %d echo requests crossed the tunnel and their replies came back" % DEMO_PINGS)
        return 0
    print("demo: FAILED: not every echo request came back through the tunnel")
    return 1


# ---------------------------------------------------------------------------------------
# 10. The command line: parse_args(), main()
# ---------------------------------------------------------------------------------------

def interface_name(text):
    """argparse type: an interface name the kernel can take (1 to 15 bytes, no '/' or spaces)."""
    size = len(text.encode())
    if not 0 < size < IFNAMSIZ:
        raise argparse.ArgumentTypeError("interface names are 1 to %d bytes long, not %d: %r"
                                         % (IFNAMSIZ - 1, size, text))
    if "/" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("interface names cannot hold '/' or spaces: %r" % text)
    return text


def number_between(low, high, name):
    """An argparse type: a whole number from `low` to `high`, called `name` in the error."""
    def parse(text):
        try:
            number = int(text)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError("%s is a number from %d to %d, not %r" % (name, low, high, text))
        return number
    return parse


def ipv4_interface(text):
    """argparse type: an IPv4 address with its prefix length, e.g. 10.0.0.1/24."""
    try:
        if "/" not in text:
            raise ValueError
        return ipaddress.IPv4Interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an IPv4 address/prefix such as 10.0.0.1/24: %r" % text) from None


def parse_args(argv=None):
    """Read the command line: the original's flags, with long forms."""
    parser = argparse.ArgumentParser(
        prog="simpletun.py",
        description="A tun/tap tunnel over TCP: each packet read from the device travels to the\n"
                    "peer as a 2-byte length and the packet, and is written to the peer's device.",
        epilog="examples:\n"
               "  sudo ./simpletun.py --demo                                 the whole tunnel on this machine\n"
               "  sudo ./simpletun.py -i tun0 -s --addr 10.0.0.1/24          on host A\n"
               "  sudo ./simpletun.py -i tun0 -c HOST_A --addr 10.0.0.2/24   on host B, then: ping 10.0.0.1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--iface", metavar="NAME", type=interface_name,
                        help="tun/tap interface to use, made if it does not exist (required)")
    role = parser.add_mutually_exclusive_group()
    role.add_argument("-s", "--server", action="store_true", help="run as server: wait for a client")
    role.add_argument("-c", "--client", metavar="HOST", help="run as client: connect to HOST")
    parser.add_argument("-p", "--port", type=number_between(1, 65535, "a port"), default=PORT,
                        help="TCP port to listen on or connect to (default %d)" % PORT)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("-u", "--tun", dest="tap", action="store_false", help="use a TUN device (default)")
    kind.add_argument("-a", "--tap", dest="tap", action="store_true", help="use a TAP device")
    parser.set_defaults(tap=False)  # otherwise -u's store_false would make tap the default
    parser.add_argument("--addr", metavar="CIDR", type=ipv4_interface,
                        help="give the device this IPv4 address/prefix (e.g. 10.0.0.1/24) and bring it up")
    parser.add_argument("--mtu", metavar="N", type=number_between(MIN_MTU, MAX_MTU, "an MTU"),
                        help="set the device's MTU (%d-%d)" % (MIN_MTU, MAX_MTU))
    parser.add_argument("-d", "--debug", action="count", default=0,
                        help="log every packet, as the original did; -dd also says what each packet is")
    parser.add_argument("--tls", metavar="FILE",
                        help="encrypt and authenticate with TLS: FILE is one PEM file holding this end's "
                             "certificate and private key (see the README: Encryption)")
    parser.add_argument("--tls-peer", metavar="CERT",
                        help="with --tls: the peer's certificate, the only one accepted "
                             "(default: the certificate in the --tls FILE)")
    parser.add_argument("--bind", metavar="ADDR",
                        help="server: listen on this address only (default: all addresses)")
    parser.add_argument("--demo", action="store_true",
                        help="show the whole tunnel on this machine: two network namespaces, a server, "
                             "a client and pings through the tunnel, then clean up (root; add -a for tap)")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.demo:
        if args.iface or args.server or args.client or args.addr:
            parser.error("--demo sets up both ends itself: use it alone, or with -a for tap mode")
        return args
    if args.iface is None:
        parser.error("an interface name is required (-i NAME)")
    if not (args.server or args.client):
        parser.error("choose server (-s) or client (-c HOST) mode")
    if args.tls_peer and not args.tls:
        parser.error("--tls-peer needs --tls FILE (this end's certificate and key)")
    if args.bind and not args.server:
        parser.error("--bind is for the server (-s)")
    return args


def main(argv=None):
    """Run one end of the tunnel; return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if args.debug else logging.WARNING)
    # SIGTERM ends the run like Ctrl-C: devices closed, summary printed, status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tunnel = None
    try:
        if not sys.platform.startswith("linux") or fcntl is None:
            raise UserError("simpletun.py runs on Linux only (it needs /dev/net/tun); this is %s"
                            % sys.platform)
        if args.demo:
            return demo(args.tap)
        tls = tls_context(args.server, args.tls, args.tls_peer) if args.tls else None
        fd, name = tun_alloc(args.iface, IFF_TAP if args.tap else IFF_TUN)
        tunnel = Tunnel(fd, name, args.tap, args.debug)
        log.debug("Successfully connected to interface %s", name)
        if args.addr or args.mtu:
            configure_device(name, args.addr, args.mtu)
        return serve(tunnel, args, tls) if args.server else run_client(tunnel, args, tls)
    except KeyboardInterrupt:
        return 0
    except UserError as err:
        print("simpletun.py: error: %s" % err, file=sys.stderr)
        return 1
    except Exception as err:  # a bug, not bad input: one line, and the traceback only with -d
        if args.debug:
            log.exception("unexpected error")
        print("simpletun.py: unexpected error: %s: %s" % (type(err).__name__, err), file=sys.stderr)
        return 1
    finally:
        if tunnel:
            os.close(tunnel.fd)
            print("simpletun.py: " + tunnel.summary(), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
