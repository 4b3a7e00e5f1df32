"""The far end for the capture tests: TCP source/sink and UDP echo, IPv4 and IPv6.

usage: peer.py PORT    (TCP on PORT, UDP echo on PORT; prints "ready")
A TCP client first sends "up N\\n" (then N bytes, which are read and dropped)
or "down N\\n" (then receives N bytes); the peer closes when done.
"""
import socket
import sys
import threading


def serve_tcp(conn):
    with conn:
        f = conn.makefile("rb")
        mode, n = f.readline().split()
        n = int(n)
        if mode == b"up":
            while n > 0:
                data = f.read(min(n, 65536))
                if not data:
                    break
                n -= len(data)
        else:
            block = b"D" * 65536
            while n > 0:
                n -= conn.send(block[:min(n, len(block))])


def tcp_loop(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    s.listen(64)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve_tcp, args=(conn,), daemon=True).start()


def udp_loop(port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    s.bind(("::", port))
    while True:
        data, addr = s.recvfrom(65536)
        s.sendto(data, addr)


if __name__ == "__main__":
    port = int(sys.argv[1])
    threading.Thread(target=udp_loop, args=(port,), daemon=True).start()
    threading.Thread(target=tcp_loop, args=(port,), daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()
