"""What each end of a TCP connection says of itself and of the other.
    peers.py serve ADDR PORT N   accept N connections; for each print
        "accept IP getpeername IP getsockname IP" (addresses only)
    peers.py connect HOST PORT   print "client getsockname IP getpeername IP"
A line of data goes each way, so that both ends are connected when they
look."""
import socket
import sys


def ip(a):
    return a[0]


if sys.argv[1] == "serve":
    host, port, n = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(8)
    print("listening", flush=True)
    for _ in range(n):
        c, a = s.accept()
        c.recv(100)
        c.sendall(b"x\n")
        print("accept", ip(a), "getpeername", ip(c.getpeername()), "getsockname", ip(c.getsockname()), flush=True)
        c.close()
else:
    host, port = sys.argv[2], int(sys.argv[3])
    c = socket.create_connection((host, port))
    c.sendall(b"x\n")
    c.recv(100)
    print("client getsockname", ip(c.getsockname()), "getpeername", ip(c.getpeername()), flush=True)
