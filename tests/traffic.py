"""Traffic generator for the capture tests, run by a uniquely named copy of python.

usage: traffic.py MODE HOST PORT BYTES [CHUNK]
  tcp-up     connect, send BYTES, wait for the peer to close
  tcp-down   connect, ask for BYTES, receive them until the peer closes
  udp        send BYTES in CHUNK-sized datagrams with sendto(), receive each echo
             with recvfrom() (unconnected socket: the peer is only in the calls)
  udp-exit   send one datagram of BYTES and exit at once
  tcp-splice ask for BYTES and move them with splice() into a pipe (no recv calls)
  tcp-alternate  BYTES sequential uploads of 1000 + 7 * i bytes, to 127.0.0.1 and
             127.0.0.2 in turn (HOST is ignored); prints the list of them
  udp-steady send BYTES datagrams of CHUNK bytes, 100 a second, receiving each echo
Prints one JSON line: the socket's local address and port, bytes sent and received.
"""
import json
import os
import socket
import sys
import time


def family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp(host, port, up, n):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, port))
    header = f"{'up' if up else 'down'} {n}\n".encode()
    s.sendall(header)
    sent, received = len(header), 0
    if up:
        s.sendall(b"u" * n)
        sent += n
        s.shutdown(socket.SHUT_WR)
    while True:
        data = s.recv(65536)
        if not data:
            break
        received += len(data)
    return s, sent, received


def tcp_splice(host, port, n):
    s = socket.socket(family(host), socket.SOCK_STREAM)
    s.connect((host, port))
    header = f"down {n}\n".encode()
    s.sendall(header)
    r, w = os.pipe()
    null = os.open(os.devnull, os.O_WRONLY)
    received = 0
    while True:
        moved = os.splice(s.fileno(), w, 65536)
        if not moved:
            break
        received += moved
        os.splice(r, null, moved)
    return s, len(header), received


def udp(host, port, n, chunk):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(5)
    sent = received = 0
    while sent < n:
        size = min(chunk, n - sent)
        sent += s.sendto(b"d" * size, (host, port))
        data, _ = s.recvfrom(65536)
        received += len(data)
    return s, sent, received


def tcp_alternate(port, n):
    """One upload after another from this process: the kernel reuses the
    memory of each closed socket for the next one."""
    out = []
    for i in range(n):
        host = f"127.0.0.{1 + i % 2}"
        s, sent, _ = tcp(host, port, True, 1000 + 7 * i)
        out.append({"raddr": host, "laddr": s.getsockname()[0], "lport": s.getsockname()[1], "sent": sent})
        s.close()
    return out


def udp_steady(host, port, n, chunk):
    s = socket.socket(family(host), socket.SOCK_DGRAM)
    s.settimeout(5)
    sent = received = 0
    for _ in range(n):
        sent += s.sendto(b"s" * chunk, (host, port))
        received += len(s.recvfrom(65536)[0])
        time.sleep(0.01)
    return s, sent, received


def main(mode, host, port, n, chunk=1000):
    port, n, chunk = int(port), int(n), int(chunk)
    if mode == "tcp-alternate":
        print(json.dumps(tcp_alternate(port, n)), flush=True)
        return
    if mode == "udp-steady":
        s, sent, received = udp_steady(host, port, n, chunk)
        print(json.dumps({"lport": s.getsockname()[1], "sent": sent, "received": received}), flush=True)
        return
    if mode == "udp-exit":
        s = socket.socket(family(host), socket.SOCK_DGRAM)
        s.sendto(b"x" * n, (host, port))
        os._exit(0)
    if mode == "udp":
        s, sent, received = udp(host, port, n, chunk)
    elif mode == "tcp-splice":
        s, sent, received = tcp_splice(host, port, n)
    else:
        s, sent, received = tcp(host, port, mode == "tcp-up", n)
    laddr, lport = s.getsockname()[:2]
    print(json.dumps({"laddr": laddr, "lport": lport, "sent": sent, "received": received}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
