#!/usr/bin/env python3
"""simpletun.py -- a tun/tap tunnel over TCP, small enough to read in one sitting.

Two hosts run this script, one as server (-s) and one as client (-c HOST). Each opens a
virtual network device -- tun carries IP packets, tap carries Ethernet frames -- and the
two ends copy packets between their device and one TCP connection:

        host A                                                     host B
    +----------+  read  +---------+             +---------+  write  +----------+
    |  tun0    | -----> | TAP2NET | ---TCP----> | NET2TAP | ------> |  tun0    |
    | (device) | <----- | NET2TAP | <---------- | TAP2NET | <------ | (device) |
    +----------+  write +---------+   :55555    +---------+  read   +----------+

Wire format, the same as the original C simpletun's, so either end may be the C program:
every packet travels as a 2-byte big-endian length followed by exactly that many bytes.

    +--------+--------+------------------------------+
    |  length (2 B)   |  packet (length bytes)       |
    +--------+--------+------------------------------+

The lines down to the "# ====" banner are the whole tunnel, the original's program in
Python; they run alone. Below the banner come the extras, each attached through a seam
the tunnel offers. WARNING: the tunnel alone protects nothing: packets cross in clear.
"""

import argparse
import contextlib
import errno
import logging
import os
import selectors
import signal
import socket
import struct
import sys

if not sys.platform.startswith("linux"):
    sys.exit("simpletun.py: error: simpletun.py runs on Linux only (it needs /dev/net/tun); this is "
             + sys.platform)
import fcntl  # noqa: E402 (Linux only: see above)

log = logging.getLogger("simpletun")

PORT = 55555  # the original's default port
HEADER = struct.Struct("!H")  # the wire format's length: 2 bytes, big-endian ("network order")

# linux/if_tun.h: open /dev/net/tun, then TUNSETIFF turns the fd into one device's fd
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int): attach this fd to the device named in a struct ifreq
IFF_TUN = 0x0001  # layer 3: the fd carries bare IP packets
IFF_TAP = 0x0002  # layer 2: the fd carries whole Ethernet frames
IFF_NO_PI = 0x1000  # no 4-byte "packet information" before each packet: we carry the packet alone
# struct ifreq: a 16-byte name, then a union whose first member (ifr_flags) TUNSETIFF reads; the
# union makes the struct 40 bytes on 64-bit Linux, and we pass 40 so the kernel never reads past it.
IFREQ_FLAGS = struct.Struct("16sH22x")

# The longest packet a frame's length can state, and the most we read from the device at once:
# the kernel takes MTUs up to 65535 for tun and 65535 - 14 for tap, whose frames add a 14-byte
# Ethernet header. (The original read at most 2000 bytes into a buffer of 2000, and overflowed.)
MAX_PACKET = 65535
MAX_BATCH = 64  # device packets read per wake-up before we send: bounds how long NET2TAP waits
OUT_LIMIT = 256 * 1024  # bytes queued for TCP before we stop reading the device; the kernel then
#                         drops packets at the device, as a busy network card would
RECV_SIZE = 256 * 1024  # the receive buffer: many frames per receive
CONNECT_TIMEOUT = 10  # seconds for the client's TCP connect


class UserError(Exception):
    """A problem the user can fix: run() prints it as one line and exits 1."""


class LinkEnded(Exception):
    """The link to the peer cannot go on (it ended in the middle of a frame, or an extra found
    something wrong); the message says why. The tunnel itself goes on: a server serves the next."""


# ---- The device: tun_alloc(), Tunnel -----------------------------------------------------

HINTS = {errno.ENOENT: "no such file: load the tun module (modprobe tun)",  # what an errno means here
         errno.EACCES: "permission denied: run as root (or with CAP_NET_ADMIN)",
         errno.EPERM: "not allowed: run as root (or with CAP_NET_ADMIN)",
         errno.EINVAL: "it exists and is not a device of this kind (tun: -u, tap: -a)",
         errno.EBUSY: "another program has it open (is another simpletun.py running on it?)"}


def tun_alloc(name, flags, clone_device="/dev/net/tun"):
    """Attach to the tun/tap device `name`, creating it if needed; return (fd, its name)."""
    try:
        fd = os.open(clone_device, os.O_RDWR)
    except OSError as err:
        raise UserError("cannot open %s: %s" % (clone_device, HINTS.get(err.errno, err.strerror))) from None
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(name.encode(), flags | IFF_NO_PI))
    except OSError as err:
        os.close(fd)
        raise UserError("cannot attach to %s: %s" % (name, HINTS.get(err.errno, err.strerror))) from None
    os.set_blocking(fd, False)  # so that TAP2NET can read "until the device is empty"
    return fd, IFREQ_FLAGS.unpack(ifreq)[0].rstrip(b"\0").decode()


class Tunnel:
    """One end's device, its -d level and its counters: all the loop needs besides the link."""

    def __init__(self, fd, name, debug=0, read_size=MAX_PACKET):
        self.fd, self.name, self.debug, self.read_size = fd, name, debug, read_size
        self.tap2net = self.net2tap = self.dropped = 0  # packets to the network, to the device; refused


# ---- The TCP link: tune(), listen_on(), connect_to(), Link -------------------------------

def tune(sock):
    """Set what every tunnel connection needs; return the socket."""
    # Nagle's algorithm would hold a small frame back until the previous one is acknowledged,
    # and the peer delays that ACK by up to 40 ms: the original's stall on every round trip.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)  # one direction never blocks the other: the loop moves only what is ready
    return sock


def listen_on(port, address="", family=socket.AF_INET, dual=False):
    """The server's listening socket: on every IPv4 address, as the original's (or as the caller says)."""
    try:
        return socket.create_server((address, port), family=family, dualstack_ipv6=dual)
    except OSError as err:  # socket.gaierror too (a negative errno); errno's words, not create_server's
        why = os.strerror(err.errno) if (err.errno or 0) > 0 else err.strerror or err
        raise UserError("cannot listen on %s port %d: %s" % (address or "every address", port, why)) from None


def connect_to(host, port):
    """Connect to the server; return the tuned socket (host: IPv4, IPv6 or a name)."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as err:  # socket.timeout and socket.gaierror too
        hint = ": is a server running (simpletun.py -s), over TCP?" if err.errno == errno.ECONNREFUSED else ""
        raise UserError("cannot connect to %s port %d: %s%s" % (host, port, err.strerror or err, hint)) \
            from None
    log.info("CLIENT: Connected to server %s", host)
    return tune(sock)


class Link:
    """One connection to the peer: the frames waiting to be sent, and the bytes received. TCP keeps
    no message boundaries: a receive may end inside a frame, or hold many. Each receive lands behind
    the `kept` bytes of an unfinished frame; cut() hands over the packets they complete."""

    would_block = (BlockingIOError,)  # "not now, ask select() again"

    def __init__(self, sock, address, header=HEADER, size=RECV_SIZE):
        self.sock, self.address, self.header = sock, address, header
        self.out = bytearray()  # frames read from the device, not yet taken by TCP
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.kept = 0  # bytes of an unfinished frame at the front of the buffer
        self.ended = False  # the peer closed its side in an orderly way

    def send_queued(self):
        """Send as much of the queued frames as the socket takes now -- many in one call."""
        try:
            del self.out[:self.sock.send(self.out)]
        except self.would_block:  # the socket buffer is full: select() says when it drains
            pass

    def receive(self):
        """Receive behind the kept bytes; return the count (0: the stream ended), None if nothing came."""
        try:
            return self.sock.recv_into(self.view[self.kept:])
        except self.would_block:
            return None

    def cut(self, count):
        """Yield the packets the kept bytes and `count` new ones complete, as views of the buffer."""
        end, start, size = self.kept + count, 0, self.header.size
        while end - start >= size:
            (length,) = self.header.unpack_from(self.buffer, start)
            if start + size + length > end:
                break
            start += size + length
            if length:  # an empty frame carries no packet (the device would refuse it): skip it
                yield self.view[start - length:start]
        self.kept = end - start
        self.view[:self.kept] = self.view[start:end]  # the next frame's start: to the front

    def finish(self):
        """The stream has ended: in an orderly way, unless in the middle of a frame."""
        if self.kept:
            raise LinkEnded("connection ended in the middle of a frame (%d bytes of it came)" % self.kept)
        self.ended = True

    def close(self):
        """The connection is over: close it."""
        self.sock.close()


# ---- The two directions: tap2net(), net2tap() --------------------------------------------

def tap2net(tunnel, link):
    """TAP2NET: read packets from the device until it is empty (or a batch is full); send them framed."""
    fd, debug, out, header = tunnel.fd, tunnel.debug, link.out, link.header  # looked up once per batch
    for _ in range(MAX_BATCH):
        try:
            packet = os.read(fd, tunnel.read_size)
        except BlockingIOError:
            break
        except OSError as err:  # EBADFD: the device was deleted under us; nothing more will come
            raise UserError("cannot read from %s: %s" % (tunnel.name, err.strerror)) from None
        size = len(packet)
        tunnel.tap2net += 1
        out += header.pack(size)  # the length and the packet, both queued: they go in one send
        out += packet
        if debug:  # the original's words: it says "tap interface" for a tun device too
            log.debug("TAP2NET %d: Read %d bytes from the tap interface", tunnel.tap2net, size,
                      extra={"packet": packet})
            log.debug("TAP2NET %d: Written %d bytes to the network", tunnel.tap2net, size)
        if len(out) >= OUT_LIMIT:
            break
    link.send_queued()  # right away, in the same wake-up: a frame never waits for the next one


def net2tap(tunnel, link):
    """NET2TAP: receive what TCP has; write each packet it completes to the device, one write each."""
    count = link.receive()
    if count is None:  # nothing there after all
        return
    if not count:  # the end of the stream
        link.finish()
        return
    fd, debug = tunnel.fd, tunnel.debug
    for packet in link.cut(count):
        size = len(packet)
        tunnel.net2tap += 1
        if debug:
            log.debug("NET2TAP %d: Read %d bytes from the network", tunnel.net2tap, size,
                      extra={"packet": packet})
        try:
            os.write(fd, packet)  # a tun/tap write takes the whole packet or fails: no short writes
        except OSError as err:  # the device is down (EIO), or this is no packet for it (EINVAL)
            tunnel.dropped += 1  # the C original died here; we drop the packet and carry on
            log.warning("NET2TAP %d: %s refused a %d-byte packet: %s", tunnel.net2tap, tunnel.name, size,
                        err.strerror)
            continue
        if debug:
            log.debug("NET2TAP %d: Written %d bytes to the tap interface", tunnel.net2tap, size)


# ---- The select loop: relay() ------------------------------------------------------------

def relay(tunnel, link, selector):
    """Copy packets both ways between the device and the link, until the peer closes it in an orderly
    way (LinkEnded or OSError if it breaks). Each fd is registered with the function that handles it;
    the selector may watch other fds already (a server's extras do), whose handlers run here too."""
    selector.register(link.sock, selectors.EVENT_READ, lambda events: link_ready(tunnel, link, events))
    reading = writing = False  # what we watch: the device for reading, the socket for writing
    try:
        while not link.ended:
            # Read the device only while the queue has room, watch the socket for writing only while
            # frames wait. When the peer stops reading we stop reading the device but keep receiving:
            # the peer may be waiting for us to take its data before it takes ours.
            if reading != (len(link.out) < OUT_LIMIT):
                reading = not reading
                if reading:
                    selector.register(tunnel.fd, selectors.EVENT_READ, lambda events: tap2net(tunnel, link))
                else:
                    selector.unregister(tunnel.fd)
            if writing != bool(link.out):
                writing = not writing
                events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0)
                selector.modify(link.sock, events, selector.get_key(link.sock).data)
            for key, events in selector.select():  # no timeout: an idle tunnel sleeps here
                key.data(events)
    finally:
        selector.unregister(link.sock)
        if reading:
            selector.unregister(tunnel.fd)


def link_ready(tunnel, link, events):
    """The connection can move bytes: send what is queued, receive what has come."""
    if events & selectors.EVENT_WRITE:
        link.send_queued()
    if events & selectors.EVENT_READ:
        net2tap(tunnel, link)


# ---- Server and client: serve(), run_client() --------------------------------------------

def accept_client(listener):
    """Wait for the next client; return its Link."""
    sock, address = listener.accept()
    log.info("SERVER: Client connected from %s", address[0])
    return Link(tune(sock), address[0])


def serve(tunnel, listener, next_client=None, selector=None):
    """Server: serve one client at a time; when it leaves, keep the device and serve the next.

    next_client() returns the next client's Link (default: whoever connects next); the selector
    is the one the loop uses, and may watch more fds while a client is served.
    """
    with selector or selectors.DefaultSelector() as selector:
        while True:
            with contextlib.closing(next_client() if next_client else accept_client(listener)) as link:
                relay_until_closed(tunnel, link, "SERVER", selector)


def run_client(tunnel, host, port, make_link=Link):
    """Client: relay until the server goes away; exit status 0 if it closed cleanly, else 1.
    make_link(sock, address) turns the connection into a Link."""
    with contextlib.closing(make_link(connect_to(host, port), host)) as link:
        with selectors.DefaultSelector() as selector:
            return 0 if relay_until_closed(tunnel, link, "CLIENT", selector) else 1


def relay_until_closed(tunnel, link, side, selector):
    """Run relay() on one link; say how it ended in one line; True if the peer closed it in order."""
    try:
        relay(tunnel, link, selector)
    except LinkEnded as err:
        log.warning("%s: %s", side, err)
    except OSError as err:
        log.warning("%s: connection lost: %s", side, err.strerror or err)
    else:
        log.warning("%s: the peer closed the connection", side)
        return True
    return False


# ---- The command line: make_parser(), run(), main() --------------------------------------

def interface_name(text):
    """argparse type: a name the kernel takes for an interface (a struct ifreq holds 15 bytes and a NUL)."""
    if not 0 < len(text.encode()) < 16 or "/" in text or " " in text:
        raise argparse.ArgumentTypeError("an interface name is 1 to 15 bytes, no '/' or spaces: %r" % text)
    return text


def port_number(text):
    """argparse type: a TCP port."""
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise argparse.ArgumentTypeError("a port is a number from 1 to 65535, not %r" % text)
    return int(text)


def make_parser(required=True, debug_help="log every packet"):
    """The original's flags, with long forms: -i NAME, -s | -c HOST, -p PORT, -u | -a, -d, -h.
    (The extras add a demo, which needs neither interface nor role, and more levels of -d.)"""
    parser = argparse.ArgumentParser(prog="simpletun.py", description="A tun/tap tunnel over TCP.")
    parser.add_argument("-i", "--iface", metavar="NAME", type=interface_name, required=required,
                        help="tun/tap interface to use, made if it does not exist")
    role = parser.add_mutually_exclusive_group(required=required)
    role.add_argument("-s", "--server", action="store_true", help="run as server: wait for a client")
    role.add_argument("-c", "--client", metavar="HOST", help="run as client: connect to HOST")
    parser.add_argument("-p", "--port", type=port_number, default=PORT, help="TCP port (default %(default)s)")
    kind = parser.add_mutually_exclusive_group()
    kind.add_argument("-u", "--tun", dest="tap", action="store_false", default=False,
                      help="use a TUN device (default)")
    kind.add_argument("-a", "--tap", dest="tap", action="store_true", help="use a TAP device")
    parser.add_argument("-d", "--debug", action="count", default=0, help=debug_help)
    return parser


def run(start):
    """Call start(); turn how it ends into an exit status and at most one line."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM ends a run as Ctrl-C does
    try:
        return start()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the device and the connection are closed
        return 0
    except UserError as err:
        print("simpletun.py: error: %s" % err, file=sys.stderr)
        return 1
    except Exception as err:  # a bug, not bad input: one line, and the traceback only with -d
        log.debug("unexpected error", exc_info=True)
        print("simpletun.py: unexpected error: %s: %s" % (type(err).__name__, err), file=sys.stderr)
        return 1


def tunnel_end(args):
    """Open the device, then serve (-s) or connect (-c) until the end; return the exit status."""
    tunnel = Tunnel(*tun_alloc(args.iface, IFF_TAP if args.tap else IFF_TUN), args.debug)
    log.debug("Successfully connected to interface %s", tunnel.name)
    try:
        if args.client:
            return run_client(tunnel, args.client, args.port)
        with listen_on(args.port) as listener:
            log.info("SERVER: listening on port %d", args.port)
            serve(tunnel, listener)
    finally:
        os.close(tunnel.fd)


def main(argv=None):
    """Run one end of the tunnel, as the original's command line says; return the exit status."""
    args = make_parser().parse_args(argv)
    logging.basicConfig(format="%(message)s", level=logging.DEBUG if args.debug else logging.WARNING)
    return run(lambda: tunnel_end(args))


# =======================================================================================
# Everything below is an extra: each attaches to the tunnel above through a parameter,
# a subclass or a logging handler the tunnel offers, and the tunnel never calls it.
# =======================================================================================

# the extras' own imports: the tunnel above needs none of them
import collections, hashlib, heapq, hmac, ipaddress, itertools, json, math  # noqa: E401,E402
import re, select, shutil, ssl, subprocess, time  # noqa: E401,E402

__version__ = "2.0.0"


# ---- 1. The full program's link: ExtraLink --------------------------------------------------
#      One subclass of Link adds what the tunnel above leaves out: an orderly goodbye, keepalive,
#      TLS (its own "not now" errors, bytes it decrypted that select() cannot see), the -dd line
#      for each receive, and one line that says why a link ended before its first packet.

# Noticing a peer that vanished without a word (power cut, cable pulled): keepalive probes after
# 20 s of silence, 4 probes 5 s apart; data unacknowledged (or not taken) for 40 s ends the connection.
USER_TIMEOUT = 40
KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 20),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5), (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
             (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT * 1000))
GOODBYE_TIME = 2  # seconds we wait for the peer's half of an orderly close
# "Not now, ask select() again": a full or empty socket, or (TLS) an incomplete record
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
EVICTED = ("the server reset the connection before it served this end: its waiting room was full "
           "(a flood of connections?), or it stopped; start the client again")
UNSERVED = ("the server closed the connection without sending a packet: it serves one client at a "
            "time (is another one connected?), or all its --clients slots are taken, or it runs with other "
            "options (--tls, --offload, -u/-a); its log says which")


def say_once(said, key, text, *args):
    """Log a line the first time `key` comes (`said` holds the keys said so far); True if it did."""
    if key in said:
        return False
    said.add(key)
    log.warning(text, *args)
    return True


def keep_alive(sock):
    """Tune a TCP connection as the tunnel does, and let keepalive notice a vanished peer."""
    for option in KEEPALIVE:
        sock.setsockopt(*option)
    return tune(sock)


class ExtraLink(Link):
    """A Link with a goodbye, keepalive, TLS, the -dd receive line, and a reason for an early end."""

    would_block = WOULD_BLOCK

    def __init__(self, sock, address, header=HEADER, size=RECV_SIZE, debug=0, heard=False):
        super().__init__(sock, address, header, size)
        self.tls, self.debug = isinstance(sock, ssl.SSLSocket), debug
        self.heard = heard  # the peer sent something: a server admits a peer only once it has
        self.stalled = None  # since when the peer has taken none of the frames queued for it
        self.switch = None  # --clients: the Switch this client of a class belongs to
        self.away = None  # client, --reconnect: since when the server has been away

    def receive(self):
        """Link.receive(), and with TLS what it decrypted beyond; a broken link says why."""
        if self.kept == len(self.buffer):
            raise LinkEnded("a frame longer than this end's buffer (%d bytes): is the peer running "
                            "another wire format?" % self.kept)
        try:
            count = super().receive()
            while count and self.tls and self.sock.pending() and self.kept + count < len(self.buffer):
                # bytes TLS decrypted already: select() cannot see them, so take them now
                count += self.sock.recv_into(self.view[self.kept + count:])
        except OSError as err:  # ssl.SSLError too
            if isinstance(err, ConnectionResetError) and not self.heard:
                raise LinkEnded(EVICTED) from None
            raise self.lost(err) from None
        if count and not self.heard:  # (a server's links have heard already: this is a client)
            self.heard = True
            if self.away is None:
                log.warning("CLIENT: a first packet came back through the tunnel: the server serves this end")
            else:
                log.warning("CLIENT: back after %d s: a packet came back through the tunnel (--reconnect)",
                            time.monotonic() - self.away)
            if self.header is HEADER and bytes(self.view[:len(GREETING_FRAME)]) == GREETING_FRAME:
                raise LinkEnded("the peer runs with --offload, this end without: start both ends with "
                                "--offload, or neither")
        if count and self.debug > 1:
            log_receive(self, count)
        return count

    def cut(self, count):
        """Link.cut(); a client of a class (--clients) hands what is for other clients to them."""
        packets = super().cut(count)
        return packets if self.switch is None else (p for p in packets if self.switch.from_client(self, p))

    def send_queued(self):
        """Link.send_queued(), noting since when the peer has taken nothing; a broken link says why."""
        waiting = len(self.out)
        try:
            super().send_queued()
        except OSError as err:
            raise self.lost(err) from None
        if not self.out or len(self.out) < waiting:
            self.stalled = None
        elif self.stalled is None:
            self.stalled = time.monotonic()

    def lost(self, err):
        """Why the connection broke, as clearly as this end can tell."""
        if self.stalled is not None and time.monotonic() - self.stalled >= USER_TIMEOUT - 5:
            return LinkEnded("connection dropped: the peer took none of this end's data for %d s "
                             "(it stopped reading, or cannot be reached)" % USER_TIMEOUT)
        return LinkEnded(explain_tls_ending(err, self)) if isinstance(err, ssl.SSLError) else err

    def finish(self):
        """Link.finish(); a server that closes before sending anything probably served someone else."""
        super().finish()
        if not self.heard:
            raise LinkEnded(UNSERVED)

    def close(self):
        """Close without a reset: TLS close_notify, our FIN, then what comes until the peer's (a socket closed
        with unread bytes sends a reset: the peer would report a broken connection, not an orderly end)."""
        with self.sock, contextlib.suppress(OSError, ValueError):  # an error: the peer is gone already
            if self.tls:
                tls_goodbye(self.sock)
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + GOODBYE_TIME
            while select.select([self.sock], [], [], max(0, deadline - time.monotonic()))[0]:
                if not self.sock.recv(65536):
                    break


class TwoWritesLink(ExtraLink):
    """--two-writes: send as the C original does (Nagle on, length and packet apart), to see its stall."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)  # Nagle back on (tune() set it off)

    def send_queued(self):
        """Send each queued frame in two sends, as the original's two write() calls."""
        self.sock.setblocking(True)
        try:
            while self.out:
                end = self.header.size + self.header.unpack_from(self.out)[0]
                self.sock.sendall(self.out[:self.header.size])
                self.sock.sendall(self.out[self.header.size:end])
                del self.out[:end]
        finally:
            self.sock.setblocking(False)


# ---- 2. TLS (--tls): tls_context(), secure_client(), tls_goodbye() --------------------------
#      Each end holds a certificate and its key, and accepts exactly one certificate from the other
#      (its own, unless --tls-peer names another): holding the key makes a host a member. The
#      client's handshake runs in run_client's make_link; the server's in the waiting room (3).

PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
HANDSHAKE_TIMEOUT = 5  # seconds for a TLS handshake (and, with --offload, the greeting after it)
TLS_HANDSHAKE_RECORD = (b"\x16\x03\x01", b"\x16\x03\x02", b"\x16\x03\x03")  # how a ClientHello starts
OP_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0x80)  # openssl/ssl.h


def tls_context(server, own_file, peer_file=None):
    """Load this end's certificate and key and the peer's certificate; return (context, peer DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # no host names: the peer is known by its certificate alone
    context.verify_mode = ssl.CERT_REQUIRED  # on the server too: the client must prove itself
    # Some Python builds (3.10, early 3.11) tell OpenSSL 3 to take an end without close_notify as an
    # orderly one: a killed peer would look like a clean close. We want to tell the two apart.
    context.options &= ~OP_IGNORE_UNEXPECTED_EOF
    try:
        context.load_cert_chain(own_file)
    except (OSError, ssl.SSLError, ValueError) as err:
        raise UserError("--tls %s: %s" % (own_file, why_unusable(err, "a certificate and its private key"))) \
            from None
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
    if isinstance(err, OSError) and not isinstance(err, ssl.SSLError):
        return {errno.ENOENT: "no such file", errno.EACCES: "cannot read it (permission denied)"}.get(
            err.errno, err.strerror or str(err))
    return "not a PEM file holding %s (see the README: Encryption)" % should_hold


def wrap_tls(sock, tls, server_side):
    """Start TLS on a connection (the handshake runs later); a ragged end stays an error."""
    context, _ = tls
    # suppress_ragged_eofs=False: a connection that ends without close_notify was cut, not
    # closed (a killed peer, or someone forging a FIN); only close_notify is an orderly end.
    return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                               suppress_ragged_eofs=False)


def pinned(tls_sock, tls):
    """True if the peer's certificate is the pinned one (the chain check also takes any it signed)."""
    return tls_sock.getpeercert(binary_form=True) == tls[1]


# What OpenSSL's reasons mean for someone setting up a tunnel
TLS_HINTS = (
    (("CERTIFICATE_VERIFY_FAILED",),
     "the peer's certificate is not the one this end accepts (give both ends the same --tls file, "
     "or name the peer's certificate with --tls-peer)"),
    (("ALERT_CERTIFICATE_EXPIRED",),
     "the peer refused this end's certificate: it has expired (make a new one: see the README)"),
    (("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN", "CERTIFICATE_REQUIRED"),
     "the peer refused this end's certificate (give both ends the same --tls file, "
     "or name this end's certificate with --tls-peer there)"),
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE",), "the peer sent no certificate"),
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"),
     "the peer does not speak TLS: is it running without --tls?"),
)


def explain_tls(err):
    """One line for a TLS failure: what OpenSSL said, and what it probably means."""
    reason = getattr(err, "reason", None) or ""
    if getattr(err, "verify_code", None) == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
        return "TLS failed (certificate has expired): the peer's certificate has expired; make a new " \
               "one for both ends (see the README: Encryption)"
    for reasons, hint in TLS_HINTS:
        if any(r in reason for r in reasons):
            return "TLS failed (%s): %s" % (reason.lower().replace("_", " "), hint)
    if isinstance(err, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)) or "EOF" in reason:
        return "the peer closed the connection during the TLS handshake: does it run with --tls, " \
               "and does it accept this end's certificate?"
    return "TLS failed: %s" % (reason.lower().replace("_", " ") or err)


def explain_tls_ending(err, link):
    """One line for a TLS connection that ended without an orderly goodbye."""
    # the TCP connection ended with no close_notify before it: SSLEOFError, or (some Python
    # builds) an SSLError that carries OpenSSL 3's own reason for it
    if isinstance(err, ssl.SSLEOFError) or "UNEXPECTED_EOF" in (getattr(err, "reason", None) or ""):
        if not link.heard:
            return "connection lost right after the TLS handshake, with no TLS goodbye: the peer " \
                   "refused this end (is this end's certificate the one it pins, and not one signed by it?)"
        return "connection lost: the peer ended the TLS connection without a goodbye (close_notify): " \
               "it was killed, or the connection was cut"
    return explain_tls(err)


def secure_client(sock, tls):
    """Client: run the TLS handshake within HANDSHAKE_TIMEOUT and check the pinned certificate."""
    sock = wrap_tls(sock, tls, server_side=False)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    try:
        sock.do_handshake()
        why = None if pinned(sock, tls) else "the server's certificate is not the pinned one (--tls-peer)"
    except socket.timeout:
        why = "no TLS handshake within %d s: does the server run with --tls?" % HANDSHAKE_TIMEOUT
    except OSError as err:  # ssl.SSLError included
        why = explain_tls(err)
    if why:
        sock.close()
        raise UserError("CLIENT: " + why)
    sock.setblocking(False)
    log.debug("CLIENT: %s with the pinned server, %s", sock.version(), sock.cipher()[0])
    return sock


def tls_goodbye(sock):
    """Send TLS close_notify, so the peer can tell an orderly end from a cut connection."""
    # SSLWantReadError: ours is sent, theirs not here yet (waiting for it is ExtraLink.close()'s job)
    with contextlib.suppress(OSError, ValueError):  # ssl.SSLError is an OSError
        sock.unwrap()  # sends close_notify


# ---- 3. Who gets the server's one client slot: WaitingRoom ----------------------------------
#      serve()'s selector and next_client. Every connection waits, with a deadline, until it proves
#      it is a tunnel end: --tls by the pinned certificate (the newest proven takes the slot),
#      plaintext by a plausible first packet (the client served keeps it), --offload by its greeting.
#      A full room resets its longest waiting; under a flood, refusals are counted, not printed.

MAX_NEWCOMERS = 32  # connections waiting to prove themselves at once; the oldest leaves for a new one
MAX_CLOSING = 64  # connections we are saying goodbye to at once
PROOF_TIMEOUT = 5  # seconds a plaintext newcomer may stay silent while another client is served
PROOF_BYTES = {"tun": 6, "tap": 14}  # how much of a first packet tells whether it is one (see below)
REPORT_EVERY = 10  # seconds: refusals of a kind after the first are summed up this often


class Newcomer:
    """A connection that has not proven itself yet."""

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.arrived = time.monotonic()
        self.handshaking = isinstance(sock, ssl.SSLSocket)
        self.head = b""  # the first bytes it sent, until they decide


def plain_address(address):
    """An IP address as a person writes it (an IPv4 client of an IPv6 socket loses '::ffff:')."""
    return address[7:] if address.startswith("::ffff:") else address


class WaitingRoom(selectors.DefaultSelector):
    """The server's selector: the listener, newcomers and closing connections, each with its deadline."""

    def __init__(self, listener, tunnel, args, tls=None):
        super().__init__()
        self.listener, self.tunnel, self.tls = listener, tunnel, tls
        self.tap, self.offload, self.debug = args.tap, args.offload, args.debug
        self.link_class = TwoWritesLink if args.two_writes else ExtraLink
        self.newcomers = {}  # socket -> Newcomer
        self.closing = {}  # socket -> deadline
        self.active = None  # the Link being served
        self.proven = None  # a Link that proved itself and waits for the slot
        self.refused = collections.Counter()  # refusals by kind since the last report
        self.said, self.unsaid = set(), 0  # reasons named since the last report; refusals not named
        self.report_at = None
        self.switch = Switch(self, args.clients) if args.clients > 1 else None  # --clients: a class
        listener.setblocking(False)
        self.register(listener, selectors.EVENT_READ, self.accept)

    def select(self, timeout=None):
        """Send away whoever's time is up, then wait as the loop asks, but not past the next deadline."""
        if not self.newcomers and not self.closing and not self.report_at:  # the usual case: cheap
            return super().select(timeout)
        self.expire()
        now = time.monotonic()
        deadlines = [self.deadline_of(n) for n in self.newcomers.values()] + list(self.closing.values())
        deadlines += [self.report_at, None if timeout is None else now + timeout]
        deadlines = [d for d in deadlines if d is not None]
        return super().select(max(0, min(deadlines) - now) if deadlines else None)

    def deadline_of(self, newcomer):
        """A handshake's or greeting's deadline; a silent plaintext newcomer's while a client is served."""
        if newcomer.deadline is not None:
            return newcomer.deadline
        return newcomer.arrived + PROOF_TIMEOUT if self.active else None

    def expire(self):
        """Send away every newcomer whose time is up; close goodbyes that take too long; report."""
        now = time.monotonic()
        for newcomer in list(self.newcomers.values()):
            deadline = self.deadline_of(newcomer)
            if deadline is not None and now >= deadline:
                self.send_away(newcomer, "silent", self.what_is_missing(newcomer), "cut")
        for sock, deadline in list(self.closing.items()):
            if now >= deadline:
                self.forget(sock)
        if self.report_at and now >= self.report_at:
            if self.unsaid:
                log.warning("SERVER: refused %d connection(s) in the last %d s (%d not named above): %s",
                            sum(self.refused.values()), REPORT_EVERY, self.unsaid,
                            ", ".join("%d %s" % (n, kind) for kind, n in sorted(self.refused.items())))
            self.refused.clear()
            self.said.clear()
            self.report_at, self.unsaid = None, 0

    def what_is_missing(self, newcomer):
        """Why a newcomer whose deadline passed is sent away."""
        if newcomer.handshaking:
            return "no TLS handshake within %d s: does it run with --tls?" % HANDSHAKE_TIMEOUT
        if self.offload:
            return "no --offload greeting within %d s: it runs without --offload" % HANDSHAKE_TIMEOUT
        return "it sent no packet within %g s while %s is being served" % (
            PROOF_TIMEOUT, self.active.address if self.active else "another client")

    def refuse(self, address, kind, why, verb="refused"):
        """Say why a newcomer leaves: each reason once, with its address, then (a flood) counted."""
        self.refused[kind] += 1
        reason = re.sub(r"[0-9.]+", "#", why)  # "its first frame (40 bytes)..." and "(41 bytes)" alike
        if not say_once(self.said, reason, "SERVER: %s %s: %s", verb, address, why):
            self.unsaid += 1
        if self.report_at is None:
            self.report_at = time.monotonic() + REPORT_EVERY

    def next_client(self):
        """serve()'s next_client: the Link of the next newcomer to prove itself (a class: the Switch)."""
        if self.switch:
            self.active = self.switch
            return self.switch
        self.active = None
        while not self.proven:
            for key, events in self.select():
                key.data(events)
        self.active, self.proven = self.proven, None
        return self.active

    def accept(self, events):
        """A newcomer knocks: let it in at once, and give it a deadline."""
        try:
            sock, address = self.listener.accept()
        except OSError:  # it left before we got to it (or we are out of fds): nothing to do
            return
        address = plain_address(address[0])
        try:
            keep_alive(sock)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT if self.tls or self.offload else None
            if self.tls:
                sock = wrap_tls(sock, self.tls, server_side=True)
            elif self.offload:
                sock.send(GREETING_FRAME)  # 15 bytes into an empty socket buffer
        except OSError as err:  # it reset the connection already
            sock.close()
            self.refuse(address, "reset", "it reset the connection at once (%s)" % (err.strerror or err))
            return
        if len(self.newcomers) >= MAX_NEWCOMERS:
            oldest = min(self.newcomers.values(), key=lambda n: n.arrived)
            self.send_away(oldest, "evicted", "the waiting room is full (%d): the longest waiting leaves "
                           "for %s" % (MAX_NEWCOMERS, address), "reset")
        newcomer = Newcomer(sock, address, deadline)
        self.newcomers[sock] = newcomer
        self.register(sock, selectors.EVENT_READ, lambda events: self.advance(newcomer))
        log.debug("SERVER: connection from %s: waiting for it to prove itself (%s; %d waiting)", address,
                  "TLS handshake" if self.tls else "--offload greeting" if self.offload else "a first packet",
                  len(self.newcomers))
        self.advance(newcomer)  # a TLS server speaks second, but try: it may all be there already

    def advance(self, newcomer):
        """A newcomer sent something: take the handshake a step further, or read its first bytes."""
        sock = newcomer.sock
        if self.newcomers.get(sock) is not newcomer:  # sent away earlier in this wake-up
            return
        try:
            if newcomer.handshaking:
                sock.do_handshake()
                newcomer.handshaking = False
                if not pinned(sock, self.tls):
                    return self.send_away(newcomer, "refused", "its certificate is not the pinned one "
                                          "(--tls-peer)", "cut")
                if not self.offload:
                    return self.admit(newcomer)
                sock.send(GREETING_FRAME)
            while True:  # TLS: the first bytes may already be decrypted, where select() cannot see them
                data = sock.recv(proof_size(newcomer.head, self.tap, self.offload) - len(newcomer.head))
                if not data:
                    return self.send_away(newcomer, "closed", "it closed the connection without greeting: it "
                                          "runs without --offload" if self.offload and not newcomer.head else
                                          "it closed the connection after %d bytes, without proving itself"
                                          % len(newcomer.head), "cut")
                newcomer.head += data
                verdict = first_frame_verdict(newcomer.head, self.tap, self.offload)
                if verdict is PROVEN:
                    return self.admit(newcomer)
                if verdict is not WAIT:
                    return self.send_away(newcomer, "not a tunnel end", verdict, "orderly")
        except ssl.SSLWantWriteError:
            self.modify(sock, selectors.EVENT_WRITE, self.get_key(sock).data)
        except WOULD_BLOCK:
            self.modify(sock, selectors.EVENT_READ, self.get_key(sock).data)
        except OSError as err:  # ssl.SSLError is one too
            why = explain_tls(err) if isinstance(err, ssl.SSLError) else err.strerror or str(err)
            self.send_away(newcomer, "TLS failed" if isinstance(err, ssl.SSLError) else "reset", why, "cut")

    def admit(self, newcomer):
        """A newcomer proved itself: it takes the slot, or (plaintext, slot taken) is turned away."""
        self.leave_room(newcomer)
        holder = self.active or self.proven  # (two may prove themselves in one wake-up)
        if self.switch:  # a class: a free slot, or no place at all (the newest does not push anyone out)
            holder = self.switch if len(self.switch.clients) >= self.switch.slots else None
        if holder and (not self.tls or self.switch):
            self.refuse(newcomer.address, "turned away", "it proved itself, but %s" % (
                "all %d slots of the class are taken (--clients)" % self.switch.slots if self.switch else
                "%s is being served (one client at a time)" % holder.address), verb="turned away")
            return self.say_goodbye(newcomer.sock, "orderly")
        if self.proven:  # --tls: the newer of two proven in one wake-up takes the slot
            self.say_goodbye(self.proven.sock, "orderly")
        link = self.link_class(newcomer.sock, newcomer.address, OFFLOAD_HEADER if self.offload else HEADER,
                               OFFLOAD_RECV_SIZE if self.offload else RECV_SIZE, self.debug, heard=True)
        if newcomer.head and not self.offload:  # the start of its first frame: cut with the rest of it
            link.kept = len(newcomer.head)
            link.view[:link.kept] = newcomer.head
            log.debug("SERVER: %s proved itself with the first %d bytes of its first frame; they go on to "
                      "the device with the rest of that frame", newcomer.address, link.kept)
        log.info("SERVER: Client connected from %s%s", newcomer.address,
                 " (%s, pinned certificate)" % newcomer.sock.version() if self.tls else "")
        if self.switch:
            return self.switch.join(link)
        self.proven = link
        if self.active:
            raise LinkEnded("%s proved itself with the pinned certificate: it replaces %s (the newest "
                            "authenticated client wins)" % (newcomer.address, self.active.address))

    def send_away(self, newcomer, kind, why, how):
        """Refuse a newcomer: say why (see refuse()), and close it `how` (see say_goodbye())."""
        self.leave_room(newcomer)
        self.refuse(newcomer.address, kind, why)
        self.say_goodbye(newcomer.sock, how)

    def leave_room(self, newcomer):
        """A newcomer's wait is over."""
        del self.newcomers[newcomer.sock]
        self.unregister(newcomer.sock)

    def say_goodbye(self, sock, how):
        """Close without waiting: "orderly" (TLS close_notify, FIN), "cut" (FIN), "reset" (RST: the client can
        tell it was pushed out); after a FIN the loop reads what still comes, GOODBYE_TIME s: no reset."""
        try:
            if how == "reset":  # linger on, for 0 s: close() sends a reset
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
                return
            if how == "orderly" and isinstance(sock, ssl.SSLSocket):
                tls_goodbye(sock)
            sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):  # the peer is gone already: nothing to wait for
            sock.close()
            return
        if len(self.closing) >= MAX_CLOSING:
            self.forget(min(self.closing, key=self.closing.get))
        self.closing[sock] = time.monotonic() + GOODBYE_TIME
        self.register(sock, selectors.EVENT_READ, lambda events: self.drain(sock))

    def drain(self, sock):
        """Read and discard what a closing connection still sends, until its end."""
        try:
            if sock not in self.closing or sock.recv(65536):  # closed earlier in this wake-up; not its end
                return
        except WOULD_BLOCK:
            return
        except (OSError, ValueError):
            pass
        self.forget(sock)

    def forget(self, sock):
        """Stop waiting for a closing connection's goodbye: close it."""
        if self.closing.pop(sock, None) is not None:
            self.unregister(sock)
            sock.close()

    def close(self):
        """The server stops: close everyone still waiting or closing (serve() has closed its link)."""
        for sock in list(self.newcomers) + list(self.closing):
            sock.close()  # (closing twice is harmless)
        super().close()


WAIT, PROVEN = "wait", "proven"


def proof_size(head, tap, offload):
    """How many first bytes decide whether a newcomer's first frame is a packet for this end."""
    if offload:
        return len(GREETING_FRAME)
    if len(head) < HEADER.size:
        return HEADER.size
    (length,) = HEADER.unpack_from(head)
    # enough to tell a packet's header, and an --offload peer's greeting (to name it)
    return HEADER.size + min(length, max(PROOF_BYTES["tap" if tap else "tun"], len(GREETING)))


def first_frame_verdict(head, tap, offload):
    """WAIT for more bytes, PROVEN, or why the first bytes a newcomer sent are not a tunnel end's."""
    if head.startswith(TLS_HANDSHAKE_RECORD):
        return "it began a TLS handshake: it runs with --tls, this end without"
    if len(head) < proof_size(head, tap, offload):
        return WAIT
    if offload:
        return PROVEN if head == GREETING_FRAME else "it runs without --offload (or is the C simpletun)"
    (length,) = HEADER.unpack_from(head)
    if head == GREETING_FRAME:
        return "it runs with --offload, this end without"
    if length == 0:
        return "its first frame is empty: that is not a packet"
    return packet_mismatch(head[HEADER.size:], length, tap) or PROVEN


def packet_mismatch(packet, length, tap):
    """Why the start of a `length`-byte packet cannot be one for this mode, or None if it can."""
    looks_ip = looks_like_ip(packet, length)
    if tap and length < PROOF_BYTES["tap"]:
        return "its first frame (%d bytes) is too short for an Ethernet frame" % length
    if tap and looks_ip:
        return ("its first frame is an IP packet, not an Ethernet frame: it runs in tun mode (-u), "
                "this end in tap (-a)")
    if not tap and not looks_ip:
        return ("its first frame (%d bytes) is not an IP packet: noise, or a peer in tap mode (-a) "
                "while this end is tun" % length)
    return None


def looks_like_ip(packet, length):
    """True if the first bytes of a `length`-byte packet are an IPv4 or IPv6 header that says that length."""
    if len(packet) < 6:
        return False
    version = packet[0] >> 4
    if version == 4:
        return packet[0] & 0x0F >= 5 and struct.unpack_from("!H", packet, 2)[0] == length
    if version == 6:
        return struct.unpack_from("!H", packet, 4)[0] + 40 == length
    return False


# ---- 4. Setting up the device (--addr, --mtu): configure_device(), ip_command() --------------
#      The ip commands a user would type after starting each end, typed for them.

# IPv4's smallest MTU; the largest a tun device takes, and a tap device (its MTU leaves room
# for the 14-byte Ethernet header within 65535: drivers/net/tun.c sets max_mtu so)
MIN_MTU, MAX_MTU, MAX_TAP_MTU = 68, 65535, 65535 - 14


def configure_device(name, interface=None, mtu=None):
    """Set the device's MTU; given an address/prefix (ipaddress), give it to the device and bring it up."""
    if interface:  # IPv6: usable at once (the peer's address is another: no duplicate to detect first)
        no_wait = ["nodad"] if interface.version == 6 else []
        ip_command("addr", "replace", str(interface), "dev", name, *no_wait)
    ip_command("link", "set", name, *(["mtu", str(mtu)] if mtu else []), *(["up"] if interface else []))
    done = (["MTU %d" % mtu] if mtu else []) + (["address %s" % interface, "up"] if interface else [])
    log.debug("Configured %s: %s", name, ", ".join(done))


def announce(interface, device):
    """--addr: a datagram from it to its network's broadcast, port 9 (discard): a class server learns it."""
    v6, broadcast = interface.version == 6, str(interface.network.broadcast_address)
    to = ("ff02::1", 9, 0, socket.if_nametoindex(device)) if v6 else (broadcast, 9)
    with socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.bind((str(interface.ip), 0))
        sock.sendto(b"simpletun.py: %s is here" % str(interface.ip).encode(), to)


def ip_command(*args):
    """Run `ip ARGS...` (iproute2); a failure is a UserError carrying ip's own message."""
    try:
        result = subprocess.run(("ip",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                universal_newlines=True)
    except FileNotFoundError:
        raise UserError("this needs the ip command from iproute2 (apt install iproute2)") from None
    if result.returncode != 0:
        raise UserError("ip %s: %s" % (" ".join(args), result.stderr.strip()))
    return result.stdout


# ---- 5. What a line is about (-dd, -ddd) and when it happened (the demo): Lines -------------
#      A logging handler, the seam the tunnel's -d lines offer: one write per line; -dd adds what each
#      packet is and what each receive brought, -ddd the frame's first bytes on the wire; the demo's
#      ends stamp each line with when it happened; a refusal repeated within a second is counted.

ETHERNET = struct.Struct("!6s6sH")  # destination MAC, source MAC, EtherType
ARP = struct.Struct("!HHBBH6s4s6s4s")  # hardware/protocol types and sizes, op, sender/target MAC and IP
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # version+IHL, TOS, length, id, fragment, TTL, proto, sum, src, dst
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
WIRE_BYTES = 24  # -ddd shows this many bytes of each packet after its length
STAMP = re.compile(r"@(\d+\.\d+) (.*)")  # how the demo's ends stamp a line (see stamped())
QUIET_TIME = 1.0  # seconds: a refused packet's line is printed at most this often
REFUSAL_HINTS = {os.strerror(errno.EIO): "is the device down? (ip link set %s up)",
                 os.strerror(errno.EINVAL): "not a packet the device can carry (garbage, or the peer "
                                            "uses the other mode: -u/-a)"}


def stamped(text, happened=None):
    """A line as the demo's ends print it: when it happened (CLOCK_MONOTONIC: one clock everywhere)."""
    return "@%.6f %s" % (happened or time.monotonic(), text)


class Lines(logging.Handler):
    """The full program's output: one write per line, with what -dd, -ddd and --timestamps add."""

    def __init__(self, args, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self.args, self.debug, self.tap = args, args.debug, args.tap
        self.header = OFFLOAD_HEADER if args.offload else HEADER
        self.arrived = None  # when the last packet came from the network (see stamp())
        self.quiet_until, self.unsaid = 0, 0  # refusals not printed (see QUIET_TIME)
        self.told_tap = False  # the original's "tap interface" was explained once

    def emit(self, record):
        """Print a record's line, and what this run's level adds to it."""
        try:
            lines = self.lines_for(record)
            stamp = self.stamp(record)
            for line in lines:
                self.stream.write(stamped(line, stamp) + "\n" if self.args.timestamps else line + "\n")
            self.stream.flush()
        except Exception:  # logging's rule: a broken output never stops the program
            self.handleError(record)

    def stamp(self, record):
        """When a line happened; a device write's, when its packet came (its reply may be printed first)."""
        now = time.monotonic()
        if record.msg.startswith("NET2TAP %d: Read"):
            self.arrived = now
        return self.arrived if record.msg.startswith("NET2TAP %d: Written") else now

    def lines_for(self, record):
        """The record's line, and the lines the level adds; none for a refusal said a moment ago."""
        text, packet, args = record.getMessage(), getattr(record, "packet", None), record.args
        if " refused a " in record.msg:
            return self.refusal(text, args)
        if self.debug < 2:
            return [text]
        if record.msg == "TAP2NET %d: Written %d bytes to the network":
            return [text + (" (one datagram: no length in front, a datagram keeps its own%s)" % (
                ", with its 8-byte number and 16-byte tag" if self.args.key else "") if self.args.udp else
                            " (%d with its %d-byte length)" % (args[1] + self.header.size, self.header.size))]
        if packet is None:
            return [text]
        direction, count = text.split(" ", 1)[0], args[0]
        if not self.told_tap and "the tap interface" in text and not self.tap:
            self.told_tap = True
            text += " (the original's words for any device: here %s, a tun device)" % self.args.iface
        lines = [text, "%s %d: %s" % (direction, count, describe(packet, self.tap, self.args.offload))]
        if self.debug > 2 and direction == "TAP2NET":
            lines.append("%s %d: on the wire: %s%s%s" % (
                direction, count, "" if self.args.udp else "[%s] " % self.header.pack(len(packet)).hex(" "),
                bytes(packet[:WIRE_BYTES]).hex(" "), " ..." if len(packet) > WIRE_BYTES else ""))
        return lines

    def refusal(self, text, args):
        """A refused packet: the first of a run with a hint, then at most one line per QUIET_TIME s."""
        now = time.monotonic()
        if now < self.quiet_until:
            self.unsaid += 1
            return []
        hint = REFUSAL_HINTS.get(args[-1], "").replace("%s", str(args[1]))
        more = " (and %d more since the last such line)" % self.unsaid if self.unsaid else ""
        self.quiet_until, self.unsaid = now + QUIET_TIME, 0
        return [text + (" -- " + hint if hint else "") + more]


def log_receive(link, count):
    """-dd: what one receive brought: bytes, the frames they complete, a frame left unfinished."""
    frames, start, end, size = 0, 0, link.kept + count, link.header.size
    whole = None  # the size of the frame that begins at `start`, once its length has come
    while end - start >= size:
        whole = size + link.header.unpack_from(link.buffer, start)[0]
        if start + whole > end:
            break
        start, frames, whole = start + whole, frames + 1, None
    if end == start:
        unfinished = "nothing left over"
    elif whole is None:
        unfinished = "%d byte(s) of the next frame's length wait for the next receive" % (end - start)
    else:
        unfinished = "%d of the next frame's %d bytes wait for the next receive" % (end - start, whole)
    held = " (after %d held from before)" % link.kept if link.kept else ""
    log.debug("NET2TAP: a receive brought %d bytes from TCP%s: %d whole frame(s); %s",
              count, held, frames, unfinished)


def describe(packet, tap, offload=False):
    """One line saying what a packet is: an Ethernet frame (tap) or an IP packet (tun)."""
    packet = bytes(packet)
    if offload:
        return describe_offloaded(packet, tap)
    return describe_ethernet(packet) if tap else describe_ip(packet)


def describe_ethernet(frame):
    """An Ethernet frame: what it carries, then its MAC addresses."""
    if len(frame) < ETHERNET.size:
        return "Ethernet truncated header (%d bytes)" % len(frame)
    destination, source, ethertype = ETHERNET.unpack_from(frame)
    payload = frame[ETHERNET.size:]
    inner = (describe_arp(payload) if ethertype == ETHERTYPE_ARP else
             describe_ip(payload) if ethertype in (ETHERTYPE_IPV4, ETHERTYPE_IPV6) else
             "EtherType 0x%04x (%d bytes)" % (ethertype, len(frame)))
    # the group bit of the first byte: broadcast (all ones), or multicast (e.g. 33:33:.. for IPv6)
    kind = "" if not destination[0] & 1 else " broadcast" if destination == b"\xff" * 6 else " multicast"
    return "%s (Ethernet %s > %s%s)" % (inner, mac_text(source), mac_text(destination), kind)


def mac_text(mac):
    """A MAC address as people write it: 6e:00:00:00:00:02."""
    return ":".join("%02x" % b for b in mac)


def describe_arp(payload):
    """An ARP request or reply: who asks for whose MAC address."""
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
    """An IP packet, IPv4 or IPv6 by its version nibble: addresses, then what it carries."""
    version = packet[0] >> 4 if packet else None
    if version == 4:
        header_size = (packet[0] & 0x0F) * 4
        if len(packet) < IPV4.size or header_size < IPV4.size or len(packet) < header_size:
            return "IPv4 truncated header (%d bytes)" % len(packet)
        _, _, total, _, fragment, _, protocol, _, source, destination = IPV4.unpack_from(packet)
        addresses = "IPv4 %s > %s" % (socket.inet_ntoa(source), socket.inet_ntoa(destination))
        payload, icmp_types = packet[header_size:max(total, header_size)], ICMP_TYPES
        later_fragment = fragment & 0x1FFF  # its bytes continue a transport header seen before
    elif version == 6:
        if len(packet) < IPV6.size:
            return "IPv6 truncated header (%d bytes)" % len(packet)
        _, _, protocol, _, source, destination = IPV6.unpack_from(packet)
        addresses = "IPv6 %s > %s" % (socket.inet_ntop(socket.AF_INET6, source),
                                      socket.inet_ntop(socket.AF_INET6, destination))
        payload, icmp_types = packet[IPV6.size:], ICMPV6_TYPES
        # Extension headers sit between the IPv6 header and the transport: skip them (MLD reports,
        # for example, carry a hop-by-hop header), each says its own length in 8-byte units.
        while protocol in IPV6_EXTENSION_HEADERS and len(payload) >= 2:
            protocol, size = payload[0], (payload[1] + 1) * 8
            payload = payload[size:]
        later_fragment = protocol == IPV6_FRAGMENT
    else:
        return "not an IP packet (%d bytes)" % len(packet)
    if later_fragment:
        return "%s fragment (%d bytes)" % (addresses, len(packet))
    return "%s %s (%d bytes)" % (addresses, describe_transport(protocol, payload, icmp_types), len(packet))


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


# ---- 6. Segmentation offload (--offload): set_offload(), the greeting, describe_offloaded() ---
#      Through tun_alloc's flags (IFF_VNET_HDR), the Tunnel's read size, the Link's header and buffer:
#      fewer, bigger packets. The kernel hands over super-packets of up to 64 KiB behind a virtio_net_hdr
#      saying how to cut them (checksums unfinished: the outer TCP or TLS guards them); the peer writes
#      both unchanged. Frames carry a 4-byte length; each end first sends GREETING: a mismatch is named.

IFF_VNET_HDR = 0x4000  # each read/write starts with a struct virtio_net_hdr
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): which offloads the device may hand us
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08  # checksums; TCP super-packets
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40  # UDP super-packets (Linux 6.2 and newer)
# struct virtio_net_hdr (linux/virtio_net.h), little-endian on the machines we run on:
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GSO_KINDS = {1: "TCP segment offload", 3: "UDP fragmentation offload", 4: "TCP segment offload",
             5: "UDP segment offload"}  # VIRTIO_NET_HDR_GSO_TCPV4, _UDP, _TCPV6, _UDP_L4
GSO_ECN = 0x80
OFFLOAD_HEADER = struct.Struct("!I")  # the 4-byte length this mode frames with
OFFLOAD_READ_SIZE = 128 * 1024  # a super-packet is at most 64 KiB; room for the headers and more
OFFLOAD_RECV_SIZE = 4 * RECV_SIZE  # the receive buffer holds many super-packets
GREETING_TIMEOUT = 4  # seconds the client waits for the server's greeting: a mismatch is named within 5 s
GREETING = b"simpletun+GSO"  # 13 bytes: shorter than an Ethernet header, and its first byte
#                              (0x73) is no IP version: a C original writes it to its device, which refuses it
GREETING_FRAME = HEADER.pack(len(GREETING)) + GREETING  # as it goes on the wire, 2-byte length first


def set_offload(fd, enabled):
    """Let the device hand us super-packets, or not (a persistent device keeps its last user's setting)."""
    if not enabled:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return
    flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags | TUN_F_USO4 | TUN_F_USO6)
    except OSError:  # an older kernel: TCP only
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def greet_server(link):
    """Client, --offload: greet, then read the server's greeting (the original's read_n) within 5 s."""
    sock, head = link.sock, b""
    sock.settimeout(GREETING_TIMEOUT)  # (for each receive: the greeting comes in one piece)
    try:
        sock.sendall(GREETING_FRAME)
        while len(head) < len(GREETING_FRAME):
            data = sock.recv(len(GREETING_FRAME) - len(head))
            if not data:
                raise LinkEnded("the server closed the connection instead of greeting: it runs without "
                                "--offload (its log says so)")
            head += data
            if not GREETING_FRAME.startswith(head):
                raise LinkEnded("the server runs without --offload: its first frame is not the greeting")
    except socket.timeout:
        raise LinkEnded("no --offload greeting from the server within %d s: it runs without --offload "
                        "(or is the C simpletun)" % GREETING_TIMEOUT) from None
    sock.setblocking(False)
    log.debug("CLIENT: the server runs --offload too: frames carry a 4-byte length from here on")


def describe_offloaded(packet, tap):
    """-dd with --offload: the packet behind the virtio header, and how the kernel will cut it."""
    if len(packet) < VIRTIO_NET_HDR.size:
        return "virtio header truncated (%d bytes)" % len(packet)
    _, gso_type, _, gso_size, csum_start, _ = VIRTIO_NET_HDR.unpack_from(packet)
    inner = packet[VIRTIO_NET_HDR.size:]
    text = describe_ethernet(inner) if tap else describe_ip(inner)
    kind = GSO_KINDS.get(gso_type & ~GSO_ECN)
    if not kind or not gso_size or len(inner) < csum_start + 13:
        return text
    # csum_start: where the TCP or UDP header begins; the payload follows it (TCP says its header's size)
    payload = len(inner) - csum_start - ((inner[csum_start + 12] >> 4) * 4 if kind.startswith("TCP") else 8)
    return "%s; %s: %d segments of %d" % (text, kind, -(-payload // gso_size), gso_size)


# ---- 7. One packet per datagram (--udp, --key): DatagramLink, udp_socket(), UdpClock -------
#      A Link relay() drives as it is: each packet one datagram (no TCP over TCP), runs of them in one
#      system call (UDP_SEGMENT, UDP_GRO). Without --key the peer may be any program that sends one packet
#      per datagram (the VPN lab's relays): it is sent packets only, and a server serves the first
#      plausible sender until it has been silent UDP_SILENCE s. With --key each datagram carries a number
#      and a keyed MAC (BLAKE2b): only key holders are served, the newest at once, nothing is replayed,
#      and both ends say "still here" every UDP_HEARTBEAT s. Packets still cross in clear. A served peer's
#      datagrams come on a socket of its own, so a stranger's flood crowds out no one (see serve_peer()).

UDP_SILENCE = 3  # seconds: a silent client may lose its slot; a client that hears nothing says so
UDP_HEARTBEAT = 1  # --key: seconds an end may send nothing before it says "still here"
MAX_STRANGERS, NAMES_AT_ONCE, NAMING_TIME = 1024, 8, 5  # senders remembered; new ones named per NAMING_TIME s
PORT_BUDGET = 8  # datagrams read from the port's socket per wake-up while a peer is served (strangers')
UDP_MTU = 1500 - 40 - 8  # the device MTU whose packets fit one datagram on a 1500-byte cable (IPv6+UDP)
UDP_BUFFER = 4 << 20  # bytes of socket buffer each way: a burst of datagrams waits there, not dropped
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h: past net.core.[wr]mem_max, as root
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # linux/udp.h (Linux 4.18 and 5.0): runs of datagrams
MAX_SEGMENTS, SEGMENTS_BYTES = 64, 65000  # the most datagrams one send may carry, and their bytes
GRO_SPACE = socket.CMSG_SPACE(4)  # room for the kernel's note of a run's datagram size (an int)
NUMBER = struct.Struct("!Q")  # --key: each datagram's number, before the packet
TAG_SIZE = 16  # --key: the keyed BLAKE2b tag after the packet, over the number and the packet
KEY_OVERHEAD = NUMBER.size + TAG_SIZE
REPLAY_WINDOW, REPLAY_BITS = 64, (1 << 64) - 1  # --key: how late a datagram may come (as IPsec's), its bits


def read_key(path):
    """--key FILE: the shared secret, refused if others may read it (as ssh refuses a private key)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise UserError("--key %s: others may read it; a secret must be yours alone: chmod 600 %s"
                                % (path, path))
            secret = f.read()
    except OSError as err:
        raise UserError("--key %s: %s" % (path, err.strerror)) from None
    if len(secret) < 16:
        raise UserError("--key %s: %d bytes is too short a secret; make one of 32 random bytes: "
                        "head -c 32 /dev/urandom > %s" % (path, len(secret), path))
    return hashlib.blake2b(secret, digest_size=32).digest()  # any length of file: one 32-byte key


class DatagramLink(Link):
    """A Link over UDP: each packet one datagram. A server's (peer None) learns its client."""

    def __init__(self, sock, address, tap, peer=None, key=None, batches=False):
        super().__init__(sock, address)
        self.tap, self.peer, self.key, self.client = tap, peer, key, peer is not None
        self.segments = MAX_SEGMENTS if batches else 1
        self.unbatched = MAX_PACKET + 1  # packets this big or bigger are sent one per call (see send_queued)
        self.heard_at = self.sent_at = 0  # when the peer last sent a datagram; when we last did
        self.unanswered = None  # client: since when what we sent has had no answer
        self.told = set()  # what was said once: "no client", "unanswered", "silent", "malformed"
        # senders named (oldest first), since when, how many; dropped, unnamed, unsent, not whole
        self.strangers, self.naming, self.named = {}, 0, 0
        self.dropped, self.unnamed, self.unsent, self.malformed = 0, 0, 0, 0
        self.own = self.former = None  # server: the peer's own socket (serve_peer()); the peer before it
        self.packets = []  # what the last receive kept for cut(): views of the buffer
        # --key: our next number (from the clock: a restarted end goes on above its old numbers), the
        # newest number received and a bit for each of the REPLAY_WINDOW before it; a keyed MAC for
        # each direction (a datagram sent back to its sender fails)
        self.number, self.newest, self.seen = time.time_ns(), 0, 0
        ours, theirs = (b"client", b"server") if self.client else (b"server", b"client")
        self.sealer, self.opener = (key and hashlib.blake2b(key=key, digest_size=TAG_SIZE, person=person)
                                    for person in (ours + b" to " + theirs, theirs + b" to " + ours))

    def filter(self, record):
        """A server with no client yet: no "Written ... to the network" line for a packet going nowhere."""
        return self.peer is not None or not record.msg.endswith("to the network")

    def send_queued(self):
        """Send each queued packet as one datagram, a run of one size per call (no peer yet: drop them)."""
        if self.peer is None:
            say_once(self.told, "no client", "SERVER: no client yet: what the device hands over is dropped "
                     "until one sends")
        start = 0 if self.peer else len(self.out)
        with memoryview(self.out) as out:
            while start < len(out):
                run, end = self.next_run(out, start)
                try:
                    self.send_run(run)
                except self.would_block:  # the socket buffer is full: select() says when it drains
                    break
                except ConnectionRefusedError:  # the ICMP answer to an earlier datagram
                    self.say_unanswered()
                except OSError as err:
                    if err.errno in (errno.EINVAL, errno.EMSGSIZE) and len(run) > 1:  # each of a run must fit
                        self.unbatched = len(run[0])  # the path's MTU: these go one by one, in fragments
                        continue
                    self.unsent += len(run)  # dropped on this host (a firewall: EPERM), or too big (EMSGSIZE)
                    if self.unsent == len(run):
                        log.warning("a datagram to %s was not sent: %s; such packets are lost, and counted",
                                    self.address, err.strerror)
                start = end
            run = None  # (views of the queue: they must go before the queue can change)
        if start and self.peer:
            self.sent_at = time.monotonic()
            self.unanswered = self.unanswered or self.sent_at  # (until something comes back)
        del self.out[:start]

    def next_run(self, out, start):
        """The packets from `start` one send takes (one size, the last may be smaller), and where it ends."""
        run, most = [], 1
        while start < len(out) and len(run) < most:
            (length,) = HEADER.unpack_from(out, start)
            if not run and length < self.unbatched:
                most = min(self.segments, SEGMENTS_BYTES // (length + KEY_OVERHEAD))
            elif run and (length > len(run[0]) or len(run[-1]) < len(run[0])):
                break
            run.append(out[start + HEADER.size:start + HEADER.size + length])
            start += HEADER.size + length
        return run, start

    def send_run(self, run):
        """Send packets of one size as datagrams in one call: the kernel cuts them (UDP_SEGMENT)."""
        pieces = [b"".join([piece for packet in run for piece in self.seal(packet)])] if self.key else run
        size = len(run[0]) + (KEY_OVERHEAD if self.key else 0)
        cut = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))] if len(run) > 1 else []
        self.sock.sendmsg(pieces, cut, 0, self.peer)

    def seal(self, packet):
        """--key: a datagram's pieces: its number, the packet, and the tag over both."""
        self.number += 1
        number = NUMBER.pack(self.number)
        tag = self.sealer.copy()  # (a copy of the keyed state costs less than keying anew)
        tag.update(number)
        tag.update(packet)
        return number, packet, tag.digest()

    def receive(self):
        """Take what waits on the peer's socket, then PORT_BUDGET of the port's; keep our peer's for cut()."""
        self.packets.clear()
        end, now = 0, time.monotonic()
        for sock, budget in ((self.own, MAX_BATCH), (self.sock, PORT_BUDGET if self.own else MAX_BATCH)):
            for _ in range(budget if sock else 0):
                if len(self.buffer) - end <= MAX_PACKET:
                    break
                try:
                    size, notes, _, sender = sock.recvmsg_into([self.view[end:]], GRO_SPACE)
                except self.would_block:
                    break
                except ConnectionRefusedError:
                    self.say_unanswered()
                    continue
                # several datagrams at once (UDP_GRO): the kernel says their size, the last may be smaller
                step = next((struct.unpack("=i", d)[0] for _, kind, d in notes if kind == UDP_GRO), size)
                run = self.view[end:end + size]
                for start in range(0, size, step or 1):
                    packet = self.admitted(sender, run[start:start + step], now)
                    if packet:
                        self.packets.append(packet)
                end += size
        return len(self.packets) or None  # never 0: a datagram socket has no end of stream

    def cut(self, count):
        """The packets the last receive kept: a datagram is one packet, there is nothing to cut."""
        return self.packets

    def admitted(self, sender, datagram, now):
        """The packet a datagram carries if it is from our peer (empty: "still here"), else None."""
        packet = self.opened(datagram) if self.key else datagram
        if packet is False and sender == self.former:
            return self.drop(sender, "it holds the key, but %s took its slot since: the newest key holder is "
                             "served (a restarted end is the newest)" % self.address, now)
        if packet is None or packet is False:
            return self.drop(sender, "no valid --key tag: it runs with another key, or without --key "
                                     "(or it replays old datagrams)", now)
        if sender != self.peer and not self.takes(sender, packet, now):
            return None
        if self.client and not self.heard_at:
            log.warning("CLIENT: the first datagram came back from %s: the server serves this end",
                        self.address)
        self.heard_at = now
        if self.unanswered is not None:  # an answer: a silence is over
            self.unanswered = None
            self.told -= {"unanswered", "silent"}
        if packet and not self.tap and not self.key and not looks_like_ip(packet, len(packet)):
            self.malformed += 1  # cut short by a lab relay's small buffer, or garbage: the kernel drops it
            say_once(self.told, "malformed", "%s sent a datagram that is no whole IP packet (%d bytes; its "
                     "IP header says otherwise): not written; such datagrams are counted", self.address,
                     len(packet))
            return None
        return packet

    def takes(self, sender, packet, now):
        """Server: True if a sender becomes our peer (plausible, ours silent; --key: a key holder)."""
        if not self.key:
            if not packet:  # a --key end's heartbeat, or noise: nothing to write
                return False
            inner = packet[NUMBER.size:-TAG_SIZE]  # what a --key end's datagram carries
            if len(packet) == KEY_OVERHEAD or not self.tap and inner and looks_like_ip(inner, len(inner)):
                why = "it runs with --key, this end without: give both ends the same --key FILE"
            else:
                why = packet_mismatch(packet, len(packet), self.tap)
            if not why and self.peer and now - self.heard_at < UDP_SILENCE:
                why = "it sent a packet, but %s is being served" % self.address
            if why:
                return self.drop(sender, why, now)
        log.warning("SERVER: serving %s%s", udp_address(sender), "" if self.peer is None else
                    " (%s was silent for %d s)" % (self.address, now - self.heard_at) if not self.key else
                    " (it holds the key; %s no longer has the slot)" % self.address)
        self.former, self.peer, self.address = self.peer, sender, udp_address(sender)
        self.serve_peer(sender)
        return True

    def serve_peer(self, peer):
        """Server: a socket of the peer's own, on the port, connected to it: the kernel hands it that peer's
        datagrams alone, and a stranger's flood fills the port's socket (read PORT_BUDGET at once), not this.
        SO_REUSEPORT lets the two share the port, on only while this one binds: no other program can after."""
        if self.own is None:
            own = socket.socket(self.sock.family, socket.SOCK_DGRAM)
            try:
                if own.family == socket.AF_INET6:  # IPv4 peers too, as on the port's socket
                    own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                for sock in (self.sock, own):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                own.bind(self.sock.getsockname())
                tune_datagrams(own)
            except OSError as err:  # the peer's datagrams stay on the port's socket: flooded with it
                own.close()
                return log.debug("SERVER: no socket of the peer's own: %s", err.strerror or err)
            finally:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
            self.own = own
        self.own.connect(peer)  # (a new peer: the same socket, connected anew)

    def opened(self, datagram):
        """--key: the packet in a datagram with a right tag and a new number (None: wrong tag; False: old)."""
        if len(datagram) < KEY_OVERHEAD:
            return None
        tag = self.opener.copy()
        tag.update(datagram[:-TAG_SIZE])
        if not hmac.compare_digest(tag.digest(), datagram[-TAG_SIZE:]):
            return None
        (number,) = NUMBER.unpack_from(datagram)
        if number > self.newest:  # the newest yet: the window moves on
            shift = number - self.newest
            self.seen = (self.seen << shift | 1) & REPLAY_BITS if shift < REPLAY_WINDOW else 1
            self.newest = number
        elif self.newest - number >= REPLAY_WINDOW or self.seen >> (self.newest - number) & 1:
            return False  # a right tag, but too old to tell, or taken before: a replay
        else:
            self.seen |= 1 << (self.newest - number)
        return datagram[NUMBER.size:-TAG_SIZE]

    def drop(self, sender, why, now):
        """Count a datagram not our peer's; name a new sender once (NAMES_AT_ONCE per NAMING_TIME s)."""
        self.dropped += 1
        if sender in self.strangers:
            return
        if now - self.naming >= NAMING_TIME:
            self.naming, self.named = now, 0
        if self.named >= NAMES_AT_ONCE:
            self.unnamed += 1
            return
        self.named += 1
        self.strangers[sender] = now  # the latest MAX_STRANGERS named are remembered, not the first forever
        if len(self.strangers) > MAX_STRANGERS:
            del self.strangers[next(iter(self.strangers))]
        log.warning("%s: dropping datagrams from %s: %s (counted, not logged again)",
                    "CLIENT" if self.client else "SERVER", udp_address(sender), why)

    def tick(self, now):
        """--key: beat after UDP_HEARTBEAT s unsent; a client unanswered UDP_SILENCE s says so. Next in s."""
        due = UDP_SILENCE
        if self.key and self.peer:
            if now - self.sent_at >= UDP_HEARTBEAT and not self.out:
                self.out += HEADER.pack(0)  # an empty packet, numbered and tagged: only a key holder takes it
                self.send_queued()
            due = max(0.1, self.sent_at + UDP_HEARTBEAT - now)
        if self.client and self.unanswered and "unanswered" not in self.told:
            if now - self.unanswered < UDP_SILENCE:
                return min(due, self.unanswered + UDP_SILENCE - now)
            say_once(self.told, "silent", "CLIENT: nothing has come back from %s for %g s: does the server "
                     "run with --udp, in this mode (%s)%s? Its log says which (or nothing inside the tunnel "
                     "answers)", self.address, UDP_SILENCE, "-a" if self.tap else "-u",
                     ", with the same --key" if self.key else ", without --key")
        return due

    def say_unanswered(self):
        """Client: the server's host answered with ICMP port unreachable. Say so once per silence."""
        if self.client:  # (a server's peer socket hears them too: its client has gone)
            say_once(self.told, "unanswered", "CLIENT: nothing answers at %s port %d (ICMP port "
                     "unreachable): is the server running, with --udp? The client goes on, and its packets "
                     "are lost until it is", self.address, self.peer[1])

    def close(self):
        """Say how many datagrams were dropped, then close."""
        if self.dropped:
            log.warning("%s: dropped %d datagram(s) from other senders (%s)", "CLIENT" if self.client else
                        "SERVER", self.dropped, "%d of them from senders not named: a flood of new ones"
                        % self.unnamed if self.unnamed else "each named above")
        for count, what in ((self.unsent, "could not be sent"), (self.malformed, "were no whole packets")):
            if count:
                log.warning("%d packet(s) %s", count, what)
        log.removeFilter(self)
        if self.own:
            self.own.close()
        super().close()


class UdpClock(selectors.DefaultSelector):
    """The --udp selector: waits as the loop asks, not past the link's next tick(); watches the peer's own."""

    def __init__(self, link):
        super().__init__()
        self.link = link

    def select(self, timeout=None):
        if self.link.own and self.link.own not in self.get_map():
            self.register(self.link.own, selectors.EVENT_READ, self.get_key(self.link.sock).data)
        due = self.link.tick(time.monotonic())
        return super().select(due if timeout is None else min(due, timeout))


def server_family(bind):
    """Where a server listens: the address given, or every IPv6 and IPv4 address (one socket)."""
    dual = not bind and socket.has_dualstack_ipv6()
    return socket.AF_INET6 if dual or ":" in (bind or "") else socket.AF_INET, dual


def udp_address(address):
    """A UDP sender as a person writes it: address and port."""
    return "%s port %d" % (plain_address(address[0]), address[1])


def tune_datagrams(sock):
    """Non-blocking, with room for a burst each way; True if the kernel hands over runs of datagrams."""
    sock.setblocking(False)
    for force, plain in ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, UDP_BUFFER)
        except PermissionError:  # not root: as much as net.core.[wr]mem_max allows
            sock.setsockopt(socket.SOL_SOCKET, plain, UDP_BUFFER)
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        return True
    except OSError:
        log.debug("this kernel cannot hand over runs of datagrams (UDP_GRO, Linux 5.0): one per call")
        return False


def udp_socket(args, key=None):
    """--udp: the server's bound socket, or the client's connected one (the server's only), in a link."""
    try:
        if args.client:
            family, _, _, _, address = socket.getaddrinfo(args.client, args.port, type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(address)
            log.info("CLIENT: Connected to server %s (UDP: the socket only knows where to send)", args.client)
        else:
            family, dual = server_family(args.bind)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if dual:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((args.bind or "", args.port))
            log.info("SERVER: listening on UDP port %d", args.port)
    except OSError as err:  # socket.gaierror too
        at = args.client or args.bind or "every address"
        raise UserError("cannot use UDP port %d on %s: %s" % (args.port, at, os.strerror(err.errno)
                                                                if err.errno else err)) from None
    link = DatagramLink(sock, args.client or "", args.tap, sock.getpeername() if args.client else None,
                        key, tune_datagrams(sock))
    if not args.client:
        log.addFilter(link)  # until close(): see filter()
    return link


# ---- 8. A class on one server (--clients N): Switch, packet_ends(), claimed_addresses() -----
#      relay() runs once, its link a Switch: the device's packets go to the client that owns their
#      destination (tap: broadcast, unknown: to all). Each client is an ExtraLink the room admits, with a
#      handler of its own; it sends from the addresses it owns (first come, first served; tap: its MACs and
#      the IP addresses its ARP and IP packets claim, as a switch's ARP inspection checks), to the device
#      or straight to another client. The server's own addresses are never a client's: read from its
#      device when a client joins, and whatever the device sends from. A client that stops reading loses
#      its own packets.

MAX_OWNED = 16  # addresses one client may own: a tunnel address or two, IPv6's, a bridge's MACs
NEIGHBOR_ADVERTISEMENT = 136  # ICMPv6: "this address is at my MAC", IPv6's ARP reply
RECONNECT_EVERY = 3  # seconds between a --reconnect client's tries


def packet_ends(packet, tap):
    """A packet's (source, destination) addresses: MACs (tap), IPv4 or IPv6 (tun); (None, None) if neither."""
    if tap:
        return bytes(packet[6:12]), bytes(packet[:6])
    start, size = {4: (12, 4), 6: (8, 16)}.get(packet[0] >> 4, (0, 0))  # where the source begins, its size
    if not size or len(packet) < start + 2 * size:
        return None, None
    return bytes(packet[start:start + size]), bytes(packet[start + size:start + 2 * size])


def claimed_addresses(frame):
    """Tap: its MAC and the IP its ARP, IP or neighbour advertisement names; None if ARP names another MAC."""
    if len(frame) < ETHERNET.size:
        return [bytes(frame[6:12])]
    _, source, ethertype = ETHERNET.unpack_from(frame)
    body, claims = frame[ETHERNET.size:], []
    if ethertype == ETHERTYPE_ARP and len(body) >= ARP.size:
        sender_mac, sender_ip = ARP.unpack_from(body)[5:7]
        if sender_mac != source:
            return None
        claims = [sender_ip]
    elif ethertype == ETHERTYPE_IPV4 and len(body) >= IPV4.size:
        claims = [IPV4.unpack_from(body)[8]]
    elif ethertype == ETHERTYPE_IPV6 and len(body) >= IPV6.size:
        _, _, next_header, _, ip_source, _ = IPV6.unpack_from(body)
        claims = [ip_source]
        icmp = body[IPV6.size:]
        if next_header == ICMPV6 and len(icmp) >= 24 and icmp[0] == NEIGHBOR_ADVERTISEMENT:
            claims.append(bytes(icmp[8:24]))  # its target: "this address is mine"
    return [source] + [address for address in claims if any(address)]  # (0.0.0.0, :: claim nothing)


def device_addresses(name):
    """A device's addresses, as packet_ends() gives them: its IPv4 and IPv6 ones (ip), its MAC (sysfs)."""
    try:
        text = ip_command("-o", "addr", "show", "dev", name)
    except UserError:  # no such device (or no ip command): nothing to reserve
        return []
    found = [ipaddress.ip_address(a).packed for a in re.findall(r"\binet6? ([0-9a-f.:]+)", text)]
    with contextlib.suppress(OSError, ValueError), open("/sys/class/net/%s/address" % name) as f:
        found.append(bytes.fromhex(f.read().strip().replace(":", "")))
    return [address for address in found if address]  # (a tun device has no MAC: an empty one)


def address_text(address):
    """An address as people write it: a MAC (6 bytes), an IPv4 or an IPv6 address."""
    return mac_text(address) if len(address) == 6 else str(ipaddress.ip_address(address))


class Switch(Link):
    """relay()'s link for a class: a queue that send_queued() sorts out to the clients."""

    def __init__(self, room, slots):
        self.pair = socket.socketpair()  # relay() watches the link's socket: this one never speaks
        super().__init__(self.pair[0], "the server")  # (the owner of the server's own addresses: itself)
        self.room, self.slots, self.tap, self.debug = room, slots, room.tap, room.debug
        self.clients, self.owners = [], {}  # the clients; address -> the client that sent from it first
        self.said = set()  # what was said once: (client, address) for a spoof, (client,) for a stall
        self.given = set()  # the clients given frames in this wake-up: each gets them in one send
        self.spoofed = self.lost = 0  # packets dropped: from another's address; for a client taking nothing
        self.routed = set()  # clients' addresses the device sent from, which it does not have (see sent_from)

    def join(self, link):
        """A client proved itself in the waiting room: it takes a slot (the server's addresses first)."""
        for address in device_addresses(self.room.tunnel.name):
            self.reserve(address)
        self.routed.clear()
        link.switch, link.owned = self, 0
        self.clients.append(link)
        self.room.register(link.sock, selectors.EVENT_READ, lambda events: self.client_ready(link, events))
        log.warning("SERVER: %s joined the class (%d of %d slots)", link.address, len(self.clients),
                    self.slots)

    def client_ready(self, link, events):
        """A client's connection can move bytes: as link_ready() (unless it left earlier in this wake-up)."""
        if link in self.clients:
            self.move(link, lambda: link_ready(self.room.tunnel, link, events))
            self.flush()

    def flush(self):
        """Send each client what it was given in this wake-up, in one send."""
        given, self.given = self.given, set()
        for link in given & set(self.clients):
            self.move(link, link.send_queued)

    def move(self, link, work):
        """Do work() on a client's link: if it ended or broke, it leaves; else watch it while frames wait."""
        try:
            work()
            if link.ended:
                raise LinkEnded("it closed the connection")
        except (LinkEnded, OSError) as err:
            return self.leave(link, getattr(err, "strerror", None) or err)
        if len(link.out) < OUT_LIMIT:
            self.said.discard((link,))
        key = self.room.get_key(link.sock)
        watch = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.out else 0)
        if key.events != watch:  # (a system call: only when it changes)
            self.room.modify(link.sock, watch, key.data)

    def leave(self, link, why):
        """A client has gone: its slot and its addresses are free at once."""
        self.clients.remove(link)
        self.room.unregister(link.sock)
        self.room.say_goodbye(link.sock, "orderly")
        for address in [a for a, owner in self.owners.items() if owner is link]:
            del self.owners[address]
        self.said = {said for said in self.said if said[0] is not link}
        log.warning("SERVER: %s left the class: %s (%d of %d slots)", link.address, why, len(self.clients),
                    self.slots)

    def send_queued(self):
        """TAP2NET: each packet the device handed over, to the client that owns its destination."""
        with memoryview(self.out) as out:
            start = 0
            while start < len(out):
                end = start + HEADER.size + HEADER.unpack_from(out, start)[0]
                packet = out[start + HEADER.size:end]
                source, destination = packet_ends(packet, self.tap)
                for address in self.claims(packet, source) or ():
                    if self.owners.get(address) is not self:
                        self.sent_from(address)
                self.given.update(self.deliver(out[start:end], destination))
                start = end
            packet = None  # (a view of the queue: it must go before the queue can change)
        del self.out[:]
        self.flush()

    def claims(self, packet, source):
        """What a packet says is its sender's: its source (tun), or what claimed_addresses() finds (tap)."""
        return claimed_addresses(packet) if self.tap else (source,) if source else ()

    def sent_from(self, address):
        """The device sent from an address: the server's, unless a client's it has not (routed back out)."""
        if address not in self.routed:
            if self.owners.get(address) is None or address in device_addresses(self.room.tunnel.name):
                return self.reserve(address)
            self.routed.add(address)

    def reserve(self, address):
        """An address of the server's own is the server's, taken back from a client if need be."""
        owner = self.owners.get(address)
        if owner not in (None, self):
            owner.owned -= 1
            log.warning("SERVER: %s is this server's own address: taken back from %s", address_text(address),
                        owner.address)
        self.owners[address] = self

    def from_client(self, link, packet):
        """NET2TAP: dropped if it claims another's address; sent on if a client's; True if the device's."""
        source, destination = packet_ends(packet, self.tap)
        claims = self.claims(packet, source)
        if claims is None:
            return self.drop(link, "arp", "whose ARP sender is another MAC than the frame's own")
        for address in claims:
            owner = self.owners.get(address)
            if owner is None and link.owned < MAX_OWNED:
                owner = self.owners[address] = link
                link.owned += 1
            if owner is not link:  # once per address of another's; once for the rest
                why = "that address is %s's" % owner.address if owner else "it owns %d" % MAX_OWNED
                return self.drop(link, owner and address, "from %s: %s", address_text(address), why)
        to = self.owners.get(destination)
        if to is not self and (to or self.tap and destination[0] & 1):  # another client's, or a broadcast
            self.given.update(self.deliver(HEADER.pack(len(packet)) + packet, destination, link))
        return to is None or to is self

    def drop(self, link, key, what, *args):
        """A client's packet that claims what is not its own: counted, and said once per key; False."""
        self.spoofed += 1
        say_once(self.said, (link, key), "SERVER: dropping %s's packets " + what +
                 " (counted, not logged again)", link.address, *args)
        return False

    def deliver(self, frame, destination, sender=None):
        """Queue a frame for its destination's owner (tap: none, or a broadcast: all but the sender)."""
        to = self.owners.get(destination)
        given = [] if to is self else [to] if to else \
            [c for c in self.clients if c is not sender] if self.tap else []
        for link in given:
            if len(link.out) >= OUT_LIMIT:  # it takes nothing: packets for it are lost, not everyone's
                self.lost += 1
                say_once(self.said, (link,), "SERVER: %s takes nothing: packets for it are dropped, counted",
                         link.address)
                continue
            link.out += frame
            if self.debug > 1 or self.debug and sender:
                log.debug("CLASS: %s -> %s: %d bytes%s", sender.address if sender else "the server",
                          link.address, len(frame) - HEADER.size, ", forwarded by the server" * bool(sender))
        return given

    def close(self):
        """The server stops: goodbye to every client, and what the class passed on, in one line."""
        for link in list(self.clients):
            self.leave(link, "the server stops")
        log.warning("SERVER: the class dropped %d packet(s) from another's address, %d for clients taking "
                    "nothing", self.spoofed, self.lost)
        self.pair[1].close()
        super().close()


# ---- 9. The whole tunnel on one machine: demo(), Timeline, ping(), the lossy cable, the bench ---
#      Two network namespaces stand in for two hosts, a veth pair for the cable between them;
#      each end is this program, run with --timestamps so that one timeline shows both.

DEMO_PREFIX = "simpletun-demo-"  # namespaces are named DEMO_PREFIX + our pid + "-" + the host's initial
DEMO_CLASS = ("alice", "bob", "carol")  # --demo --clients N: the first N are the class's client hosts
DEMO_UNDERLAY = {"server": "192.0.2.1/24", "client": "192.0.2.2/24",  # the "physical" network
                 "alice": "192.0.2.2/24", "bob": "192.0.2.3/24", "carol": "192.0.2.4/24"}
DEMO_TUNNEL = {"server": "10.0.0.1/24", "client": "10.0.0.2/24",  # the private network
               "alice": "10.0.0.2/24", "bob": "10.0.0.3/24", "carol": "10.0.0.4/24"}
DEMO_LAN = {"server": "10.1.0.1/24", "lan": "10.1.0.2/24"}  # --lan: a network behind the server
DEMO_PINGS, DEMO_PINGS_LOSSY = 3, 10  # with --loss: enough to tell a lossy cable from a broken tunnel
PING_WAIT, PING_WAIT_TCP = 2, 6  # s per reply; under TCP a lossy cable's repairs come late (RTO 1-3 s)
DEMO_PINGS_CLASS = 1  # --clients: to each of two hosts from each client, a timeline short enough to read
DEMO_WAIT = 10  # seconds for each end to come up, and to go
DEMO_COUNT = {2: "two", 3: "three", 4: "four"}  # how many hosts the demo makes, in words
BENCH_PORT, BENCH_SECONDS, BENCH_PINGS = 5201, 3, 20
ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


class Timeline:
    """The demo's one output: every process's lines in the order they happened (stamped()), held HOLD s."""

    HOLD = 0.3

    def __init__(self):
        self.start = time.monotonic()
        self.waiting = []  # a heap of (stamp, arrival order, label, text)
        self.order = itertools.count()
        self.sources = {}  # pipe fd -> [label, unfinished line]
        self.lines = collections.deque(maxlen=1000)  # the latest (stamp, label, text): saw(), journey()

    def launch(self, label, namespace, command):
        """Start a command in a namespace (start_in()); merge what it prints into the timeline."""
        process = start_in(namespace, command)
        os.set_blocking(process.stdout.fileno(), False)
        self.sources[process.stdout.fileno()] = [label, b""]
        return process

    def say(self, text):
        """A line of the demo's own."""
        for line in text.splitlines():
            self.add("demo", stamped(line))

    def add(self, label, line):
        """Queue a line, stamped by its process or, if not, now."""
        match = STAMP.match(line)
        stamp, text = (float(match.group(1)), match.group(2)) if match else (time.monotonic(), line)
        heapq.heappush(self.waiting, (stamp, next(self.order), label, text))
        self.lines.append((stamp, label, text))

    def saw(self, label, text):
        """True if the process `label` has printed a line holding `text`."""
        return any(label == who and text in line for _, who, line in self.lines)

    def pump(self, until=lambda: False, timeout=None):
        """Read and print lines until until() holds (True) or timeout s pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            wait = self.HOLD / 3
            readable = select.select(list(self.sources), [], [], wait)[0] if self.sources else \
                time.sleep(wait)
            for fd in readable or ():
                self.read(fd)
            self.emit(time.monotonic() - self.HOLD)
        return True

    def read(self, fd):
        """Take what a process printed; whole lines go on the timeline."""
        label, rest = self.sources[fd]
        data = os.read(fd, 65536)
        if not data:  # the process closed its output: it has ended, and its last line with it
            del self.sources[fd]
        lines = (rest + data).split(b"\n")
        if fd in self.sources:  # (else the last line is whole, newline or not)
            self.sources[fd][1] = lines.pop()
        for line in lines:
            if line:
                self.add(label, line.decode(errors="replace"))

    def emit(self, before):
        """Print, in order, every line that happened before `before`: one write per line."""
        try:
            while self.waiting and self.waiting[0][0] <= before:
                stamp, _, label, text = heapq.heappop(self.waiting)
                sys.stdout.write("%7.3f %-6s| %s\n" % (max(0.0, stamp - self.start), label, text))
            sys.stdout.flush()
        except BrokenPipeError:  # nobody reads us any more (| head): go on unheard, and clean up
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def flush(self):
        """Print every line still waiting: the processes have ended."""
        for fd in list(self.sources):
            while fd in self.sources and select.select([fd], [], [], 0.5)[0]:
                self.read(fd)
        self.emit(float("inf"))


def ping(address, count=DEMO_PINGS, timeout=PING_WAIT, interval=0.2, say=lambda text: None):
    """ping (a fresh machine may lack it), by the kernel's ping socket: round trip times (None: no reply)."""
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as sock:
        for sequence in range(1, count + 1):
            say("echo request to %s: icmp_seq=%d" % (address, sequence))
            sent = time.monotonic()
            sock.sendto(ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, 0, sequence) +
                        b"simpletun.py demo, echo request %d" % sequence, (address, 0))
            times.append(None)
            while select.select([sock], [], [], max(0, sent + timeout - time.monotonic()))[0]:
                kind, _, _, _, their_sequence = ICMP_ECHO.unpack_from(sock.recv(65535))
                if (kind, their_sequence) == (ICMP_ECHO_REPLY, sequence):
                    times[-1] = time.monotonic() - sent
                    say("reply from %s: icmp_seq=%d time=%.2f ms" % (address, sequence, times[-1] * 1000))
                    break
            else:
                say("no reply from %s to icmp_seq=%d within %g s" % (address, sequence, timeout))
            time.sleep(interval)
    return times


def demo_ping(address, count=DEMO_PINGS, loss=0, wait=PING_WAIT):
    """The demo's pinger (client host): exit status 0 if every reply came, or what `loss` % explains."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the demo stops us like Ctrl-C
    try:
        times = ping(address, count, wait, say=lambda text: print(stamped(text), flush=True))
    except KeyboardInterrupt:
        return 1
    except OSError as err:  # e.g. the tunnel's device went away under us
        print(stamped("ping: %s" % (err.strerror or err)), flush=True)
        return 1
    replies = count - times.count(None)
    if loss:
        print(stamped("%d of %d replies came back within %g s; the cable loses about %.0f %% of round trips "
                      "(%g %% each way)" % (replies, count, wait, loss * (2 - loss / 100), loss)), flush=True)
    return 0 if loss_explains(replies, count, loss) else 1


def loss_explains(replies, count, loss):
    """True unless so few replies are unlikely (under 1 in 1000) with loss % lost each way (TCP: fewer)."""
    crosses = (1 - loss / 100) ** 2
    return sum(math.comb(count, k) * crosses ** k * (1 - crosses) ** (count - k)  # binomial: P(<= replies)
               for k in range(replies + 1)) >= 0.001


def remove_stale_demos():
    """Remove the namespaces of earlier demos whose process is gone (killed before it cleaned up)."""
    for name in ip_command("netns", "list").split():  # lines "NAME (id: N)": only a NAME has the prefix
        pid = name[len(DEMO_PREFIX):-2]  # the demo that made it
        if name.startswith(DEMO_PREFIX) and pid.isdigit() and not os.path.exists("/proc/" + pid):
            remove_namespace(name)
            print("demo: removed %s, left behind by an earlier demo" % name, flush=True)


def remove_namespace(name):
    """End what still runs in a demo namespace (the demo started it), then delete the namespace."""
    try:
        for pid in ip_command("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip_command("netns", "delete", name)
    except UserError:  # gone already (never made, or another demo removed it as stale just now): done
        if name in ip_command("netns", "list").split():
            raise


def lossy_cable_method(loss, delay):
    """'netem' or 'nft': how the demo's cable will lose or delay packets (else a UserError, up front)."""
    if shutil.which("tc") and (os.path.isdir("/sys/module/sch_netem") or shutil.which("modprobe") and
                               subprocess.run(["modprobe", "-q", "sch_netem"],
                                              stderr=subprocess.DEVNULL).returncode == 0):
        return "netem"
    if delay:
        raise UserError("--delay needs netem (tc qdisc ... netem), which this kernel does not have "
                        "(modprobe sch_netem fails); --loss alone works with nft")
    if not shutil.which("nft"):
        raise UserError("--loss needs tc with netem (kernel module sch_netem) or nft: this machine has "
                        "neither (apt install nftables)")
    return "nft"


def make_cable_lossy(namespaces, method, loss, delay):
    """Lose loss % of the cable's packets (netem: delay them); nft as they arrive (as they leave: EPERM)."""
    for namespace in namespaces:
        inside = ("netns", "exec", namespace)  # ip netns exec NAMESPACE COMMAND...
        # one packet on the cable, one segment: with GSO a "packet" may be a 64 KiB super-packet,
        # and the cable would lose far fewer, far bigger ones than it says
        ip_command("-n", namespace, "link", "set", "veth0", "gso_max_segs", "1")
        if method == "netem":
            shape = (["loss", "%g%%" % loss] if loss else []) + (["delay", "%gms" % delay] if delay else [])
            ip_command(*inside, "tc", "qdisc", "add", "dev", "veth0", "root", "netem", *shape)
        else:  # nft: numgen random, a random number per packet, 0..9999
            chance = "numgen random mod 10000 < %d " % round(loss * 100) if loss < 100 else ""
            ip_command(*inside, "nft", "add table inet simpletun_demo; add chain inet simpletun_demo in "
                       "{ type filter hook input priority 0; policy accept; }; "
                       "add rule inet simpletun_demo in iifname veth0 %scounter drop" % chance)


def outer_retransmissions(namespace, port_filter):
    """How many segments the tunnel's own TCP connection retransmitted, as ss -ti reports it, in words."""
    try:
        text = ip_command("netns", "exec", namespace, "ss", "-tiH", "state", "established", port_filter)
    except (UserError, OSError) as err:
        return "an unknown number of segments (ss failed: %s)" % err
    found = re.search(r"retrans:\d+/(\d+)", text)
    return "%s segment(s)" % (found.group(1) if found else "0")


def start_in(namespace, command):
    """Start a command in a namespace and a session of its own: Ctrl-C reaches the demo, which stops it."""
    return subprocess.Popen(["ip", "netns", "exec", namespace] + command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def calling(call):
    """The command that runs CALL, a call of a function of this file, in a process of its own."""
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); from simpletun import *; sys.exit(%s)"
            % (os.path.dirname(os.path.abspath(__file__)), call)]


def demo(args):
    """--demo: build the hosts, run a server and its client(s), ping through the tunnel, clean up."""
    if os.geteuid() != 0:
        raise UserError("--demo needs root, to make network namespaces: sudo ./simpletun.py --demo")
    if not shutil.which("ip"):
        raise UserError("--demo needs the ip command from iproute2 (apt install iproute2)")
    method = lossy_cable_method(args.loss, args.delay) if args.loss or args.delay else None
    remove_stale_demos()
    mode, device = ("tap", "tap0") if args.tap else ("tun", "tun0")
    clients = DEMO_CLASS[:args.clients] if args.clients > 1 else ("client",)
    hosts = ("server",) + clients
    ns = {side: "%s%d-%s" % (DEMO_PREFIX, os.getpid(), side[0])
          for side in hosts + (("lan",) if args.lan else ())}
    level = 0 if args.bench else args.debug or (0 if args.keep else 2)  # kept: quiet unless asked
    level = max(level, 2) if args.diagram else level  # (the diagram is drawn from the -dd lines)
    options = ["-i", device] + (["-" + "d" * level] if level else []) + (["-a"] if args.tap else []) + \
        [option for flag in ("tls", "key") if getattr(args, flag)
         for option in ("--" + flag, os.path.abspath(getattr(args, flag)))] + \
        ["--" + flag.replace("_", "-") for flag in ("offload", "udp", "two_writes") if getattr(args, flag)]
    ends = {side: options + ["-c", host_of(DEMO_UNDERLAY["server"]), "--addr", DEMO_TUNNEL[side]]
            for side in clients}
    ends["server"] = options + ["-s", "--addr", DEMO_TUNNEL["server"]] + \
        (["--clients", str(args.clients)] if args.clients > 1 else [])
    target = host_of(DEMO_LAN["lan"] if args.lan else DEMO_TUNNEL["server"])
    # who pings whom: the client its target; each client of a class the server, then another client
    pings = [("client", target, None)] if args.clients == 1 else [(side, host_of(DEMO_TUNNEL[to]), to)
                                                                  for n, side in enumerate(clients)
                                                                  for to in ("server", clients[n - 1])]
    cable = "br0" if args.clients > 1 else "veth0"  # the server's end of the cable (a class: on a bridge)
    timeline = Timeline()
    timeline.say("%s hosts, each a network namespace, joined by %s (the \"physical\" network):" % (
        DEMO_COUNT[len(ns)], "veth pairs to a bridge, br0" if args.clients > 1 else
        "veth pairs" if args.lan else "a veth pair"))
    intro = ["  %-6s %s  %s %s  %s %s" % (side, ns[side], cable if side == "server" else "veth0",
                                         DEMO_UNDERLAY[side], device, DEMO_TUNNEL[side]) for side in hosts]
    if args.lan:
        intro.append("  lan    %s  lan0 %s, on a LAN behind the server (its lan0 %s), which forwards"
                     % (ns["lan"], DEMO_LAN["lan"], DEMO_LAN["server"]))
    intro.append("a %s tunnel joins %s and %s%s" % (mode, DEMO_TUNNEL["server"], DEMO_TUNNEL["client"], "" if
                 args.bench else "; the client pings %s through it" % target) if args.clients == 1 else
                 "a %s tunnel joins the server and its %d clients (--clients %d); each client pings the "
                 "server, then another client" % (mode, len(clients), len(clients)))
    timeline.say("\n".join(intro))
    running, crossed, interrupted, diagram = {}, False, False, None
    script = [sys.executable, os.path.abspath(__file__), "--timestamps"]
    try:
        build_demo_hosts(ns)
        if method:
            make_cable_lossy((ns["server"], ns["client"]), method, args.loss, args.delay)
            timeline.say("the cable loses %g %% of packets each way%s (%s)" % (
                args.loss, ", delayed %g ms" % args.delay if args.delay else "", method))
        for side in ("server",) + clients:
            ready = "SERVER: listening" if side == "server" else "CLIENT: Connected"
            timeline.say("%s: simpletun.py %s" % (side, " ".join(ends[side])))
            running[side] = timeline.launch(side, ns[side], script + ends[side])
            started = lambda: timeline.saw(side, ready) or running[side].poll() is not None  # noqa: E731
            if not timeline.pump(started, DEMO_WAIT) or running[side].poll() is not None:
                raise UserError("the demo's %s did not come up: see its lines above" % side)
        if args.lan:  # the client's route to the LAN: into the tunnel, to the server, which forwards
            lan = ipaddress.ip_interface(DEMO_LAN["lan"]).network
            route = (str(lan), "via", host_of(DEMO_TUNNEL["server"]))
            ip_command("-n", ns["client"], "route", "add", *route)
            timeline.say("client: ip route add %s %s %s" % route)
        joined = "joined the class (%d of %d slots)" % (len(clients), len(clients))
        if args.clients > 1 and not timeline.pump(lambda: timeline.saw("server", joined), DEMO_WAIT):
            raise UserError("not every client of the demo's class joined: see the lines above")
        count = DEMO_PINGS_CLASS if args.clients > 1 else DEMO_PINGS_LOSSY if args.loss else DEMO_PINGS
        crossed = True
        for side, address, to in pings:
            if to:
                timeline.say("%s pings the server (%s)" % (side, address) if to == "server" else
                             "%s pings %s (%s): the server passes each packet on, a client to a client"
                             % (side, to, address))
            running["ping"] = pinger = timeline.launch("ping", ns[side], calling("demo_ping(%r, %d, %g, %g)"
                % (address, count, args.loss, PING_WAIT_TCP if args.loss and not args.udp else PING_WAIT)))
            timeline.pump(lambda: pinger.poll() is not None)  # noqa: B023 (this pinger, waited for here)
            crossed = crossed and pinger.returncode == 0
        if args.diagram:  # the first echo request; a class's first from a client to a client
            side, address, to = pings[1] if args.clients > 1 else pings[0]
            timeline.pump(timeout=Timeline.HOLD)  # (the ends' last lines of it)
            carried = "udp" if args.udp else "tls" if args.tls else "two_writes" if args.two_writes else "tcp"
            diagram = journey(timeline.lines, address, {host: host_of(DEMO_UNDERLAY[host]) for host in (
                side, "server") + ((to,) if args.clients > 1 else ())}, carried)
            if diagram and args.diagram != "-":
                with open(args.diagram, "w") as f:
                    f.write(diagram)
            where = "below" if args.diagram == "-" else args.diagram
            timeline.say("the first echo request's journey, a Mermaid sequence diagram: %s (mmdc -i FILE "
                         "-o journey.svg)" % where if diagram else "no diagram: the first ping failed")
        if args.bench:
            bench(ns, timeline, "%s mode%s" % (mode, " over UDP" if args.udp else ""))
        if args.keep:
            timeline.say(keep_instructions(ns, pings, "udp" if args.udp else "tcp", cable))
            timeline.pump()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: clean up all the same, and say so
        interrupted = True
        timeline.say("interrupted: stopping %s" % ("both ends" if args.clients == 1 else "every end"))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave things behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if (method or args.keep) and "client" in running and not args.udp:
            counts = (outer_retransmissions(ns["client"], "( dport = :%d )" % PORT),
                      outer_retransmissions(ns["server"], "( sport = :%d )" % PORT))
            timeline.say("the tunnel's own TCP connection retransmitted %s from the client and %s from the "
                         "server (ss -ti)" % counts)
        for process in reversed(list(running.values())):  # ping, clients, server: each says its summary
            if process.poll() is None:
                process.terminate()
        timeline.pump(lambda: all(p.poll() is not None for p in running.values()), DEMO_WAIT)
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        timeline.flush()
        for name in ns.values():
            remove_namespace(name)
        timeline.say("removed %s namespaces and everything in them" % (
            "both" if len(ns) == 2 else "all " + DEMO_COUNT[len(ns)]))
        timeline.flush()
    if interrupted and not args.keep:
        return 1
    if args.loss:
        timeline.say("the replies that came back are what the lossy cable leaves: the tunnel works" if crossed
                     else "FAILED: fewer replies came back than the lossy cable explains")
    else:
        timeline.say("all %d echo requests crossed the tunnel and their replies came back" % (count * len(
            pings)) if crossed else "FAILED: not every echo request came back through the tunnel")
    timeline.flush()
    if diagram and args.diagram == "-":
        sys.stdout.write(diagram)
    return 0 if crossed else 1


def build_demo_hosts(ns):
    """The demo's hosts: a veth pair from each client to the server (a class: a bridge); --lan: one more."""
    for name in ns.values():  # each host: its loopback up, and ping sockets for root's group (ping())
        ip_command("netns", "add", name)
        ip_command("-n", name, "link", "set", "lo", "up")
        ip_command("netns", "exec", name, "sh", "-c", "echo 0 0 > /proc/sys/net/ipv4/ping_group_range")
    server, bridged = ns["server"], "alice" in ns
    if bridged:
        ip_command("-n", server, "link", "add", "br0", "up", "type", "bridge")
        ip_command("-n", server, "addr", "add", DEMO_UNDERLAY["server"], "dev", "br0")
    for side in ns:
        ifname, addresses = ("lan0", DEMO_LAN) if side == "lan" else ("veth0", DEMO_UNDERLAY)
        here = side if bridged else ifname  # the server's end of the cable
        if side != "server":
            ip_command("-n", server, "link", "add", here, "type", "veth", "peer", "name", ifname,
                       "netns", ns[side])
            ip_command("-n", ns[side], "addr", "add", addresses[side], "dev", ifname)
            ip_command("-n", ns[side], "link", "set", ifname, "up")
            ip_command("-n", server, *(("link", "set", here, "master", "br0") if bridged else
                                       ("addr", "add", addresses["server"], "dev", here)))
            ip_command("-n", server, "link", "set", here, "up")
    if "lan" in ns:
        ip_command("-n", ns["lan"], "route", "add", "default", "via", host_of(DEMO_LAN["server"]))
        ip_command("netns", "exec", server, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")


def host_of(cidr):
    """The address in an address/prefix: 10.0.0.1 in 10.0.0.1/24."""
    return cidr.split("/")[0]


def keep_instructions(ns, pings, transport, cable):
    """--keep: commands to paste in another terminal (as root): a shell on each host, each ping, the cable."""
    c, s = ns[pings[0][0]], ns["server"]
    on_cable, socket_kind = {"tcp": ("the frames inside TCP, on the cable", "the tunnel's TCP connection"),
                          "udp": ("the datagrams, on the cable", "the tunnel's UDP socket")}[transport]
    commands = [("%s bash" % ns[host], "a shell on the %s host" % host) for host in ns] + \
        [("%s ping %s" % (ns[side], address), "%s pings %s through the tunnel" % (side, to or address))
         for side, address, to in pings] + \
        [("%s tcpdump -ni %s -X %s port %d" % (s, cable, transport, PORT), on_cable),
         ("%s ip route" % c, "the route into the tunnel"), ("%s ss -%si" % (c, transport[0]), socket_kind)]
    if "lan" in ns:
        commands.insert(-2, ("%s tcpdump -ni lan0" % ns["lan"], "what the LAN host sees"))
    width = max(len(command) for command, _ in commands)
    return "the tunnel stays up until Ctrl-C; its lines keep coming here. In another terminal, as root:\n" + \
        "\n".join("  ip netns exec %-*s   %s" % (width, command, what) for command, what in commands)


NUMBERED = re.compile(r"(TAP2NET|NET2TAP) (\d+): ((Read|Written) (\d+) bytes)?(.*)")  # -d, -dd lines
FORWARDED = re.compile(r"CLASS: \S+ -> (\S+): (\d+) bytes, forwarded")  # a class's packet, client to client
CABLE = {"tcp": "TCP", "tls": "TLS records", "two_writes": "two writes (Nagle on)"}


def journey(lines, target, hosts, cable):
    """--diagram: the first ping to `target`, from the timeline's `lines`, as a Mermaid sequence diagram."""
    lines, names = sorted(lines), list(hosts)
    pinged = [(t, text) for t, who, text in lines if who == "ping"]
    start = next(t for t, text in pinged if text.startswith("echo request to %s:" % target))
    end, said = next(((t, text) for t, text in pinged if t > start and " icmp_seq=1 " in text), (start, ""))
    if not said.startswith("reply"):
        return None
    window = [(t, who, text) for t, who, text in lines if start <= t <= end and who in hosts]
    what = {(who, m[1], m[2]): re.sub(r" id=\d+| \(Ethernet.*| \(\d+ bytes\)", "", m[6]).replace(">", "to")
            for _, who, text in window for m in [NUMBERED.match(text)] if m and not m[3]
            and not m[6].startswith("on the wire")}  # the -dd line that says what a packet is
    kept = {key for key, kind in what.items() if re.search(r"echo-(request|reply) seq=1$|^ARP", kind)}
    pair = lambda host: [("D" + host, "the device on " + host), ("S" + host, "simpletun.py on " + host)]
    lifelines = [("ping", "ping on %s" % names[0])] + pair(names[0]) + [("C", "the cable")] + \
        pair("server")[::-1] + [line for host in names[2:] for line in pair(host)[::-1]]
    out = ["sequenceDiagram"] + ["    participant %s as %s" % line for line in lifelines]
    events = [("ping", "D" + names[0], start, "echo request, icmp_seq=1")]
    received = collections.defaultdict(list)  # a host's receives that brought what it has not cut yet
    for t, who, text in window:
        m, forwarded, here = NUMBERED.match(text), FORWARDED.match(text), "S" + who
        if text.startswith("NET2TAP: a receive brought"):
            received[who].append(("C", here, t, text.split(": ", 1)[1].split(";")[0]))
        elif forwarded and forwarded[1] in hosts.values():  # (never cut for the server's own device)
            to = next(host for host, address in hosts.items() if address == forwarded[1])
            events += received.pop(who, []) + [(here, "C", t, "CLASS: passed on to %s, %s bytes, a client to "
                                                             "a client" % (to, forwarded[2]))]
        elif m and m[4]:
            (direction, n, verb, size), key = m.group(1, 2, 4, 5), (who, m[1], m[2])
            cut = received.pop(who, []) if direction == "NET2TAP" and verb == "Read" else []
            if key not in kept:
                continue
            if direction == "TAP2NET" and verb == "Read":
                events.append(("D" + who, here, t, "TAP2NET %s: read %s bytes, %s" % (n, size, what[key])))
            elif direction == "TAP2NET":
                events.append((here, "C", t, "TAP2NET %s: one datagram of %s bytes" % (n, size) if cable ==
                               "udp" else "TAP2NET %s: a frame of %d bytes, its 2-byte length then the %s, "
                               "in %s" % (n, int(size) + HEADER.size, size, CABLE[cable])))
            elif verb == "Read":
                events += cut + [("C", here, t, "NET2TAP %s: one datagram, a packet of %s bytes" % (n, size))
                                 if cable == "udp" else (here, here, t, "NET2TAP %s: cut a packet of %s bytes"
                                                         % (n, size))]
            else:
                events.append((here, "D" + who, t, "NET2TAP %s: wrote %s bytes to the device" % (n, size)))
    events.append(("D" + names[0], "ping", end, "echo reply, icmp_seq=1"))
    out += ["    %s->>%s: %s (+%.2f ms)" % (a, b, re.sub(r"[;#\"']", "", text), (t - start) * 1000)
            for a, b, t, text in sorted(events, key=lambda event: event[2])]  # (a receive waits for its cut)
    out.append("    Note over ping,%s: round trip %s, as ping measured it" % (lifelines[-1][0],
                                                                            said.split("time=")[1]))
    return "\n".join(out) + "\n"


def bench(ns, timeline, mode):
    """--bench: TCP throughput and ping round trips over the bare cable and through the tunnel."""
    def run(namespace, call):
        try:
            return json.loads(ip_command("netns", "exec", namespace, *calling(call)))
        except UserError as err:  # (its last line: the error the call ended with)
            timeline.say("bench: %s failed: %s" % (call.split("(")[0], str(err).splitlines()[-1]))

    addresses = {side: {"underlay": host_of(DEMO_UNDERLAY[side]), "tunnel": host_of(DEMO_TUNNEL[side])}
                 for side in ("server", "client")}
    sink = start_in(ns["server"], calling("bench_sink(%d)" % BENCH_PORT))
    sink.stdout.readline()  # "listening"
    try:
        timeline.say("bench: TCP client -> server for %d s over the cable, then through the tunnel; "
                     "%d pings each way" % (BENCH_SECONDS, BENCH_PINGS))
        rows = [("TCP client -> server (Mbit/s)", [run(ns["client"], "bench_send(%r, %d, %d)"
                                                      % (addresses["server"][way], BENCH_PORT, BENCH_SECONDS))
                                                  for way in ("underlay", "tunnel")])]
        for here_side, there in (("client", "server"), ("server", "client")):
            rows.append(("ping %s -> %s (ms)" % (here_side, there),
                         [run(ns[here_side], "bench_ping(%r, %d)" % (addresses[there][way], BENCH_PINGS))
                          for way in ("underlay", "tunnel")]))
    finally:
        sink.kill()
        sink.wait()
    timeline.say("%-35s underlay   tunnel   tunnel vs underlay" % ("bench, %s:" % mode))
    for name, (under, tunnel) in rows:
        if under is None or tunnel is None:
            timeline.say("  %-32s failed" % name)
            continue
        ratio = ("x %.3f" % (tunnel / under)) if "Mbit" in name else ("+%.3f ms" % (tunnel - under))
        timeline.say("  %-32s %9.1f %9.1f   %s" % (name, under, tunnel, ratio) if "Mbit" in name else
                     "  %-32s %9.3f %9.3f   %s" % (name, under, tunnel, ratio))


def bench_sink(port):
    """--bench, in the server host: count the bytes of each connection, answer with the count."""
    with socket.create_server(("", port)) as listener:
        print("listening", flush=True)  # bench() waits for this line
        while True:
            sock, _ = listener.accept()
            with sock:
                buffer = bytearray(1 << 20)
                received = sum(iter(lambda: sock.recv_into(buffer), 0))  # until the sender's end
                sock.sendall(b"%d" % received)


def bench_send(host, port, seconds):
    """--bench, in the client host: send as fast as TCP takes it for `seconds`; print Mbit/s as JSON."""
    chunk = bytes(1 << 18)
    with socket.create_connection((host, port), timeout=10) as sock:
        start = time.monotonic()
        while time.monotonic() - start < seconds:
            sock.sendall(chunk)
        sock.shutdown(socket.SHUT_WR)
        received = int(sock.recv(64))  # what arrived, counted by the receiver once all of it had
        elapsed = time.monotonic() - start
    print(json.dumps(received * 8 / elapsed / 1e6))


def bench_ping(address, count):
    """--bench: the average ping round trip in ms, as JSON (null if a reply was missing)."""
    times = ping(address, count, timeout=1.0, interval=0.02)
    print(json.dumps(None if None in times else sum(times) / len(times) * 1000))


# ---- 10. The full command line: parse_args(), full_main() -----------------------------------
#      The tunnel's own parser (make_parser) with the extras' flags added, and the tunnel's
#      run() and serve()/run_client() called with the extras in their seams.

def number_between(low, high, name, kind=int):
    """An argparse type: a number from `low` to `high`, called `name` in the error."""
    def parse(text):
        try:
            number = kind(text)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError("%s is a number from %g to %g, not %r" % (name, low, high, text))
        return number
    return parse


def ip_interface(text):
    """argparse type: an IPv4 or IPv6 address with its prefix length, e.g. 10.0.0.1/24 or fd00::1/64."""
    if "/" in text:
        with contextlib.suppress(ValueError):
            return ipaddress.ip_interface(text)
    raise argparse.ArgumentTypeError("not an address/prefix such as 10.0.0.1/24 or fd00::1/64: %r" % text)


def parse_args(argv=None):
    """Read the command line: the original's flags (make_parser), then the extras'."""
    parser = make_parser(required=False, debug_help="log every packet, as the original did; -dd also says "
                         "what each packet is and what each receive brought; -ddd also shows each frame's "
                         "first bytes on the wire")
    parser.epilog = "examples, labs and what each line means: README.md"
    parser.add_argument("--addr", metavar="CIDR", type=ip_interface, help="give the device this address/"
                        "prefix (IPv4 or IPv6, e.g. 10.0.0.1/24 or fd00::1/64) and bring it up")
    parser.add_argument("--mtu", metavar="N", type=number_between(MIN_MTU, MAX_MTU, "an MTU"),
                        help="set the device's MTU (%d-%d; tap: up to %d)" % (MIN_MTU, MAX_MTU, MAX_TAP_MTU))
    parser.add_argument("--tls", metavar="FILE", help="encrypt and authenticate with TLS: FILE is one PEM "
                        "file holding this end's certificate and private key (see the README: Encryption)")
    parser.add_argument("--tls-peer", metavar="CERT", help="with --tls: the peer's certificate, the only one "
                        "accepted (default: the certificate in the --tls FILE)")
    parser.add_argument("--bind", metavar="ADDR", help="server: listen on this address only (default: all)")
    parser.add_argument("--clients", metavar="N", type=number_between(1, MAX_NEWCOMERS * 32, "a class"),
                        default=1, help="server: serve up to N clients at once, as one network (default 1); "
                        "with --demo: a class of 2 or 3 on this machine")
    parser.add_argument("--reconnect", action="store_true", help="client: when the server goes away, keep "
                        "the device and try again every %d s until it is back" % RECONNECT_EVERY)
    parser.add_argument("--udp", action="store_true", help="carry each packet as one UDP datagram (no TCP "
                        "over TCP); both ends need it, and a C simpletun peer has no such mode")
    parser.add_argument("--key", metavar="FILE", help="with --udp: sign every datagram with the secret in "
                        "FILE, the same at both ends: only key holders are served; packets cross in clear")
    parser.add_argument("--two-writes", action="store_true", help="send as the C original does, to see its "
                        "40 ms stall: length and packet in two sends, Nagle on (still wire-compatible)")
    parser.add_argument("--offload", action="store_true", help="let the kernel hand over 64 KiB super-"
                        "packets (TSO/GSO): several times the throughput; both ends need it (not a C peer)")
    demo = parser.add_argument_group("the one-machine demo")
    demo.add_argument("--demo", action="store_true",
                      help="show the whole tunnel on this machine: namespaces, a server, a client and pings "
                           "through it, then clean up (root; -a, -d, --tls, --udp... go to every end)")
    demo.add_argument("--keep", action="store_true", help="keep the demo up until Ctrl-C (quiet unless -d)")
    demo.add_argument("--lan", action="store_true", help="add a third host on a LAN behind the server, and "
                      "ping it from the client through the tunnel")
    demo.add_argument("--loss", metavar="PCT", type=number_between(0, 100, "a percentage", float), default=0,
                      help="the demo's cable loses PCT %% of packets each way")
    demo.add_argument("--delay", metavar="MS", default=0, type=number_between(0, 1e4, "a delay in ms", float),
                      help="the demo's cable delays each packet MS ms (needs netem)")
    demo.add_argument("--diagram", metavar="FILE", help="write the first ping's journey through the tunnel "
                      "to FILE as a Mermaid sequence diagram (-: after the timeline)")
    demo.add_argument("--bench", action="store_true", help="measure TCP throughput and ping over the demo's "
                      "cable and through its tunnel")
    parser.add_argument("--timestamps", action="store_true", help=argparse.SUPPRESS)  # the demo's ends
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.tap and args.mtu and args.mtu > MAX_TAP_MTU:
        parser.error("a tap device takes an MTU of at most %d (the Ethernet header must fit in 65535)"
                     % MAX_TAP_MTU)
    for flag, why in (("tls", "the standard library has no DTLS, TLS for datagrams"),
                      ("offload", "its 64 KiB super-packets do not fit in a datagram"),
                      ("two_writes", "it is about TCP: a datagram has no length to send apart")):
        if args.udp and getattr(args, flag):
            parser.error("--udp cannot go with --%s (%s)" % (flag.replace("_", "-"), why))
    if args.key and not args.udp:
        parser.error("--key is for --udp (over TCP, --tls proves who the peer is, and encrypts too)")
    if args.tls_peer and not args.tls:
        parser.error("--tls-peer needs --tls FILE (this end's certificate and key)")
    if args.demo:
        if args.iface or args.server or args.client or args.addr or args.tls_peer or args.bind or args.mtu \
                or args.reconnect:
            parser.error("--demo sets up both ends itself: it takes only -a, -d, --tls, --offload, --udp, "
                         "--key, --two-writes, --lan, --keep, --loss, --delay, --bench and --clients")
        if args.clients > len(DEMO_CLASS) or args.clients > 1 and any(getattr(args, flag) for flag in (
                "udp", "offload", "two_writes", "lan", "loss", "delay", "bench")):
            parser.error("--demo --clients N shows a class of 2 or 3 clients over TCP: not with --udp, "
                         "--offload, --two-writes, --lan, --loss, --delay or --bench")
        return args
    for flag in ("keep", "lan", "loss", "delay", "bench", "diagram"):
        if getattr(args, flag):
            parser.error("--%s is for the demo (--demo --%s)" % (flag, flag))
    if args.iface is None:
        parser.error("an interface name is required (-i NAME)")
    if not (args.server or args.client):
        parser.error("choose server (-s) or client (-c HOST) mode")
    for flag, role, needs in (("bind", "server", args.server), ("clients", "server", args.server),
                              ("reconnect", "client", args.client)):
        if getattr(args, flag) != parser.get_default(flag) and not needs:
            parser.error("--%s is for the %s (%s)" % (flag, role, "-s" if role == "server" else "-c HOST"))
    for flag in ("offload", "two_writes", "udp"):
        if args.clients > 1 and getattr(args, flag):
            parser.error("--clients cannot go with --%s (a class is served over TCP, one packet per frame)"
                         % flag.replace("_", "-"))
    return args


def client_link(sock, host, args, tls, away=None):
    """run_client()'s make_link: TLS handshake, ExtraLink, --offload greeting, "connected" (unless -d)."""
    keep_alive(sock)
    if tls:
        sock = secure_client(sock, tls)
    kind = TwoWritesLink if args.two_writes else ExtraLink
    link = kind(sock, host, OFFLOAD_HEADER if args.offload else HEADER,
                OFFLOAD_RECV_SIZE if args.offload else RECV_SIZE, args.debug)
    try:
        if args.offload:
            greet_server(link)
    except (LinkEnded, OSError) as err:
        link.sock.close()  # not a peer of this kind: no goodbye to wait for
        raise UserError("CLIENT: %s" % err) from None
    link.away = away
    if away is None and not log.isEnabledFor(logging.INFO):
        log.warning("CLIENT: connected to %s port %d%s; the tunnel is up once a packet comes back through it",
                    host, args.port, " (TLS, the pinned certificate)" if tls else "")
    if args.addr:  # (it waits in the device until relay() reads it: the first packet the server gets)
        announce(args.addr, args.iface)
    return link


def run_client_again(tunnel, host, port, make_link):
    """--reconnect: run_client()'s work every RECONNECT_EVERY s; a line per outage, whatever ends each try."""
    away = None  # since when the server has been away
    while True:
        link = None
        try:
            link = make_link(connect_to(host, port), host, away)
            with contextlib.closing(link), selectors.DefaultSelector() as selector:
                relay(tunnel, link, selector)
            why = "the server closed the connection"
        except (UserError, LinkEnded, OSError) as err:
            why = getattr(err, "strerror", None) or err
        if link and link.heard:  # it was back
            away = None
        if away is None:
            log.warning("CLIENT: %s; trying again every %d s until it is back (--reconnect)", why,
                        RECONNECT_EVERY)
            away = time.monotonic()
        time.sleep(RECONNECT_EVERY)


def serve_with_room(tunnel, args, tls=None):
    """The server, with the waiting room as serve()'s next_client and selector."""
    with listen_on(args.port, args.bind or "", *server_family(args.bind)) as listener:
        log.info("SERVER: listening on port %d", args.port)
        room = WaitingRoom(listener, tunnel, args, tls)
        serve(tunnel, listener, room.next_client, room)


def extended_end(args):
    """Open the device with the extras' options, then serve (-s) or connect (-c) until the end."""
    tls = tls_context(args.server, args.tls, args.tls_peer) if args.tls else None
    flags = (IFF_TAP if args.tap else IFF_TUN) | (IFF_VNET_HDR if args.offload else 0)
    read_size = OFFLOAD_READ_SIZE if args.offload else MAX_PACKET
    tunnel = Tunnel(*tun_alloc(args.iface, flags), args.debug, read_size)
    try:
        set_offload(tunnel.fd, args.offload)
        log.debug("Successfully connected to interface %s", tunnel.name)
        mtu = args.mtu
        if args.udp and args.addr and not mtu:  # a packet that fits one datagram on a 1500-byte cable
            mtu = UDP_MTU - (ETHERNET.size if args.tap else 0) - (KEY_OVERHEAD if args.key else 0)
        if args.addr or mtu:
            configure_device(tunnel.name, args.addr, mtu)
        if args.udp:  # one loop until the end: its selector keeps the link's time
            link = udp_socket(args, read_key(args.key) if args.key else None)
            if args.client and args.addr:
                announce(args.addr, args.iface)
            with contextlib.closing(link), UdpClock(link) as selector:
                relay_until_closed(tunnel, link, "CLIENT" if args.client else "SERVER", selector)
                return 1  # a datagram link has no orderly end: it ends only when it breaks
        if args.client:
            return (run_client_again if args.reconnect else run_client)(
                tunnel, args.client, args.port,
                lambda sock, host, away=None: client_link(sock, host, args, tls, away))
        serve_with_room(tunnel, args, tls)
    finally:
        os.close(tunnel.fd)
        if tunnel.tap2net or tunnel.net2tap:  # a peer came (an error before that needs no second line)
            log.warning("simpletun.py: %s: TAP2NET %d packets, NET2TAP %d packets, %d dropped",
                        tunnel.name, tunnel.tap2net, tunnel.net2tap, tunnel.dropped)


def full_main(argv=None):
    """Run one end of the tunnel, or the demo, with every extra; return the exit status."""
    args = parse_args(argv)
    # -d: every packet; the demo's ends (--timestamps) also say when they connect, even without -d
    logging.basicConfig(handlers=[Lines(args)], level=logging.DEBUG if args.debug else
                        logging.INFO if args.timestamps else logging.WARNING)
    return run(lambda: demo(args) if args.demo else extended_end(args))


if __name__ == "__main__":
    sys.exit(full_main())
