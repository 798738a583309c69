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
gets in. (--offload, which only two simpletun.py ends speak, is the one exception to
"nothing else is sent": see section 12.)

The file reads in the order a packet travels; sections 1-7 are the whole tunnel, the C
original's program in Python, and everything after them is optional:
    1. constants   2. the device (tun_alloc)   3. the TCP link   4. framing
    5. the two directions (tap2net, net2tap)   6. the select loop (relay)
    7. server and client (serve, run_client)
    8. TLS (--tls)     9. who gets the server's one slot (admission)
    10. --addr/--mtu   11. what a packet is, what a receive brought (-dd, -ddd)
    12. segmentation offload (--offload)       13. the one-machine demo (--demo, --bench)
    14. the command line (main)
"""

import argparse
import errno
import heapq
import ipaddress
import itertools
import json
import logging
import os
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
import time

try:
    import fcntl
except ImportError:  # not a Unix at all: main() then refuses to run, in one line
    fcntl = None

__version__ = "1.1.0"

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

# The wire format
HEADER = struct.Struct("!H")  # the length, big-endian ("network order"), as the original's htons()
MAX_FRAME = 0xFFFF  # the largest length two bytes can state

# The largest packet a device can hand us: tun/tap MTUs stop at 65535, and a tap frame adds its
# 14-byte Ethernet header and perhaps a 4-byte VLAN tag. (The original read 2000 bytes at most.)
MAX_DEVICE_PACKET = 65535 + 14 + 4

# The relay loop
CALM = (True, False)  # what relay() watches when nothing waits to be sent: the device, not writability
MAX_BATCH = 64  # device packets read per wake-up before we send: bounds how long NET2TAP waits
OUT_LIMIT = 256 * 1024  # bytes queued for TCP before we stop reading the device; the kernel
#                         then drops packets at the device, as a busy network card would
RECV_SIZE = 256 * 1024  # bytes taken from TCP per receive: many frames per wake-up

# Noticing a peer that vanished without a word (power cut, cable pulled): keepalive probes
# after 20 s of silence, 4 probes 5 s apart; data unacknowledged for 40 s ends the connection.
KEEPALIVE_IDLE, KEEPALIVE_INTERVAL, KEEPALIVE_COUNT = 20, 5, 4
USER_TIMEOUT_MS = 40_000
CONNECT_TIMEOUT = 10  # seconds for the client's TCP connect
GOODBYE_TIME = 2  # seconds we wait for the peer's half of an orderly close (see close_link)


class UserError(Exception):
    """A problem the user can fix: main() prints it as one line and exits 1."""


class FrameError(Exception):
    """A byte stream that breaks the wire format: it ends in the middle of a frame."""


class PeerMismatch(Exception):
    """The peer runs with other options than this end (--offload, -u/-a): say which, end cleanly."""


class LinkReplaced(Exception):
    """A server's client gives its place to a newer one that proved itself (section 9)."""


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


class Tunnel:
    """One end's device, its -d level and its counters: all the loop needs besides the link."""

    def __init__(self, fd, name, tap=False, debug=0, offload=False):
        self.fd, self.name, self.tap, self.debug, self.offload = fd, name, tap, debug, offload
        self.read_size = OFFLOAD_READ_SIZE if offload else MAX_DEVICE_PACKET
        self.tap2net = self.tap2net_bytes = 0  # packets and bytes device -> network
        self.net2tap = self.net2tap_bytes = 0  # packets and bytes network -> device
        self.dropped = 0  # packets lost on the way: refused by the kernel or too long for the wire
        self.refusing = 0  # refusals since the device last accepted a packet
        self.served = False  # a peer has been relayed to at least once: worth a summary line

    def summary(self):
        """One line for the end of the run: packets and bytes each way."""
        return "%s: TAP2NET %d packets (%d bytes), NET2TAP %d packets (%d bytes), %d dropped" % (
            self.name, self.tap2net, self.tap2net_bytes, self.net2tap, self.net2tap_bytes, self.dropped)


# ---------------------------------------------------------------------------------------
# 3. The TCP link: listen_on(), connect_to(), Link, close_link()
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
            listener = socket.create_server((address, port), family=family, backlog=LISTEN_BACKLOG)
        elif socket.has_dualstack_ipv6():
            listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True,
                                            backlog=LISTEN_BACKLOG)
        else:
            listener = socket.create_server(("", port), backlog=LISTEN_BACKLOG)  # SO_REUSEADDR is set for us
    except socket.gaierror as err:
        raise UserError("cannot listen on %s: %s" % (address, err.strerror)) from None
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise UserError("port %d is already in use: is another server running? "
                            "(choose another port with -p)" % port) from None
        if err.errno == errno.EADDRNOTAVAIL:
            raise UserError("cannot listen on %s: no interface has that address" % address) from None
        raise UserError("cannot listen on port %d: %s" % (port, err.strerror)) from None
    listener.setblocking(False)  # accept() only when select() says someone is there
    return listener


def peer_address(sock):
    """The peer's IP address as a person writes it (an IPv4 client of an IPv6 socket loses '::ffff:')."""
    address = sock.getpeername()[0]
    return address[7:] if address.startswith("::ffff:") else address


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
    log.info("CLIENT: Connected to server %s", peer_address(sock))
    return sock


class Link:
    """One connection to the peer: its socket, the frames waiting to be sent, and its Deframer."""

    def __init__(self, sock, address, header=HEADER):
        self.sock, self.address, self.header = sock, address, header
        self.out = bytearray()  # frames read from the device, not yet taken by TCP
        self.deframer = Deframer(header, RECV_SIZE * (4 if header is OFFLOAD_HEADER else 1))
        self.ended = False  # the peer closed its side in an orderly way
        self.watching = None  # (device, writable) as registered with the selector: see watch_what_can_move()
        self.on_device = None  # the device's handler in relay()'s selector, while it watches the device
        self.tls = isinstance(sock, ssl.SSLSocket)


def close_link(sock, orderly=True, wait=GOODBYE_TIME):
    """Close a connection without a reset: say goodbye, then read until the peer says it too.

    Closing a socket that still holds unread bytes makes the kernel send a reset, and the
    peer then reports a broken connection instead of an orderly end. So: our goodbye, then
    discard what arrives until the peer's FIN, for `wait` s.
    """
    try:
        if start_goodbye(sock, orderly):
            deadline = time.monotonic() + wait
            while select.select([sock], [], [], max(0, deadline - time.monotonic()))[0]:
                if not sock.recv(65536):
                    break
    except (OSError, ValueError):  # the peer is already gone: nothing left to say
        pass
    finally:
        sock.close()


def start_goodbye(sock, orderly):
    """Our half of a close: TLS close_notify (orderly ends only), then our FIN; False if the peer is gone."""
    try:
        if orderly and isinstance(sock, ssl.SSLSocket):
            tls_goodbye(sock)
        sock.shutdown(socket.SHUT_WR)
        return True
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------
# 4. Framing: frame(), Deframer -- no I/O here, so tests can call them directly
# ---------------------------------------------------------------------------------------

def longest_packet(header):
    """The longest packet a length field of this size can state: MAX_FRAME for the wire format's 2 bytes."""
    return 256 ** header.size - 1


def frame(packet, header=HEADER):
    """Prefix a packet with its length: the bytes that go on the wire."""
    if len(packet) > longest_packet(header):
        raise FrameError("a %d-byte packet does not fit the %d-byte length of the wire format"
                         % (len(packet), header.size))
    return header.pack(len(packet)) + packet


class Deframer:
    """Cut a TCP byte stream back into packets.

    TCP keeps no message boundaries: one receive may end inside a frame, or hold many. The
    Deframer owns one buffer that every receive fills (space(), then cut(n)); cut() yields the
    completed packets as memoryviews of that buffer (no copy). An unfinished frame at the end
    stays where it is while the rest of the buffer can still hold the longest frame, and only
    then moves to the front: so it never holds more than one frame beyond what one receive
    brought, and rarely copies. feed(bytes) does the same for callers that hold bytes.
    """

    def __init__(self, header=HEADER, size=None):
        self.header = header
        size = size or RECV_SIZE
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.start = self.end = 0  # buffer[start:end]: received bytes not cut into packets yet
        self.frames = 0  # whole frames cut so far
        # The longest packet this end takes: what the length can state, as far as the buffer holds it.
        self.max_packet = min(size // 2, longest_packet(header))
        self.longest_frame = header.size + self.max_packet

    def space(self):
        """The part of the buffer the next receive may fill."""
        if self.start == self.end:  # every frame was cut: start again at the front, nothing to move
            self.start = self.end = 0
        elif len(self.buffer) - self.start < self.longest_frame:
            # The frame that waits might not fit behind where it starts: move it to the front
            # (the packets cut before it are written already).
            waiting = self.end - self.start
            self.buffer[:waiting] = self.view[self.start:self.end]
            self.start, self.end = 0, waiting
        return self.view[self.end:]

    def cut(self, count):
        """`count` bytes were received into space(): yield the packets they completed."""
        self.end += count
        header, size, buffer = self.header, self.header.size, self.buffer
        while self.end - self.start >= size:
            (length,) = header.unpack_from(buffer, self.start)
            if length > self.max_packet:
                raise FrameError("a frame says it is %d bytes long: more than this end takes (%d); "
                                 "is the peer running another wire format?" % (length, self.max_packet))
            packet_start = self.start + size
            if packet_start + length > self.end:
                return
            self.start = packet_start + length
            self.frames += 1
            yield self.view[packet_start:self.start]

    def take(self, data):
        """Bytes received somewhere else (a server's newcomer sent them): they are cut with the next receive."""
        space = self.space()
        space[:len(data)] = data
        self.end += len(data)

    def feed(self, data):
        """Add received bytes; return the packets they completed (bytes; maybe none, maybe many)."""
        packets, data = [], memoryview(data)
        while data:
            count = min(len(self.space()), len(data))
            self.take(data[:count])
            packets += [bytes(packet) for packet in self.cut(0)]
            data = data[count:]
        return packets

    def preview(self, count):
        """What `count` bytes received into space() will complete, without cutting anything:
        (whole frames, bytes left over, the full size of the frame those begin, or None)."""
        start, end, size = self.start, self.end + count, self.header.size
        frames = 0
        while end - start >= size:
            frame_size = size + self.header.unpack_from(self.buffer, start)[0]
            if start + frame_size > end:
                return frames, end - start, frame_size
            start += frame_size
            frames += 1
        return frames, end - start, None

    def peek(self, count, size):
        """The first `size` bytes waiting to be cut, once `count` bytes were received into space()."""
        return bytes(self.view[self.start:min(self.end + count, self.start + size)])

    def waiting(self):
        """Bytes of an unfinished frame held for the next receive."""
        return self.end - self.start

    def close(self):
        """The stream has ended: raise FrameError if it ended in the middle of a frame."""
        waiting = self.waiting()
        if not waiting:
            return
        size = self.header.size
        if waiting < size:
            raise FrameError("connection ended in the middle of a frame header (%d of %d bytes)"
                             % (waiting, size))
        (length,) = self.header.unpack_from(self.buffer, self.start)
        raise FrameError("connection ended in the middle of a frame (%d of %d bytes)"
                         % (waiting, size + length))


# ---------------------------------------------------------------------------------------
# 5. The two directions: tap2net(), net2tap()
# ---------------------------------------------------------------------------------------

def tap2net(tunnel, link):
    """TAP2NET: read packets from the device until it is empty (or a batch is full); send them framed."""
    fd, debug, out, header = tunnel.fd, tunnel.debug, link.out, link.header  # looked up once per batch
    limit = longest_packet(header)
    for _ in range(MAX_BATCH):
        try:
            packet = os.read(fd, tunnel.read_size)
        except BlockingIOError:
            break
        except OSError as err:  # EBADFD: the device was deleted under us; nothing more will come
            raise UserError("cannot read from %s: %s (was the device removed?)"
                            % (tunnel.name, err.strerror)) from None
        size = len(packet)
        tunnel.tap2net += 1
        if debug:
            log.debug("TAP2NET %d: Read %d bytes from the tap interface", tunnel.tap2net, size)
            if debug > 1:
                log_packet("TAP2NET", tunnel, packet, header)
        if size > limit:
            tunnel.dropped += 1
            log.warning("TAP2NET %d: dropped: a %d-byte packet does not fit the %d-byte length of the "
                        "wire format (lower the MTU of %s)", tunnel.tap2net, size, header.size, tunnel.name)
            continue
        out += header.pack(size)  # two appends, not frame(): saves copying the packet once more
        out += packet
        tunnel.tap2net_bytes += size
        if debug:
            log.debug("TAP2NET %d: Written %d bytes to the network", tunnel.tap2net, size)
        if len(out) >= OUT_LIMIT:
            break
    if out:  # send right away, in the same wake-up: a frame never waits for the next one
        send_queued(link)


def net2tap(tunnel, link):
    """NET2TAP: receive what TCP has; write each packet it completes to the device, one write each."""
    count = receive(link)
    if count is None:  # nothing there after all
        return
    deframer = link.deframer
    if not count:  # the end of the stream: orderly, unless it ends inside a frame
        deframer.close()
        link.ended = True
        return
    fd, debug = tunnel.fd, tunnel.debug
    if not deframer.frames:  # the first frame says what kind of peer this is
        check_first_frame(tunnel, deframer, count)
    if debug > 1:
        log_receive(deframer, count)
    for packet in deframer.cut(count):
        size = len(packet)
        tunnel.net2tap += 1
        if debug:
            log.debug("NET2TAP %d: Read %d bytes from the network", tunnel.net2tap, size)
            if debug > 1 and size:
                log_packet("NET2TAP", tunnel, packet)
        if not size:  # the kernel would refuse it; the C original would die on it
            if debug:
                log.debug("NET2TAP %d: skipped an empty frame", tunnel.net2tap)
            continue
        writing = time.monotonic() if debug else 0  # the moment the packet reaches the device: see stamped()
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
            log.debug("NET2TAP %d: Written %d bytes to the tap interface", tunnel.net2tap, size,
                      extra={"happened": writing})


# "Not now, ask select() again": a full or empty socket, or (TLS) an incomplete record
WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


def send_queued(link):
    """Send as much of the queued frames as the socket takes now -- many in one call -- and drop what went."""
    try:
        sent = link.sock.send(link.out)
    except WOULD_BLOCK:  # the socket buffer is full: select() tells us when it drains
        return
    del link.out[:sent]


def receive(link):
    """Receive into the deframer's buffer; return the byte count (0: the stream ended), None if nothing came."""
    try:
        return link.sock.recv_into(link.deframer.space())
    except WOULD_BLOCK:
        return None


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

def relay(tunnel, link, room=None):
    """Copy packets both ways between the device and the link, until the link ends.

    Returns when the peer closes in an orderly way; raises FrameError if it vanished in the
    middle of a frame, OSError (ssl.SSLError included) if the connection broke. A server
    passes its waiting `room` (section 9): the loop then also admits newcomers, and raises
    LinkReplaced when one of them takes this link's place.
    """
    with selectors.DefaultSelector() as selector:
        # Each fd is registered with the function that handles it: tap2net() for the device,
        # link_ready() for the connection, the room's own handlers for everyone else.
        link.on_device = lambda events: tap2net(tunnel, link)
        selector.register(link.sock, selectors.EVENT_READ, lambda events: link_ready(tunnel, link, events))
        if room:
            room.watch(selector, link)
        while not link.ended:
            if link.out or link.watching is not CALM:  # the usual case costs one test per wake-up
                watch_what_can_move(selector, tunnel, link)
            # No timeout: an idle tunnel sleeps here until there is work. (EINTR is retried for us.)
            # Only a newcomer's deadline sets one.
            for key, events in selector.select(room.timeout() if room else None):
                key.data(events)
            if room:
                room.expire()


def link_ready(tunnel, link, events):
    """The connection can move bytes: send what is queued, receive what has come."""
    if events & selectors.EVENT_WRITE:
        send_queued(link)
    if events & selectors.EVENT_READ:
        net2tap(tunnel, link)
        while link.tls and decrypted_waiting(link.sock) and not link.ended:  # see section 8
            net2tap(tunnel, link)


def watch_what_can_move(selector, tunnel, link):
    """Watch the device only while the outgoing queue has room, the socket for writing only while
    frames wait: when the peer stops reading, we stop reading the device but keep receiving, since
    the peer may be waiting for us to drain its data before it can drain ours."""
    wanted = (len(link.out) < OUT_LIMIT, bool(link.out))
    if wanted == CALM:
        wanted = CALM  # the very object, so that relay() can tell it at a glance
    if wanted == link.watching:
        link.watching = wanted
        return
    device, writable = wanted
    if link.watching is None or device != link.watching[0]:
        if device:
            selector.register(tunnel.fd, selectors.EVENT_READ, link.on_device)
        elif link.watching is not None:
            selector.unregister(tunnel.fd)
    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if writable else 0)
    selector.modify(link.sock, events, selector.get_key(link.sock).data)
    link.watching = wanted


# ---------------------------------------------------------------------------------------
# 7. Server and client: serve(), run_client()
# ---------------------------------------------------------------------------------------

def serve(tunnel, args, tls=None):
    """Server: serve one client at a time; when it leaves, keep the device and serve the next."""
    with listen_on(args.port, args.bind) as listener:
        log.info("SERVER: listening on port %d", args.port)
        room = WaitingRoom(listener, tunnel, tls)  # who may take the one client slot: section 9
        try:
            while True:
                link = room.next_client()
                try:
                    relay_until_closed(tunnel, link, "SERVER", room)
                except KeyboardInterrupt:  # Ctrl-C or SIGTERM: an orderly goodbye before we go
                    close_link(link.sock)
                    raise
                room.leave(link)
                log.debug("SERVER: waiting for the next client")
        finally:
            room.close()


def run_client(tunnel, args, tls=None):
    """Client: relay until the server goes away; exit status 0 if it closed cleanly, else 1."""
    sock = connect_to(args.client, args.port)
    try:
        if tls:
            sock = secure_client(sock, tls)
        link = Link(sock, args.client, OFFLOAD_HEADER if tunnel.offload else HEADER)
        if tunnel.offload:
            try:
                greet_server(link)
            except PeerMismatch as err:
                log.warning("CLIENT: %s", err)
                return 1
        tunnel.served = True
        return 0 if relay_until_closed(tunnel, link, "CLIENT") else 1
    finally:
        close_link(sock)


def relay_until_closed(tunnel, link, side, room=None):
    """Run relay() on one link; log how it ended in one line; True if it ended in an orderly way."""
    try:
        relay(tunnel, link, room)
    except FrameError as err:
        log.warning("%s: the peer vanished: %s", side, err)
    except (PeerMismatch, LinkReplaced) as err:
        log.warning("%s: %s", side, err)
    except OSError as err:  # ssl.SSLError is one too: see explain_tls_ending()
        log.warning("%s: %s", side, explain_tls_ending(err, link) if isinstance(err, ssl.SSLError)
                    else "connection lost: %s" % (err.strerror or err))
    else:
        if link.deframer.frames or side == "SERVER":
            log.warning("%s: the peer closed the connection", side)
            return True
        # A client the server never sent a frame to was probably not served at all.
        log.warning("CLIENT: the server closed the connection without sending a packet: it serves one "
                    "client at a time (is another one connected?), or runs with other options "
                    "(--tls, --offload, -u/-a); its log says which")
    return False


# =======================================================================================
# Everything below is an extra: the options and safeguards the tunnel above calls on,
# each from one or two places. Read the tunnel first; come here when a call leads here.
# =======================================================================================

# ---------------------------------------------------------------------------------------
# 8. TLS (--tls): tls_context(), secure_client(), tls_goodbye(), decrypted_waiting()
#    Both ends hold a certificate and its key; each accepts exactly one certificate from the
#    other (the same one, unless --tls-peer names another). No CA, no host names: holding the
#    key is what makes a host a member of the private network. (The server's handshakes run
#    side by side in section 9, never one after another.)
# ---------------------------------------------------------------------------------------

PEM_CERTIFICATE = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
HANDSHAKE_TIMEOUT = 5  # seconds for a TLS handshake (and, with --offload, the greeting after it)
TLS_HANDSHAKE_RECORD = (b"\x16\x03\x01", b"\x16\x03\x02", b"\x16\x03\x03")  # how a ClientHello starts
OP_IGNORE_UNEXPECTED_EOF = getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0x80)  # SSL_OP_IGNORE_UNEXPECTED_EOF, openssl/ssl.h


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


def wrap_tls(sock, tls, server_side):
    """Start TLS on a connection (the handshake runs later); a ragged end stays an error."""
    context, _ = tls
    # suppress_ragged_eofs=False: a connection that ends without close_notify was cut, not
    # closed (a killed peer, or someone forging a FIN); only close_notify is an orderly end.
    return context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                               suppress_ragged_eofs=False)


def pinned(tls_sock, tls):
    """True if the peer's certificate is exactly the pinned one (the chain check alone also
    accepts any certificate the pinned one signed)."""
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


def cut_without_goodbye(err):
    """True if a TLS error says the TCP connection ended with no close_notify before it: SSLEOFError,
    or (some Python builds) an SSLError that carries OpenSSL 3's own reason for it."""
    return isinstance(err, ssl.SSLEOFError) or "UNEXPECTED_EOF" in (getattr(err, "reason", None) or "")


def explain_tls_ending(err, link):
    """One line for a TLS connection that ended without an orderly goodbye."""
    if cut_without_goodbye(err):
        if not link.deframer.frames:
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
    except socket.timeout:
        sock.close()
        raise UserError("CLIENT: no TLS handshake within %d s: does the server run with --tls?"
                        % HANDSHAKE_TIMEOUT) from None
    except OSError as err:  # ssl.SSLError included
        sock.close()
        raise UserError("CLIENT: %s" % explain_tls(err)) from None
    if not pinned(sock, tls):
        sock.close()
        raise UserError("CLIENT: the server's certificate is not the pinned one (--tls-peer)")
    sock.setblocking(False)
    log.debug("CLIENT: %s with the pinned server, %s", sock.version(), sock.cipher()[0])
    return sock


def tls_goodbye(sock):
    """Send TLS close_notify, so the peer can tell an orderly end from a cut connection."""
    try:
        sock.unwrap()  # sends close_notify; waiting for the peer's is close_link()'s job
    except (ssl.SSLError, OSError, ValueError):  # SSLWantRead: ours is sent, theirs not here yet
        pass


def decrypted_waiting(sock):
    """Bytes a TLS socket has already decrypted: select() cannot see them, the kernel has no more."""
    return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


# ---------------------------------------------------------------------------------------
# 9. Who gets the server's one client slot: WaitingRoom, first_frame_verdict()
#
#    The server accepts every connection at once, even while it serves a client, and keeps
#    it in a bounded waiting room with a deadline until it proves it is a tunnel end:
#      --tls       a completed handshake with the pinned certificate (handshakes run side
#                  by side, non-blocking); the newest proven connection takes the slot, even
#                  from a client that is still there: a restarted client is back at once.
#      plaintext   a first frame that is a plausible packet for the mode; an empty frame,
#                  noise, a TLS handshake or a port scanner is not. The client being served
#                  keeps the slot; a newcomer that proves itself meanwhile is turned away at
#                  once, and one that stays silent after PROOF_TIMEOUT s: the client hears
#                  the close, and says what it means.
#      --offload   the peer's greeting (section 12), after the handshake with --tls.
#    When the room is full the longest waiting newcomer leaves: a flood cannot keep a real
#    client out, and every newcomer's fate is one log line.
# ---------------------------------------------------------------------------------------

LISTEN_BACKLOG = 128  # connections the kernel queues before we accept them: we accept at once
MAX_NEWCOMERS = 32  # connections waiting to prove themselves at once; the oldest leaves for a new one
MAX_CLOSING = 64  # connections we are saying goodbye to at once (see close_link)
PROOF_TIMEOUT = 5  # seconds a plaintext newcomer may stay silent while another client is served
PROOF_BYTES = {"tun": 6, "tap": 14}  # how much of a first packet tells whether it is one (see below)


class Newcomer:
    """A connection that has not proven itself yet."""

    def __init__(self, sock, address, deadline):
        self.sock, self.address, self.deadline = sock, address, deadline
        self.arrived = time.monotonic()
        self.handshaking = isinstance(sock, ssl.SSLSocket)
        self.head = b""  # the first bytes it sent, until they decide


class WaitingRoom:
    """The server's listening socket, its newcomers and the connections it is closing."""

    def __init__(self, listener, tunnel, tls=None):
        self.listener, self.tunnel, self.tls = listener, tunnel, tls
        self.newcomers = {}  # socket -> Newcomer
        self.closing = {}  # socket -> deadline
        self.active = None  # the Link being served
        self.proven = None  # a Link that proved itself and waits for the slot
        self.selector = None

    # -- the loop's side: registration, deadlines ------------------------------------------

    def watch(self, selector, active=None):
        """Register the listener, the newcomers and the closing connections with a loop's selector."""
        self.selector, self.active = selector, active
        selector.register(self.listener, selectors.EVENT_READ, self.accept)
        for sock, newcomer in self.newcomers.items():
            selector.register(sock, selectors.EVENT_READ, self.handler(newcomer))
        for sock in self.closing:
            selector.register(sock, selectors.EVENT_READ, self.handler(sock))

    def handler(self, who):
        """The function the loop calls when a newcomer or a closing connection has something."""
        if isinstance(who, Newcomer):
            return lambda events: self.advance(who)
        return lambda events: self.drain(who)

    def timeout(self):
        """Seconds until the next deadline, or None if nothing waits for one."""
        if not self.newcomers and not self.closing:  # the usual case, once per wake-up: keep it cheap
            return None
        deadlines = [self.deadline_of(n) for n in self.newcomers.values()] + list(self.closing.values())
        deadlines = [d for d in deadlines if d is not None]
        return max(0, min(deadlines) - time.monotonic()) if deadlines else None

    def deadline_of(self, newcomer):
        """A handshake or a greeting has its own deadline; a silent plaintext newcomer has one only
        while another client is being served."""
        if newcomer.deadline is not None:
            return newcomer.deadline
        return newcomer.arrived + PROOF_TIMEOUT if self.active else None

    def expire(self):
        """Send away every newcomer whose time is up; close goodbyes that take too long."""
        if not self.newcomers and not self.closing:
            return
        now = time.monotonic()
        for newcomer in list(self.newcomers.values()):
            deadline = self.deadline_of(newcomer)
            if deadline is not None and now >= deadline:
                self.send_away(newcomer, self.what_is_missing(newcomer), orderly=False)
        for sock, deadline in list(self.closing.items()):
            if now >= deadline:
                self.forget(sock)

    def what_is_missing(self, newcomer):
        """Why a newcomer whose deadline passed is sent away."""
        if newcomer.handshaking:
            return "no TLS handshake within %d s: does it run with --tls?" % HANDSHAKE_TIMEOUT
        if self.tunnel.offload:
            return "no --offload greeting within %d s: it runs without --offload" % HANDSHAKE_TIMEOUT
        return "it sent no packet within %g s while %s is being served" % (
            PROOF_TIMEOUT, self.active.address if self.active else "another client")

    # -- newcomers -------------------------------------------------------------------------

    def next_client(self):
        """Wait, admitting newcomers, until one proves itself; return its Link."""
        with selectors.DefaultSelector() as selector:
            self.watch(selector)
            while not self.proven:
                for key, events in selector.select(self.timeout()):
                    key.data(events)
                self.expire()
        link, self.proven = self.proven, None
        self.selector = None
        self.tunnel.served = True
        return link

    def accept(self, events):
        """A newcomer knocks: let it in at once, and give it a deadline."""
        try:
            sock, _ = self.listener.accept()
        except OSError:  # it left before we got to it (or we are out of fds): nothing to do
            return
        try:
            tune_link(sock)
            address = peer_address(sock)
        except OSError:  # it reset the connection already
            sock.close()
            return
        if len(self.newcomers) >= MAX_NEWCOMERS:
            oldest = min(self.newcomers.values(), key=lambda n: n.arrived)
            self.send_away(oldest, "the waiting room is full (%d): the longest waiting leaves for %s"
                           % (MAX_NEWCOMERS, address), orderly=False)
        deadline = None
        if self.tls:
            sock = wrap_tls(sock, self.tls, server_side=True)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        elif self.tunnel.offload:
            send_greeting(sock)
            deadline = time.monotonic() + HANDSHAKE_TIMEOUT
        newcomer = Newcomer(sock, address, deadline)
        self.newcomers[sock] = newcomer
        self.selector.register(sock, selectors.EVENT_READ, self.handler(newcomer))
        log.debug("SERVER: connection from %s: waiting for it to prove itself (%s; %d waiting)", address,
                  "TLS handshake" if self.tls else "--offload greeting" if self.tunnel.offload
                  else "a first packet", len(self.newcomers))
        self.advance(newcomer)  # a TLS server speaks second, but try: it may all be there already

    def advance(self, newcomer):
        """A newcomer sent something: take the handshake a step further, or read its first bytes."""
        sock = newcomer.sock
        try:
            if newcomer.handshaking:
                sock.do_handshake()
                newcomer.handshaking = False
                if not pinned(sock, self.tls):
                    self.send_away(newcomer, "its certificate is not the pinned one (--tls-peer)", orderly=False)
                    return
                if not self.tunnel.offload:
                    self.admit(newcomer)
                    return
                send_greeting(sock)
            while True:  # TLS: the first bytes may already be decrypted, where select() cannot see them
                data = sock.recv(proof_size(newcomer.head, self.tunnel) - len(newcomer.head))
                if not data:
                    self.send_away(newcomer, "it closed the connection without greeting: it runs without --offload"
                                   if self.tunnel.offload and not newcomer.head else
                                   "it closed the connection after %d bytes, without proving itself"
                                   % len(newcomer.head), orderly=False)
                    return
                newcomer.head += data
                verdict = first_frame_verdict(newcomer.head, self.tunnel)
                if verdict == PROVEN:
                    self.admit(newcomer)
                    return
                if verdict != WAIT:
                    self.send_away(newcomer, verdict, orderly=True)
                    return
        except ssl.SSLWantWriteError:
            self.selector.modify(sock, selectors.EVENT_WRITE, self.handler(newcomer))
        except WOULD_BLOCK:
            self.selector.modify(sock, selectors.EVENT_READ, self.handler(newcomer))
        except OSError as err:  # ssl.SSLError is one too
            why = explain_tls(err) if isinstance(err, ssl.SSLError) else err.strerror or str(err)
            self.send_away(newcomer, why, orderly=False)

    def admit(self, newcomer):
        """A newcomer proved itself: it takes the slot, or (plaintext, slot taken) is turned away."""
        del self.newcomers[newcomer.sock]
        self.selector.unregister(newcomer.sock)
        holder = self.active or self.proven  # (two may prove themselves in one wake-up)
        if holder and not self.tls:
            log.warning("SERVER: turned away %s: it proved itself, but %s is being served "
                        "(one client at a time)", newcomer.address, holder.address)
            self.say_goodbye(newcomer.sock, orderly=True)
            return
        if self.proven:  # --tls: the newer of two proven in one wake-up takes the slot
            self.say_goodbye(self.proven.sock, orderly=True)
        link = Link(newcomer.sock, newcomer.address, OFFLOAD_HEADER if self.tunnel.offload else HEADER)
        if newcomer.head and not self.tunnel.offload:  # the start of its first frame: relayed as usual
            link.deframer.take(newcomer.head)
            log.debug("SERVER: %s proved itself with the first %d bytes of its first frame; they go on to "
                      "the device with the rest of that frame", newcomer.address, len(newcomer.head))
        self.proven = link
        log.info("SERVER: Client connected from %s%s", newcomer.address,
                 " (%s, pinned certificate)" % newcomer.sock.version() if self.tls else "")
        if self.active:
            raise LinkReplaced("%s proved itself with the pinned certificate: it replaces %s "
                               "(the newest authenticated client wins)" % (newcomer.address, self.active.address))

    def send_away(self, newcomer, why, orderly):
        """Log why a newcomer leaves, and close it."""
        del self.newcomers[newcomer.sock]
        if self.selector:
            self.selector.unregister(newcomer.sock)
        log.warning("SERVER: refused %s: %s", newcomer.address, why)
        self.say_goodbye(newcomer.sock, orderly=orderly and not newcomer.handshaking)

    # -- goodbyes --------------------------------------------------------------------------

    def leave(self, link):
        """The served client's link ended (its loop is gone): close it without stopping the server."""
        self.active = self.selector = None
        self.say_goodbye(link.sock, orderly=True)

    def say_goodbye(self, sock, orderly):
        """close_link() without waiting: our goodbye now, the peer's read by the loop, for GOODBYE_TIME s."""
        if not start_goodbye(sock, orderly):
            sock.close()
            return
        if len(self.closing) >= MAX_CLOSING:
            self.forget(min(self.closing, key=self.closing.get))
        self.closing[sock] = time.monotonic() + GOODBYE_TIME
        if self.selector:
            self.selector.register(sock, selectors.EVENT_READ, self.handler(sock))

    def drain(self, sock):
        """Read and discard what a closing connection still sends, until its end."""
        try:
            if sock.recv(65536):
                return
        except WOULD_BLOCK:
            return
        except (OSError, ValueError):
            pass
        self.forget(sock)

    def forget(self, sock):
        """Stop waiting for a closing connection's goodbye: close it."""
        del self.closing[sock]
        if self.selector:
            self.selector.unregister(sock)
        sock.close()

    def close(self):
        """The server stops: close everyone still waiting or closing."""
        for sock in list(self.newcomers) + list(self.closing):
            sock.close()
        self.newcomers.clear()
        self.closing.clear()


WAIT, PROVEN = "wait", "proven"


def proof_size(head, tunnel):
    """How many first bytes decide whether a newcomer's first frame is a packet for this end."""
    if tunnel.offload:
        return len(GREETING_FRAME)
    if len(head) < HEADER.size:
        return HEADER.size
    (length,) = HEADER.unpack_from(head)
    # enough to tell a packet's header, and an --offload peer's greeting (to name it)
    return HEADER.size + min(length, max(PROOF_BYTES["tap" if tunnel.tap else "tun"], len(GREETING)))


def first_frame_verdict(head, tunnel):
    """WAIT for more bytes, PROVEN, or why the first bytes a newcomer sent are not a tunnel end's."""
    if head.startswith(TLS_HANDSHAKE_RECORD):
        return "it began a TLS handshake: it runs with --tls, this end without"
    if len(head) < proof_size(head, tunnel):
        return WAIT
    if tunnel.offload:
        return PROVEN if head == GREETING_FRAME else "it runs without --offload (or is the C simpletun)"
    packet = head[HEADER.size:]
    (length,) = HEADER.unpack_from(head)
    if head == GREETING_FRAME:
        return "it runs with --offload, this end without"
    if length == 0:
        return "its first frame is empty: that is not a packet"
    return packet_mismatch(packet, length, tunnel.tap) or PROVEN


def packet_mismatch(packet, length, tap):
    """Why the start of a `length`-byte packet cannot be one for this mode, or None if it can."""
    looks_ip = looks_like_ip(packet, length)
    if tap:
        if length < PROOF_BYTES["tap"]:
            return "its first frame (%d bytes) is too short for an Ethernet frame" % length
        if looks_ip:
            return "its first frame is an IP packet, not an Ethernet frame: it runs in tun mode (-u), this end in tap (-a)"
        return None
    if looks_ip:
        return None
    return "its first frame (%d bytes) is not an IP packet: noise, or a peer in tap mode (-a) while this end is tun" % length


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


# ---------------------------------------------------------------------------------------
# 10. Setting up the device (--addr, --mtu): configure_device()
# ---------------------------------------------------------------------------------------

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
# IPv4's smallest MTU; the largest a tun device takes, and a tap device (its MTU leaves room
# for the 14-byte Ethernet header within 65535: drivers/net/tun.c sets max_mtu so)
MIN_MTU, MAX_MTU, MAX_TAP_MTU = 68, 65535, 65535 - 14


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


# ---------------------------------------------------------------------------------------
# 11. Saying what a packet is and what a receive brought (-dd), and the bytes on the wire (-ddd):
#     describe(), log_packet(), log_receive()
#     Only called when -dd is on; bad or cut-off bytes get an honest description, never an error.
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
WIRE_BYTES = 24  # -ddd shows this many bytes of each packet after its length


def log_packet(direction, tunnel, packet, header=None):
    """-dd: say what a packet is; -ddd, on the way out: show its frame's first bytes as they go on the wire."""
    count = tunnel.tap2net if direction == "TAP2NET" else tunnel.net2tap
    log.debug("%s %d: %s", direction, count, describe(packet, tunnel.tap, tunnel.offload))
    if header and tunnel.debug > 2:
        log.debug("%s %d: on the wire: [%s] %s%s", direction, count, header.pack(len(packet)).hex(" "),
                  bytes(packet[:WIRE_BYTES]).hex(" "), " ..." if len(packet) > WIRE_BYTES else "")


def log_receive(deframer, count):
    """-dd: what one receive brought: bytes, the frames they complete, a frame left unfinished."""
    frames, rest, frame_size = deframer.preview(count)
    if not rest:
        unfinished = "nothing left over"
    elif frame_size is None:
        unfinished = "%d byte(s) of the next frame's length wait for the next receive" % rest
    else:
        unfinished = "%d of the next frame's %d bytes wait for the next receive" % (rest, frame_size)
    log.debug("NET2TAP: a receive brought %d bytes from TCP: %d whole frame(s); %s", count, frames, unfinished)


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
    """An IP packet, by its version nibble: IPv4, IPv6, or neither."""
    version = packet[0] >> 4 if packet else None
    if version == 4:
        return describe_ipv4(packet)
    if version == 6:
        return describe_ipv6(packet)
    return "not an IP packet (%d bytes)" % len(packet)


def describe_ipv4(packet):
    """An IPv4 packet: addresses, then what it carries."""
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
    """An IPv6 packet: addresses, then what it carries behind any extension headers."""
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
# 12. Segmentation offload (--offload): set_offload(), greetings, describe_offloaded()
#
#     Per packet, each end pays a device read or write and the inner TCP stack's work, so
#     the way to go faster is fewer, bigger packets. With IFF_VNET_HDR and TUNSETOFFLOAD the
#     kernel hands a TCP stream to the device as "super-packets" of up to 64 KiB, each with
#     a 10-byte virtio_net_hdr in front saying how to cut it into MTU-sized segments (and that
#     its checksums are left unfinished). The peer writes header and super-packet unchanged;
#     its kernel cuts it up, or delivers it whole. A read can be longer than the 2-byte length
#     can state, so this mode frames with a 4-byte length: only two simpletun.py ends with
#     --offload speak it. Each end's first frame, in the default format, is GREETING, so
#     that a mismatch is named at once on both ends. Checksums travel unfinished; the outer
#     TCP checksum (and with --tls, TLS) guards the bytes on the way.
# ---------------------------------------------------------------------------------------

IFF_VNET_HDR = 0x4000  # each read/write starts with a struct virtio_net_hdr
TUNSETOFFLOAD = 0x400454D0  # _IOW('T', 208, unsigned int): which offloads the device may hand us
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08  # unfinished checksums; TCP super-packets
TUN_F_USO4, TUN_F_USO6 = 0x20, 0x40  # UDP super-packets (Linux 6.2 and newer)
# struct virtio_net_hdr (linux/virtio_net.h), little-endian on the machines we run on:
VIRTIO_NET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GSO_KINDS = {1: "TCP segment offload", 3: "UDP fragmentation offload", 4: "TCP segment offload",
             5: "UDP segment offload"}  # VIRTIO_NET_HDR_GSO_TCPV4, _UDP, _TCPV6, _UDP_L4
GSO_ECN = 0x80
OFFLOAD_HEADER = struct.Struct("!I")  # the 4-byte length this mode frames with
OFFLOAD_READ_SIZE = 128 * 1024  # a super-packet is at most 64 KiB; room for the headers and more
GREETING_TIMEOUT = 4  # seconds the client waits for the server's greeting: a mismatch is named within 5 s
GREETING = b"simpletun+GSO"  # 13 bytes: shorter than an Ethernet header, and its first byte
#                              (0x73) is no IP version: a C original writes it to its device, which refuses it
GREETING_FRAME = frame(GREETING)  # as it goes on the wire, 2-byte length first


def set_offload(fd, enabled):
    """Let the device hand us super-packets (or, plain mode, stop: a persistent device keeps the
    setting of its last user, and a reader without the virtio header would get unfinished TCP)."""
    if not enabled:
        fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        return
    flags = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
    try:
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags | TUN_F_USO4 | TUN_F_USO6)
    except OSError:  # an older kernel: TCP only
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)


def send_greeting(sock):
    """Say "this end runs --offload" as an ordinary short frame of the default format."""
    sock.sendall(GREETING_FRAME)  # 15 bytes into an empty socket buffer: never blocks


def greet_server(link):
    """Client, --offload: greet, then read the server's greeting (the original's read_n) within 5 s."""
    send_greeting(link.sock)
    expected, head = GREETING_FRAME, b""
    deadline = time.monotonic() + GREETING_TIMEOUT
    while len(head) < len(expected):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([link.sock], [], [], left)[0] and not decrypted_waiting(link.sock):
            raise PeerMismatch("no --offload greeting from the server within %d s: it runs without --offload "
                               "(or is the C simpletun)" % GREETING_TIMEOUT)
        try:
            data = link.sock.recv(len(expected) - len(head))
        except WOULD_BLOCK:
            continue
        if not data:
            raise PeerMismatch("the server closed the connection instead of greeting: it runs without "
                               "--offload (its log says so)")
        head += data
        if not expected.startswith(head):
            raise PeerMismatch("the server runs without --offload: its first frame is not the greeting")
    log.debug("CLIENT: the server runs --offload too: frames carry a 4-byte length from here on")


def check_first_frame(tunnel, deframer, count):
    """Plain mode: the first frame on a link may be an --offload peer's greeting; say so, end cleanly."""
    if deframer.header is HEADER and deframer.peek(count, len(GREETING_FRAME)) == GREETING_FRAME:
        raise PeerMismatch("the peer runs with --offload, this end without: start both ends with "
                           "--offload, or neither")


def describe_offloaded(packet, tap):
    """-dd with --offload: the packet behind the virtio header, and how the kernel will cut it."""
    if len(packet) < VIRTIO_NET_HDR.size:
        return "virtio header truncated (%d bytes)" % len(packet)
    _, gso_type, _, gso_size, _, _ = VIRTIO_NET_HDR.unpack_from(packet)
    inner = packet[VIRTIO_NET_HDR.size:]
    text = describe_ethernet(inner) if tap else describe_ip(inner)
    kind = GSO_KINDS.get(gso_type & ~GSO_ECN)
    if not kind or not gso_size:
        return text
    payload = len(inner) - headers_size(inner, tap)
    return "%s; %s: %d segments of %d" % (text, kind, -(-payload // gso_size), gso_size)


def headers_size(packet, tap):
    """Bytes of Ethernet, IP and TCP/UDP headers at the start of a packet (0 if it cannot tell)."""
    start = ETHERNET.size if tap else 0
    ip = packet[start:]
    if len(ip) < 20:
        return 0
    if ip[0] >> 4 == 4:
        size, protocol = (ip[0] & 0x0F) * 4, ip[9]
    elif ip[0] >> 4 == 6 and len(ip) >= IPV6.size:
        size, protocol = IPV6.size, ip[6]
    else:
        return 0
    if protocol == TCP and len(ip) >= size + 13:
        return start + size + (ip[size + 12] >> 4) * 4
    return start + size + (8 if protocol == UDP else 0)


# ---------------------------------------------------------------------------------------
# 13. The whole tunnel on one machine: demo(), Timeline, ping(), the lossy cable, the bench
#     Two network namespaces stand in for two hosts, a veth pair for the cable between them.
# ---------------------------------------------------------------------------------------

DEMO_PREFIX = "simpletun-demo-"  # namespaces are named DEMO_PREFIX + our pid + "-s" / "-c"
DEMO_UNDERLAY = {"server": "192.0.2.1/24", "client": "192.0.2.2/24"}  # the "physical" network
DEMO_TUNNEL = {"server": "10.0.0.1/24", "client": "10.0.0.2/24"}  # the private network
DEMO_PINGS = 3
DEMO_WAIT = 10  # seconds for each end to come up, and to go
BENCH_PORT, BENCH_SECONDS, BENCH_PINGS = 5201, 3, 20
ICMP_ECHO = struct.Struct("!BBHHH")  # type, code, checksum, identifier, sequence
ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY = 8, 0
STAMP = re.compile(r"@(\d+\.\d+) (.*)")  # how a demo's process stamps a line (see stamped())


def stamped(text, happened=None):
    """A line as the demo's processes print it: the time it happened (CLOCK_MONOTONIC, one clock for
    every namespace), so that the demo can put both ends' lines in the order they happened."""
    return "@%.6f %s" % (happened or time.monotonic(), text)


class Timeline:
    """The demo's one output: every process's lines, merged in the order they happened.

    Each end stamps a line when the event happens (a TAP2NET before the send, a NET2TAP after
    the receive), so ordering by stamp puts a packet's sending before its arrival. Lines wait
    HOLD seconds for an earlier line still in another process's pipe, then print one by one.
    """

    HOLD = 0.3

    def __init__(self):
        self.start = time.monotonic()
        self.waiting = []  # a heap of (stamp, arrival order, label, text)
        self.order = itertools.count()
        self.sources = {}  # pipe fd -> [label, unfinished line]
        self.lines = []  # (label, text) of every line so far, for until()

    def follow(self, label, process):
        """Merge the lines a process prints (stdout and stderr) into the timeline."""
        fd = process.stdout.fileno()
        os.set_blocking(fd, False)
        self.sources[fd] = [label, b""]

    def say(self, text):
        """A line of the demo's own."""
        for line in text.splitlines():
            self.add("demo", stamped(line))

    def add(self, label, line):
        """Queue a line, stamped by its process or, if not, now."""
        match = STAMP.match(line)
        stamp, text = (float(match.group(1)), match.group(2)) if match else (time.monotonic(), line)
        heapq.heappush(self.waiting, (stamp, next(self.order), label, text))
        self.lines.append((label, text))

    def saw(self, label, text):
        """True if the process `label` has printed a line holding `text`."""
        return any(label == who and text in line for who, line in self.lines)

    def pump(self, until=lambda: False, timeout=None):
        """Read and print lines until until() holds (True) or timeout s pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not until():
            if deadline is not None and time.monotonic() >= deadline:
                return False
            wait = self.HOLD / 3
            readable = select.select(list(self.sources), [], [], wait)[0] if self.sources else time.sleep(wait)
            for fd in readable or ():
                self.read(fd)
            self.emit(time.monotonic() - self.HOLD)
        return True

    def read(self, fd):
        """Take what a process printed; whole lines go on the timeline."""
        label, rest = self.sources[fd]
        data = os.read(fd, 65536)
        if not data:  # the process closed its output: it has ended
            del self.sources[fd]
            data = b"\n" if rest else b""
        lines = (rest + data).split(b"\n")
        if fd in self.sources:
            self.sources[fd][1] = lines.pop()
        for line in lines:
            if line:
                self.add(label, line.decode(errors="replace"))

    def emit(self, before):
        """Print, in order, every line that happened before `before`: one write per line."""
        while self.waiting and self.waiting[0][0] <= before:
            stamp, _, label, text = heapq.heappop(self.waiting)
            sys.stdout.write("%7.3f %-6s| %s\n" % (max(0.0, stamp - self.start), label, text))
        sys.stdout.flush()

    def flush(self):
        """Print every line still waiting: the processes have ended."""
        for fd in list(self.sources):
            while fd in self.sources and select.select([fd], [], [], 0.5)[0]:
                self.read(fd)
        self.emit(float("inf"))


def internet_checksum(data):
    """The ones' complement sum of 16-bit words that IP, ICMP, TCP and UDP use (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ping(address, count=DEMO_PINGS, timeout=2.0, interval=0.2, say=None):
    """Send ICMP echo requests to `address`; return the round trip times (None: no reply).

    What the ping command does, with a raw socket (root only): the demo cannot count on
    ping being installed. `say` prints a line per request and per reply.
    """
    identifier = os.getpid() & 0xFFFF
    times = []
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        for sequence in range(1, count + 1):
            payload = b"simpletun.py demo, echo request %d" % sequence
            header = ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, 0, identifier, sequence)
            checksum = internet_checksum(header + payload)
            if say:
                say("echo request to %s: icmp_seq=%d" % (address, sequence))
            sent = time.monotonic()
            sock.sendto(ICMP_ECHO.pack(ICMP_ECHO_REQUEST, 0, checksum, identifier, sequence) + payload,
                        (address, 0))
            times.append(None)
            while select.select([sock], [], [], max(0, sent + timeout - time.monotonic()))[0]:
                reply = sock.recv(65535)  # a raw socket hands us the IP header too
                kind, _, _, their_id, their_sequence = ICMP_ECHO.unpack_from(reply, (reply[0] & 0x0F) * 4)
                if (kind, their_id, their_sequence) == (ICMP_ECHO_REPLY, identifier, sequence):
                    times[-1] = time.monotonic() - sent
                    if say:
                        say("reply from %s: icmp_seq=%d time=%.2f ms" % (address, sequence, times[-1] * 1000))
                    break
            else:
                if say:
                    say("no reply from %s to icmp_seq=%d within %g s" % (address, sequence, timeout))
            time.sleep(interval)
    return times


def demo_ping(address, count=DEMO_PINGS):
    """The demo's pinger, run inside the client host: exit status 0 if every reply came back."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # the demo stops us like Ctrl-C
    try:
        times = ping(address, count, say=lambda text: print(stamped(text), flush=True))
    except KeyboardInterrupt:
        return 1
    except OSError as err:  # e.g. the tunnel's device went away under us
        print(stamped("ping: %s" % (err.strerror or err)), flush=True)
        return 1
    return 0 if all(t is not None for t in times) else 1


def ip_command(*args):
    """Run `ip ARGS...` (iproute2); a failure is a UserError carrying ip's own message."""
    result = subprocess.run(("ip",) + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            universal_newlines=True)
    if result.returncode != 0:
        raise UserError("ip %s: %s" % (" ".join(args), result.stderr.strip()))
    return result.stdout


def in_namespace(namespace, *command):
    """Run a command inside a namespace; return what it printed, or raise UserError with its message."""
    result = subprocess.run(("ip", "netns", "exec", namespace) + command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, universal_newlines=True)
    if result.returncode != 0:
        raise UserError("%s: %s" % (" ".join(command), result.stdout.strip()))
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


def lossy_cable_method(loss, delay):
    """How this machine can make the demo's cable lose or delay packets: 'netem', 'nft' or
    'iptables'; a UserError naming what is missing if it cannot. Decided before anything is built."""
    if shutil.which("tc") and (os.path.isdir("/sys/module/sch_netem") or shutil.which("modprobe") and
                               subprocess.run(["modprobe", "-q", "sch_netem"], stderr=subprocess.DEVNULL).returncode == 0):
        return "netem"
    if delay:
        raise UserError("--delay needs netem (tc qdisc ... netem), which this kernel does not have "
                        "(modprobe sch_netem fails); --loss alone works with nft or iptables")
    for command in ("nft", "iptables"):
        if shutil.which(command):
            return command
    raise UserError("--loss needs tc with netem (kernel module sch_netem), nft or iptables: this machine "
                    "has none (apt install nftables)")


def make_cable_lossy(namespaces, method, loss, delay):
    """Make every packet sent on the demo's cable, each way, be lost with probability loss %
    (and delayed by delay ms, netem only)."""
    for namespace in namespaces:
        if method == "netem":
            in_namespace(namespace, "tc", "qdisc", "add", "dev", "veth0", "root", "netem",
                         *(["loss", "%g%%" % loss] if loss else []), *(["delay", "%gms" % delay] if delay else []))
        elif method == "nft":  # numgen random: a random number per packet, 0..9999
            chance = "numgen random mod 10000 < %d " % round(loss * 100) if loss < 100 else ""
            in_namespace(namespace, "nft", "add table inet simpletun_demo; add chain inet simpletun_demo out "
                         "{ type filter hook output priority 0; policy accept; }; add rule inet simpletun_demo out "
                         "oifname veth0 %scounter drop" % chance)
        else:
            in_namespace(namespace, "iptables", "-A", "OUTPUT", "-o", "veth0", "-m", "statistic",
                         "--mode", "random", "--probability", "%g" % (loss / 100), "-j", "DROP")


def outer_retransmissions(namespace, port_filter):
    """Segments the tunnel's own TCP connection retransmitted, as ss -ti reports it (None: unknown)."""
    try:
        text = in_namespace(namespace, "ss", "-tiH", "state", "established", port_filter)
    except (UserError, OSError):
        return "an unknown number of"
    found = re.search(r"retrans:\d+/(\d+)", text)
    return found.group(1) if found else "0"


def start_in(namespace, command):
    """Start a command inside a namespace, in a session of its own: a terminal's Ctrl-C reaches only
    the demo, which then stops everything in order."""
    return subprocess.Popen(["ip", "netns", "exec", namespace] + command, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def demo(args):
    """--demo: build two hosts, run a server and a client, ping through the tunnel, clean up."""
    if os.geteuid() != 0:
        raise UserError("--demo needs root, to make network namespaces: sudo ./simpletun.py --demo")
    if not shutil.which("ip"):
        raise UserError("--demo needs the ip command from iproute2 (apt install iproute2)")
    method = lossy_cable_method(args.loss, args.delay) if args.loss or args.delay else None
    remove_stale_demos()
    mode, device = ("tap", "tap0") if args.tap else ("tun", "tun0")
    ns = {side: "%s%d-%s" % (DEMO_PREFIX, os.getpid(), side[0]) for side in ("server", "client")}
    level = 0 if args.bench else args.debug or 2
    options = ["-i", device] + (["-" + "d" * level] if level else []) + (["-a"] if args.tap else []) + \
        (["--tls", os.path.abspath(args.tls)] if args.tls else []) + (["--offload"] if args.offload else [])
    ends = {"server": options + ["-s", "--addr", DEMO_TUNNEL["server"]],
            "client": options + ["-c", DEMO_UNDERLAY["server"].split("/")[0], "--addr", DEMO_TUNNEL["client"]]}
    target = DEMO_TUNNEL["server"].split("/")[0]
    timeline = Timeline()
    timeline.say("two hosts, each a network namespace, joined by a veth pair (the \"physical\" network):\n"
                 "  server %s  veth0 %s  %s %s\n  client %s  veth0 %s  %s %s\n"
                 "a %s tunnel joins %s and %s%s"
                 % (ns["server"], DEMO_UNDERLAY["server"], device, DEMO_TUNNEL["server"],
                    ns["client"], DEMO_UNDERLAY["client"], device, DEMO_TUNNEL["client"], mode,
                    DEMO_TUNNEL["server"], DEMO_TUNNEL["client"],
                    "" if args.bench else "; the client pings %s through it" % target))
    running, crossed, interrupted = {}, False, False
    script = [sys.executable, os.path.abspath(__file__), "--timestamps"]
    try:
        build_demo_hosts(ns)
        if method:
            make_cable_lossy(ns.values(), method, args.loss, args.delay)
            timeline.say("the cable loses %g %% of packets each way%s (%s)" % (
                args.loss, ", delayed %g ms" % args.delay if args.delay else "", method))
        for side, ready in (("server", "SERVER: listening"), ("client", "CLIENT: Connected")):
            timeline.say("%s: simpletun.py %s" % (side, " ".join(ends[side])))
            running[side] = start_in(ns[side], script + ends[side])
            timeline.follow(side, running[side])
            if not timeline.pump(lambda: timeline.saw(side, ready) or running[side].poll() is not None, DEMO_WAIT) \
                    or running[side].poll() is not None:
                raise UserError("the demo's %s did not come up: see its lines above" % side)
        pinger = start_in(ns["client"], [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import simpletun; "
                                         "sys.exit(simpletun.demo_ping(%r))"
                                         % (os.path.dirname(os.path.abspath(__file__)), target)])
        timeline.follow("ping", pinger)
        running["ping"] = pinger
        timeline.pump(lambda: pinger.poll() is not None)
        crossed = pinger.returncode == 0
        if args.bench:
            bench(ns, timeline, mode)
        if args.keep:
            timeline.say(keep_instructions(ns, target))
            timeline.pump()  # until Ctrl-C or SIGTERM
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: clean up all the same, and say so
        interrupted = True
        timeline.say("interrupted: stopping both ends")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave things behind
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if method and "client" in running:
            timeline.say("the tunnel's own TCP connection retransmitted %s segment(s) from the client, %s from the "
                         "server (ss -ti)" % (outer_retransmissions(ns["client"], "( dport = :%d )" % PORT),
                                              outer_retransmissions(ns["server"], "( sport = :%d )" % PORT)))
        for side in ("ping", "client", "server"):  # both ends print their summary line on SIGTERM
            if side in running and running[side].poll() is None:
                running[side].terminate()
        timeline.pump(lambda: all(p.poll() is not None for p in running.values()), DEMO_WAIT)
        for process in running.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        timeline.flush()
        for name in ns.values():
            if name in ip_command("netns", "list"):
                remove_namespace(name)
        timeline.say("removed both namespaces and everything in them")
        timeline.flush()
    if interrupted and not args.keep:
        return 1
    if crossed:
        timeline.say("all %d echo requests crossed the tunnel and their replies came back" % DEMO_PINGS)
        timeline.flush()
        return 0
    timeline.say("FAILED: not every echo request came back through the tunnel")
    timeline.flush()
    return 1


def build_demo_hosts(ns):
    """Two namespaces, a veth pair between them, addressed and up."""
    for name in ns.values():
        ip_command("netns", "add", name)
    ip_command("-n", ns["server"], "link", "add", "veth0", "type", "veth",
               "peer", "name", "veth0", "netns", ns["client"])
    for side, name in ns.items():
        ip_command("-n", name, "addr", "add", DEMO_UNDERLAY[side], "dev", "veth0")
        ip_command("-n", name, "link", "set", "veth0", "up")
        ip_command("-n", name, "link", "set", "lo", "up")


def keep_instructions(ns, target):
    """--keep: commands to paste into another terminal (as root) to explore the two hosts."""
    c, s = ns["client"], ns["server"]
    commands = (("%s bash" % c, "a shell on the client host"),
                ("%s ping %s" % (c, target), "ping through the tunnel"),
                ("%s tcpdump -ni veth0 -X tcp port %d" % (s, PORT), "the frames inside TCP, on the cable"),
                ("%s ip route" % c, "the route into the tunnel"),
                ("%s ss -ti" % c, "the tunnel's TCP connection"))
    width = max(len(command) for command, _ in commands)
    return "the tunnel stays up until Ctrl-C; its lines keep coming here. In another terminal, as root:\n" + \
        "\n".join("  ip netns exec %-*s   %s" % (width, command, what) for command, what in commands)


def bench(ns, timeline, mode):
    """--bench: TCP throughput and ping round trips over the bare cable and through the tunnel."""
    here = os.path.dirname(os.path.abspath(__file__))

    def run(namespace, call):
        result = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-c",
                                 "import sys; sys.path.insert(0, %r); import simpletun; simpletun.%s" % (here, call)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                                timeout=BENCH_SECONDS * 10)
        if result.returncode:
            timeline.say("bench: %s failed: %s" % (call.split("(")[0], (result.stderr.strip().splitlines() or ["?"])[-1]))
            return None
        return json.loads(result.stdout)

    addresses = {side: {"underlay": DEMO_UNDERLAY[side].split("/")[0], "tunnel": DEMO_TUNNEL[side].split("/")[0]}
                 for side in ns}
    sink = start_in(ns["server"], [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import simpletun; "
                                   "simpletun.bench_sink(%d)" % (here, BENCH_PORT)])
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
    timeline.say("bench, %s mode:%s underlay   tunnel   tunnel vs underlay" % (mode, " " * 19))
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
        while True:
            sock, _ = listener.accept()
            with sock:
                received, buffer = 0, bytearray(1 << 20)
                while True:
                    count = sock.recv_into(buffer)
                    if not count:
                        break
                    received += count
                sock.sendall(b"%d" % received)


def bench_send(host, port, seconds):
    """--bench, in the client host: send as fast as TCP takes it for `seconds`; print Mbit/s as JSON."""
    chunk = bytes(1 << 18)
    deadline = time.monotonic() + DEMO_WAIT
    while True:  # the receiver in the other host may still be starting
        try:
            sock = socket.create_connection((host, port), timeout=10)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    with sock:
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


# ---------------------------------------------------------------------------------------
# 14. The command line: parse_args(), main()
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
               "  sudo ./simpletun.py --demo --keep                          ... and keep it up to explore\n"
               "  sudo ./simpletun.py --demo --bench                         what does the tunnel cost?\n"
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
                        help="set the device's MTU (%d-%d; tap: up to %d)" % (MIN_MTU, MAX_MTU, MAX_TAP_MTU))
    parser.add_argument("-d", "--debug", action="count", default=0,
                        help="log every packet, as the original did; -dd also says what each packet is "
                             "and what each receive brought; -ddd also shows each frame's first bytes on the wire")
    parser.add_argument("--tls", metavar="FILE",
                        help="encrypt and authenticate with TLS: FILE is one PEM file holding this end's "
                             "certificate and private key (see the README: Encryption)")
    parser.add_argument("--tls-peer", metavar="CERT",
                        help="with --tls: the peer's certificate, the only one accepted "
                             "(default: the certificate in the --tls FILE)")
    parser.add_argument("--bind", metavar="ADDR",
                        help="server: listen on this address only (default: all addresses)")
    parser.add_argument("--offload", action="store_true",
                        help="let the kernel hand over 64 KiB super-packets (TSO/GSO): several times the "
                             "throughput; both ends need it, and a C simpletun peer cannot take it")
    demo = parser.add_argument_group("the one-machine demo")
    demo.add_argument("--demo", action="store_true",
                      help="show the whole tunnel on this machine: two network namespaces, a server, "
                           "a client and pings through the tunnel, then clean up (root; with -a: tap; "
                           "-d/-ddd, --tls FILE, --offload are passed on to both ends)")
    demo.add_argument("--keep", action="store_true", help="keep the demo's hosts and tunnel up until Ctrl-C")
    demo.add_argument("--loss", metavar="PCT", type=number_between(0, 100, "a percentage", float), default=0,
                      help="the demo's cable loses PCT %% of packets each way")
    demo.add_argument("--delay", metavar="MS", type=number_between(0, 10000, "a delay in ms", float), default=0,
                      help="the demo's cable delays each packet MS ms (needs netem)")
    demo.add_argument("--bench", action="store_true",
                      help="measure TCP throughput and ping over the demo's cable and through its tunnel")
    parser.add_argument("--timestamps", action="store_true", help=argparse.SUPPRESS)  # the demo's ends: see stamped()
    parser.add_argument("--version", action="version", version="%(prog)s " + __version__)
    args = parser.parse_args(argv)
    if args.tap and args.mtu and args.mtu > MAX_TAP_MTU:
        parser.error("a tap device takes an MTU of at most %d (the Ethernet header must fit in 65535)" % MAX_TAP_MTU)
    if args.tls_peer and not args.tls:
        parser.error("--tls-peer needs --tls FILE (this end's certificate and key)")
    if args.demo:
        if args.iface or args.server or args.client or args.addr or args.tls_peer or args.bind or args.mtu:
            parser.error("--demo sets up both ends itself: it takes only -a, -d, --tls, --offload, "
                         "--keep, --loss, --delay and --bench")
        return args
    for flag in ("keep", "loss", "delay", "bench"):
        if getattr(args, flag):
            parser.error("--%s is for the demo (--demo --%s)" % (flag, flag))
    if args.iface is None:
        parser.error("an interface name is required (-i NAME)")
    if not (args.server or args.client):
        parser.error("choose server (-s) or client (-c HOST) mode")
    if args.bind and not args.server:
        parser.error("--bind is for the server (-s)")
    return args


class StampedFormatter(logging.Formatter):
    """Log lines stamped with the moment they happen (--timestamps, for the demo's Timeline)."""

    def format(self, record):
        """The line, with the moment it happened in front."""
        # A device write is logged once it succeeded, but it happened when it began: a reply
        # it caused may be printed by another process before our log call.
        return stamped(super().format(record), getattr(record, "happened", None))


def main(argv=None):
    """Run one end of the tunnel; return the exit status."""
    args = parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(StampedFormatter("%(message)s") if args.timestamps else logging.Formatter("%(message)s"))
    # -d: every packet; the demo's ends (--timestamps) also say when they connect, even without -d
    logging.basicConfig(handlers=[handler], level=logging.DEBUG if args.debug else
                        logging.INFO if args.timestamps else logging.WARNING)
    # SIGTERM ends the run like Ctrl-C: devices closed, summary printed, status 0.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    tunnel = None
    try:
        if not sys.platform.startswith("linux") or fcntl is None:
            raise UserError("simpletun.py runs on Linux only (it needs /dev/net/tun); this is %s"
                            % sys.platform)
        if args.demo:
            return demo(args)
        tls = tls_context(args.server, args.tls, args.tls_peer) if args.tls else None
        fd, name = tun_alloc(args.iface, (IFF_TAP if args.tap else IFF_TUN) | (IFF_VNET_HDR if args.offload else 0))
        tunnel = Tunnel(fd, name, args.tap, args.debug, args.offload)
        set_offload(fd, args.offload)
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
            if tunnel.served:  # an error before any peer came needs no second line
                log.warning("simpletun.py: %s", tunnel.summary())


if __name__ == "__main__":
    sys.exit(main())
