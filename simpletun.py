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

The wire format is the original C simpletun's (either end may be the C program): every
packet travels as a 2-byte big-endian length followed by exactly that many bytes.

    +--------+--------+------------------------------+
    |  length (2 B)   |  packet (length bytes)       |
    +--------+--------+------------------------------+

The lines down to the "# ====" banner are the whole tunnel, the original's program in Python,
and run alone; the extras below attach through the seams it offers (Link's methods, serve()'s
next_client and selector, logging's handlers). WARNING: it protects nothing: packets cross in
clear."""

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
    sys.exit("simpletun.py: error: simpletun.py runs on Linux only (it needs /dev/net/tun); "
             "this is " + sys.platform)
import fcntl  # noqa: E402 (Linux only: see above)

log = logging.getLogger("simpletun")

PORT = 55555  # the original's default port
HEADER = struct.Struct("!H")  # the wire format's length: 2 bytes, big-endian ("network order")
READ, WRITE = selectors.EVENT_READ, selectors.EVENT_WRITE  # what select() may wait for on an fd

# linux/if_tun.h: open /dev/net/tun, then TUNSETIFF turns the fd into one device's fd
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int): attach this fd to the device named in a struct ifreq
IFF_TUN = 0x0001  # layer 3: the fd carries bare IP packets
IFF_TAP = 0x0002  # layer 2: the fd carries whole Ethernet frames
IFF_NO_PI = 0x1000  # no 4-byte "packet information" before each packet: we carry the packet alone
# struct ifreq: a 16-byte name, then a union whose first member (ifr_flags) TUNSETIFF reads;
# the union makes it 40 bytes on 64-bit Linux: we pass 40, so the kernel never reads past it.
IFREQ_FLAGS = struct.Struct("16sH22x")

# The longest packet a frame's length can state, and the most we read from the device at once:
# the kernel takes MTUs up to 65535 for tun and 65535 - 14 for tap, whose frames add a 14-byte
# Ethernet header. (The original read at most 2000 bytes into a buffer of 2000, and overflowed.)
MAX_PACKET = 65535
MAX_BATCH = 64  # device packets read per wake-up before we send: bounds how long NET2TAP waits
OUT_LIMIT = 256 * 1024  # bytes queued for TCP before we stop reading the device (see relay())
RECV_SIZE = 256 * 1024  # the receive buffer: many frames per receive
CONNECT_TIMEOUT = 10  # seconds for the client's TCP connect


class UserError(Exception):
    """A problem the user can fix: run() prints it as one line and exits 1."""


# ---- The device: tun_alloc(), Tunnel -----------------------------------------------------

HINTS = {errno.ENOENT: "no such file: load the tun module (modprobe tun)",
         errno.EACCES: "permission denied: run as root (or with CAP_NET_ADMIN)",
         errno.EPERM: "not allowed: run as root (or with CAP_NET_ADMIN)",
         errno.EINVAL: "it exists and is not a device of this kind (tun: -u, tap: -a)",
         errno.EBUSY: "another program has it open (is another simpletun.py running on it?)"}


def tun_alloc(name, flags, clone_device="/dev/net/tun"):
    """Attach to the tun/tap device `name`, creating it if needed; return (fd, its name)."""
    try:
        fd = os.open(clone_device, os.O_RDWR)
    except OSError as err:
        why = HINTS.get(err.errno, err.strerror)
        raise UserError("cannot open %s: %s" % (clone_device, why)) from None
    try:
        ifreq = fcntl.ioctl(fd, TUNSETIFF, IFREQ_FLAGS.pack(name.encode(), flags | IFF_NO_PI))
    except OSError as err:
        os.close(fd)
        why = HINTS.get(err.errno, err.strerror)
        raise UserError("cannot attach to %s: %s" % (name, why)) from None
    os.set_blocking(fd, False)  # so that TAP2NET can read "until the device is empty"
    return fd, IFREQ_FLAGS.unpack(ifreq)[0].rstrip(b"\0").decode()


class Tunnel:
    """One end's device, its -d level and its counters: all the loop needs besides the link."""

    def __init__(self, fd, name, debug=0, read_size=MAX_PACKET):
        self.fd, self.name, self.debug, self.read_size = fd, name, debug, read_size
        self.tap2net = self.net2tap = self.dropped = 0  # packets read; written or refused; refused

    def write(self, packet):
        """NET2TAP: write one packet to the device, in one write (it takes all of it, or fails)."""
        self.net2tap += 1
        if self.debug:
            log.debug("NET2TAP %d: Read %d bytes from the network", self.net2tap, len(packet),
                      extra={"packet": packet})
        try:
            os.write(self.fd, packet)
        except OSError as err:  # the device is down (EIO), or this is no packet for it (EINVAL)
            self.dropped += 1  # the C original died here; we drop the packet and carry on
            log.warning("NET2TAP %d: %s refused a %d-byte packet: %s", self.net2tap, self.name,
                        len(packet), err.strerror)
            return
        if self.debug:
            log.debug("NET2TAP %d: Written %d bytes to the tap interface", self.net2tap,
                      len(packet))


# ---- Framing: deframe() ------------------------------------------------------------------

def deframe(data, handle, header=HEADER):
    """Cut bytes from TCP into packets: hand each whole frame's packet to handle(), as a view of
    `data` (no copy); return the bytes left over, the start of a frame still to come. (TCP keeps
    no message boundaries: a receive may end inside a frame, or hold many.)"""
    size, start = len(data), 0
    while size - start >= header.size:
        (length,) = header.unpack_from(data, start)
        end = start + header.size + length
        if end > size:
            break
        if length:  # an empty frame carries no packet (the device would refuse it): skip it
            handle(data[end - length:end])
        start = end
    return data[start:]


# ---- The TCP link: tune(), listen_on(), connect_to(), Link -------------------------------

def tune(sock):
    """Set what every tunnel connection needs; return the socket."""
    # Nagle's algorithm would hold a small frame back until the previous one is acknowledged,
    # and the peer delays that ACK by up to 40 ms: the original's stall on every round trip.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)  # one direction never blocks the other: the loop moves what is ready
    return sock


def listen_on(port, address="", family=socket.AF_INET, dual=False):
    """The server's listening socket: on every IPv4 address, as the original's (or as told)."""
    try:
        return socket.create_server((address, port), family=family, dualstack_ipv6=dual)
    except OSError as err:  # errno's own words, not create_server's (a gaierror's errno is < 0)
        why = os.strerror(err.errno) if err.errno > 0 else err.strerror
        where = address or "every address"
        raise UserError("cannot listen on %s port %d: %s" % (where, port, why)) from None


def connect_to(host, port):
    """Connect to the server; return the tuned socket (host: IPv4, IPv6 or a name)."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as err:  # socket.timeout and socket.gaierror too
        why = err.strerror or err
        if err.errno == errno.ECONNREFUSED:
            why = "%s: is a server running (simpletun.py -s), over TCP?" % why
        raise UserError("cannot connect to %s port %d: %s" % (host, port, why)) from None
    log.info("CLIENT: Connected to server %s", host)
    return tune(sock)


class Link:
    """One connection to the peer: the frames queued for it (`out`), and the `kept` bytes of a
    frame whose end has not come, at the front of the buffer the next receive lands in. A link
    ends one way: end(why) notes why (the first reason stands), and the loop stops.

    Methods an extra may override, keeping what each means:
    - receive(handle): take what has come, hand each whole packet to handle(); at the end of
      the peer's stream, finish(); if it breaks, end() with lost()'s words
    - send_queued(): send as much of `out` as the socket takes now
    - finish(), lost(err): why the link ended, in words; close(): close the connection
    """

    would_block = (BlockingIOError,)  # "not now, ask select() again"

    def __init__(self, sock, address, header=HEADER, size=RECV_SIZE):
        self.sock, self.address, self.header = sock, address, header
        self.out = bytearray()  # frames read from the device, not yet taken by TCP
        self.view = memoryview(bytearray(size))  # the receive buffer
        self.kept = 0  # bytes of an unfinished frame at the front of the buffer
        self.ended = None  # why the link ended, once it has
        self.orderly = False  # it ended as it should: the peer closed it between two frames

    def end(self, why, orderly=False):
        """The link cannot go on: note why (the loop stops at its next turn)."""
        if self.ended is None:
            self.ended, self.orderly = why, orderly

    def send_queued(self):
        """Send as much of the queued frames as the socket takes now -- many in one call."""
        try:
            del self.out[:self.sock.send(self.out)]
        except self.would_block:  # the socket buffer is full: select() says when it drains
            pass
        except OSError as err:
            self.end(self.lost(err))

    def receive(self, handle):
        """Receive behind the kept bytes; hand each packet that completes to handle(); return
        how many bytes came (None: none)."""
        try:
            count = self.sock.recv_into(self.view[self.kept:])
        except self.would_block:  # nothing there after all
            return
        except OSError as err:
            return self.end(self.lost(err))
        if not count:
            return self.finish()
        rest = deframe(self.view[:self.kept + count], handle, self.header)
        self.kept = len(rest)
        self.view[:self.kept] = rest  # the start of the next frame: the next receive lands behind
        return count

    def finish(self):
        """The peer's stream has ended: in order, unless in the middle of a frame."""
        if self.kept:
            self.end("connection ended in the middle of a frame (%d bytes of it came)" % self.kept)
        self.end("the peer closed the connection", orderly=True)

    def lost(self, err):
        """Why an OSError broke the connection, in words."""
        return "connection lost: %s" % (err.strerror or err)

    def close(self):
        """The connection is over: close it."""
        self.sock.close()


# ---- The two directions: tap2net(), net2tap() --------------------------------------------

def tap2net(tunnel, link):
    """TAP2NET: read packets from the device until it is empty (or a batch is full); send them
    framed, the whole batch in one send."""
    fd, debug, out, header = tunnel.fd, tunnel.debug, link.out, link.header  # once per batch
    for _ in range(MAX_BATCH):
        try:
            packet = os.read(fd, tunnel.read_size)
        except BlockingIOError:
            break
        except OSError as err:  # EBADFD: the device was deleted under us; nothing more will come
            raise UserError("cannot read from %s: %s" % (tunnel.name, err.strerror)) from None
        tunnel.tap2net += 1
        out += header.pack(len(packet))  # the length and the packet, both queued: one send
        out += packet
        if debug:  # the original's words: it says "tap interface" for a tun device too
            log.debug("TAP2NET %d: Read %d bytes from the tap interface", tunnel.tap2net,
                      len(packet), extra={"packet": packet})
            log.debug("TAP2NET %d: Written %d bytes to the network", tunnel.tap2net, len(packet))
        if len(out) >= OUT_LIMIT:
            break
    link.send_queued()  # right away, in the same wake-up: a frame never waits for the next one


def net2tap(tunnel, link):
    """NET2TAP: receive what TCP has; write each packet it completes to the device."""
    link.receive(tunnel.write)


# ---- The select loop: relay(), watch() ---------------------------------------------------

def relay(tunnel, link, selector):
    """Copy packets both ways between the device and the link until the link ends (link.ended
    says why). The selector may watch more fds, each with the function that handles it as its
    data (a server's extras do): those are called here too."""
    try:
        while not link.ended:
            # Read the device only while the queue has room; wait for room in the socket only
            # while frames wait. A peer that stops reading stops our reads of the device, not our
            # receives: it may be waiting for us to take its data before it takes ours.
            watch(selector, tunnel.fd, READ if len(link.out) < OUT_LIMIT else 0)
            watch(selector, link.sock, READ | WRITE if link.out else READ)
            for key, events in selector.select():  # no timeout: an idle tunnel sleeps here
                if key.fileobj == tunnel.fd:
                    tap2net(tunnel, link)
                elif key.fileobj == link.sock:
                    if events & WRITE:
                        link.send_queued()
                    if events & READ:
                        net2tap(tunnel, link)
                else:
                    key.data(events)  # another fd, and the function that handles it
    finally:
        watch(selector, tunnel.fd, 0)
        watch(selector, link.sock, 0)


def watch(selector, fileobj, events):
    """Have the selector wait for `events` on fileobj (0: none); a system call only on a change."""
    key = selector.get_map().get(fileobj)
    if key is None:
        if events:
            selector.register(fileobj, events)
    elif not events:
        selector.unregister(fileobj)
    elif events != key.events:
        selector.modify(fileobj, events, key.data)


# ---- Server and client: serve(), run_client() --------------------------------------------

def accept_client(listener):
    """Wait for the next client; return its Link."""
    sock, address = listener.accept()
    log.info("SERVER: Client connected from %s", address[0])
    return Link(tune(sock), address[0])


def serve(tunnel, listener, next_client=None, selector=None):
    """Server: serve one client at a time; when it leaves, keep the device and serve the next.
    next_client() returns the next client's Link (default: whoever connects next); the selector
    is the one the loop uses, and may watch more fds while a client is served."""
    with selector or selectors.DefaultSelector() as selector:
        while True:
            link = next_client() if next_client else accept_client(listener)
            with contextlib.closing(link):
                relay_until_closed(tunnel, link, "SERVER", selector)


def run_client(tunnel, host, port, make_link=Link, selector=None):
    """Client: relay until the server goes away; exit status 0 if it closed cleanly, else 1.
    make_link(sock, address) turns the connection into a Link; the selector is the loop's."""
    with contextlib.closing(make_link(connect_to(host, port), host)) as link:
        with selector or selectors.DefaultSelector() as selector:
            return 0 if relay_until_closed(tunnel, link, "CLIENT", selector) else 1


def relay_until_closed(tunnel, link, side, selector):
    """Run relay() on one link; say in one line how it ended; True if it ended in order."""
    relay(tunnel, link, selector)
    log.warning("%s: %s", side, link.ended)
    return link.orderly
# ---- The command line: make_parser(), run(), main() --------------------------------------

def interface_name(text):
    """argparse type: a name the kernel takes for a device (struct ifreq: 15 bytes and a NUL)."""
    if not 0 < len(text.encode()) < 16 or "/" in text or " " in text:
        raise argparse.ArgumentTypeError("an interface name is 1 to 15 bytes, no '/' or spaces: %r"
                                         % text)
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
    role.add_argument("-s", "--server", action="store_true",
                      help="run as server: wait for a client")
    role.add_argument("-c", "--client", metavar="HOST", help="run as client: connect to HOST")
    parser.add_argument("-p", "--port", type=port_number, default=PORT,
                        help="TCP port (default %(default)s)")
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
        print("simpletun.py: unexpected error: %s: %s" % (type(err).__name__, err),
              file=sys.stderr)
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
    level = logging.DEBUG if args.debug else logging.WARNING
    logging.basicConfig(format="%(message)s", level=level)
    return run(lambda: tunnel_end(args))


# =======================================================================================
# Everything below is an extra: each attaches to the tunnel above through a seam it offers
# (Link's methods, serve()'s next_client and selector, a logging handler), and the tunnel
# never calls it. Each section says what it adds, and through which seam.
# =======================================================================================

# the extras' own imports: the tunnel above needs none of them
import collections  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import heapq  # noqa: E402
import itertools  # noqa: E402
import hmac  # noqa: E402
import ipaddress  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import ssl  # noqa: E402
import subprocess  # noqa: E402
import termios  # noqa: E402
import time  # noqa: E402

__version__ = "2.1.0"


# ---- 1. The full program's link: ExtraLink, keep_alive(), framing() -------------------------
#      One subclass of Link (the seam: its methods) adds what the tunnel above leaves out: TLS
#      (its own "not now" errors, bytes it decrypted that select() cannot see), keepalive, an
#      orderly goodbye, the -dd line for each receive, --two-writes, and, for a client, a line
#      when its first packet comes back, when nothing does, and why a link ended before that.

# Noticing a peer that vanished without a word (power cut, cable pulled): keepalive probes after
# 20 s of silence, 4 probes 5 s apart; data unacknowledged (or not taken) for 40 s ends it.
USER_TIMEOUT = 40
KEEPALIVE = ((socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
             (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 20),
             (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5),
             (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4),
             (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT * 1000))
GOODBYE_TIME = 2  # seconds we wait for the peer's half of an orderly close
SILENCE = 3  # seconds a client may send with nothing back before it says so
BUSY = 0.2  # seconds since something came back in which a client's sends are not looked at
# "Not now, ask select() again": a full or empty socket, or (TLS) an incomplete record
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)
EVICTED = ("the server reset the connection before it served this end: its waiting room was "
           "full (a flood of connections?), or it stopped; start the client again")
UNSERVED = ("the server closed the connection without sending a packet: it serves one client "
            "at a time (is another one connected?), or all its --clients slots are taken, or it "
            "runs with other options (--tls, --offload, -u/-a); its log says which")
UNANSWERED = ("CLIENT: nothing has come back through the tunnel for %d s since this end sent a "
              "ping or opened a TCP connection: is this end's address another client's (the "
              "server drops such packets, and its log says so), or does nothing answer at the "
              "other end?")


def say_once(said, key, text, *args):
    """Log a line the first time `key` comes (`said`: the keys said so far); True if it did."""
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


def asks(link):
    """True if the first of a client's queued frames holds a packet that waits for an answer
    (see awaits_answer()). The first is enough: a ping, or a new connection's first segment, is
    read from the device alone. A busy tunnel, where something came back within BUSY s, is not
    looked at: its answers are coming, and reading each send would cost it speed."""
    if time.monotonic() - link.heard_at < BUSY:
        return False
    frames, header, args = link.out, link.header, link.args
    size = min(header.unpack_from(frames)[0], HEADERS_READ)
    return awaits_answer(bytes(frames[header.size:header.size + size]), args.tap, args.offload)


def framing(args):
    """How this run frames packets on TCP: the length's header, and the receive buffer's size."""
    if args.offload:
        return OFFLOAD_HEADER, OFFLOAD_RECV_SIZE
    return HEADER, RECV_SIZE


class ExtraLink(Link):
    """A Link with the full program's additions (see above); args are the run's options."""

    would_block = WOULD_BLOCK

    def __init__(self, sock, address, args, heard=False):
        super().__init__(sock, address, *framing(args))
        self.args, self.debug = args, args.debug
        self.tls = isinstance(sock, ssl.SSLSocket)
        self.heard = heard  # a packet came from the peer: a server admits only such a peer
        self.stalled = None  # since when the peer has taken none of the frames queued for it
        self.asked = None  # client: since when it has sent with nothing back
        self.heard_at = 0  # client: when something last came back
        self.away = None  # client, --reconnect: since when the server has been away
        self.told = set()  # what a client has said once
        if args.two_writes:  # Nagle's algorithm back on (tune() turned it off): see send_apart()
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)

    def receive(self, handle):
        """Link.receive(); -dd: a line for each receive; a client says its first packet back."""
        # (TLS decrypts a record at a time, at most 16 KiB, and a receive has room for more: a
        # frame is far shorter than the buffer. So no decrypted bytes are left inside TLS, where
        # select() could not see them.)
        if self.kept == len(self.view):
            return self.end("a frame longer than this end's buffer (%d bytes): is the peer "
                            "running another wire format?" % self.kept)
        if not self.heard:  # a client, until a packet comes back (else the tunnel's own handle())
            handle = functools.partial(self.first_packet, handle)
        if self.debug > 1:
            count = self.receive_and_tell(handle)
        else:
            count = super().receive(handle)
        if count:  # something came back: no silence to tell of
            self.asked, self.heard_at = None, time.monotonic()
            self.told.discard("silent")
        return count

    def receive_and_tell(self, handle):
        """-dd: receive, say what the receive brought, then hand its packets on (copies: the next
        frame's start moves to the front of the buffer, over the packets before it)."""
        held, wire, packets = self.kept, self.waiting(), []
        count = super().receive(lambda packet: packets.append(bytes(packet)))
        if count:
            log_receive(self, count, held, wire and wire - self.waiting(), len(packets))
        for packet in packets:
            handle(packet)
        return count

    def first_packet(self, handle, packet):
        """handle(), for a client that has had nothing back yet: it says the first packet that
        could be one (garbage is none), and names an --offload server's greeting."""
        if not self.heard:
            if self.header is HEADER and packet == GREETING:
                return self.end("the peer runs with --offload, this end without: start both ends "
                                "with --offload, or neither")
            self.heard = not packet_mismatch(packet, len(packet), self.args.tap)
            if self.heard and self.away is None:
                log.warning("CLIENT: a first packet came back through the tunnel: the server "
                            "serves this end")
            elif self.heard:
                log.warning("CLIENT: back after %d s: a packet came back through the tunnel "
                            "(--reconnect)", time.monotonic() - self.away)
        handle(packet)

    def waiting(self):
        """-dd with TLS: the bytes of TLS records waiting in the kernel (what came by cable)."""
        if not (self.tls and self.debug > 1):
            return 0
        return struct.unpack("i", fcntl.ioctl(self.sock.fileno(), termios.FIONREAD, bytes(4)))[0]

    def send_queued(self):
        """Link.send_queued() (--two-writes: as the C original sends); note since when the peer
        has taken nothing; a client that sent with nothing back says so once."""
        waiting = len(self.out)
        if waiting and self.args.client and self.asked is None and asks(self):
            self.asked = time.monotonic()
        if self.args.two_writes:
            self.send_apart()
        else:
            super().send_queued()
        if not self.out or len(self.out) < waiting:
            self.stalled = None
        elif self.stalled is None:
            self.stalled = time.monotonic()

    def due(self):
        """The Clock's timer (a client's): when to say that nothing came back (None: not now)."""
        return silence_due(self)

    def tick(self):
        """The timer: a client pinged or opened a connection, and nothing came back for
        SILENCE s: it says so, once."""
        say_once(self.told, "silent", UNANSWERED, SILENCE)

    def send_apart(self):
        """--two-writes: send each queued frame as the original does, length and packet apart,
        with Nagle's algorithm on: the stall it shows is the original's."""
        self.sock.setblocking(True)
        try:
            while self.out:
                end = self.header.size + self.header.unpack_from(self.out)[0]
                self.sock.sendall(self.out[:self.header.size])
                self.sock.sendall(self.out[self.header.size:end])
                del self.out[:end]
        except OSError as err:
            self.end(self.lost(err))
        finally:
            self.sock.setblocking(False)

    def finish(self):
        """Link.finish(); a server that closes before sending a packet probably served another."""
        if not self.heard and not self.kept:
            self.end(UNSERVED)
        super().finish()

    def lost(self, err):
        """Why the connection broke, as clearly as this end can tell."""
        if self.stalled is not None and time.monotonic() - self.stalled >= USER_TIMEOUT - 5:
            return ("connection dropped: the peer took none of this end's data for %d s (it "
                    "stopped reading, or cannot be reached)" % USER_TIMEOUT)
        if isinstance(err, ConnectionResetError) and not self.heard:
            return EVICTED
        if isinstance(err, ssl.SSLError):
            return explain_tls_ending(err, self)
        return super().lost(err)

    def close(self):
        """Close without a reset: TLS close_notify, our FIN, then read what comes until the peer's
        (a socket closed with unread bytes sends a reset: the peer would report a broken
        connection, not an orderly end)."""
        with self.sock, contextlib.suppress(OSError, ValueError):  # (the peer is gone already)
            if self.tls:
                tls_goodbye(self.sock)
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + GOODBYE_TIME
            while select.select([self.sock], [], [], max(0, deadline - time.monotonic()))[0]:
                if not self.sock.recv(65536):
                    break


# ---- 2. TLS (--tls): tls_context(), secure_client(), tls_goodbye() --------------------------
#      Each end holds a certificate and its key, and accepts exactly one certificate from the
#      other (its own, unless --tls-peer names another): holding the key makes a host a member.
#      The client's handshake runs in its make_link (client_link()); the server's in the waiting
#      room (3), beside every other newcomer's.

PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
HANDSHAKE_TIMEOUT = 5  # seconds for a TLS handshake (and, with --offload, the greeting after it)
TLS_HANDSHAKE_RECORD = (b"\x16\x03\x01", b"\x16\x03\x02", b"\x16\x03\x03")  # a ClientHello's start
OP_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0x80)  # openssl/ssl.h
X509_V_ERR_CERT_HAS_EXPIRED = 10


def tls_context(server, own_file, peer_file=None):
    """Load this end's certificate and key and the peer's certificate: (context, peer's DER)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if server:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # no host names: the peer is known by its certificate alone
    context.verify_mode = ssl.CERT_REQUIRED  # on the server too: the client must prove itself
    # Some Python builds (3.10, early 3.11) tell OpenSSL 3 to take an end without close_notify
    # as an orderly one: a killed peer would look like a clean close. We tell the two apart.
    context.options &= ~OP_IGNORE_UNEXPECTED_EOF
    try:
        context.load_cert_chain(own_file)
    except (OSError, ssl.SSLError, ValueError) as err:
        why = why_unusable(err, "a certificate and its private key")
        raise UserError("--tls %s: %s" % (own_file, why)) from None
    peer_file = peer_file or own_file
    try:
        with open(peer_file) as f:
            peer_pem = PEM_CERTIFICATE.search(f.read())
        if not peer_pem:
            raise ValueError("no certificate")
        context.load_verify_locations(cadata=peer_pem.group())
    except (OSError, ssl.SSLError, ValueError) as err:
        raise UserError("--tls-peer %s: %s" % (peer_file, why_unusable(err, "a certificate"))) \
            from None
    return context, ssl.PEM_cert_to_DER_cert(peer_pem.group())


def why_unusable(err, should_hold):
    """Why a --tls/--tls-peer file cannot be used, in words."""
    if isinstance(err, ssl.SSLError) or not isinstance(err, OSError):
        return "not a PEM file holding %s (see the README: Encryption)" % should_hold
    if err.errno == errno.ENOENT:
        return "no such file"
    if err.errno == errno.EACCES:
        return "cannot read it (permission denied)"
    return err.strerror or str(err)


def wrap_tls(sock, tls, server_side):
    """Start TLS on a connection (the handshake runs later); a ragged end stays an error."""
    context, _ = tls
    # suppress_ragged_eofs=False: a connection that ends without close_notify was cut, not
    # closed (a killed peer, or someone forging a FIN); only close_notify is an orderly end.
    return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                               suppress_ragged_eofs=False)


def pinned(tls_sock, tls):
    """True if the peer's certificate is the pinned one (the chain check takes any it signed)."""
    return tls_sock.getpeercert(binary_form=True) == tls[1]


# What OpenSSL's reasons mean for someone setting up a tunnel
TLS_HINTS = (
    (("CERTIFICATE_VERIFY_FAILED",),
     "the peer's certificate is not the one this end accepts (give both ends the same --tls "
     "file, or name the peer's certificate with --tls-peer)"),
    (("ALERT_CERTIFICATE_EXPIRED",),
     "the peer refused this end's certificate: it has expired (make a new one: see the README)"),
    (("ALERT_UNKNOWN_CA", "ALERT_BAD_CERTIFICATE", "ALERT_CERTIFICATE_UNKNOWN",
      "CERTIFICATE_REQUIRED"),
     "the peer refused this end's certificate (give both ends the same --tls file, or name this "
     "end's certificate with --tls-peer there)"),
    (("PEER_DID_NOT_RETURN_A_CERTIFICATE",), "the peer sent no certificate"),
    (("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
      "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "RECORD_LENGTH_MISMATCH"),
     "the peer does not speak TLS: is it running without --tls?"),
)


def explain_tls(err):
    """One line for a TLS failure: what OpenSSL said, and what it probably means."""
    reason = getattr(err, "reason", None) or ""
    if getattr(err, "verify_code", None) == X509_V_ERR_CERT_HAS_EXPIRED:
        return ("TLS failed (certificate has expired): the peer's certificate has expired; make "
                "a new one for both ends (see the README: Encryption)")
    for reasons, hint in TLS_HINTS:
        if any(r in reason for r in reasons):
            return "TLS failed (%s): %s" % (reason.lower().replace("_", " "), hint)
    ended = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionError)
    if isinstance(err, ended) or "EOF" in reason:
        return ("the peer closed the connection during the TLS handshake: does it run with "
                "--tls, and does it accept this end's certificate?")
    return "TLS failed: %s" % (reason.lower().replace("_", " ") or err)


def explain_tls_ending(err, link):
    """One line for a TLS connection that ended without an orderly goodbye."""
    # The TCP connection ended with no close_notify before it: SSLEOFError, or (some Python
    # builds) an SSLError that carries OpenSSL 3's own reason for it.
    reason = getattr(err, "reason", None) or ""
    if not isinstance(err, ssl.SSLEOFError) and "UNEXPECTED_EOF" not in reason:
        return explain_tls(err)
    if not link.heard:
        return ("connection lost right after the TLS handshake, with no TLS goodbye: the peer "
                "refused this end (is this end's certificate the one it pins, and not one "
                "signed by it?)")
    return ("connection lost: the peer ended the TLS connection without a goodbye "
            "(close_notify): it was killed, or the connection was cut")


def secure_client(sock, tls):
    """Client: run the TLS handshake within HANDSHAKE_TIMEOUT and check the pinned certificate."""
    sock = wrap_tls(sock, tls, server_side=False)
    sock.settimeout(HANDSHAKE_TIMEOUT)
    why = None
    try:
        sock.do_handshake()
        if not pinned(sock, tls):
            why = "the server's certificate is not the pinned one (--tls-peer)"
    except socket.timeout:
        why = "no TLS handshake within %g s: does the server run with --tls?" % HANDSHAKE_TIMEOUT
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
    # SSLWantReadError: ours is sent, theirs not here yet (waiting is ExtraLink.close()'s job)
    with contextlib.suppress(OSError, ValueError):  # ssl.SSLError is an OSError
        sock.unwrap()  # sends close_notify


# ---- 3. Who gets a place on the server: Clock, WaitingRoom, first_frame_verdict() ------------
#      serve()'s selector and next_client (the seams). Every connection waits, with a deadline,
#      until it proves it is a tunnel end: --tls by the pinned certificate, --offload by its
#      greeting, plaintext by a plausible first packet. Then seat(link) gives it a place: the one
#      slot (plaintext: the client served keeps it; --tls: the newest proven takes it) or, for a
#      class, the Switch's (8). A full room resets its longest waiting; under a flood, refusals
#      are counted, not printed. The room's deadlines are a Clock's: a timer the loop calls.

MAX_NEWCOMERS = 32  # connections waiting to prove themselves at once; the oldest leaves for a new
MAX_CLOSING = 64  # connections we are saying goodbye to at once
PROOF_TIMEOUT = 5  # seconds a plaintext newcomer may stay silent while another client is served
PROOF_BYTES = {False: 6, True: 14}  # how much of a first packet (tun, tap) tells if it is one
REPORT_EVERY = 10  # seconds: refusals of a kind after the first are summed up this often
WAIT, PROVEN = "wait", "proven"  # a newcomer's proof: not decided yet, or done


class Clock(selectors.DefaultSelector):
    """A selector that also keeps a timer's time: select() waits no longer than timer.due() says
    (None: nothing is due) and, once that time has come, hands the timer over as an event, which
    the loop calls as it calls any other fd's handler (its data): timer.tick() runs there. The
    timer may be given later (a client's link, once it is made)."""

    def __init__(self, timer=None):
        super().__init__()
        self.timer = timer
        self.alarm = selectors.SelectorKey(None, -1, READ, lambda events: self.timer.tick())

    def select(self, timeout=None):
        """Wait for the fds, but not past the timer's time; then hand over what is ready."""
        due = None
        if self.timer:
            due = self.timer.due()
        if due is not None:
            wait = max(0, due - time.monotonic())
            timeout = wait if timeout is None else min(wait, timeout)
        ready = super().select(timeout)
        if due is not None and time.monotonic() >= due:
            ready.append((self.alarm, READ))
        return ready


class Newcomer:
    """A connection that has not proven itself yet."""

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.arrived = time.monotonic()
        self.handshaking = isinstance(sock, ssl.SSLSocket)
        self.head = b""  # the first bytes it sent, until they decide


def plain_address(address):
    """An IP address as a person writes it (an IPv4 client of an IPv6 socket loses '::ffff:')."""
    if address.startswith("::ffff:"):
        return address[len("::ffff:"):]
    return address


class WaitingRoom(Clock):
    """The server's selector: the listener, newcomers and closing connections, each with its
    deadline; seat(link) gives a proven newcomer its place (default: the one slot, take_slot())
    or returns why it has none."""

    def __init__(self, listener, tunnel, args, tls=None, seat=None):
        super().__init__(self)
        self.listener, self.tunnel, self.args, self.tls = listener, tunnel, args, tls
        self.seat = seat or self.take_slot
        self.newcomers = {}  # socket -> Newcomer
        self.closing = {}  # socket -> deadline
        self.active = None  # the Link being served (a class: its Switch)
        self.proven = None  # the Link that takes the one slot next
        self.refused = collections.Counter()  # refusals by kind since the last report
        self.said = set()  # reasons named since the last report
        self.unsaid = 0  # refusals not named since the last report
        self.report_at = None
        listener.setblocking(False)
        self.register(listener, READ, self.accept)

    def due(self):
        """The room's next deadline: a newcomer's, a goodbye's, or the next report (None: none)."""
        deadlines = [self.deadline_of(n) for n in self.newcomers.values()]
        deadlines += list(self.closing.values()) + [self.report_at]
        return min((d for d in deadlines if d is not None), default=None)

    def deadline_of(self, newcomer):
        """A handshake's or greeting's deadline; a silent plaintext newcomer's while one is
        served."""
        if newcomer.deadline is None and self.active:
            return newcomer.arrived + PROOF_TIMEOUT
        return newcomer.deadline

    def tick(self):
        """The timer: send away every newcomer whose time is up, end goodbyes that take too long,
        and sum up the refusals not named since the last report."""
        now = time.monotonic()
        for newcomer in list(self.newcomers.values()):
            deadline = self.deadline_of(newcomer)
            if deadline is not None and now >= deadline:
                self.send_away(newcomer, "silent", self.what_is_missing(newcomer), "cut")
        for sock, deadline in list(self.closing.items()):
            if now >= deadline:
                self.forget(sock)
        if self.report_at is not None and now >= self.report_at:
            self.report()

    def report(self):
        """Sum up the refusals of the last REPORT_EVERY s, if one was not named; start anew."""
        if self.unsaid:
            kinds = ", ".join("%d %s" % (n, kind) for kind, n in sorted(self.refused.items()))
            log.warning("SERVER: refused %d connection(s) in the last %d s (%d not named above): "
                        "%s", sum(self.refused.values()), REPORT_EVERY, self.unsaid, kinds)
        self.refused.clear()
        self.said.clear()
        self.report_at, self.unsaid = None, 0

    def what_is_missing(self, newcomer):
        """Why a newcomer whose deadline passed is sent away."""
        if newcomer.handshaking:
            return "no TLS handshake within %g s: does it run with --tls?" % HANDSHAKE_TIMEOUT
        if self.args.offload:
            return ("no --offload greeting within %g s: it runs without --offload"
                    % HANDSHAKE_TIMEOUT)
        return "it sent no packet within %g s while %s is being served" % (PROOF_TIMEOUT,
                                                                            self.active.address)

    def refuse(self, address, kind, why, verb="refused"):
        """Say why a newcomer leaves: each reason once, with its address; then (a flood) count."""
        self.refused[kind] += 1
        reason = re.sub(r"[0-9.]+", "#", why)  # "its first frame (40 bytes)..." and "(41 bytes)"
        if not say_once(self.said, reason, "SERVER: %s %s: %s", verb, address, why):
            self.unsaid += 1
        if self.report_at is None:
            self.report_at = time.monotonic() + REPORT_EVERY

    def next_client(self):
        """serve()'s next_client: the Link of the next newcomer to prove itself."""
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
        deadline = None
        if self.tls or self.args.offload:
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        try:
            keep_alive(sock)
            if self.tls:
                sock = wrap_tls(sock, self.tls, server_side=True)
            elif self.args.offload:
                sock.send(GREETING_FRAME)  # 15 bytes into an empty socket buffer
        except OSError as err:  # it reset the connection already
            sock.close()
            why = "it reset the connection at once (%s)" % (err.strerror or err)
            return self.refuse(address, "reset", why)
        if len(self.newcomers) >= MAX_NEWCOMERS:
            oldest = min(self.newcomers.values(), key=lambda n: n.arrived)
            why = "the waiting room is full (%d): the longest waiting leaves for %s" % (
                MAX_NEWCOMERS, address)
            self.send_away(oldest, "evicted", why, "reset")
        newcomer = self.newcomers[sock] = Newcomer(sock, address, deadline)
        self.register(sock, READ, lambda events: self.advance(newcomer))
        log.debug("SERVER: connection from %s: waiting for it to prove itself (%s; %d waiting)",
                  address, self.proof_asked(), len(self.newcomers))
        self.advance(newcomer)  # a TLS server speaks second, but try: it may all be there already

    def proof_asked(self):
        """What a newcomer must send to prove itself, in words."""
        if self.tls:
            return "TLS handshake"
        if self.args.offload:
            return "--offload greeting"
        return "a first packet"

    def advance(self, newcomer):
        """A newcomer sent something: take its proof a step further; admit it once it is proven."""
        if self.newcomers.get(newcomer.sock) is not newcomer:  # sent away earlier in this wake-up
            return
        try:
            verdict = self.prove(newcomer)
        except ssl.SSLWantWriteError:
            return self.modify(newcomer.sock, WRITE, self.get_key(newcomer.sock).data)
        except WOULD_BLOCK:
            return self.modify(newcomer.sock, READ, self.get_key(newcomer.sock).data)
        except ssl.SSLError as err:
            verdict = "TLS failed", explain_tls(err)
        except OSError as err:
            verdict = "reset", err.strerror or str(err)
        if verdict is PROVEN:
            self.admit(newcomer)
        elif verdict is not WAIT:
            kind, why = verdict
            how = "orderly" if kind == "not a tunnel end" else "cut"
            self.send_away(newcomer, kind, why, how)

    def prove(self, newcomer):
        """The next step of a newcomer's proof (TLS: the handshake and its pinned certificate;
        --offload: the greeting; else its first frame's start): PROVEN, WAIT for more, or (kind,
        why) it is refused. WOULD_BLOCK: the step waits for the socket."""
        sock = newcomer.sock
        if newcomer.handshaking:
            sock.do_handshake()
            newcomer.handshaking = False
            if not pinned(sock, self.tls):
                return "refused", "its certificate is not the pinned one (--tls-peer)"
            if not self.args.offload:
                return PROVEN
            sock.send(GREETING_FRAME)
        verdict = WAIT
        while verdict is WAIT:  # TLS: bytes may be decrypted already, where select() cannot see
            wanted = proof_size(newcomer.head, self.args.tap, self.args.offload)
            data = sock.recv(wanted - len(newcomer.head))
            if not data:
                return "closed", self.closed_early(newcomer)
            newcomer.head += data
            verdict = first_frame_verdict(newcomer.head, self.args.tap, self.args.offload)
        if verdict is PROVEN:
            return PROVEN
        return "not a tunnel end", verdict

    def closed_early(self, newcomer):
        """Why a newcomer that closed before proving itself did so, as well as can be told."""
        if self.args.offload and not newcomer.head:
            return "it closed the connection without greeting: it runs without --offload"
        return ("it closed the connection after %d bytes, without proving itself"
                % len(newcomer.head))

    def admit(self, newcomer):
        """A newcomer proved itself: its link takes a place (seat()), or it is turned away."""
        self.leave_room(newcomer)
        link = ExtraLink(newcomer.sock, newcomer.address, self.args, heard=True)
        if newcomer.head and not self.args.offload:  # its first frame's start: cut with the rest
            link.kept = len(newcomer.head)
            link.view[:link.kept] = newcomer.head
            log.debug("SERVER: %s proved itself with the first %d bytes of its first frame; they "
                      "go on to the device with the rest of that frame", link.address, link.kept)
        why = self.seat(link)
        if why:
            self.refuse(link.address, "turned away", "it proved itself, but " + why,
                        verb="turned away")
            self.say_goodbye(link.sock, "orderly")

    def take_slot(self, link):
        """seat() for the one slot (the original's): the client served keeps it, except with --tls,
        where the newest proven takes it (only a key holder can); None, or why it has none."""
        holder = self.active or self.proven
        if holder and not self.tls:
            return "%s is being served (one client at a time)" % holder.address
        if self.proven:  # --tls: the newer of two proven in one wake-up takes the slot
            self.say_goodbye(self.proven.sock, "orderly")
        elif self.active:
            self.active.end("%s proved itself with the pinned certificate: it replaces %s (the "
                            "newest authenticated client wins)" % (link.address, holder.address))
        say_connected(link, logging.WARNING)
        self.proven = link
        return None

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
        """Close without waiting: "orderly" (TLS close_notify, FIN), "cut" (FIN), "reset" (RST:
        the client can tell it was pushed out). After a FIN, what still comes is read and
        dropped for GOODBYE_TIME s: a socket closed with unread bytes would send a reset."""
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
        self.register(sock, READ, lambda events: self.drain(sock))

    def drain(self, sock):
        """Read and drop what a closing connection still sends, until its end."""
        try:
            if sock.recv(65536):  # not its end yet
                return
        except WOULD_BLOCK:
            return
        except (OSError, ValueError):  # a reset, or closed earlier in this wake-up: its end
            pass
        self.forget(sock)

    def forget(self, sock):
        """Stop waiting for a closing connection's goodbye: close it."""
        if self.closing.pop(sock, None) is not None:
            self.unregister(sock)
            sock.close()

    def close(self):
        """The server stops: close everyone still waiting or closing (serve() closed its link)."""
        for sock in list(self.newcomers) + list(self.closing):
            sock.close()  # (closing twice is harmless)
        super().close()


def say_connected(link, level):
    """The original's line for a client that takes a place."""
    log.log(level, "SERVER: Client connected from %s%s", link.address, proof_of(link))


def proof_of(link):
    """With --tls, how a client proved itself, for the line that says it came in."""
    if isinstance(link.sock, ssl.SSLSocket):
        return " (%s, pinned certificate)" % link.sock.version()
    return ""


def proof_size(head, tap, offload):
    """How many first bytes decide whether a newcomer's first frame is a packet for this end."""
    if offload:
        return len(GREETING_FRAME)
    if len(head) < HEADER.size:
        return HEADER.size
    (length,) = HEADER.unpack_from(head)
    # enough to tell a packet's header, and an --offload peer's greeting (to name it)
    return HEADER.size + min(length, max(PROOF_BYTES[tap], len(GREETING)))


def first_frame_verdict(head, tap, offload):
    """WAIT for more bytes, PROVEN, or why a newcomer's first bytes are not a tunnel end's."""
    if head.startswith(TLS_HANDSHAKE_RECORD):
        return "it began a TLS handshake: it runs with --tls, this end without"
    if len(head) < proof_size(head, tap, offload):
        return WAIT
    if offload and head != GREETING_FRAME:
        return "it runs without --offload (or is the C simpletun)"
    if offload:
        return PROVEN
    if head == GREETING_FRAME:
        return "it runs with --offload, this end without"
    (length,) = HEADER.unpack_from(head)
    if length == 0:
        return "its first frame is empty: that is not a packet"
    return packet_mismatch(head[HEADER.size:], length, tap) or PROVEN


def packet_mismatch(packet, length, tap):
    """Why the start of a `length`-byte packet cannot be one for this mode, or None if it can."""
    if tap and length < PROOF_BYTES[tap]:
        return "its first frame (%d bytes) is too short for an Ethernet frame" % length
    if tap and looks_like_ip(packet, length):
        return ("its first frame is an IP packet, not an Ethernet frame: it runs in tun mode "
                "(-u), this end in tap (-a)")
    if not tap and not looks_like_ip(packet, length):
        return ("its first frame (%d bytes) is not an IP packet: noise, or a peer in tap mode "
                "(-a) while this end is tun" % length)
    return None


def looks_like_ip(packet, length):
    """True if the first bytes of a `length`-byte packet are an IPv4 or IPv6 header saying so."""
    if len(packet) < 6:
        return False
    version = packet[0] >> 4
    if version == 4:
        return packet[0] & 0x0F >= 5 and struct.unpack_from("!H", packet, 2)[0] == length
    if version == 6:
        return struct.unpack_from("!H", packet, 4)[0] + 40 == length
    return False


# ---- 4. Setting up the device (--addr, --mtu): configure_device(), ip_command() ---------------
#      The ip commands a user would type after starting each end, typed for them.

# IPv4's smallest MTU; the largest a tun device takes, and a tap device (its MTU leaves room
# for the 14-byte Ethernet header within 65535: drivers/net/tun.c sets max_mtu so)
MIN_MTU, MAX_MTU, MAX_TAP_MTU = 68, 65535, 65535 - 14
DISCARD_PORT = 9  # where announce() sends: the discard service, which a host drops unanswered


def configure_device(name, interface=None, mtu=None):
    """Set the device's MTU; given an address/prefix (ipaddress), give it, and bring it up."""
    link, done = ["link", "set", name], []
    if interface:
        # IPv6: usable at once (the peer's address is another: no duplicate to detect first)
        no_wait = ["nodad"] if interface.version == 6 else []
        ip_command("addr", "replace", str(interface), "dev", name, *no_wait)
    if mtu:
        link += ["mtu", str(mtu)]
        done.append("MTU %d" % mtu)
    if interface:
        link.append("up")
        done += ["address %s" % interface, "up"]
    ip_command(*link)
    log.debug("Configured %s: %s", name, ", ".join(done))


def announce(interface, device):
    """--addr: a datagram from it to its network's broadcast, port 9: a class server learns it."""
    family, to = socket.AF_INET, (str(interface.network.broadcast_address), DISCARD_PORT)
    if interface.version == 6:
        family, to = socket.AF_INET6, ("ff02::1", DISCARD_PORT, 0, socket.if_nametoindex(device))
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
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


# ---- 5. What a line says (-dd, -ddd) and the demo's events: Lines, describe() -----------------
#      A logging handler, the seam the tunnel's -d lines offer: one write per line; -dd adds
#      what each packet is and what each receive brought, -ddd each frame's first bytes on the
#      wire; a refusal repeated within a second is counted. In the demo (--events) each line is
#      a JSON event: when it happened, its text, and its fields, which the demo's timeline and
#      diagram read (never a line's words).

ETHERNET = struct.Struct("!6s6sH")  # destination MAC, source MAC, EtherType
# hardware and protocol types, their sizes, operation, sender's MAC and IP, target's MAC and IP
ARP = struct.Struct("!HHBBH6s4s6s4s")
IPV4 = struct.Struct("!BBHHHBBH4s4s")  # version+IHL, TOS, length, id, fragment, TTL, protocol,
#                                        checksum, source, destination
IPV6 = struct.Struct("!IHBB16s16s")  # version+class+flow, payload length, next header, hop
#                                      limit, source, destination
PORTS = struct.Struct("!HH")  # the source and destination ports that start TCP and UDP headers

ETHERTYPE_IPV4, ETHERTYPE_ARP, ETHERTYPE_IPV6 = 0x0800, 0x0806, 0x86DD
ARP_REQUEST, ARP_REPLY = 1, 2
ICMP, TCP, UDP, ICMPV6 = 1, 6, 17, 58  # IP protocol numbers
# What may sit between the IPv6 header and the transport: each says the next header's kind
IPV6_FRAGMENT = 44
IPV6_EXTENSIONS = {0: "hop-by-hop", 43: "routing", IPV6_FRAGMENT: "fragment",
                   60: "destination options"}
MAX_EXTENSIONS = 8  # extension headers walked, at most: a longer chain is not read to its end

ICMP_TYPES = {0: "echo-reply", 3: "destination-unreachable", 5: "redirect", 8: "echo-request",
              11: "time-exceeded"}
ICMPV6_TYPES = {1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded",
                128: "echo-request", 129: "echo-reply", 133: "router-solicitation",
                134: "router-advertisement", 135: "neighbor-solicitation",
                136: "neighbor-advertisement", 143: "multicast-listener-report"}
TCP_FLAGS = ((0x02, "SYN"), (0x10, "ACK"), (0x08, "PSH"), (0x01, "FIN"), (0x04, "RST"),
             (0x20, "URG"))
WIRE_BYTES = 24  # -ddd shows this many bytes of each packet after its length
HEADERS_READ = 128  # bytes of a packet that hold its headers, when only they are read
QUIET_TIME = 1.0  # seconds: a refused packet's line is printed at most this often
REFUSAL_HINTS = {os.strerror(errno.EIO): "is the device down? (ip link set %s up)",
                 os.strerror(errno.EINVAL): "not a packet the device can carry (garbage, or "
                                            "the peer uses the other mode: -u/-a)"}
# The tunnel's own -d lines name no event: what each one is follows from the function that logs
# it and whether it carries the packet. (The extras' lines name theirs: extra={"event": ...}.)
TUNNEL_EVENTS = {("tap2net", True): "read", ("tap2net", False): "sent",
                 ("write", True): "arrived", ("write", False): "written",
                 ("connect_to", False): "connected"}
PACKET_EVENTS = ("read", "sent", "arrived", "written")  # each says its packet's number and size


class Lines(logging.Handler):
    """The full program's output: one write per line, with what -dd, -ddd and --events add."""

    def __init__(self, args, stream=None):
        super().__init__()
        self.stream = stream or sys.stderr
        self.args, self.debug = args, args.debug
        self.header = framing(args)[0]
        self.arrived = None  # when the last packet came from the network (see stamp())
        self.quiet_until = 0  # a refusal's line is not printed before then
        self.unsaid = 0  # refusals not printed since the last that was
        self.told_tap = False  # the original's "tap interface" was explained once
        self.step = None, None  # --events: what the last packet was on a ping's journey

    def emit(self, record):
        """Print a record's line, and what this run's level adds to it (--events: as events)."""
        try:
            lines = self.lines_for(record)
            if lines and self.args.events:
                lines = [json.dumps(event) for event in self.events(record, lines)]
            for line in lines:
                self.stream.write(line + "\n")
            self.stream.flush()
        except Exception:  # logging's rule: a broken output never stops the program
            self.handleError(record)

    def lines_for(self, record):
        """The record's line and the lines the level adds; none for a refusal said just now."""
        text, packet = record.getMessage(), getattr(record, "packet", None)
        kind = event_of(record)
        if record.funcName == "write" and record.levelno == logging.WARNING:
            return self.refusal(text, record.args)
        if self.debug < 2:
            return [text]
        if kind == "sent":
            return [text + self.on_the_wire(record.args[1])]
        if kind not in ("read", "arrived"):
            return [text]
        direction, number = text.split(" ", 1)[0], record.args[0]
        if not self.told_tap and kind == "read" and not self.args.tap:
            self.told_tap = True
            text += " (the original's words for any device: here %s, a tun device)" % (
                self.args.iface)
        said = describe(packet, self.args.tap, self.args.offload)
        lines = [text, "%s %d: %s" % (direction, number, said)]
        if self.debug > 2 and kind == "read":
            lines.append("%s %d: on the wire: %s" % (direction, number, self.wire(packet)))
        return lines

    def on_the_wire(self, size):
        """-dd: what a packet of `size` bytes became on the wire, in this mode."""
        if not self.args.udp:
            return " (%d with its %d-byte length)" % (size + self.header.size, self.header.size)
        if self.args.key:
            return (" (one datagram: no length in front, a datagram keeps its own, with its "
                    "8-byte number and 16-byte tag)")
        return " (one datagram: no length in front, a datagram keeps its own)"

    def wire(self, packet):
        """-ddd: a frame's first bytes as they go on the wire, its length in brackets."""
        shown = bytes(packet[:WIRE_BYTES]).hex(" ")
        if len(packet) > WIRE_BYTES:
            shown += " ..."
        if self.args.udp:
            return shown
        return "[%s] %s" % (self.header.pack(len(packet)).hex(" "), shown)

    def refusal(self, text, args):
        """A refused packet: the first of a run with a hint, then one line per QUIET_TIME."""
        now = time.monotonic()
        if now < self.quiet_until:
            self.unsaid += 1
            return []
        hint = REFUSAL_HINTS.get(args[-1], "").replace("%s", str(args[1]))
        if hint:
            text += " -- " + hint
        if self.unsaid:
            text += " (and %d more since the last such line)" % self.unsaid
        self.quiet_until, self.unsaid = now + QUIET_TIME, 0
        return [text]

    def events(self, record, lines):
        """--events: the lines as the demo's events, stamped; the first carries the record's fields
        (what it is, its numbers, and for a packet what the demo's diagram says of it)."""
        stamp, kind = self.stamp(record), event_of(record)
        event = dict(getattr(record, "fields", {}), t=stamp, text=lines[0], event=kind)
        packet = getattr(record, "packet", None)
        if kind in PACKET_EVENTS:
            event["n"], event["size"] = record.args[:2]
        if packet is not None:  # (the sent and written events after it are of this packet too)
            self.step = journey_step(packet, self.args.tap, self.args.offload)
        if packet is not None or kind in ("sent", "written"):
            event["label"], event["seq"] = self.step
        return [event] + [{"t": stamp, "text": line} for line in lines[1:]]

    def stamp(self, record):
        """When a line happened; a device write's, when its packet came from the network: the
        reply it causes may be printed by another process before this line is."""
        now = time.monotonic()
        kind = event_of(record)
        if kind == "arrived":
            self.arrived = now
        if kind == "written" and self.arrived:
            return self.arrived
        return now


def event_of(record):
    """What a log record tells of, as the demo's events name it (None: nothing the demo reads)."""
    if hasattr(record, "event"):
        return record.event
    if record.levelno > logging.INFO:  # (the tunnel's warnings: a refusal, a link's end)
        return None
    return TUNNEL_EVENTS.get((record.funcName, hasattr(record, "packet")))


def log_receive(link, count, held, wire, frames):
    """-dd: what one receive brought: bytes (TLS: the records' bytes on the cable too), the frames
    they completed, and what of the next frame waits for the next receive."""
    if link.kept == 0:
        rest = "nothing left over"
    elif link.kept < link.header.size:
        rest = "%d byte(s) of the next frame's length wait for the next receive" % link.kept
    else:
        whole = link.header.size + link.header.unpack_from(link.view)[0]
        rest = "%d of the next frame's %d bytes wait for the next receive" % (link.kept, whole)
    came = "%d bytes from TCP" % count
    if wire:
        came = "%d bytes of TLS records from TCP, %d bytes of frames in them" % (wire, count)
    if held:
        came += " (after %d held from before)" % held
    log.debug("NET2TAP: a receive brought %s: %d whole frame(s); %s", came, frames, rest,
              extra={"event": "received", "fields": {"bytes": count, "wire": wire,
                                                     "from": link.address}})


def describe(packet, tap, offload=False):
    """One line saying what a packet is: an Ethernet frame (tap) or an IP packet (tun)."""
    packet = bytes(packet)
    if offload:
        return describe_offloaded(packet, tap)
    if tap:
        return describe_ethernet(packet)
    return describe_ip(packet)


def describe_ethernet(frame):
    """An Ethernet frame: what it carries, then its MAC addresses."""
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
    return "%s (Ethernet %s > %s%s)" % (inner, mac_text(source), mac_text(destination),
                                        group_kind(destination))


def group_kind(mac):
    """" broadcast" or " multicast" for a group address (its first byte's lowest bit), else ""."""
    if mac == b"\xff" * 6:
        return " broadcast"
    if mac[0] & 1:
        return " multicast"  # e.g. 33:33:.. for IPv6
    return ""


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


def ip_parts(packet):
    """An IP packet's (version, source, destination, protocol, payload, fragment), IPv6's extension
    headers walked: fragment says "later" for a fragment without the transport header; protocol is
    None if the headers cannot be read to their end. A string: why it is no IP packet."""
    version = packet[0] >> 4 if packet else None
    if version == 4:
        size = (packet[0] & 0x0F) * 4
        if len(packet) < IPV4.size or size < IPV4.size or len(packet) < size:
            return "IPv4 truncated header (%d bytes)" % len(packet)
        _, _, total, _, offset, _, protocol, _, source, destination = IPV4.unpack_from(packet)
        fragment = None
        if offset & 0x1FFF:  # its bytes continue a transport header seen before
            fragment = "later"
        return 4, source, destination, protocol, packet[size:max(total, size)], fragment
    if version != 6:
        return "not an IP packet (%d bytes)" % len(packet)
    if len(packet) < IPV6.size:
        return "IPv6 truncated header (%d bytes)" % len(packet)
    _, _, protocol, _, source, destination = IPV6.unpack_from(packet)
    payload, fragment = packet[IPV6.size:], None
    for _ in range(MAX_EXTENSIONS):
        if protocol not in IPV6_EXTENSIONS:
            return 6, source, destination, protocol, payload, fragment
        if len(payload) < 8:
            break
        size = (payload[1] + 1) * 8  # each says its own length in 8-byte units...
        if protocol == IPV6_FRAGMENT:  # ... but the fragment header, 8 bytes and an offset
            size, fragment = 8, "first"
            if struct.unpack_from("!H", payload, 2)[0] >> 3:
                fragment = "later"
        protocol, payload = payload[0], payload[size:]
    return 6, source, destination, None, payload, fragment


def describe_ip(packet):
    """An IP packet, IPv4 or IPv6 by its version nibble: addresses, then what it carries."""
    parts = ip_parts(packet)
    if isinstance(parts, str):
        return parts
    version, source, destination, protocol, payload, fragment = parts
    family = {4: socket.AF_INET, 6: socket.AF_INET6}[version]
    addresses = "IPv%d %s > %s" % (version, socket.inet_ntop(family, source),
                                   socket.inet_ntop(family, destination))
    if fragment == "later":
        return "%s fragment (%d bytes)" % (addresses, len(packet))
    if protocol is None:
        return "%s extension headers not read to their end (%d bytes)" % (addresses, len(packet))
    return "%s %s (%d bytes)" % (addresses, describe_transport(protocol, payload), len(packet))


def describe_transport(protocol, payload):
    """The part of an IP packet's line that says what it carries: TCP, UDP, ICMP or ICMPv6."""
    if protocol in (ICMP, ICMPV6):
        return describe_icmp(protocol, payload)
    if protocol not in (TCP, UDP):
        return "protocol %d" % protocol
    name = {TCP: "TCP", UDP: "UDP"}[protocol]
    size = {TCP: 20, UDP: 8}[protocol]
    if len(payload) < size:
        return "%s truncated header (%d bytes)" % (name, len(payload))
    source, destination = PORTS.unpack_from(payload)
    if protocol == UDP:
        return "UDP %d > %d len=%d" % (source, destination, len(payload) - size)
    flags = ",".join(name for bit, name in TCP_FLAGS if payload[13] & bit) or "none"
    data = len(payload) - (payload[12] >> 4) * 4
    return "TCP %d > %d [%s] len=%d" % (source, destination, flags, max(data, 0))


def describe_icmp(protocol, payload):
    """An ICMP or ICMPv6 message: its type; an echo's id and sequence; a neighbour's address."""
    name, types = icmp_names(protocol)
    if len(payload) < 8:
        return "%s truncated (%d bytes)" % (name, len(payload))
    kind, code = payload[0], payload[1]
    text = "%s %s" % (name, types.get(kind, "type %d code %d" % (kind, code)))
    if types.get(kind, "").startswith("echo"):  # echo request/reply carry an id and a sequence
        text += " id=%d seq=%d" % PORTS.unpack_from(payload, 4)
    elif kind in (NEIGHBOR_SOLICITATION, NEIGHBOR_ADVERTISEMENT) and len(payload) >= 24:
        # neighbour solicitation/advertisement: IPv6's ARP; the target address follows
        text += " " + socket.inet_ntop(socket.AF_INET6, payload[8:24])
    return text


def icmp_names(protocol):
    """ICMP's or ICMPv6's name, and its message types' names."""
    if protocol == ICMPV6:
        return "ICMPv6", ICMPV6_TYPES
    return "ICMP", ICMP_TYPES


def awaits_answer(packet, tap, offload=False):
    """True for a ping's echo request, a TCP connection's first segment (SYN, no ACK), or (tap)
    the ARP request the kernel sends before either: what a user waits for an answer to. (A host
    sends more that nothing answers: IPv6's housekeeping, its own answers, a class client's
    announcement, a gratuitous ARP.)"""
    if offload:
        packet = packet[VIRTIO_NET_HDR.size:]
    if tap and len(packet) >= ETHERNET.size + ARP.size and packet[12:14] == b"\x08\x06":
        _, _, _, _, op, _, sender, _, target = ARP.unpack_from(packet, ETHERNET.size)
        return op == ARP_REQUEST and sender != target
    if tap:
        packet = packet[ETHERNET.size:]
    parts = ip_parts(packet)
    if isinstance(parts, str):
        return False
    protocol, payload = parts[3:5]
    if protocol in (ICMP, ICMPV6) and payload:
        return icmp_names(protocol)[1].get(payload[0]) == "echo-request"
    return protocol == TCP and len(payload) > 13 and payload[13] & 0x12 == 0x02


def journey_step(packet, tap, offload=False):
    """What a packet is on a ping's journey, for the demo's diagram: (a short label, the echo's
    sequence number or None); (None, None) for a packet no journey draws."""
    packet = bytes(packet)
    if offload:
        packet = packet[VIRTIO_NET_HDR.size:]
    if tap and len(packet) >= ETHERNET.size + ARP.size and packet[12:14] == b"\x08\x06":
        _, _, _, _, op, _, sender, _, target = ARP.unpack_from(packet, ETHERNET.size)
        asked = {ARP_REQUEST: "who-has " + socket.inet_ntoa(target),
                 ARP_REPLY: "reply " + socket.inet_ntoa(sender)}
        return "ARP " + asked.get(op, "operation %d" % op), None
    if tap:
        packet = packet[ETHERNET.size:]
    parts = ip_parts(packet)
    if isinstance(parts, str) or parts[3] not in (ICMP, ICMPV6) or len(parts[4]) < 8:
        return None, None
    name, types = icmp_names(parts[3])
    kind = types.get(parts[4][0], "")
    if not kind.startswith("echo"):
        return None, None
    return "%s %s" % (name, kind), struct.unpack_from("!H", parts[4], 6)[0]


# ---- 6. Segmentation offload (--offload): set_offload(), the greeting, describe_offloaded() ---
#      Through tun_alloc's flags (IFF_VNET_HDR), the Tunnel's read size, the Link's header and
#      buffer: fewer, bigger packets. The kernel hands over super-packets of up to 64 KiB behind a
#      virtio_net_hdr saying how to cut them (checksums unfinished: the outer TCP or TLS guards
#      them); the peer writes both unchanged. Frames carry a 4-byte length; each end first sends
#      GREETING: a mismatch is named.

IFF_VNET_HDR = 0x4000  # each read/write starts with a struct virtio_net_hdr
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): which offloads the device may hand us
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08  # checksums; TCP
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40  # UDP super-packets (Linux 6.2 and newer)
# struct virtio_net_hdr (linux/virtio_net.h), little-endian on the machines we run on: flags,
# gso_type, hdr_len, gso_size, csum_start, csum_offset
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")
# VIRTIO_NET_HDR_GSO_TCPV4, _UDP, _TCPV6, _UDP_L4
GSO_KINDS = {1: "TCP segment offload", 3: "UDP fragmentation offload", 4: "TCP segment offload",
             5: "UDP segment offload"}
GSO_ECN = 0x80
OFFLOAD_HEADER = struct.Struct("!I")  # the 4-byte length this mode frames with
OFFLOAD_READ_SIZE = 128 * 1024  # a super-packet is at most 64 KiB; room for the headers and more
OFFLOAD_RECV_SIZE = 4 * RECV_SIZE  # the receive buffer holds many super-packets
GREETING_TIMEOUT = 4  # seconds the client waits for the server's greeting: named within 5 s
# 13 bytes: shorter than an Ethernet header, and its first byte (0x73) is no IP version: a C
# original writes it to its device, which refuses it
GREETING = b"simpletun+GSO"
GREETING_FRAME = HEADER.pack(len(GREETING)) + GREETING  # as it goes on the wire, 2-byte length


def set_offload(fd, enabled):
    """Let the device hand us super-packets, or not (a persistent device keeps its last user's)."""
    if not enabled:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return
    flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags | TUN_F_USO4 | TUN_F_USO6)
    except OSError:  # an older kernel: TCP only
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def greet_server(sock):
    """Client, --offload: greet, then read the server's greeting (the original's read_n) within
    GREETING_TIMEOUT s; None, or why the server is no --offload peer."""
    head = b""
    sock.settimeout(GREETING_TIMEOUT)  # (for each receive: the greeting comes in one piece)
    try:
        sock.sendall(GREETING_FRAME)
        while len(head) < len(GREETING_FRAME):
            data = sock.recv(len(GREETING_FRAME) - len(head))
            if not data:
                return ("the server closed the connection instead of greeting: it runs without "
                        "--offload (its log says so)")
            head += data
            if not GREETING_FRAME.startswith(head):
                return "the server runs without --offload: its first frame is not the greeting"
    except socket.timeout:
        return ("no --offload greeting from the server within %g s: it runs without --offload "
                "(or is the C simpletun)" % GREETING_TIMEOUT)
    sock.setblocking(False)
    log.debug("CLIENT: the server runs --offload too: frames carry a 4-byte length from here on")
    return None


def describe_offloaded(packet, tap):
    """-dd with --offload: the packet behind the virtio header, and how the kernel will cut it."""
    if len(packet) < VIRTIO_NET_HDR.size:
        return "virtio header truncated (%d bytes)" % len(packet)
    _, gso_type, _, gso_size, csum_start, _ = VIRTIO_NET_HDR.unpack_from(packet)
    inner = packet[VIRTIO_NET_HDR.size:]
    text = describe(inner, tap)
    kind = GSO_KINDS.get(gso_type & ~GSO_ECN)
    if not kind or not gso_size or len(inner) < csum_start + 13:
        return text
    # csum_start: where the TCP or UDP header begins; the payload follows it (TCP says how long
    # its header is, UDP's is 8 bytes)
    header = 8
    if kind.startswith("TCP"):
        header = (inner[csum_start + 12] >> 4) * 4
    segments = -(-(len(inner) - csum_start - header) // gso_size)  # rounded up
    return "%s; %s: %d segments of %d" % (text, kind, segments, gso_size)


# ---- 7. One packet per datagram (--udp, --key): UdpClient, UdpServer, Tags, Strangers --------
#      Links that relay() drives as they are (the seam: Link's methods), each packet one datagram
#      (no TCP over TCP), runs of them in one system call (UDP_SEGMENT, UDP_GRO). Without --key
#      the peer may be any program that sends one packet per datagram (the VPN lab's relays): it
#      is sent packets only, and a server serves the first plausible sender until it has been
#      silent SILENCE s. With --key each datagram carries a number and a keyed tag (BLAKE2b):
#      only key holders are served, the newest at once, nothing is replayed, and both ends say
#      "still here" every UDP_HEARTBEAT s, a timer the loop calls (Clock). Packets still cross
#      in clear. A served peer's datagrams come on a socket of its own: a stranger's flood of
#      the port crowds out no one.

UDP_HEARTBEAT = 1  # --key: seconds an end may send nothing before it says "still here"
MAX_STRANGERS = 1024  # senders remembered as named
NAMES_AT_ONCE, NAMING_TIME = 8, 5  # new senders named per NAMING_TIME s; the rest are counted
PORT_BUDGET = 8  # datagrams read from the port's socket per wake-up while a peer is served
UDP_MTU = 1500 - 40 - 8  # the device MTU whose packets fit one datagram on a 1500-byte cable
UDP_BUFFER = 4 << 20  # bytes of socket buffer each way: a burst of datagrams waits there
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33  # asm-generic/socket.h: past net.core.[wr]mem_max (root)
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104  # linux/udp.h (Linux 4.18 and 5.0): runs of datagrams
MAX_SEGMENTS, SEGMENTS_BYTES = 64, 65000  # the most datagrams one send may carry, and their bytes
GRO_SPACE = socket.CMSG_SPACE(4)  # room for the kernel's note of a run's datagram size (an int)
NUMBER = struct.Struct("!Q")  # --key: each datagram's number, before the packet
TAG_SIZE = 16  # --key: the keyed BLAKE2b tag after the packet, over the number and the packet
KEY_OVERHEAD = NUMBER.size + TAG_SIZE
REPLAY_WINDOW = 64  # --key: how far behind the newest a number may come (as IPsec's window)
UNTAGGED = ("no valid --key tag: it runs with another key, or without --key (or it replays old "
            "datagrams)")


def read_key(path):
    """--key FILE: the shared secret, refused if others may read it (as ssh refuses a key)."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise UserError("--key %s: others may read it; a secret must be yours alone: "
                                "chmod 600 %s" % (path, path))
            secret = f.read()
    except OSError as err:
        raise UserError("--key %s: %s" % (path, err.strerror)) from None
    if len(secret) < 16:
        raise UserError("--key %s: %d bytes is too short a secret; make one of 32 random bytes: "
                        "head -c 32 /dev/urandom > %s" % (path, len(secret), path))
    return hashlib.blake2b(secret, digest_size=32).digest()  # any length of file: one 32-byte key


class Tags:
    """--key: each datagram's number and keyed tag (BLAKE2b over both, a key for each direction:
    a datagram sent back to its sender fails), and which numbers came already."""

    def __init__(self, key, client):
        ours, theirs = b"server", b"client"
        if client:
            ours, theirs = theirs, ours
        self.sealer = hashlib.blake2b(key=key, digest_size=TAG_SIZE,
                                      person=ours + b" to " + theirs)
        self.opener = hashlib.blake2b(key=key, digest_size=TAG_SIZE,
                                      person=theirs + b" to " + ours)
        self.number = time.time_ns()  # our last number: from the clock, so that a restarted end
        #                               goes on above its old numbers
        self.newest = 0  # the newest number taken
        self.seen = 0  # a bit for each of the REPLAY_WINDOW numbers behind the newest: taken

    def seal(self, packet):
        """A datagram's pieces: its number, the packet, and the tag over both."""
        self.number += 1
        number = NUMBER.pack(self.number)
        tag = self.sealer.copy()  # (a copy of the keyed state costs less than keying anew)
        tag.update(number)
        tag.update(packet)
        return number, packet, tag.digest()

    def open(self, datagram):
        """The packet in a datagram with a right tag and a new number; None: no right tag;
        False: a right tag, but a number taken before or too old to tell (a replay)."""
        if len(datagram) < KEY_OVERHEAD:
            return None
        tag = self.opener.copy()
        tag.update(datagram[:-TAG_SIZE])
        if not hmac.compare_digest(tag.digest(), datagram[-TAG_SIZE:]):
            return None
        (number,) = NUMBER.unpack_from(datagram)
        behind = self.newest - number
        if behind < 0:  # the newest yet: the window moves on (hours ahead: a restarted peer)
            self.seen = (self.seen << min(-behind, REPLAY_WINDOW) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self.newest = number
        elif behind >= REPLAY_WINDOW or self.seen >> behind & 1:
            return False
        else:
            self.seen |= 1 << behind
        return datagram[NUMBER.size:-TAG_SIZE]


class Strangers:
    """Datagrams that are not the peer's: each one counted, each new sender named once (at most
    NAMES_AT_ONCE per NAMING_TIME s; the others counted unnamed); the latest named remembered."""

    def __init__(self, side):
        self.side = side
        self.named = {}  # sender -> when it was named, oldest first (at most MAX_STRANGERS)
        self.naming = self.names = 0  # when this NAMING_TIME began; names said since
        self.dropped = self.unnamed = 0

    def drop(self, sender, why, now):
        """Count a datagram of `sender`'s; name the sender if it is new (and names are left)."""
        self.dropped += 1
        if sender in self.named:
            return
        if now - self.naming >= NAMING_TIME:
            self.naming, self.names = now, 0
        if self.names >= NAMES_AT_ONCE:
            self.unnamed += 1
            return
        self.names += 1
        self.named[sender] = now
        if len(self.named) > MAX_STRANGERS:
            del self.named[next(iter(self.named))]
        log.warning("%s: dropping datagrams from %s: %s (counted, not logged again)", self.side,
                    udp_address(sender), why)

    def summary(self):
        """The end's line on what it dropped (None if nothing)."""
        if not self.dropped:
            return
        unnamed = "each named above"
        if self.unnamed:
            unnamed = "%d of them from senders not named: a flood of new ones" % self.unnamed
        log.warning("%s: dropped %d datagram(s) from other senders (%s)", self.side,
                    self.dropped, unnamed)


class Datagrams:
    """What a --udp client and server share, a mixin for Link: each packet one datagram, a run
    of one size in one system call each way; --key's tags and its heartbeat (the timer a Clock
    hands the loop: due(), tick()). The mixer says where datagrams go (peer), which sockets it
    reads (sockets()), and what it takes: accept(sender, packet, now) -> the packet, or None."""

    peer = former = None  # where datagrams go; --key, a server: the key holder served before it

    def setup(self, args, key, side):
        """What both ends start with; the socket is tuned, and `side` is CLIENT or SERVER."""
        self.args, self.side = args, side
        self.tags = None  # --key's numbers and tags
        if key:
            self.tags = Tags(key, side == "CLIENT")
        self.strangers = Strangers(side)
        self.segments = 1  # the most datagrams one send takes (a run)
        if tune_datagrams(self.sock):
            self.segments = MAX_SEGMENTS
        self.unbatched = MAX_PACKET + 1  # packets this big or bigger go one per send (the path's)
        self.heard_at = self.sent_at = 0  # when a datagram came from the peer; when we last sent
        self.asked = None  # since when what we sent has had no answer
        self.told = set()  # what was said once
        self.unsent = self.malformed = 0  # packets not sent (dropped here); datagrams no packet

    def send_queued(self):
        """Send each queued packet as one datagram, a run of one size per call; what the socket
        cannot take now waits; a packet this host refuses to send is counted, and said once."""
        if self.out and self.asked is None and (self.tags or asks(self)):
            self.asked = time.monotonic()  # (--key: the peer answers every datagram, in a second)
        start = 0
        with memoryview(self.out) as out:
            while start < len(out):
                run, end = self.next_run(out, start)
                try:
                    self.send_run(run)
                except self.would_block:  # the socket buffer is full: select() says when it drains
                    break
                except ConnectionRefusedError:  # the ICMP answer to an earlier datagram
                    self.refused()
                except OSError as err:
                    if err.errno in (errno.EINVAL, errno.EMSGSIZE) and len(run) > 1:
                        self.unbatched = len(run[0])  # the path's MTU: these go one by one
                        continue
                    self.not_sent(run, err)
                start = end
            run = None  # (views of the queue: they must go before the queue can change)
        if start:
            self.sent_at = time.monotonic()
        del self.out[:start]

    def next_run(self, out, start):
        """The packets from `start` one send takes (one size, the last may be smaller), and where
        the run ends."""
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
        """Send packets of one size as datagrams in one call, cut by the kernel (UDP_SEGMENT)."""
        pieces, size = run, len(run[0])
        if self.tags:
            pieces = [b"".join(piece for packet in run for piece in self.tags.seal(packet))]
            size += KEY_OVERHEAD
        cut = []
        if len(run) > 1:
            cut = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", size))]
        self.sock.sendmsg(pieces, cut, 0, self.peer)

    def not_sent(self, run, err):
        """Packets this host would not send (a firewall's EPERM, too big): counted, said once."""
        self.unsent += len(run)
        if self.unsent == len(run):
            log.warning("a datagram to %s was not sent: %s; such packets are lost, and counted",
                        self.address, err.strerror)

    def receive(self, handle):
        """Take what waits on each socket, each datagram one packet, up to what the buffer holds
        (as TCP's one receive: the other direction waits no longer); hand those that are for this
        end to handle(); return how many datagrams came (None: none)."""
        count, taken, now = 0, 0, time.monotonic()
        for sock, budget in self.sockets():
            for _ in range(budget):
                if len(self.view) - taken < MAX_PACKET:
                    break
                try:
                    size, notes, _, sender = sock.recvmsg_into([self.view], GRO_SPACE)
                except self.would_block:
                    break
                except ConnectionRefusedError:  # the ICMP answer to a datagram we sent
                    self.refused()
                    continue
                except OSError as err:
                    self.end(self.lost(err))
                    return None
                # a run of datagrams at once (UDP_GRO): the kernel says their size, and the
                # last may be smaller
                taken += size
                step = size
                for level, kind, data in notes:
                    if (level, kind) == (SOL_UDP, UDP_GRO):
                        (step,) = struct.unpack("=i", data)
                for start in range(0, size, step or 1):
                    count += 1
                    packet = self.take(sender, self.view[start:min(start + step, size)], now)
                    if packet:
                        handle(packet)
        return count or None

    def take(self, sender, datagram, now):
        """The packet a datagram carries if it is for this end (empty: "still here"), else None."""
        packet = datagram
        if self.tags:
            packet = self.tags.open(datagram)
        if packet is False and sender == self.former:
            return self.strangers.drop(sender, "it holds the key, but %s took its slot since: the "
                                       "newest key holder is served (a restarted end is the "
                                       "newest)" % self.address, now)
        if packet is None or packet is False:
            return self.strangers.drop(sender, UNTAGGED, now)
        packet = self.accept(sender, packet, now)
        if packet is None:
            return None
        self.heard_at, self.asked = now, None  # an answer: a silence is over
        self.told -= {"unanswered", "silent"}
        if packet and not self.args.tap and not self.tags and not looks_like_ip(packet,
                                                                               len(packet)):
            self.malformed += 1  # cut short by a lab relay's small buffer, or garbage
            say_once(self.told, "malformed", "%s sent a datagram that is no whole IP packet (%d "
                     "bytes; its IP header says otherwise): not written; such datagrams are "
                     "counted", self.address, len(packet))
            return None
        return packet

    def due(self):
        """The timer's time (Clock): --key, with a peer, the next "still here"; else None."""
        if self.tags and self.peer:
            return self.sent_at + UDP_HEARTBEAT
        return None

    def tick(self):
        """The timer: --key, nothing sent for UDP_HEARTBEAT s: send "still here", an empty packet
        numbered and tagged (only a key holder takes it)."""
        if not self.out:
            self.out += HEADER.pack(0)
        self.send_queued()
        self.sent_at = time.monotonic()  # (sent or not: the next beat is a heartbeat away)

    def close(self):
        """Say what was dropped, then close."""
        self.strangers.summary()
        for count, what in ((self.unsent, "could not be sent"),
                            (self.malformed, "were no whole packets")):
            if count:
                log.warning("%d packet(s) %s", count, what)
        super().close()


class UdpClient(Datagrams, Link):
    """--udp client: its socket is connected to the server, whose datagrams alone come to it; it
    says when the first comes back, and when nothing does."""

    def __init__(self, sock, args, key=None):
        Link.__init__(self, sock, args.client)
        self.setup(args, key, "CLIENT")
        self.peer = sock.getpeername()

    def sockets(self):
        """The sockets receive() reads, and how many datagrams from each per wake-up."""
        return [(self.sock, MAX_BATCH)]

    def accept(self, sender, packet, now):
        """The server's datagrams are this end's; the first is said."""
        if not self.heard_at:
            log.warning("CLIENT: the first datagram came back from %s: the server serves this "
                        "end", self.address)
        return packet

    def due(self):
        """The Clock's timer: the heartbeat (Datagrams.due()), or when to say that nothing came
        back, whichever comes first."""
        return min((t for t in (super().due(), silence_due(self)) if t is not None), default=None)

    def tick(self):
        """The timer: the heartbeat, if it is due; nothing back for SILENCE s: said once."""
        now = time.monotonic()
        if self.tags and now >= self.sent_at + UDP_HEARTBEAT:
            super().tick()
        if silence_due(self) is None or now < silence_due(self):
            return
        key = ", without --key"
        if self.tags:
            key = ", with the same --key"
        mode = "-a" if self.args.tap else "-u"
        say_once(self.told, "silent", "CLIENT: nothing has come back from %s for %g s: does the "
                 "server run with --udp, in this mode (%s)%s? Its log says which (or nothing "
                 "inside the tunnel answers)", self.address, SILENCE, mode, key)

    def refused(self):
        """The server's host answered with ICMP port unreachable: said once per silence."""
        say_once(self.told, "unanswered", "CLIENT: nothing answers at %s port %d (ICMP port "
                 "unreachable): is the server running, with --udp? The client goes on, and its "
                 "packets are lost until it is", self.address, self.peer[1])


class UdpServer(Datagrams, Link):
    """--udp server: it serves the sender of the first plausible datagram (--key: of a tagged
    one) until another takes its place; the others' datagrams are counted as strangers'."""

    def __init__(self, sock, args, key=None):
        Link.__init__(self, sock, "")
        self.setup(args, key, "SERVER")
        self.own = self.own_socket()  # the served peer's own socket (None if it cannot have one)

    def own_socket(self):
        """A second socket on the port, connected to each peer served: the kernel hands it that
        peer's datagrams alone, and a stranger's flood fills the port's socket (read PORT_BUDGET
        at a time), not this one. SO_REUSEPORT lets the two share the port, on only while this
        one binds: no other program can join them after."""
        own = socket.socket(self.sock.family, socket.SOCK_DGRAM)
        try:
            if own.family == socket.AF_INET6:  # IPv4 peers too, as on the port's socket
                own.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            for sock in (self.sock, own):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            own.bind(self.sock.getsockname())
            tune_datagrams(own)
        except OSError as err:  # the peer's datagrams stay on the port's: flooded with it
            own.close()
            log.debug("SERVER: no socket of the peer's own: %s", err.strerror or err)
            return None
        finally:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        own.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 0)
        return own

    def sockets(self):
        """The peer's own socket first, then PORT_BUDGET datagrams of the port's (strangers')."""
        if self.own is None:
            return [(self.sock, MAX_BATCH)]
        return [(self.own, MAX_BATCH), (self.sock, PORT_BUDGET)]

    def send_queued(self):
        """Datagrams.send_queued(), once a client is served; until then the packets go nowhere."""
        if self.peer is None:
            say_once(self.told, "no client", "SERVER: no client yet: what the device hands over "
                     "is dropped until one sends")
            del self.out[:]
            return
        super().send_queued()

    def accept(self, sender, packet, now):
        """The served peer's packet; or a new sender's, which becomes the peer (plausible, and
        the peer silent for SILENCE s; --key: any key holder, the newest at once)."""
        if sender == self.peer:
            return packet
        if not packet and not self.tags:  # a --key end's "still here", or noise: nothing to take
            return None
        why = self.why_not_served(sender, packet, now)
        if why:
            return self.strangers.drop(sender, why, now)
        before = ""
        if self.peer and self.tags:
            before = " (it holds the key; %s no longer has the slot)" % self.address
        elif self.peer:
            before = " (%s was silent for %d s)" % (self.address, now - self.heard_at)
        log.warning("SERVER: serving %s%s", udp_address(sender), before)
        self.former, self.peer, self.address = self.peer, sender, udp_address(sender)
        if self.own:
            self.own.connect(sender)  # (a new peer: the same socket, connected anew)
        return packet

    def why_not_served(self, sender, packet, now):
        """Why a sender does not take the slot (None: it does)."""
        if self.tags:
            return None  # a key holder: the newest is served
        inner = packet[NUMBER.size:-TAG_SIZE]  # what a --key end's datagram would carry
        if len(packet) == KEY_OVERHEAD or not self.args.tap and inner and looks_like_ip(
                inner, len(inner)):
            return "it runs with --key, this end without: give both ends the same --key FILE"
        why = packet_mismatch(packet, len(packet), self.args.tap)
        if not why and self.peer and now - self.heard_at < SILENCE:
            why = "it sent a packet, but %s is being served" % self.address
        return why

    def refused(self):
        """An ICMP port unreachable: the peer has gone; its silence will tell."""

    def close(self):
        """Datagrams.close(), and the peer's own socket's."""
        if self.own:
            self.own.close()
        super().close()


def silence_due(link):
    """When a client is to say that nothing came back: SILENCE s after the first send nothing
    answered, unless it said so (or why) already; None if not."""
    if link.asked is None or link.told & {"silent", "unanswered"}:
        return None
    return link.asked + SILENCE


def server_family(bind):
    """Where a server listens: the address given, or every IPv6 and IPv4 address (one socket)."""
    dual = not bind and socket.has_dualstack_ipv6()
    if dual or ":" in (bind or ""):
        return socket.AF_INET6, dual
    return socket.AF_INET, dual


def udp_address(address):
    """A UDP sender as a person writes it: address and port."""
    return "%s port %d" % (plain_address(address[0]), address[1])


def tune_datagrams(sock):
    """Non-blocking, with room for a burst each way; True if the kernel hands over runs."""
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
        log.debug("this kernel cannot hand over runs of datagrams (UDP_GRO, Linux 5.0): one "
                  "per call")
        return False


def udp_link(args, key=None):
    """--udp: the server's link on its bound socket, or the client's on its connected one."""
    try:
        if args.client:
            family, _, _, _, address = socket.getaddrinfo(args.client, args.port,
                                                          type=socket.SOCK_DGRAM)[0]
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.connect(address)
        else:
            family, dual = server_family(args.bind)
            sock = socket.socket(family, socket.SOCK_DGRAM)
            if dual:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((args.bind or "", args.port))
    except OSError as err:  # socket.gaierror too
        where = args.client or args.bind or "every address"
        why = os.strerror(err.errno) if err.errno and err.errno > 0 else err
        raise UserError("cannot use UDP port %d on %s: %s" % (args.port, where, why)) from None
    if args.client:
        log.info("CLIENT: Connected to server %s (UDP: the socket only knows where to send)",
                 args.client, extra={"event": "connected"})
        return UdpClient(sock, args, key)
    log.warning("SERVER: listening on UDP port %d", args.port, extra={"event": "listening"})
    return UdpServer(sock, args, key)


# ---- 8. A class on one server (--clients N): Switch, serve_class() ---------------------------
#      The waiting room seats each proven client through the Switch's seat() (the room's seam),
#      and one loop serves them all, each fd with its handler: the device through tap2net(),
#      with the Switch as its link (the seam: a link's out, header and send_queued()), and each
#      client's link. As a switch does, the Switch learns which addresses each client sends from
#      (first come, first served; tap: its MACs and the IP addresses its ARP, IP and neighbour
#      advertisements claim, as a switch's ARP inspection checks them), checks each packet's
#      claims, forwards it to the client that owns its destination, and floods (tap) broadcasts
#      and unknown destinations. The server's own addresses are never a client's: read from its
#      device at the start and whenever the kernel says they changed (netlink), and whatever the
#      device sends from. A client whose packet claims another's address is told so, as a
#      firewall's REJECT tells: an ICMP "administratively prohibited" (at most once a second).

MAX_OWNED = 16  # addresses one client may own: a tunnel address or two, IPv6's, a bridge's MACs
IP_SOURCE = {4: (12, 4), 6: (8, 16)}  # by IP version: where a packet's source begins, its size
NEIGHBOR_SOLICITATION, NEIGHBOR_ADVERTISEMENT = 135, 136  # ICMPv6: IPv6's ARP request and reply
NEIGHBOR_DISCOVERY = range(133, 138)  # ICMPv6 router/neighbour solicitations, advertisements
REJECT_EVERY = 1  # seconds: a client is told its packet was refused at most this often
# prohibited(): ICMP's destination unreachable (3), "communication administratively prohibited"
# (13, RFC 1812), and ICMPv6's destination unreachable (1), "administratively prohibited" (1)
# netlink (linux/rtnetlink.h): the groups whose messages say a link or an address changed
RTMGRP_LINK, RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x1, 0x10, 0x100
SERVER = "the server"  # the owner of the server's own addresses
RECONNECT_EVERY = 3  # seconds between a --reconnect client's tries


class Switch:
    """A class's server side: which client owns which address, and where each packet goes."""

    address = "the class"  # (as the waiting room names who is served)

    def __init__(self, room, tunnel, slots):
        self.room, self.tunnel, self.slots = room, tunnel, slots
        self.tap, self.debug = room.args.tap, room.args.debug
        self.out, self.header = bytearray(), HEADER  # what tap2net() hands over (see above)
        self.clients = []
        self.owners = {}  # address -> the client that sent from it first, or SERVER
        self.device_has = None  # the server's device's addresses, as last read
        self.said = set()  # what was said once: (client, address) for a claim, (client,) a stall
        self.given = set()  # the clients given frames in this wake-up: each gets one send
        self.spoofed = self.lost = 0  # packets dropped: claiming what is another's; unsent
        self.rejected = {}  # client -> when it was last told its packet was refused
        self.netlink = self.follow_addresses()

    def seat(self, link):
        """The waiting room's seat(): a free slot for a proven client, or why it has none."""
        if len(self.clients) >= self.slots:
            return "all %d slots of the class are taken (--clients)" % self.slots
        link.owned = 0
        self.clients.append(link)
        self.room.register(link.sock, READ, functools.partial(self.client_ready, link))
        log.warning("SERVER: %s%s joined the class (%d of %d slots)", link.address, proof_of(link),
                    len(self.clients), self.slots, extra={"event": "joined", "fields": {
                        "clients": len(self.clients), "slots": self.slots}})
        return None

    def follow_addresses(self):
        """Read the device's addresses, and ask the kernel to say when they change (netlink)."""
        self.addresses_changed()
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            sock.bind((0, RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
        except OSError as err:
            log.warning("SERVER: the device's addresses are read once, not followed: %s",
                        err.strerror or err)
            return None
        sock.setblocking(False)
        self.room.register(sock, READ, lambda events: self.addresses_changed(sock))
        return sock

    def addresses_changed(self, netlink=None):
        """A link or an address changed (or the class begins): read the device's addresses again;
        each is the server's, taken back from a client if need be."""
        with contextlib.suppress(OSError):  # (what netlink says is only "something changed")
            while netlink and netlink.recv(65536):
                pass
        has = set(device_addresses(self.tunnel.name))
        if has != self.device_has:  # (netlink tells of every change of every link: most are none)
            log.debug("SERVER: %s's addresses, the server's own: %s", self.tunnel.name,
                      ", ".join(sorted(address_text(a) for a in has)) or "none")
        self.device_has = has
        for address in has:
            self.reserve(address)

    def reserve(self, address):
        """An address of the server's own is the server's, taken back from a client if need be."""
        owner = self.owners.get(address)
        if owner not in (None, SERVER):
            owner.owned -= 1
            log.warning("SERVER: %s is this server's own address: taken back from %s",
                        address_text(address), owner.address)
        self.owners[address] = SERVER

    def client_ready(self, link, events):
        """A client's connection can move bytes: send what waits for it; receive what came, each
        packet checked, then forwarded (NET2TAP, from a client)."""
        if link not in self.clients:  # it left earlier in this wake-up
            return
        if events & WRITE:
            link.send_queued()
        if events & READ:
            link.receive(functools.partial(self.from_client, link))
        self.keep_watch(link)

    def keep_watch(self, link):
        """After a client's link moved bytes: if it ended, it leaves; else wait for room to send
        while frames wait for it."""
        if link.ended:
            return self.leave(link, link.ended)
        if len(link.out) < OUT_LIMIT:
            self.said.discard((link,))  # it takes packets again: a new stall is said again
        watch(self.room, link.sock, READ | WRITE if link.out else READ)

    def flush(self):
        """Send each client what it was given in this wake-up, in one send."""
        given, self.given = self.given, set()
        for link in given & set(self.clients):
            link.send_queued()
            self.keep_watch(link)

    def send_queued(self):
        """What tap2net() queued here (TAP2NET): each packet from the device, forwarded."""
        frames, self.out = self.out, bytearray()
        deframe(memoryview(frames), self.from_device)
        self.flush()

    def from_device(self, packet):
        """A packet from the server's device: what it sends from is the server's (unless it is a
        client's address the server's kernel routes back out), and it goes where it is for."""
        source, destination = packet_ends(packet, self.tap)
        for address in self.claims(packet, source):
            if self.owners.get(address) is not SERVER:
                if self.owners.get(address) is None or address in self.device_has:
                    self.reserve(address)
        self.forward(packet, SERVER, destination)

    def from_client(self, link, packet):
        """A client's packet: checked, then forwarded (the server's device is one destination).
        Its ends are read once, here: each step is paid for every packet of the class."""
        source, destination = packet_ends(packet, self.tap)
        if self.check(link, packet, source):
            self.forward(packet, link, destination)

    def claims(self, packet, source):
        """The addresses a packet claims as its sender's (tun: its source; tap: see
        claimed_addresses()); a string says why its claims cannot be checked."""
        if self.tap:
            return claimed_addresses(packet)
        if source is None:
            return []
        return [source]

    def check(self, link, packet, source):
        """True if every address the packet claims is its sender's (learning those no one has);
        else it is dropped, counted, said once, and the sender is told (reject())."""
        claims = self.claims(packet, source)
        if isinstance(claims, str):
            return self.drop(link, claims, claims)
        for address in claims:
            owner = self.owners.get(address) or self.learn(link, address)
            if owner is link:
                continue
            key, why = "too many", "it owns %d" % MAX_OWNED
            if owner:  # (once per address of another's; once for all the rest)
                key, why = address, "that address is %s's" % owner_name(owner)
            self.reject(link, packet, owner)
            return self.drop(link, key, "from %s: %s" % (address_text(address), why))
        return True

    def learn(self, link, address):
        """A client sends from an address no one has: it owns it, up to MAX_OWNED of them; the
        address's owner now (None: no one)."""
        if link.owned >= MAX_OWNED:
            return None
        link.owned += 1
        self.owners[address] = link
        return link

    def forward(self, packet, sender, destination):
        """A packet goes where its destination says: to the client that owns it; a broadcast or a
        multicast (tap) to everyone (flood()); the rest from a client to the server's device, and
        from the device (tap) to every client: a MAC no one has sent from yet."""
        owner = self.owners.get(destination)
        if self.tap and destination and destination[0] & 1:
            self.flood(packet, sender)
        elif owner not in (None, SERVER):
            self.give(owner, packet, sender)
        elif sender is not SERVER:
            self.tunnel.write(packet)
        elif self.tap and owner is None:
            self.flood(packet, sender)

    def flood(self, packet, sender):
        """To every client but the sender; and a client's to the server's device too."""
        for link in self.clients:
            if link is not sender:
                self.give(link, packet, sender)
        if sender is not SERVER:
            self.tunnel.write(packet)

    def give(self, link, packet, sender):
        """Queue a packet for a client: its bounded queue full, the packet is lost for it alone."""
        if len(link.out) >= OUT_LIMIT:  # it takes nothing: its packets are lost, not the others'
            self.lost += 1
            say_once(self.said, (link,), "SERVER: %s takes nothing: packets for it are dropped, "
                     "counted", link.address)
            return
        link.out += self.header.pack(len(packet))
        link.out += packet
        self.given.add(link)
        if self.debug > 1 or self.debug and sender is not SERVER:
            log.debug("CLASS: %s -> %s: %d bytes%s", owner_name(sender), link.address,
                      len(packet), ", forwarded by the server" * (sender is not SERVER),
                      extra={"event": "forwarded", "packet": packet,
                             "fields": {"to": link.address, "size": len(packet)}})

    def drop(self, link, key, what):
        """A client's packet that claims what is not its own: counted, said once per key; False."""
        self.spoofed += 1
        say_once(self.said, (link, key), "SERVER: dropping %s's packets %s (counted, not logged "
                 "again)", link.address, what)
        return False

    def reject(self, link, packet, owner):
        """Tell a client its packet was refused, as a firewall's REJECT does: an ICMP "prohibited"
        from the server's address, to it alone, at most once a REJECT_EVERY s. (Not when it took
        the server's own address: its kernel drops a packet from its own address.)"""
        now = time.monotonic()
        if owner is SERVER or now - self.rejected.get(link, -REJECT_EVERY) < REJECT_EVERY:
            return
        answer = prohibited(packet, self.tap, self.device_has)
        if answer:
            self.rejected[link] = now
            self.give(link, answer, SERVER)

    def leave(self, link, why):
        """A client has gone: its slot and its addresses are free at once."""
        self.clients.remove(link)
        self.room.unregister(link.sock)
        self.room.say_goodbye(link.sock, "orderly")
        for address in [a for a, owner in self.owners.items() if owner is link]:
            del self.owners[address]
        self.said = {said for said in self.said if said[0] is not link}
        self.rejected.pop(link, None)
        log.warning("SERVER: %s left the class: %s (%d of %d slots)", link.address, why,
                    len(self.clients), self.slots)

    def close(self):
        """The server stops: goodbye to every client, and what the class passed on, in one line."""
        for link in list(self.clients):
            self.leave(link, "the server stops")
        if self.netlink:
            self.netlink.close()
        log.warning("SERVER: the class dropped %d packet(s) from another's address, %d for "
                    "clients taking nothing", self.spoofed, self.lost)


def serve_class(tunnel, room, switch):
    """--clients: one loop for the whole class: the device (TAP2NET through the Switch), each
    client's link and the waiting room, each fd with the function that handles it."""
    room.active = switch  # (a newcomer that says nothing is sent away as while a client is served)
    room.register(tunnel.fd, READ, lambda events: tap2net(tunnel, switch))
    with contextlib.closing(switch):
        while True:
            for key, events in room.select():
                key.data(events)
            switch.flush()


def owner_name(owner):
    """Who owns an address, in words: a client's address, or "the server"."""
    if owner is SERVER:
        return SERVER
    return owner.address


def packet_ends(packet, tap):
    """A packet's (source, destination): MACs (tap), IPv4 or IPv6 (tun); else (None, None)."""
    if tap:
        return bytes(packet[6:12]), bytes(packet[:6])
    start, size = IP_SOURCE.get(packet[0] >> 4, (0, 0))
    if not size or len(packet) < start + 2 * size:
        return None, None
    return bytes(packet[start:start + size]), bytes(packet[start + size:start + 2 * size])


def claimed_addresses(frame):
    """Tap: what a frame claims is its sender's: its source MAC, and the IP address its ARP, IP
    packet or neighbour advertisement names (0.0.0.0 and :: claim nothing); a string says why it
    cannot be checked: an ARP naming another MAC, or neighbour discovery not read to its end."""
    if len(frame) < ETHERNET.size:  # (its first bytes could say anything: a classmate's address)
        return "shorter than an Ethernet header (%d bytes)" % len(frame)
    _, source, ethertype = ETHERNET.unpack_from(frame)
    body, claims = frame[ETHERNET.size:], []
    if source[0] & 1:  # as a switch never learns a group address as a source
        return "from %s, a group address: no one owns one" % mac_text(source)
    if ethertype == ETHERTYPE_ARP and len(body) >= ARP.size:
        sender_mac, sender_ip = ARP.unpack_from(body)[5:7]
        if sender_mac != source:
            return "whose ARP sender is another MAC than the frame's own"
        claims = [sender_ip]
    elif ethertype == ETHERTYPE_IPV4 and len(body) >= IPV4.size:
        claims = [IPV4.unpack_from(body)[8]]
    elif ethertype == ETHERTYPE_IPV6:
        claims = ipv6_claims(body)
        if isinstance(claims, str):
            return claims
    return [source] + [address for address in claims if any(address)]


def ipv6_claims(packet):
    """An IPv6 packet's claims: its source, and a neighbour advertisement's target behind any
    extension headers; a string if neighbour discovery cannot be read to its end."""
    parts = ip_parts(packet)
    if isinstance(parts, str):
        return []
    _, source, _, protocol, payload, fragment = parts
    if protocol is None:
        return "whose IPv6 extension headers go on past the %d read" % MAX_EXTENSIONS
    if protocol != ICMPV6 or fragment == "later" or not payload:
        return [source]
    if payload[0] in NEIGHBOR_DISCOVERY and fragment:
        return "of neighbour discovery in fragments (RFC 6980 forbids it)"
    if payload[0] == NEIGHBOR_ADVERTISEMENT and len(payload) >= 24:
        return [source, bytes(payload[8:24])]  # its target: "this address is mine"
    return [source]


def prohibited(packet, tap, server_addresses):
    """The ICMP or ICMPv6 "administratively prohibited" answer to a packet, from the server's
    address of its family (tap: in a frame to its sender's MAC, from the server's); None if
    there is no answer to send. It quotes the packet's IP header and 8 bytes after it (RFC 792):
    all the sender's ping needs to find its own request."""
    ip = packet[ETHERNET.size:] if tap else packet
    source = packet_ends(ip, False)[0] or b""
    ours = [a for a in server_addresses if len(a) == len(source) and a[:2] != b"\xfe\x80"]
    macs = [a for a in server_addresses if len(a) == 6]
    if not ours:  # no address of the packet's family to answer from
        return None
    if tap and not macs:
        return None
    if len(source) == 4:
        icmp = bytearray(struct.pack("!BBHI", 3, 13, 0, 0) + bytes(ip[:(ip[0] & 0x0F) * 4 + 8]))
        struct.pack_into("!H", icmp, 2, checksum(icmp))
        header = bytearray(IPV4.pack(0x45, 0, IPV4.size + len(icmp), 0, 0, 64, ICMP, 0, ours[0],
                                     source))
        struct.pack_into("!H", header, 10, checksum(header))
    else:
        icmp = bytearray(struct.pack("!BBHI", 1, 1, 0, 0) + bytes(ip[:IPV6.size + 8]))
        pseudo = ours[0] + source + struct.pack("!I3xB", len(icmp), ICMPV6)
        struct.pack_into("!H", icmp, 2, checksum(pseudo + icmp))
        header = IPV6.pack(6 << 28, len(icmp), ICMPV6, 64, ours[0], source)
    if not tap:
        return bytes(header + icmp)
    ethertype = ETHERTYPE_IPV4 if len(source) == 4 else ETHERTYPE_IPV6
    return ETHERNET.pack(bytes(packet[6:12]), macs[0], ethertype) + header + icmp


def checksum(data):
    """The Internet checksum (RFC 1071): the ones' complement of the ones' complement sum of the
    16-bit words."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def device_addresses(name):
    """A device's addresses, as packet_ends() gives them: its IPv4 and IPv6 ones (ip), its MAC."""
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
    if len(address) == 6:
        return mac_text(address)
    return str(ipaddress.ip_address(address))


# ---- 9. The whole tunnel on one machine: Demo, Timeline, ping(), journey(), the bench --------
#      Two network namespaces stand in for two hosts, a veth pair for the cable between them;
#      each end is this program, run with --events: each of its lines comes as an event (JSON:
#      when it happened, its text, its fields), so that one timeline shows every process's
#      lines in the order they happened, and the diagram is drawn from the events' fields.

DEMO_PREFIX = "simpletun-demo-"  # namespaces: DEMO_PREFIX + our pid + "-" + the host's initial
DEMO_CLASS = ("alice", "bob", "carol")  # --demo --clients N: the first N are the class's hosts
DEMO_UNDERLAY = {"server": "192.0.2.1/24", "client": "192.0.2.2/24",  # the "physical" network
                 "alice": "192.0.2.2/24", "bob": "192.0.2.3/24", "carol": "192.0.2.4/24"}
DEMO_TUNNEL = {"server": "10.0.0.1/24", "client": "10.0.0.2/24",  # the private network
               "alice": "10.0.0.2/24", "bob": "10.0.0.3/24", "carol": "10.0.0.4/24"}
DEMO_LAN = {"server": "10.1.0.1/24", "lan": "10.1.0.2/24"}  # --lan: a network behind the server
DEMO_PINGS, DEMO_PINGS_LOSSY = 3, 10  # with --loss: enough to tell a lossy cable from a broken one
DEMO_PINGS_CLASS = 1  # --clients: to each of two hosts from each client: a timeline that reads
PING_WAIT, PING_WAIT_TCP = 2, 6  # s per reply; under TCP a lossy cable's repairs come late
DEMO_WAIT = 10  # seconds for each end to come up, and to go
DEMO_COUNT = {2: "two", 3: "three", 4: "four"}  # how many hosts the demo makes, in words
DIAGRAM_PING = 1  # --diagram: the echo request it draws (its icmp_seq)
BENCH_PORT, BENCH_SECONDS, BENCH_PINGS = 5201, 3, 20
ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0


class Timeline:
    """The demo's one output: every process's events in the order they happened, held HOLD s."""

    HOLD = 0.3

    def __init__(self):
        self.start = time.monotonic()
        self.waiting = []  # a heap of (when, arrival order, label, text)
        self.order = itertools.count()
        self.sources = {}  # pipe fd -> [label, unfinished line]
        self.events = collections.deque(maxlen=2000)  # the latest (label, event): saw(), journey()

    def launch(self, label, namespace, command):
        """Start a command in a namespace (start_in()); its events join the timeline."""
        process = start_in(namespace, command)
        os.set_blocking(process.stdout.fileno(), False)
        self.sources[process.stdout.fileno()] = [label, b""]
        return process

    def say(self, text):
        """A line of the demo's own."""
        for line in text.splitlines():
            self.add("demo", {"t": time.monotonic(), "text": line})

    def add(self, label, event):
        """Queue an event (a line that is no event: its text, now)."""
        heapq.heappush(self.waiting, (event["t"], next(self.order), label, event["text"]))
        self.events.append((label, event))

    def saw(self, label, kind, **fields):
        """True if the process `label` told of an event of this kind, with these fields."""
        return any(who == label and event.get("event") == kind and
                   all(event.get(name) == value for name, value in fields.items())
                   for who, event in self.events)

    def pump(self, until=lambda: False, timeout=None):
        """Read and print events until until() holds (True) or timeout s pass (False)."""
        deadline = None
        if timeout is not None:
            deadline = time.monotonic() + timeout
        while not until():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self.sources:
                for fd in select.select(list(self.sources), [], [], self.HOLD / 3)[0]:
                    self.read(fd)
            else:
                time.sleep(self.HOLD / 3)
            self.emit(time.monotonic() - self.HOLD)
        return True

    def read(self, fd):
        """Take what a process printed; each whole line is an event."""
        label, rest = self.sources[fd]
        data = os.read(fd, 65536)
        if not data:  # the process closed its output: it has ended, and its last line with it
            del self.sources[fd]
        lines = (rest + data).split(b"\n")
        if fd in self.sources:  # (else the last line is whole, newline or not)
            self.sources[fd][1] = lines.pop()
        for line in lines:
            if line:
                self.add(label, as_event(line.decode(errors="replace")))

    def emit(self, before):
        """Print, in order, every event that happened before `before`: one write per line."""
        try:
            while self.waiting and self.waiting[0][0] <= before:
                when, _, label, text = heapq.heappop(self.waiting)
                sys.stdout.write("%7.3f %-6s| %s\n" % (max(0.0, when - self.start), label, text))
            sys.stdout.flush()
        except BrokenPipeError:  # nobody reads us any more (| head): go on unheard, and clean up
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())

    def flush(self):
        """Print every event still waiting: the processes have ended."""
        for fd in list(self.sources):
            while fd in self.sources and select.select([fd], [], [], 0.5)[0]:
                self.read(fd)
        self.emit(float("inf"))


def as_event(line):
    """A process's line as an event: its own (--events), or, for any other line, its text now."""
    if line.startswith("{"):
        with contextlib.suppress(ValueError):
            return json.loads(line)
    return {"t": time.monotonic(), "text": line}


def tell(text, **fields):
    """Print an event of this process's (the demo's pinger and bench): one JSON line."""
    print(json.dumps(dict(fields, t=fields.get("t", time.monotonic()), text=text)), flush=True)


def ping(address, count=DEMO_PINGS, timeout=PING_WAIT, interval=0.2, say=lambda **event: None):
    """ping (a fresh machine may lack it), by the kernel's ping socket: the round trip times
    (None: no reply); say() is told of each request as it is sent and each reply as it comes."""
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP) as sock:
        for sequence in range(1, count + 1):
            request = ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, 0, sequence)
            sent = time.monotonic()
            sock.sendto(request + b"simpletun.py demo, echo request %d" % sequence, (address, 0))
            say(event="request", t=sent, seq=sequence, to=address,
                text="echo request to %s: icmp_seq=%d" % (address, sequence))
            times.append(None)
            while select.select([sock], [], [], max(0, sent + timeout - time.monotonic()))[0]:
                kind, _, _, _, their_sequence = ICMP_ECHO.unpack_from(sock.recv(65535))
                if (kind, their_sequence) == (ICMP_ECHO_REPLY, sequence):
                    came = time.monotonic()
                    times[-1] = came - sent
                    say(event="reply", t=came, seq=sequence, to=address, text="reply from %s: "
                        "icmp_seq=%d time=%.2f ms" % (address, sequence, times[-1] * 1000))
                    break
            else:
                say(text="no reply from %s to icmp_seq=%d within %g s" % (address, sequence,
                                                                         timeout))
            time.sleep(interval)
    return times


def demo_ping(address, count=DEMO_PINGS, loss=0, wait=PING_WAIT):
    """The demo's pinger (client host): exit status 0 if every reply came, or if `loss` % each
    way explains the replies that did not."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the demo stops us like Ctrl-C
    try:
        times = ping(address, count, wait, say=lambda **event: tell(**event))
    except KeyboardInterrupt:
        return 1
    except OSError as err:  # e.g. the tunnel's device went away under us
        tell("ping: %s" % (err.strerror or err))
        return 1
    replies = count - times.count(None)
    if loss:
        tell("%d of %d replies came back within %g s; the cable loses about %.0f %% of round "
             "trips (%g %% each way)" % (replies, count, wait, loss * (2 - loss / 100), loss))
    if loss_explains(replies, count, loss):
        return 0
    return 1


def loss_explains(replies, count, loss):
    """True unless so few replies are unlikely (under 1 in 1000) with loss % lost each way."""
    crosses = (1 - loss / 100) ** 2  # the request, then its reply
    chance = sum(math.comb(count, k) * crosses ** k * (1 - crosses) ** (count - k)
                 for k in range(replies + 1))  # binomial: P(no more than `replies`)
    return chance >= 0.001


class Demo:
    """--demo: its hosts (network namespaces), what runs in them, and the timeline of what they
    did; each step of the demo is one method."""

    def __init__(self, args):
        self.args, self.timeline = args, Timeline()
        self.say = self.timeline.say
        self.mode = "tap" if args.tap else "tun"
        self.clients = DEMO_CLASS[:args.clients] if args.clients > 1 else ("client",)
        self.hosts = ("server",) + self.clients
        self.ns = {side: "%s%d-%s" % (DEMO_PREFIX, os.getpid(), side[0])
                   for side in self.hosts + ("lan",) * args.lan}
        self.cable = "br0" if args.clients > 1 else "veth0"  # the server's end (a class: a bridge)
        self.pings = self.who_pings_whom()
        self.running = {}  # what runs in the hosts: the ends, then the pinger

    def who_pings_whom(self):
        """(host, address, whom) for each pinger: the client its target; each client of a class
        the server, then another client."""
        if len(self.clients) > 1:
            return [(side, host_of(DEMO_TUNNEL[whom]), whom) for n, side in enumerate(self.clients)
                    for whom in ("server", self.clients[n - 1])]
        target = DEMO_LAN["lan"] if self.args.lan else DEMO_TUNNEL["server"]
        return [("client", host_of(target), None)]

    def commands(self):
        """Each end's command line: the options the demo passes on, and its role."""
        args = self.args
        level = 0 if args.bench else args.debug or 2 * (not args.keep)  # kept: quiet unless asked
        if args.diagram:
            level = max(level, 2)  # (the diagram is drawn from the -dd events)
        options = ["-i", self.mode + "0"] + ["-" + "d" * level] * bool(level) + ["-a"] * args.tap
        for flag in ("tls", "key"):
            if getattr(args, flag):
                options += ["--" + flag, os.path.abspath(getattr(args, flag))]
        for flag in ("offload", "udp", "two_writes"):
            if getattr(args, flag):
                options.append("--" + flag.replace("_", "-"))
        ends = {side: options + ["-c", host_of(DEMO_UNDERLAY["server"]), "--addr",
                                 DEMO_TUNNEL[side]] for side in self.clients}
        ends["server"] = options + ["-s", "--addr", DEMO_TUNNEL["server"]]
        if args.clients > 1:
            ends["server"] += ["--clients", str(args.clients)]
        return ends

    def introduce(self):
        """The demo's first lines: the hosts, their cables and addresses, and what will happen."""
        how = "veth pairs to a bridge, br0"
        if len(self.clients) == 1:
            how = "veth pairs" if self.args.lan else "a veth pair"
        self.say("%s hosts, each a network namespace, joined by %s (the \"physical\" network):"
                 % (DEMO_COUNT[len(self.ns)], how))
        for side in self.hosts:
            cable = self.cable if side == "server" else "veth0"
            self.say("  %-6s %s  %s %s  %s0 %s" % (side, self.ns[side], cable, DEMO_UNDERLAY[side],
                                                  self.mode, DEMO_TUNNEL[side]))
        if self.args.lan:
            self.say("  lan    %s  lan0 %s, on a LAN behind the server (its lan0 %s), which "
                     "forwards" % (self.ns["lan"], DEMO_LAN["lan"], DEMO_LAN["server"]))
        if len(self.clients) > 1:
            self.say("a %s tunnel joins the server and its %d clients (--clients %d); each client "
                     "pings the server, then another client" % (self.mode, len(self.clients),
                                                                len(self.clients)))
        else:
            pings = "; the client pings %s through it" % self.pings[0][1]
            self.say("a %s tunnel joins %s and %s%s" % (self.mode, DEMO_TUNNEL["server"],
                                                       DEMO_TUNNEL["client"], "" if self.args.bench
                                                       else pings))

    def start_ends(self):
        """Start the server, then each client: each is up once it says so (its event)."""
        script = [sys.executable, os.path.abspath(__file__), "--events"]
        for side, command in sorted(self.commands().items(), key=lambda end: end[0] != "server"):
            self.say("%s: simpletun.py %s" % (side, " ".join(command)))
            process = self.launch(side, side, script + command)
            ready = "listening" if side == "server" else "connected"
            self.timeline.pump(lambda: self.timeline.saw(side, ready) or  # noqa: B023 (here)
                               process.poll() is not None, DEMO_WAIT)
            if not self.timeline.saw(side, ready) or process.poll() is not None:
                raise UserError("the demo's %s did not come up: see its lines above" % side)
        slots = len(self.clients)
        if slots > 1 and not self.timeline.pump(lambda: self.timeline.saw(
                "server", "joined", clients=slots, slots=slots), DEMO_WAIT):
            raise UserError("not every client of the demo's class joined: see the lines above")

    def launch(self, label, host, command):
        """Start a command in a host; what it prints joins the timeline under `label`."""
        self.running[label] = self.timeline.launch(label, self.ns[host], command)
        return self.running[label]

    def ping_all(self):
        """Each pinger in turn, waited for; (echo requests sent, True if every pinger's replies
        came back, or the lossy cable explains those that did not)."""
        count = DEMO_PINGS_LOSSY if self.args.loss else DEMO_PINGS
        wait = PING_WAIT_TCP if self.args.loss and not self.args.udp else PING_WAIT
        if len(self.clients) > 1:
            count = DEMO_PINGS_CLASS
        crossed = True
        for side, address, whom in self.pings:
            if whom == "server":
                self.say("%s pings the server (%s)" % (side, address))
            elif whom:
                self.say("%s pings %s (%s): the server passes each packet on, a client to a "
                         "client" % (side, whom, address))
            call = "demo_ping(%r, %d, %g, %g)" % (address, count, self.args.loss, wait)
            pinger = self.launch("ping", side, calling(call))
            self.timeline.pump(lambda: pinger.poll() is not None)  # noqa: B023 (waited for here)
            crossed = crossed and pinger.returncode == 0
        return count * len(self.pings), crossed

    def draw(self):
        """--diagram: the journey of the first echo request (a class: a client's to a client)."""
        side, address, whom = self.pings[len(self.pings) > 1]
        self.timeline.pump(timeout=Timeline.HOLD)  # (the ends' last events of it)
        hosts = [side, "server"] + [whom] * (len(self.clients) > 1)
        drawn = journey(self.timeline.events, address, hosts, self.args, DIAGRAM_PING)
        if not drawn:
            self.say("no diagram: the first ping failed")
            return None
        if self.args.diagram != "-":
            with open(self.args.diagram, "w") as f:
                f.write(drawn)
        where = "below" if self.args.diagram == "-" else self.args.diagram
        self.say("the first echo request's journey, a Mermaid sequence diagram: %s (an SVG for "
                 "a slide: mmdc -i FILE -o journey.svg)" % where)
        return drawn

    def stop(self):
        """Stop everything started, each saying its last lines, and remove every host."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must leave nothing behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        args, running = self.args, self.running
        if (args.loss or args.keep) and "client" in running and not args.udp:
            self.say("the tunnel's own TCP connection retransmitted %s from the client and %s "
                     "from the server (ss -ti)" % (
                         outer_retransmissions(self.ns["client"], "( dport = :%d )" % PORT),
                         outer_retransmissions(self.ns["server"], "( sport = :%d )" % PORT)))
        for process in reversed(list(running.values())):  # ping, clients, server
            if process.poll() is None:
                process.terminate()
        self.timeline.pump(lambda: all(p.poll() is not None for p in running.values()),
                           DEMO_WAIT)
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        self.timeline.flush()
        for name in self.ns.values():
            remove_namespace(name)
        many = "all " + DEMO_COUNT[len(self.ns)] if len(self.ns) > 2 else "both"
        self.say("removed %s namespaces and everything in them" % many)
        self.timeline.flush()


def demo(args):
    """--demo: build the hosts, run a server and its client(s), ping through the tunnel, clean up;
    exit status 0 if the pings crossed."""
    if os.geteuid() != 0:
        raise UserError("--demo needs root, to make network namespaces: "
                        "sudo ./simpletun.py --demo")
    if not shutil.which("ip"):
        raise UserError("--demo needs the ip command from iproute2 (apt install iproute2)")
    method = None
    if args.loss or args.delay:
        method = lossy_cable_method(args.loss, args.delay)
    remove_stale_demos()
    show = Demo(args)
    show.introduce()
    verdict = drawn = None
    try:
        build_demo_hosts(show.ns)
        if method:
            make_cable_lossy((show.ns["server"], show.ns["client"]), method, args.loss, args.delay)
            delayed = ", delayed %g ms" % args.delay if args.delay else ""
            show.say("the cable loses %g %% of packets each way%s (%s)"
                     % (args.loss, delayed, method))
        show.start_ends()
        if args.lan:  # the client's route to the LAN: into the tunnel, to the server: it forwards
            route = (DEMO_LAN["server"][:-4] + "0/24", "via", host_of(DEMO_TUNNEL["server"]))
            ip_command("-n", show.ns["client"], "route", "add", *route)
            show.say("client: ip route add %s %s %s" % route)
        verdict = show.ping_all()
        if args.diagram:
            drawn = show.draw()
        if args.bench:
            bench(show.ns, show.say, show.mode + " mode" + " over UDP" * args.udp)
        if args.keep:
            show.say(keep_instructions(show.ns, show.pings, args.udp, show.cable))
            show.timeline.pump()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: clean up all the same, and say so
        show.say("interrupted: stopping " + ("every end" if args.clients > 1 else "both ends"))
        verdict = verdict if args.keep else None
    finally:
        show.stop()
    return demo_verdict(show.timeline, args, verdict, drawn)


def demo_verdict(timeline, args, verdict, drawn):
    """The demo's last line, and its exit status: 0 if the pings crossed (None: interrupted)."""
    if verdict is None:
        return 1
    count, crossed = verdict
    if args.loss and crossed:
        timeline.say("the replies that came back are what the lossy cable leaves: the tunnel "
                     "works")
    elif args.loss:
        timeline.say("FAILED: fewer replies came back than the lossy cable explains")
    elif crossed:
        timeline.say("all %d echo requests crossed the tunnel and their replies came back" % count)
    else:
        timeline.say("FAILED: not every echo request came back through the tunnel")
    timeline.flush()
    if drawn and args.diagram == "-":
        sys.stdout.write(drawn)
    return 0 if crossed else 1


def build_demo_hosts(ns):
    """The demo's hosts: a veth pair from each client to the server (a class: to a bridge in the
    server's host); --lan: one more, behind the server."""
    for name in ns.values():  # each host: its loopback up, and ping sockets for root's group
        ip_command("netns", "add", name)
        ip_command("-n", name, "link", "set", "lo", "up")
        ip_command("netns", "exec", name, "sh", "-c",
                   "echo 0 0 > /proc/sys/net/ipv4/ping_group_range")
    server, bridged = ns["server"], "alice" in ns
    if bridged:
        ip_command("-n", server, "link", "add", "br0", "up", "type", "bridge")
        ip_command("-n", server, "addr", "add", DEMO_UNDERLAY["server"], "dev", "br0")
    for side in ns:
        if side == "server":
            continue
        device, addresses = "veth0", DEMO_UNDERLAY
        if side == "lan":
            device, addresses = "lan0", DEMO_LAN
        here = device  # the server's end of the cable (a class: named after the client)
        if bridged:
            here = side
        ip_command("-n", server, "link", "add", here, "type", "veth", "peer", "name", device,
                   "netns", ns[side])
        ip_command("-n", ns[side], "addr", "add", addresses[side], "dev", device)
        ip_command("-n", ns[side], "link", "set", device, "up")
        if bridged:
            ip_command("-n", server, "link", "set", here, "master", "br0")
        else:
            ip_command("-n", server, "addr", "add", addresses["server"], "dev", here)
        ip_command("-n", server, "link", "set", here, "up")
    if "lan" in ns:
        ip_command("-n", ns["lan"], "route", "add", "default", "via", host_of(DEMO_LAN["server"]))
        ip_command("netns", "exec", server, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")


def host_of(cidr):
    """The address in an address/prefix: 10.0.0.1 in 10.0.0.1/24."""
    return cidr.split("/")[0]


def remove_stale_demos():
    """Remove the namespaces of earlier demos whose process is gone (killed before cleaning up)."""
    for name in ip_command("netns", "list").split():  # lines "NAME (id: N)": a NAME has the prefix
        pid = name[len(DEMO_PREFIX):-2]  # the demo that made it
        if name.startswith(DEMO_PREFIX) and pid.isdigit() and not os.path.exists("/proc/" + pid):
            remove_namespace(name)
            print("demo: removed %s, left behind by an earlier demo" % name, flush=True)


def remove_namespace(name):
    """End what still runs in a demo namespace (the demo started it), then delete it."""
    try:
        for pid in ip_command("netns", "pids", name).split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        ip_command("netns", "delete", name)
    except UserError:  # gone already (never made, or another demo removed it as stale): done
        if name in ip_command("netns", "list").split():
            raise


def lossy_cable_method(loss, delay):
    """'netem' or 'nft': how the demo's cable will lose or delay packets (else a UserError)."""
    if shutil.which("tc") and has_netem():
        return "netem"
    if delay:
        raise UserError("--delay needs netem (tc qdisc ... netem), which this kernel does not "
                        "have (modprobe sch_netem fails); --loss alone works with nft")
    if not shutil.which("nft"):
        raise UserError("--loss needs tc with netem (kernel module sch_netem) or nft: this "
                        "machine has neither (apt install nftables)")
    return "nft"


def has_netem():
    """True if the kernel has netem, the queue that loses and delays packets (loaded, loadable)."""
    if os.path.isdir("/sys/module/sch_netem"):
        return True
    if not shutil.which("modprobe"):
        return False
    loaded = subprocess.run(["modprobe", "-q", "sch_netem"], stderr=subprocess.DEVNULL)
    return loaded.returncode == 0


def make_cable_lossy(namespaces, method, loss, delay):
    """Lose loss % of the cable's packets (netem: delay them too); nft as they arrive (as they
    leave, nft's drop is an error the sender sees: EPERM)."""
    for namespace in namespaces:
        inside = ("netns", "exec", namespace)  # ip netns exec NAMESPACE COMMAND...
        # one packet on the cable, one segment: with GSO a "packet" may be a 64 KiB super-packet,
        # and the cable would lose far fewer, far bigger ones than it says
        ip_command("-n", namespace, "link", "set", "veth0", "gso_max_segs", "1")
        if method == "netem":
            shape = []
            if loss:
                shape += ["loss", "%g%%" % loss]
            if delay:
                shape += ["delay", "%gms" % delay]
            ip_command(*inside, "tc", "qdisc", "add", "dev", "veth0", "root", "netem", *shape)
            continue
        chance = ""  # nft's numgen random: a random number per packet, 0..9999
        if loss < 100:
            chance = "numgen random mod 10000 < %d " % round(loss * 100)
        ip_command(*inside, "nft", "add table inet simpletun_demo; add chain inet simpletun_demo "
                   "in { type filter hook input priority 0; policy accept; }; add rule inet "
                   "simpletun_demo in iifname veth0 %scounter drop" % chance)


def outer_retransmissions(namespace, port_filter):
    """How many segments the tunnel's own TCP connection retransmitted (ss -ti), in words."""
    try:
        text = ip_command("netns", "exec", namespace, "ss", "-tiH", "state", "established",
                          port_filter)
    except (UserError, OSError) as err:
        return "an unknown number of segments (ss failed: %s)" % err
    found = re.search(r"retrans:\d+/(\d+)", text)
    if not found:
        return "0 segment(s)"
    return "%s segment(s)" % found.group(1)


def start_in(namespace, command):
    """Start a command in a namespace, in a session of its own: Ctrl-C reaches the demo, which
    stops it."""
    return subprocess.Popen(["ip", "netns", "exec", namespace] + command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)


def calling(call):
    """The command that runs CALL, a call of a function of this file, in a process of its own."""
    here = os.path.dirname(os.path.abspath(__file__))
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); from simpletun import *; "
            "sys.exit(%s)" % (here, call)]


def keep_instructions(ns, pings, udp, cable):
    """--keep: commands to paste in another terminal (as root): a shell on each host, each ping,
    what crosses the cable."""
    client, server = ns[pings[0][0]], ns["server"]
    transport, on_cable, sockets = ("tcp", "the frames inside TCP, on the cable",
                                    "the tunnel's TCP connection")
    if udp:
        transport, on_cable, sockets = ("udp", "the datagrams, on the cable",
                                        "the tunnel's UDP socket")
    commands = [("%s bash" % ns[host], "a shell on the %s host" % host) for host in ns]
    commands += [("%s ping %s" % (ns[side], address), "%s pings %s through the tunnel" % (
        side, whom or address)) for side, address, whom in pings]
    commands += [("%s tcpdump -ni %s -X %s port %d" % (server, cable, transport, PORT), on_cable),
                 ("%s ip route" % client, "the route into the tunnel"),
                 ("%s ss -%si" % (client, transport[0]), sockets)]
    if "lan" in ns:
        commands.insert(-2, ("%s tcpdump -ni lan0" % ns["lan"], "what the LAN host sees"))
    width = max(len(command) for command, _ in commands)
    return ("the tunnel stays up until Ctrl-C; its lines keep coming here. In another terminal, "
            "as root:\n" + "\n".join("  ip netns exec %-*s   %s" % (width, command, what)
                                     for command, what in commands))


# --diagram: what each of an end's events is on the diagram: an arrow from one of its lifelines to
# another (D: its device, S: its simpletun.py, C: its cable), and the words on it
ARROWS = {"read": ("D", "S", "TAP2NET %(n)d: %(size)d B %(unit)s, %(label)s"),
          "sent": ("S", "C", "TAP2NET %(n)d: %(cable)s"),
          "received": ("C", "S", "a receive: %(bytes)d B from TCP"),
          "arrived": ("S", "S", "NET2TAP %(n)d: cut a %(size)d B %(unit)s"),
          "written": ("S", "D", "NET2TAP %(n)d: wrote %(size)d B to the device"),
          "forwarded": ("S", "C", "CLASS: passed on to %(whom)s, 2 + %(size)d B")}
UDP_ARRIVED = ("C", "S", "NET2TAP %(n)d: one datagram, %(size)d B %(unit)s")  # (--udp: no stream)


def journey(events, target, hosts, args, seq=DIAGRAM_PING):
    """--diagram: echo request `seq` to `target` and its reply, from the run's (label, event)
    list, as a Mermaid sequence diagram: an arrow for each step of each packet on its way (tap:
    the ARP before it), with its time (ms since the request left) and what crossed, on one
    clock: the pinger's sending and receiving are the first and last arrows. None if no reply
    came. hosts: the pinger's, the server, and (a class) the client it pings."""
    pinged = {event["event"]: event["t"] for who, event in events if who == "ping" and
              (event.get("seq"), event.get("to")) == (seq, target)}
    if "reply" not in pinged:
        return None
    start, end = pinged["request"], pinged["reply"]
    lanes = journey_lanes(hosts)
    steps = [(start, "ping", "D" + hosts[0], "echo request, icmp_seq=%d" % seq)]
    steps += journey_steps([(who, event) for who, event in events if who in hosts and
                            start <= event["t"] <= end], hosts, args, seq)
    steps.append((end, "D" + hosts[0], "ping", "echo reply, icmp_seq=%d" % seq))
    lines = ["sequenceDiagram"] + ["    participant %s as %s" % lane for lane in lanes]
    for when, here, there, label in sorted(steps, key=lambda step: step[0]):
        if here == "note":
            lines.append("    Note over %s: %s" % (there, label))
        else:
            lines.append("    %s->>%s: +%.2f %s" % (here, there, (when - start) * 1000, label))
    lines.append("    Note over ping,%s: round trip %.2f ms, as ping measured it. On each arrow, "
                 "the ms since the request left" % (lanes[-1][0], (end - start) * 1000))
    return "\n".join(lines) + "\n"


def journey_lanes(hosts):
    """The diagram's lifelines, in the order the packet meets them: ping, the first host's device,
    simpletun.py and cable, the server's simpletun.py; then the server's device, or (a class) the
    second client's cable, simpletun.py and device: the server's device never sees the packet."""
    first = hosts[0]
    lanes = [("ping", "ping on " + first), ("D" + first, "the device on " + first),
             ("S" + first, "simpletun.py on " + first), ("C" + first, "the cable from " + first),
             ("Sserver", "simpletun.py on server")]
    if len(hosts) == 2:
        return lanes + [("Dserver", "the device on server")]
    other = hosts[2]
    return lanes + [("C" + other, "the cable to " + other),
                    ("S" + other, "simpletun.py on " + other),
                    ("D" + other, "the device on " + other)]


def journey_steps(events, hosts, args, seq):
    """The arrows of the hosts' events of the journey's packets (a class's server: only what it
    passes on). A receive is drawn with the packet it brought, and a stall between two receives
    with a note (--two-writes: the length came alone; Nagle held the packet until its ACK)."""
    hosts_at = {host_of(DEMO_UNDERLAY[host]): host for host in hosts}
    steps, received = [], collections.defaultdict(list)  # a host's receives, until their packet
    for who, event in events:
        kind = event.get("event")
        if kind not in ARROWS:
            continue
        step = journey_arrow(who, event, hosts_at, hosts[0], args)
        if kind == "received":
            received[who].append(step)
            continue
        came = []
        if kind in ("arrived", "forwarded"):  # what the receives before it brought
            came = received.pop(who, [])
        if event.get("label") is None or event.get("seq") not in (seq, None):
            continue  # a packet of no step of this journey
        if who == "server" and len(hosts) > 2 and kind != "forwarded":
            continue
        if len(came) > 1:  # the length came alone: the packet waited for its ACK (Nagle)
            when, cable, end, _ = came[-1]
            stall = (when - came[0][0]) * 1000
            note = "%.1f ms later: Nagle waited for the length's ACK" % stall
            came.insert(-1, (when, "note", "%s,%s" % (cable, end), note))
        steps += came + [step]
    return steps


def journey_arrow(who, event, hosts_at, first, args):
    """An end's event as the diagram's arrow: (its time, from which lifeline, to which, words)."""
    kind = event["event"]
    here, there, words = ARROWS[kind]
    if kind == "arrived" and args.udp:  # no stream to cut: the datagram came from the cable
        here, there, words = UDP_ARRIVED
    if kind == "received" and event.get("wire"):
        words = "a receive: TLS records, %(wire)d B on the wire"
    fields = dict(event, unit="frame" if args.tap else "packet",
                  whom=hosts_at.get(event.get("to")))
    if kind == "sent":
        fields["cable"] = on_cable(event, args)
    words %= fields
    cable = who  # the cable an end's arrow crosses: its own; the server's, its client's
    if who == "server":
        cable = hosts_at.get(event.get("from") or event.get("to"), first)
    lane = {"D": "D" + who, "S": "S" + who, "C": "C" + cable}
    return event["t"], lane[here], lane[there], words


def on_cable(event, args):
    """What a packet became on the cable, in this mode."""
    size = event.get("size")
    if args.udp and args.key:
        return "datagram: 8 + %d + 16 B" % size
    if args.udp:
        return "one datagram of %d B" % size
    if args.two_writes:
        return "2 B, then %d B: two writes" % size
    if args.tls:
        return "frame: 2 + %d B, in TLS" % size
    return "frame: %d + %d B" % (framing(args)[0].size, size)


def bench(ns, say, mode):
    """--bench: TCP throughput and ping round trips over the bare cable and through the tunnel;
    say() prints the demo's lines."""
    def run(namespace, call):
        try:
            return json.loads(ip_command("netns", "exec", namespace, *calling(call)))
        except UserError as err:  # (its last line: the error the call ended with)
            say("bench: %s failed: %s" % (call.split("(")[0], str(err).splitlines()[-1]))
            return None

    addresses = {side: {"underlay": host_of(DEMO_UNDERLAY[side]),
                        "tunnel": host_of(DEMO_TUNNEL[side])} for side in ("server", "client")}
    sink = start_in(ns["server"], calling("bench_sink(%d)" % BENCH_PORT))
    sink.stdout.readline()  # "listening"
    try:
        say("bench: TCP client -> server for %d s over the cable, then through the "
                     "tunnel; %d pings each way" % (BENCH_SECONDS, BENCH_PINGS))
        rows = [("TCP client -> server (Mbit/s)",
                 [run(ns["client"], "bench_send(%r, %d, %d)" % (addresses["server"][way],
                                                               BENCH_PORT, BENCH_SECONDS))
                  for way in ("underlay", "tunnel")])]
        for here, there in (("client", "server"), ("server", "client")):
            rows.append(("ping %s -> %s (ms)" % (here, there),
                         [run(ns[here], "bench_ping(%r, %d)" % (addresses[there][way],
                                                                 BENCH_PINGS))
                          for way in ("underlay", "tunnel")]))
    finally:
        sink.kill()
        sink.wait()
    say("%-35s underlay   tunnel   tunnel vs underlay" % ("bench, %s:" % mode))
    for name, (under, tunnel) in rows:
        if under is None or tunnel is None:
            say("  %-32s failed" % name)
        elif "Mbit" in name:
            say("  %-32s %9.1f %9.1f   x %.3f" % (name, under, tunnel, tunnel / under))
        else:
            say("  %-32s %9.3f %9.3f   +%.3f ms" % (name, under, tunnel, tunnel - under))


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
    """--bench, in the client host: send as fast as TCP takes it for `seconds`; print Mbit/s."""
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
    if None in times:
        print(json.dumps(None))
    else:
        print(json.dumps(sum(times) / len(times) * 1000))


# ---- 10. The full command line: parse_args(), extended_end(), full_main() --------------------
#      The tunnel's own parser (make_parser) with the extras' flags added, and the tunnel's
#      run() and serve()/run_client() called with the extras in their seams. One options object
#      (parse_args()'s) goes to every part that needs to know how this end runs.

def number_between(low, high, name, kind=int):
    """An argparse type: a number from `low` to `high`, called `name` in the error."""
    def parse(text):
        try:
            number = kind(text)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise argparse.ArgumentTypeError("%s is a number from %g to %g, not %r" % (
                name, low, high, text))
        return number
    return parse


def ip_interface(text):
    """argparse type: an IPv4 or IPv6 address with its prefix length, e.g. 10.0.0.1/24."""
    if "/" in text:
        with contextlib.suppress(ValueError):
            return ipaddress.ip_interface(text)
    raise argparse.ArgumentTypeError("not an address/prefix such as 10.0.0.1/24 or fd00::1/64: "
                                     "%r" % text)


def full_parser():
    """The original's flags (make_parser()), and the extras'."""
    parser = make_parser(required=False, debug_help="log every packet, as the original did; -dd "
                         "also says what each packet is and what each receive brought; -ddd "
                         "also shows each frame's first bytes on the wire")
    parser.epilog = "examples, labs and what each line means: README.md"
    add = parser.add_argument
    add("--addr", metavar="CIDR", type=ip_interface, help="give the device this address/prefix "
        "(IPv4 or IPv6, e.g. 10.0.0.1/24 or fd00::1/64) and bring it up")
    add("--mtu", metavar="N", type=number_between(MIN_MTU, MAX_MTU, "an MTU"),
        help="set the device's MTU (%d-%d; tap: up to %d)" % (MIN_MTU, MAX_MTU, MAX_TAP_MTU))
    add("--tls", metavar="FILE", help="encrypt and authenticate with TLS: FILE is one PEM file "
        "holding this end's certificate and private key (see the README: Encryption)")
    add("--tls-peer", metavar="CERT", help="with --tls: the peer's certificate, the only one "
        "accepted (default: the certificate in the --tls FILE)")
    add("--bind", metavar="ADDR", help="server: listen on this address only (default: all)")
    add("--clients", metavar="N", type=number_between(1, MAX_NEWCOMERS * 32, "a class"),
        default=1, help="server: serve up to N clients at once, as one network (default 1); "
        "with --demo: a class of 2 or 3 on this machine")
    add("--reconnect", action="store_true", help="client: when the server goes away, keep the "
        "device and try again every %d s until it is back" % RECONNECT_EVERY)
    add("--udp", action="store_true", help="carry each packet as one UDP datagram (no TCP over "
        "TCP); both ends need it, and a C simpletun peer has no such mode")
    add("--key", metavar="FILE", help="with --udp: sign every datagram with the secret in FILE, "
        "the same at both ends: only key holders are served; packets cross in clear")
    add("--two-writes", action="store_true", help="send as the C original does, to see its 40 ms "
        "stall: length and packet in two sends, Nagle on (still wire-compatible)")
    add("--offload", action="store_true", help="let the kernel hand over 64 KiB super-packets "
        "(TSO/GSO): several times the throughput; both ends need it (not a C peer)")
    add("--events", action="store_true", help=argparse.SUPPRESS)  # the demo's ends
    add("--version", action="version", version="%(prog)s " + __version__)
    add_demo_flags(parser.add_argument_group("the one-machine demo").add_argument)
    return parser


def add_demo_flags(add):
    """The demo's own flags."""
    add("--demo", action="store_true", help="show the whole tunnel on this machine: namespaces, a "
        "server, a client and pings through it, then clean up (root; -a, -d, --tls, --udp... go "
        "to every end)")
    add("--keep", action="store_true", help="keep the demo up until Ctrl-C (quiet unless -d)")
    add("--lan", action="store_true", help="add a third host on a LAN behind the server, and ping "
        "it from the client through the tunnel")
    add("--loss", metavar="PCT", type=number_between(0, 100, "a percentage", float), default=0,
        help="the demo's cable loses PCT %% of packets each way")
    add("--delay", metavar="MS", default=0, type=number_between(0, 1e4, "a delay in ms", float),
        help="the demo's cable delays each packet MS ms (needs netem)")
    add("--diagram", metavar="FILE", help="write the first ping's journey through the tunnel to "
        "FILE as a Mermaid sequence diagram (-: after the timeline)")
    add("--bench", action="store_true", help="measure TCP throughput and ping over the demo's "
        "cable and through its tunnel")


def parse_args(argv=None):
    """Read the command line: the original's flags and the extras'; the run's options object.
    What does not go together is a usage error, in one line."""
    parser = full_parser()
    args = parser.parse_args(argv)
    why = what_does_not_go(args)
    if why is None and args.demo:
        why = what_the_demo_refuses(args)
    elif why is None:
        why = what_an_end_needs(args, parser)
    if why:
        parser.error(why)
    return args


def what_does_not_go(args):
    """Options that go with no run: why (None: they go)."""
    if args.tap and args.mtu and args.mtu > MAX_TAP_MTU:
        return ("a tap device takes an MTU of at most %d (the Ethernet header must fit in 65535)"
                % MAX_TAP_MTU)
    for flag, why in (("tls", "the standard library has no DTLS, TLS for datagrams"),
                      ("offload", "its 64 KiB super-packets do not fit in a datagram"),
                      ("two_writes", "it is about TCP: a datagram has no length to send apart")):
        if args.udp and getattr(args, flag):
            return "--udp cannot go with --%s (%s)" % (flag.replace("_", "-"), why)
    if args.key and not args.udp:
        return "--key is for --udp (over TCP, --tls proves who the peer is, and encrypts too)"
    if args.tls_peer and not args.tls:
        return "--tls-peer needs --tls FILE (this end's certificate and key)"
    return None


def what_the_demo_refuses(args):
    """--demo sets both ends up itself: what it refuses (None: nothing)."""
    ends = ("iface", "server", "client", "addr", "tls_peer", "bind", "mtu", "reconnect")
    if any(getattr(args, flag) for flag in ends):
        return ("--demo sets up both ends itself: it takes only -a, -d, --tls, --offload, --udp, "
                "--key, --two-writes, --lan, --keep, --loss, --delay, --bench and --clients")
    alone = ("udp", "offload", "two_writes", "lan", "loss", "delay", "bench")
    if args.clients > len(DEMO_CLASS) or args.clients > 1 and any(getattr(args, flag)
                                                                  for flag in alone):
        return ("--demo --clients N shows a class of 2 or 3 clients over TCP: not with --udp, "
                "--offload, --two-writes, --lan, --loss, --delay or --bench")
    return None


def what_an_end_needs(args, parser):
    """A server or a client: what its options lack or have too many of (None: nothing)."""
    for flag in ("keep", "lan", "loss", "delay", "bench", "diagram"):
        if getattr(args, flag):
            return "--%s is for the demo (--demo --%s)" % (flag, flag)
    if args.iface is None:
        return "an interface name is required (-i NAME)"
    if not (args.server or args.client):
        return "choose server (-s) or client (-c HOST) mode"
    for flag, role, needs in (("bind", "server (-s)", args.server),
                              ("clients", "server (-s)", args.server),
                              ("reconnect", "client (-c HOST)", args.client)):
        if getattr(args, flag) != parser.get_default(flag) and not needs:
            return "--%s is for the %s" % (flag, role)
    for flag in ("offload", "two_writes", "udp"):
        if args.clients > 1 and getattr(args, flag):
            return ("--clients cannot go with --%s (a class is served over TCP, one packet per "
                    "frame)" % flag.replace("_", "-"))
    return None


def client_link(sock, host, args, tls, away=None, clock=None):
    """run_client()'s make_link: the TLS handshake, the --offload greeting, then an ExtraLink,
    the clock's timer; the client says it is connected (without -d), and (--addr) announces its
    address."""
    keep_alive(sock)
    if tls:
        sock = secure_client(sock, tls)
    if args.offload:
        try:
            why = greet_server(sock)
        except OSError as err:
            why = "connection lost: %s" % (err.strerror or err)
        if why:
            sock.close()  # not a peer of this kind: no goodbye to wait for
            raise UserError("CLIENT: %s" % why)
    link = ExtraLink(sock, host, args)
    link.away = away
    if clock:
        clock.timer = link
    if away is None and not log.isEnabledFor(logging.INFO):
        tls_said = ""
        if tls:
            tls_said = " (TLS, the pinned certificate)"
        log.warning("CLIENT: connected to %s port %d%s; the tunnel is up once a packet comes "
                    "back through it", host, args.port, tls_said)
    if args.addr:  # (it waits in the device until relay() reads it: the server's first packet)
        announce(args.addr, args.iface)
    return link


def run_client_again(tunnel, host, port, make_link, selector):
    """--reconnect: run_client()'s work every RECONNECT_EVERY s; a line per outage, whatever ends
    each try (and, once a packet comes back, the link says so)."""
    away = None  # since when the server has been away
    while True:
        link = None
        try:
            link = make_link(connect_to(host, port), host, away)
            with contextlib.closing(link):
                relay(tunnel, link, selector)
            why = link.ended
        except (UserError, OSError) as err:
            why = getattr(err, "strerror", None) or err
        if link and link.heard:  # it was back
            away = None
        if away is None:
            log.warning("CLIENT: %s; trying again every %d s until it is back (--reconnect)",
                        why, RECONNECT_EVERY)
            away = time.monotonic()
        time.sleep(RECONNECT_EVERY)


def serve_with_room(tunnel, args, tls=None):
    """The server: the waiting room as serve()'s next_client and selector; a class (--clients)
    served by serve_class(), whose Switch seats each client the room admits."""
    with listen_on(args.port, args.bind or "", *server_family(args.bind)) as listener:
        log.warning("SERVER: listening on port %d", args.port, extra={"event": "listening"})
        room = WaitingRoom(listener, tunnel, args, tls)
        if args.clients == 1:
            return serve(tunnel, listener, room.next_client, room)
        switch = Switch(room, tunnel, args.clients)
        room.seat = switch.seat
        with room:
            serve_class(tunnel, room, switch)


def udp_end(tunnel, args):
    """--udp: one link until the end, its selector a Clock (the link's heartbeat is its timer)."""
    key = None
    if args.key:
        key = read_key(args.key)
    link = udp_link(args, key)
    if args.client and args.addr:
        announce(args.addr, args.iface)

    def unsent(record):  # a server with no client yet: no "written to the network" line
        return link.peer is not None or event_of(record) != "sent"
    log.addFilter(unsent)
    try:
        with contextlib.closing(link), Clock(link) as clock:
            if getattr(link, "own", None):  # the served peer's own socket: read as the port's
                clock.register(link.own, READ, lambda events: net2tap(tunnel, link))
            relay_until_closed(tunnel, link, link.side, clock)
    finally:
        log.removeFilter(unsent)
    return 1  # a datagram link has no orderly end: it ends only when it breaks


def open_device(args):
    """The device, as the options say: tun or tap, --offload, --mtu and --addr."""
    flags = IFF_TUN
    if args.tap:
        flags = IFF_TAP
    read_size = MAX_PACKET
    if args.offload:
        flags, read_size = flags | IFF_VNET_HDR, OFFLOAD_READ_SIZE
    tunnel = Tunnel(*tun_alloc(args.iface, flags), args.debug, read_size)
    try:
        set_offload(tunnel.fd, args.offload)
        log.debug("Successfully connected to interface %s", tunnel.name)
        mtu = args.mtu
        if args.udp and args.addr and not mtu:  # packets that fit a datagram on a 1500-byte cable
            mtu = UDP_MTU - ETHERNET.size * args.tap - KEY_OVERHEAD * bool(args.key)
        if args.addr or mtu:
            configure_device(tunnel.name, args.addr, mtu)
    except BaseException:
        os.close(tunnel.fd)
        raise
    return tunnel


def extended_end(args):
    """Open the device with the extras' options, then serve (-s) or connect (-c) until the end;
    say what crossed, once anything did."""
    tls = None
    if args.tls:
        tls = tls_context(args.server, args.tls, args.tls_peer)
    tunnel = open_device(args)
    try:
        if args.udp:
            return udp_end(tunnel, args)
        if args.client:
            run = run_client
            if args.reconnect:
                run = run_client_again
            with Clock() as clock:  # (its timer: the client's link)
                return run(tunnel, args.client, args.port, lambda sock, host, away=None:
                           client_link(sock, host, args, tls, away, clock), clock)
        serve_with_room(tunnel, args, tls)
    finally:
        os.close(tunnel.fd)
        if tunnel.tap2net or tunnel.net2tap:  # (an error before a peer came needs no more lines)
            log.warning("simpletun.py: %s: TAP2NET %d packets, NET2TAP %d packets, %d dropped",
                        tunnel.name, tunnel.tap2net, tunnel.net2tap, tunnel.dropped)


def full_main(argv=None):
    """Run one end of the tunnel, or the demo, with every extra; return the exit status."""
    args = parse_args(argv)
    # -d: every packet; the demo's ends (--events) also say when they connect, even without -d
    level = logging.WARNING
    if args.debug:
        level = logging.DEBUG
    elif args.events:
        level = logging.INFO
    logging.basicConfig(handlers=[Lines(args)], level=level)
    if args.demo:
        return run(lambda: demo(args))
    return run(lambda: extended_end(args))


if __name__ == "__main__":
    sys.exit(full_main())
