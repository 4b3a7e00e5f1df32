"""The far end of the benchmark, run inside the peer network namespace (and on
the host for loopback scenarios).

usage: peer.py PORT [basic|all]      prints "ready" once listening (IPv4 and IPv6)
  basic:
  TCP PORT    first line "up N" (read N bytes), "down N" (send N bytes) or
              "echo N" (send back what arrives, up to N bytes), then close
  UDP PORT    echo
  all (the default), also:
  UDP 443  echo      UDP 53  sink
  UDP PORT+1  "N SIZE" answers with N datagrams of SIZE bytes
"""
import socket
import sys
import threading


def bind(kind, port):
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind(("::", port))
    return s


def serve_tcp(conn):
    with conn:
        f = conn.makefile("rb")
        verb, n = f.readline().split()
        n = int(n)
        if verb == b"down":
            block = b"D" * 65536
            while n > 0:
                n -= conn.send(block[:min(n, len(block))])
            return
        while n > 0:
            data = f.read1(min(n, 65536))
            if not data:
                break
            n -= len(data)
            if verb == b"echo":
                conn.sendall(data)


def tcp_loop(port):
    s = bind(socket.SOCK_STREAM, port)
    s.listen(512)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_tcp, args=(conn,), daemon=True).start()


def udp_loop(port, answer):
    s = bind(socket.SOCK_DGRAM, port)
    while True:
        data, addr = s.recvfrom(65536)
        answer(s, data, addr)


def echo(s, data, addr):
    s.sendto(data, addr)


def burst(s, data, addr):
    count, size = (int(x) for x in data.split())
    block = b"B" * size
    for _ in range(count):
        s.sendto(block, addr)


if __name__ == "__main__":
    port = int(sys.argv[1])
    services = [(tcp_loop, (port,)), (udp_loop, (port, echo))]
    if sys.argv[2:] != ["basic"]:
        services += [(udp_loop, (443, echo)), (udp_loop, (53, lambda *_: None)), (udp_loop, (port + 1, burst))]
    for target, args in services:
        threading.Thread(target=target, args=args, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
