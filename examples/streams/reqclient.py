"""N requests to HOST:PORT, one connection each: "TAG i\n", then either
shut writing and read the answer to its end (mode "shut", checked to be
"ok TAG i\n"), or close at once without reading (mode "gone"). Prints
"TAG failures F of N" and the first failures.
    reqclient.py HOST PORT N TAG shut|gone"""
import socket
import sys

host, port, n, tag, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
bad = []
for i in range(n):
    req = f"{tag} {i}\n".encode()
    try:
        c = socket.create_connection((host, port), timeout=60)
        c.sendall(req)
        if mode == "gone":
            c.close()
            continue
        c.shutdown(socket.SHUT_WR)
        got = b""
        while True:
            d = c.recv(4096)
            if not d:
                break
            got += d
        c.close()
        if got != b"ok " + req:
            bad.append(f"{i}: got {got!r}")
    except OSError as e:
        bad.append(f"{i}: {e}")
print(f"{tag} failures {len(bad)} of {n}", *bad[:5], flush=True)
