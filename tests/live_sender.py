"""Sends UDP datagrams to a local port at a pace, for the live view's tests.

usage: live_sender.py PORT SIZE RATE SECONDS [RATE SECONDS ...]
  each RATE (datagrams a second) for its SECONDS, each datagram SIZE bytes,
  to 127.0.0.1:PORT from one socket. Prints one JSON line: its local port and
  the bytes sent.
"""
import json
import socket
import sys
import time


def main(port, size, steps):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.connect(("127.0.0.1", port))
    sent = 0
    for rate, seconds in steps:
        start = time.monotonic()
        for i in range(int(rate * seconds)):
            pause = start + i / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            sent += s.send(b"l" * size)
        time.sleep(max(0.0, start + seconds - time.monotonic()))
    print(json.dumps({"lport": s.getsockname()[1], "sent": sent}), flush=True)


if __name__ == "__main__":
    args = [float(a) for a in sys.argv[3:]]
    main(int(sys.argv[1]), int(sys.argv[2]), list(zip(args[0::2], args[1::2])))
