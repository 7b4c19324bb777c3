"""A one-request-per-connection server, one at a time (so that clients
wait in its accept queue): reads a line, waits DELAY ms, answers
"ok <line>" and closes. "quit" ends it; it then prints how many requests
it served.   reqserver.py PORT DELAY_MS"""
import socket
import sys
import time

port, delay = int(sys.argv[1]), int(sys.argv[2]) / 1000
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", port))
s.listen(32)
print("ready", flush=True)
served = 0
while True:
    c, _ = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(4096)
        if not d:
            break
        data += d
    time.sleep(delay)
    if data == b"quit\n":
        c.sendall(b"bye\n")
        c.close()
        break
    try:
        c.sendall(b"ok " + data)
    except OSError:
        pass
    c.close()
    served += 1
print("served", served, flush=True)
