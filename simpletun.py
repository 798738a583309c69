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

WARNING: this tunnel protects nothing. Packets cross the network in clear, and anyone
who can reach the server's port becomes a host on your private network.
"""

import argparse
import errno
import logging
import os
import select
import signal
import socket
import struct
import sys

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
TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int): read back the name and flags the fd has
IFF_TUN = 0x0001  # layer 3: the fd carries bare IP packets
IFF_TAP = 0x0002  # layer 2: the fd carries whole Ethernet frames
IFF_NO_PI = 0x1000  # drop the 4-byte "packet information" header (flags, EtherType) the kernel
#                     would otherwise put before every packet: the wire carries only the packet
IFNAMSIZ = 16  # interface names are at most 15 bytes plus the terminating NUL

# struct ifreq: a 16-byte name, then a union of many request types; TUNSETIFF reads only the
# leading short (ifr_flags) of the union. The union's largest member makes the struct 40 bytes
# on 64-bit Linux; we always pass 40 so the kernel never reads past our buffer.
IFREQ_FLAGS = struct.Struct("16sH22x")

# The wire format
HEADER = struct.Struct("!H")  # the length, big-endian ("network order"), as the original's htons()
MAX_FRAME = 0xFFFF  # the largest length two bytes can state

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


class UserError(Exception):
    """A problem the user can fix: main() prints it as one line and exits 1."""


class FrameError(Exception):
    """A byte stream that breaks the wire format: it ends in the middle of a frame."""


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
    # Some kernels let a tun request attach to an existing tap device (or the reverse) and keep
    # the device's own mode: ask which one we got rather than send frames the peer cannot read.
    got = IFREQ_FLAGS.unpack(fcntl.ioctl(fd, TUNGETIFF, bytes(IFREQ_FLAGS.size)))[1]
    if got & (IFF_TUN | IFF_TAP) != flags:
        os.close(fd)
        raise UserError(explain_tunsetiff(name, flags, OSError(errno.EINVAL, "wrong mode")))
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
    """Wait for the next client and return its tuned socket."""
    sock, _ = listener.accept()
    tune_link(sock)
    log.debug("SERVER: Client connected from %s", peer_address(sock))
    return sock


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
        raise UserError("connection to %s port %d timed out after %d s"
                        % (host, port, CONNECT_TIMEOUT)) from None
    except OSError as err:
        raise UserError("cannot connect to %s port %d: %s" % (host, port, err.strerror)) from None
    tune_link(sock)
    log.debug("CLIENT: Connected to server %s", peer_address(sock))
    return sock


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
        self.pending = data[start:]
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
        raise FrameError("connection ended in the middle of a frame (%d of %d bytes)"
                         % (len(self.pending), HEADER.size + length))


# ---------------------------------------------------------------------------------------
# 5. The two directions: tap2net(), net2tap()
# ---------------------------------------------------------------------------------------

def tap2net(tunnel, out):
    """TAP2NET: read packets from the device until it is empty (or a batch is full); queue them framed."""
    for _ in range(MAX_BATCH):
        try:
            packet = os.read(tunnel.fd, MAX_DEVICE_PACKET)
        except BlockingIOError:
            return
        except OSError as err:  # EBADFD: the device was deleted under us; nothing more will come
            raise UserError("cannot read from %s: %s (was the device removed?)"
                            % (tunnel.name, err.strerror)) from None
        tunnel.tap2net += 1
        if tunnel.debug:
            log.debug("TAP2NET %d: Read %d bytes from the tap interface", tunnel.tap2net, len(packet))
        try:
            out += frame(packet)
        except FrameError as err:
            tunnel.dropped += 1
            log.warning("TAP2NET %d: dropped: %s (lower the MTU of %s)", tunnel.tap2net, err, tunnel.name)
            continue
        tunnel.tap2net_bytes += len(packet)
        if tunnel.debug:
            log.debug("TAP2NET %d: Written %d bytes to the network", tunnel.tap2net, len(packet))
        if len(out) >= OUT_LIMIT:
            return


def net2tap(tunnel, packets):
    """NET2TAP: write each packet to the device, one write per packet (the device takes one per write)."""
    for packet in packets:
        tunnel.net2tap += 1
        if tunnel.debug:
            log.debug("NET2TAP %d: Read %d bytes from the network", tunnel.net2tap, len(packet))
        if not packet:  # the kernel would refuse it; the C original would die on it
            log.debug("NET2TAP %d: skipped an empty frame", tunnel.net2tap)
            continue
        try:
            # A tun/tap write takes the whole packet or fails: there is no short write to resume.
            os.write(tunnel.fd, packet)
        except OSError as err:
            note_refusal(tunnel, len(packet), err)
            continue
        if tunnel.refusing:
            log.warning("NET2TAP %d: %s accepts packets again (%d refused before this one)",
                        tunnel.net2tap, tunnel.name, tunnel.refusing)
            tunnel.refusing = 0
        tunnel.net2tap_bytes += len(packet)
        if tunnel.debug:
            log.debug("NET2TAP %d: Written %d bytes to the tap interface", tunnel.net2tap, len(packet))


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
# 6. The select loop: relay()
# ---------------------------------------------------------------------------------------

def send_queued(sock, out):
    """Send as much of `out` as the socket takes now -- many frames in one call -- and drop what went."""
    try:
        sent = sock.send(out)
    except BlockingIOError:  # the socket buffer is full: select() tells us when it drains
        return
    del out[:sent]


def receive(sock):
    """Take what TCP has for us (b'' at end of stream), or None if nothing is there yet."""
    try:
        return sock.recv(RECV_SIZE)
    except BlockingIOError:
        return None


def relay(tunnel, sock):
    """Copy packets both ways between the device and one connection, until the connection ends.

    Returns when the peer closes cleanly; raises FrameError if it closed in the middle of a
    frame, OSError if the connection broke.
    """
    out = bytearray()  # frames read from the device, not yet taken by TCP
    deframer = Deframer()
    while True:
        # While `out` is full we stop reading the device but keep reading the socket:
        # the peer may be waiting for us to drain its data before it can drain ours.
        readers = [sock, tunnel.fd] if len(out) < OUT_LIMIT else [sock]
        writers = [sock] if out else []
        # No timeout: an idle tunnel sleeps here until there is work. (EINTR is retried for us.)
        readable, _, _ = select.select(readers, writers, [])

        if tunnel.fd in readable:
            tap2net(tunnel, out)
        if out:  # send right away, in the same wake-up: a frame never waits for the next one
            send_queued(sock, out)

        if sock in readable:
            data = receive(sock)
            if data == b"":
                deframer.close()
                return
            if data:
                net2tap(tunnel, deframer.feed(data))


# ---------------------------------------------------------------------------------------
# 7. Command line: serve(), run_client(), main()
# ---------------------------------------------------------------------------------------

def relay_until_closed(tunnel, sock, side):
    """Run relay() on one connection; log how it ended in one line; True if it ended cleanly."""
    try:
        relay(tunnel, sock)
    except FrameError as err:
        log.warning("%s: the peer vanished: %s", side, err)
        return False
    except OSError as err:
        log.warning("%s: connection lost: %s", side, err.strerror or err)
        return False
    log.warning("%s: the peer closed the connection", side)
    return True


def serve(tunnel, args):
    """Server: serve one client at a time; when it leaves, keep the device and wait for the next."""
    with listen_on(args.port) as listener:
        log.debug("SERVER: listening on port %d", args.port)
        while True:
            with accept_client(listener) as sock:
                relay_until_closed(tunnel, sock, "SERVER")
            log.debug("SERVER: waiting for the next client")


def run_client(tunnel, args):
    """Client: relay until the server goes away; exit status 0 if it closed cleanly, else 1."""
    with connect_to(args.client, args.port) as sock:
        return 0 if relay_until_closed(tunnel, sock, "CLIENT") else 1


def interface_name(text):
    """argparse type: an interface name the kernel can take (1 to 15 bytes, no '/' or spaces)."""
    size = len(text.encode())
    if not 0 < size < IFNAMSIZ:
        raise argparse.ArgumentTypeError("interface names are 1 to %d bytes long, not %d: %r"
                                         % (IFNAMSIZ - 1, size, text))
    if "/" in text or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError("interface names cannot hold '/' or spaces: %r" % text)
    return text


def port_number(text):
    """argparse type: a TCP port, 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise argparse.ArgumentTypeError("a port is a number from 1 to 65535, not %r" % text)
    return port


def parse_args(argv=None):
    """Read the command line: the original's flags, with long forms."""
    parser = argparse.ArgumentParser(
        prog="simpletun.py",
        description="A tun/tap tunnel over TCP: packets read from the device travel to the peer "
                    "as a 2-byte length and the bytes, and are written to its device.",
        epilog="example: on host A  sudo ./simpletun.py -i tun0 -s\n"
               "         on host B  sudo ./simpletun.py -i tun0 -c HOST_A\n"
               "then give both tun0 an address in one private subnet and bring them up.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--iface", metavar="NAME", type=interface_name,
                        help="tun/tap interface to use, made if it does not exist (required)")
    role = parser.add_mutually_exclusive_group()
    role.add_argument("-s", "--server", action="store_true", help="run as server: wait for a client")
    role.add_argument("-c", "--client", metavar="HOST", help="run as client: connect to HOST")
    parser.add_argument("-p", "--port", type=port_number, default=PORT,
                        help="TCP port to listen on or connect to (default %d)" % PORT)
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("-u", "--tun", dest="tap", action="store_false", help="use a TUN device (default)")
    kind.add_argument("-a", "--tap", dest="tap", action="store_true", help="use a TAP device")
    parser.set_defaults(tap=False)  # otherwise -u's store_false would make tap the default
    parser.add_argument("-d", "--debug", action="count", default=0,
                        help="log every packet, as the original did")
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.iface is None:
        parser.error("an interface name is required (-i NAME)")
    if not (args.server or args.client):
        parser.error("choose server (-s) or client (-c HOST) mode")
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
        fd, name = tun_alloc(args.iface, IFF_TAP if args.tap else IFF_TUN)
        tunnel = Tunnel(fd, name, args.tap, args.debug)
        log.debug("Successfully connected to interface %s", name)
        return serve(tunnel, args) if args.server else run_client(tunnel, args)
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
